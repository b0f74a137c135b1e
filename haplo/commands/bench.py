"""`haplo-export bench`: latency and throughput of every backend and precision, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from haplo.commands.common import (
    NON_NEGATIVE,
    POSITIVE,
    _number,
    add_model_args,
    comma_list,
    device_name,
    torch_device,
)
from haplo.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="latency/throughput of every backend and precision, side by side",
        description="Runs torch eager (the baseline), ONNX Runtime and TensorRT (when present) "
        "on the same inputs in one process; writes results.json, table.txt and PNG plots.",
    )
    add_model_args(parser, "benchmark this bundle (torch baseline from its source)")
    parser.add_argument(
        "--backends",
        default="torch,onnxruntime,tensorrt",
        help="comma list of torch, torch-compile, onnxruntime, tensorrt (default: %(default)s)",
    )
    parser.add_argument(
        "--precisions",
        default="fp32",
        help="comma list for onnxruntime/tensorrt: fp32, fp16, bf16, int8, fp8 (default: %(default)s)",
    )
    parser.add_argument("--threads", type=POSITIVE, help="intra-op threads for torch and ONNX Runtime (default: cores)")
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the torch and torch-compile backends run: cpu (default), cuda or cuda:N (bundles are "
        "still exported from a CPU copy; ONNX Runtime and TensorRT run where their providers do)",
    )
    parser.add_argument(
        "--peer",
        choices=["onnxruntime-genai"],
        help="also build and time the peer for the language half (a Qwen2 of equal decode-step weight "
        "bytes with ONNX Runtime GenAI's builder, fp32 and, with int8 asked for, int8 weight-only) and "
        "report our TTFT/TPOT over its; needs the 'peer' extra",
    )
    _add_workload_args(parser)
    _add_output_args(parser)
    parser.set_defaults(handler=run)
    return parser


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="warm-up runs excluded from the statistics")
    parser.add_argument("--repeats", type=POSITIVE, default=3, help="measured runs")
    parser.add_argument(
        "--new-tokens",
        type=_number(int, 2, what="must be >= 2"),
        default=32,
        help="tokens decoded per understanding run",
    )
    parser.add_argument("--ddim-steps", type=POSITIVE, default=4, help="DDIM steps of the end-to-end generation run")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the cache-length and video-size sweeps")
    parser.add_argument("--past-lengths", default="32,128,256,512,1024", help="decode sweep: cache lengths")
    parser.add_argument(
        "--videos", default="9x64x64,9x128x128,17x128x128,9x192x192", help="DDIM sweep: FRAMESxHEIGHTxWIDTH list"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest"),
        help="results directory: new, empty, or earlier results of this command",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".cache/haplo-bench"),
        help="where the bundles the benchmark builds are kept (reused across runs)",
    )
    parser.add_argument("--json", action="store_true", help="print the result document instead of the table")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None


def _video_list(text: str) -> list[tuple[int, int, int]]:
    videos = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"--videos {item!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 9x128x128")
        videos.append(tuple(int(p) for p in parts))
    return videos


def _options(args: argparse.Namespace):
    from haplo.bench.runner import BenchOptions

    return BenchOptions(
        preset=args.preset,
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        seed=args.seed,
        backends=comma_list(args.backends),
        precisions=comma_list(args.precisions),
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        ddim_steps=args.ddim_steps,
        sweeps=not args.no_sweeps,
        past_lengths=_int_list(args.past_lengths, "--past-lengths"),
        videos=_video_list(args.videos),
        out=args.out,
        work_dir=args.work_dir,
        peer=args.peer,
        device=str(torch_device(args)),
    )


def run(args: argparse.Namespace) -> dict:
    from haplo.bench.report import table
    from haplo.bench.runner import check_output, run_benchmark, write_outputs

    check_output(args.out)
    options = _options(args)
    if options.peer:
        from haplo.bench.peer import require

        require()  # before any work: the extra may not be installed
    doc = run_benchmark(options)
    paths = write_outputs(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(doc))
        print(f"\nwrote {paths['json']}, {paths['table']} and {len(paths['plots'])} plots in {args.out}")
    return doc
