"""`haplo-export`: the deployment tool's one entry point.

    haplo-export inspect  --preset haplo-omni-9b
    haplo-export build    --out bundles/haplo-mini                      (the shipped model)
    haplo-export build    --preset tiny --out bundles/tiny
    haplo-export run --bundle bundles/tiny understand --prompt "Describe the video." --video clip.mp4
    haplo-export run understand --prompt "Describe the video." --video clip.mp4   (PyTorch)
    haplo-export run generate   --prompt "A red square moves left." --out out/video.mp4
    haplo-export eval     --backends torch,onnxruntime --precisions fp32,int8
    haplo-export bench    --preset small --backends torch,onnxruntime --precisions fp32,int8
    haplo-export bench-serve --clients 1,16                              (haplo-serve under load)
    haplo-export kernels  --preset tiny --arch 90 --out kernels/sm_90

Every command works on the shipped, trained haplo-mini by default, a checkpoint directory
(`--checkpoint DIR`) or a built-in preset (`--preset`, randomly initialised with `--seed`).
Bad input ends with one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from haplo.commands import bench, bench_serve, build, evaluate, inspect, kernels, run
from haplo.commands.common import Parser, run_command

SUBCOMMANDS = (inspect, build, run, evaluate, bench, bench_serve, kernels)  # in the order `--help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-export", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
