"""`haplo-export bench-serve`: haplo-serve under concurrent streaming clients against one, in one run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from haplo.commands.common import NON_NEGATIVE, POSITIVE, _number, add_model_args
from haplo.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-serve",
        help="serving throughput and latency: N concurrent clients against one",
        description="Starts haplo-serve in its own process and drives it with the openai client: greedy video "
        "questions of fixed length at each concurrency level (tokens/s, requests/s, TTFT and TPOT "
        "p50/p90/p99, answers checked against the same request served alone), then concurrent video jobs "
        "against one. Writes serving.json and table.txt.",
    )
    add_model_args(parser, "serve this bundle")
    parser.add_argument(
        "--backend", default="onnxruntime", choices=["onnxruntime", "torch"], help="(default: %(default)s)"
    )
    parser.add_argument("--precision", default="fp32", help="bundle precision built for onnxruntime (default: fp32)")
    parser.add_argument("--threads", type=POSITIVE, help="the server's intra-op threads (default: cores)")
    parser.add_argument(
        "--media-cache-mib",
        type=NON_NEGATIVE,
        help="the server's decoded-media cache (the questions repeat their clips; 0 decodes every request's "
        "clip again; default: the server's)",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=NON_NEGATIVE,
        help="the server's kept prompt prefixes (the questions repeat; 0 prefills every prompt whole; "
        "default: the server's)",
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma list (default: %(default)s)")
    parser.add_argument("--requests-per-client", type=POSITIVE, default=2, help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=_number(int, 2, what="must be >= 2"), default=32)
    parser.add_argument("--prompts", type=POSITIVE, default=16, help="distinct questions (default: %(default)s)")
    parser.add_argument("--video-jobs", type=POSITIVE, default=4, help="concurrent video jobs (default: 4)")
    parser.add_argument("--video-steps", type=POSITIVE, default=4, help="DDIM steps per job (default: 4)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve"), help="results directory")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/haplo-bench"), help="where bundles are built")
    parser.add_argument("--json", action="store_true", help="print the result document instead of the table")
    parser.set_defaults(handler=run)
    return parser


def _levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UsageError(f"--clients {text!r}: expected comma-separated counts >= 1, e.g. 1,4,16")
    return sorted(set(levels) | {1})  # one client is the baseline every ratio divides by


def run(args: argparse.Namespace) -> dict:
    from haplo.bench.serving import ServeBenchOptions, check_output, run_serving_benchmark, table, write_outputs
    from haplo.commands.serve import require_server_stack

    check_output(args.out)
    require_server_stack()
    if args.backend == "torch" and args.bundle:
        raise UsageError("--backend torch serves a checkpoint or preset; leave --bundle out, or use onnxruntime")
    options = ServeBenchOptions(
        preset=args.preset,
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        seed=args.seed,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        media_cache_mib=args.media_cache_mib,
        prefix_cache_mib=args.prefix_cache_mib,
        clients=_levels(args.clients),
        requests_per_client=args.requests_per_client,
        new_tokens=args.new_tokens,
        prompts=args.prompts,
        video_jobs=args.video_jobs,
        video_steps=args.video_steps,
        out=args.out,
        work_dir=args.work_dir,
        command=shlex.join(["haplo-export", *sys.argv[1:]]),
    )
    doc = run_serving_benchmark(options, log=lambda m: print(m, file=sys.stderr))
    paths = write_outputs(doc, args.out)
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    if not args.json:
        print(f"\nwrote {paths['json']} and {paths['table']}")
    return doc
