"""`haplo-export inspect`: parameters per stage, bytes per precision, KV cache, latent tokens."""

from __future__ import annotations

import argparse
import json

from haplo.commands.common import POSITIVE, add_model_args, load_config, source_name


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help="parameters per stage, bytes per precision, KV cache, latent tokens")
    add_model_args(parser)
    parser.add_argument("--frames", type=POSITIVE, help="video frames for the latent-token count (default: config)")
    parser.add_argument("--height", type=POSITIVE, help="video height in pixels (default: config)")
    parser.add_argument("--width", type=POSITIVE, help="video width in pixels (default: config)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> dict:
    from haplo.model.inspection import format_report, inspect_config

    report = inspect_config(load_config(args), args.frames, args.height, args.width)
    print(json.dumps(report, indent=2) if args.json else format_report(source_name(args), report))
    return report
