"""`haplo-export eval`: task accuracy on held-out clips of the synthetic world, per backend and precision."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from haplo.commands.common import POSITIVE, add_model_args, comma_list


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="understanding and generation accuracy on held-out clips, every backend side by side",
        description="Asks every backend and precision about the same held-out clips (colour, shape and "
        "direction parsed from the answer) and has it generate the same held-out captions (a detector "
        "finds the prompted colour and its direction of travel in the decoded video); prints a table, "
        "writes results.json and table.txt with --out.",
    )
    add_model_args(
        parser,
        "evaluate this bundle (torch reference from its source)",
        "seed of the preset's weights, the clips' order, the noise",
    )
    parser.add_argument(
        "--backends",
        default="torch,onnxruntime",
        help="comma list of torch, onnxruntime, tensorrt (default: %(default)s)",
    )
    parser.add_argument(
        "--precisions", default="fp32", help="comma list for onnxruntime/tensorrt: fp32, int8, fp8, ... (default: fp32)"
    )
    parser.add_argument(
        "--int8-weights",
        default="auto",
        choices=["auto", "full", "reduced"],
        help="INT8 weight range of the int8 bundles eval builds; reduced is what an AVX2-only CPU computes "
        "exactly, on any x86 CPU (default: %(default)s, by this CPU)",
    )
    parser.add_argument("--tasks", default="understanding,generation", help="comma list (default: %(default)s)")
    parser.add_argument("--clips", type=POSITIVE, default=96, help="held-out understanding clips (default: 96)")
    parser.add_argument("--prompts", type=POSITIVE, default=48, help="held-out generation captions (default: 48)")
    parser.add_argument("--steps", type=POSITIVE, help="DDIM steps per video (default: the config's)")
    parser.add_argument("--threads", type=POSITIVE, help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(".cache/haplo-eval"), help="bundles built for --precisions"
    )
    parser.add_argument("--out", type=Path, help="results directory: new, empty, or earlier results of this command")
    parser.add_argument("--json", action="store_true", help="print the result document instead of the table")
    parser.set_defaults(handler=run)
    return parser


def _options(args: argparse.Namespace):
    from haplo.bench.evaluation import EvalOptions

    return EvalOptions(
        preset=args.preset,
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        seed=args.seed,
        backends=comma_list(args.backends),
        precisions=comma_list(args.precisions),
        tasks=tuple(comma_list(args.tasks)),
        clips=args.clips,
        prompts=args.prompts,
        steps=args.steps,
        threads=args.threads,
        int8_weights=args.int8_weights,
        work_dir=args.work_dir,
    )


def run(args: argparse.Namespace) -> dict:
    from haplo.bench.evaluation import check_output, run_eval, table, write_outputs

    options = _options(args)
    options.check()
    if args.out is not None:
        check_output(args.out)  # before any work
    doc = run_eval(options)
    if args.out is not None:
        write_outputs(doc, args.out)
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    return doc
