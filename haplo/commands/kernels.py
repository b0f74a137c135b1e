"""`haplo-export kernels`: the TensorRT plugin kernels compiled to PTX for one SM (no GPU needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from haplo.commands.common import _number, add_model_args, load_config
from haplo.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "kernels",
        help="compile the TensorRT plugin kernels to PTX for an SM (no GPU needed)",
        description="Compiles every Triton kernel variant the model's engines use (per stage "
        "norm mode and width, per dtype, per attention tile) to PTX for one GPU architecture, "
        "and writes NAME.ptx files with kernels.json (entry points, launch threads, shared "
        "memory). Engine builds compile the same kernels for the build GPU by themselves.",
    )
    add_model_args(parser)
    parser.add_argument(
        "--arch",
        type=_number(int, 70, what="Triton targets sm_70 and newer"),
        default=90,
        help="SM number: 80, 89, 90, 100, ... (default: %(default)s)",
    )
    parser.add_argument(
        "--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16 (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("kernels"),
        help="output directory: new, empty, or kernels this command wrote (default: %(default)s)",
    )
    ptx = parser.add_mutually_exclusive_group()
    ptx.add_argument(
        "--ptx-version", help="PTX ISA to emit, MAJOR.MINOR (default: what this driver JITs, else Triton's)"
    )
    ptx.add_argument("--cuda-driver", help="emit the PTX a driver of this CUDA version JITs, e.g. 12.4")
    parser.add_argument("--json", action="store_true", help="print the index as JSON")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> dict:
    try:
        from haplo.engines.plugins import aot
    except ImportError as err:
        raise UsageError(f"the plugin kernels need Triton ({err}); pip install 'triton>=3.3'") from None
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - set(aot.DTYPES))
    if unknown or not dtypes:
        raise UsageError(f"--dtypes {args.dtypes!r}: choose from {', '.join(aot.DTYPES)}")
    aot.check_output(args.out)
    try:
        ptx_version = _ptx_version(aot, args)
        index = aot.compile_for_config(
            load_config(args), args.out, args.arch, dtypes, (lambda _: None) if args.json else print, ptx_version
        )
    except aot.KernelCompileError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps(index, indent=2))
    return index


def _ptx_version(aot, args: argparse.Namespace) -> int | None:
    """--ptx-version, else the ISA of --cuda-driver, else of this machine's driver (None: none here)."""
    if args.ptx_version:
        return aot.parse_ptx_version(args.ptx_version)
    if args.cuda_driver:
        major, _, minor = args.cuda_driver.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise UsageError(f"--cuda-driver {args.cuda_driver!r}: give MAJOR.MINOR, e.g. 12.4")
        return aot.ptx_version_for(args.arch, (int(major), int(minor)))
    return aot.ptx_version_for(args.arch, aot.driver_cuda_version())
