"""`haplo-export build`: export the ONNX graphs, check parity, write a bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from haplo.bundle import Manifest
from haplo.commands.common import (
    DEFAULT_PRESET,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    add_model_args,
    load_model,
    load_tokenizer_for,
    source_name,
)
from haplo.errors import UsageError
from haplo.model.shipped import SHIPPED_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("build", help="export the ONNX graphs, check parity, write a bundle")
    add_model_args(parser)
    _add_target_args(parser)
    _add_quantization_args(parser)
    _add_graph_args(parser)
    _add_parity_args(parser)
    parser.set_defaults(handler=run)
    return parser


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bundles") / SHIPPED_NAME,
        help="bundle directory: new, empty, or a bundle this tool built (anything else is refused)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16", "int8", "fp8", "int8-weight", "int4"],
        help="precision of the decoder graphs (Q/DQ for int8/fp8, casts for fp16/bf16); heads, "
        "embeddings and the VAE stay fp32 unless --graph-precision says otherwise (default: fp32)",
    )
    parser.add_argument(
        "--target",
        default="auto",
        choices=["auto", "tensorrt", "onnxruntime"],
        help="auto: TensorRT engines when an NVIDIA GPU and TensorRT are present, else ONNX Runtime",
    )
    parser.add_argument(
        "--no-engines",
        action="store_true",
        help="with --target tensorrt: write the TensorRT-ready graphs (symmetric INT8, plugin "
        "nodes) without building engines, e.g. on a CPU machine; build them later on the GPU",
    )


def _add_quantization_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--graph-precision",
        action="append",
        default=[],
        metavar="GRAPH=PRECISION",
        help="override the precision policy for one graph, e.g. lm_head=int8 (repeatable)",
    )
    parser.add_argument(
        "--int8-weights",
        default="auto",
        choices=["auto", "full", "reduced"],
        help="INT8 weight range: full (+-127) is exact on CPUs with VNNI/AMX and on TensorRT; "
        "reduced (+-64) on every x86 CPU (AVX2 adds u8 x s8 pairs in saturating int16); auto picks "
        "by this CPU and --target (default: %(default)s)",
    )
    parser.add_argument(
        "--exclude-modules",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep matmuls of modules matching REGEX in fp32, e.g. 'layers\\.0\\.' (repeatable)",
    )
    budgets = [
        ("--quant-min-cosine", 0.99, "per-graph cosine budget of low-precision graphs against fp32 PyTorch"),
        ("--quant-min-token-agreement", 0.9, "greedy agreement budget of low-precision bundles"),
        ("--quant-min-latent-cosine", 0.98, "DDIM latent cosine budget of low-precision bundles"),
    ]
    for flag, default, text in budgets:
        parser.add_argument(flag, type=FRACTION, default=default, help=text)
    parser.add_argument(
        "--quant-min-task-accuracy",
        type=FRACTION,
        help="refuse the bundle when its task accuracy on held-out clips (understanding all three right; "
        "generation colour and direction right, with --task-prompts) is below this fraction, e.g. 0.9",
    )
    parser.add_argument(
        "--task-clips",
        type=NON_NEGATIVE,
        default=48,
        help="held-out clips the task check asks about; it runs for low-precision builds and with "
        "--quant-min-task-accuracy, 0 turns it off (default: %(default)s)",
    )
    parser.add_argument(
        "--task-prompts", type=NON_NEGATIVE, default=0, help="held-out captions the task check generates (default: 0)"
    )


def _add_graph_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="export every graph again even if unchanged (only over a bundle this tool built)",
    )
    parser.add_argument(
        "--decomposed", action="store_true", help="standard ONNX ops only (no haplo-domain nodes, no TensorRT plugins)"
    )
    parser.add_argument(
        "--frames", type=POSITIVE, help="video frames the VAE graph is built for, 8k+1 (default: config)"
    )
    parser.add_argument("--height", type=POSITIVE, help="video height the VAE graph is built for (default: config)")
    parser.add_argument("--width", type=POSITIVE, help="video width the VAE graph is built for (default: config)")
    vae = parser.add_mutually_exclusive_group()
    vae.add_argument("--vae", type=Path, help="diffusers AutoencoderKLCogVideoX directory (default: checkpoint/vae)")
    vae.add_argument("--no-vae", action="store_true", help="build without the VAE decoder graph")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer files to ship (default: checkpoint's, else built-in)")


def _add_parity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=NON_NEGATIVE_FLOAT, default=1e-4, help="per-graph max abs error budget")
    parser.add_argument(
        "--vae-atol",
        type=NON_NEGATIVE_FLOAT,
        default=2 / 255,
        help="the VAE decoder graph's budget: one level of the 8-bit video (default: 2/255)",
    )
    parser.add_argument("--min-cosine", type=FRACTION, default=0.9999, help="per-graph cosine budget")
    parser.add_argument(
        "--min-token-agreement", type=FRACTION, default=1.0, help="teacher-forced greedy agreement budget over 32 steps"
    )
    parser.add_argument(
        "--ddim-atol", type=NON_NEGATIVE_FLOAT, default=1e-3, help="latent error budget after 3 DDIM steps"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest summary as JSON")


# -- running -------------------------------------------------------------------------------------


def _tensorrt_status() -> tuple[bool, str]:
    from haplo.engines.tensorrt import tensorrt_status

    return tensorrt_status()


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(target, reason): `--target`, with auto resolved by whether TensorRT is usable here."""
    usable, reason = _tensorrt_status()
    if args.target == "auto" and args.precision in ("int8-weight", "int4"):
        return "onnxruntime", f"--precision {args.precision} is ONNX Runtime's weight-only MatMulNBits"
    if args.target == "auto":
        return ("tensorrt" if usable else "onnxruntime"), reason
    if args.target == "tensorrt" and not usable and not args.no_engines:
        raise UsageError(
            f"--target tensorrt: TensorRT engines need an NVIDIA GPU with TensorRT ({reason}); "
            "use --target onnxruntime (or auto) on this machine"
        )
    return args.target, reason


def _check_weight_only(target: str, precisions: set[str]) -> None:
    """int8-weight and int4 are ONNX Runtime's MatMulNBits, which TensorRT does not run."""
    weight_only = sorted(precisions & {"int8-weight", "int4"})
    if target == "tensorrt" and weight_only:
        raise UsageError(
            f"--precision {weight_only[0]} is weight-only ONNX Runtime (MatMulNBits), which TensorRT does not run; "
            "use --target onnxruntime, or int8 / fp8 for TensorRT"
        )


def _graph_precisions(args: argparse.Namespace) -> dict[str, str]:
    overrides = {}
    for item in args.graph_precision:
        graph, _, value = item.partition("=")
        if not value:
            raise UsageError(f"--graph-precision {item!r}: expected GRAPH=PRECISION, e.g. lm_head=fp32")
        overrides[graph.strip()] = value.strip()
    return overrides


def _tolerances(args: argparse.Namespace):
    from haplo.export.validate import Tolerances

    return Tolerances(
        atol=args.atol,
        vae_atol=args.vae_atol,
        min_cosine=args.min_cosine,
        min_token_agreement=args.min_token_agreement,
        ddim_atol=args.ddim_atol,
        quant_min_cosine=args.quant_min_cosine,
        quant_min_token_agreement=args.quant_min_token_agreement,
        quant_min_latent_cosine=args.quant_min_latent_cosine,
    )


def _options(args: argparse.Namespace, video: tuple[int, int, int], target: str, overrides: dict[str, str]):
    from haplo.export.build import BuildOptions, weights_source

    return BuildOptions(
        out=args.out,
        decomposed=args.decomposed,
        force=args.force,
        video=video,
        source=weights_source(args.checkpoint, args.preset or DEFAULT_PRESET, args.seed, source_name(args)),
        precision=args.precision,
        target=target,
        build_engines=not args.no_engines,
        graph_precision=overrides,
        exclude_modules=tuple(args.exclude_modules),
        int8_weights=args.int8_weights,
        tolerances=_tolerances(args),
        min_task_accuracy=args.quant_min_task_accuracy,
    )


def _task_check(args: argparse.Namespace):
    """The held-out task check for a low-precision build or a task floor; None when not asked for."""
    from haplo.bench.evaluation import task_check

    wanted = args.precision != "fp32" or args.quant_min_task_accuracy is not None
    if not wanted or not (args.task_clips or args.task_prompts):
        return None
    return task_check(args.task_clips, args.task_prompts, args.seed, progress=not args.json)


def _summary(args: argparse.Namespace, manifest: Manifest) -> dict:
    return {
        "bundle": str(args.out),
        "precision": manifest.precision,
        "target": manifest.target,
        "graphs": list(manifest.graphs),
        "engines": list(manifest.engines),
        "parity": manifest.parity,
        "task": manifest.task,
        "build_seconds": manifest.build_seconds,
    }


def _print_report(args: argparse.Namespace, manifest: Manifest, has_vae: bool, target: str, reason: str) -> None:
    p = manifest.parity
    print(
        f"wrote {args.out}: {len(manifest.graphs)} graphs ({manifest.precision}), export max abs error "
        f"{max(p['max_abs_error'].values()):.2g}, token agreement {p['token_agreement']:.0%}, "
        f"DDIM latent error {p['ddim_max_abs_error']:.2g} ({manifest.build_seconds}s)"
    )
    for graph, cosine in p["quantized_cosine"].items():
        print(f"  {graph}: {manifest.graphs[graph].precision} cosine vs fp32 {cosine:.5f}")
    if p.get("video_psnr_db"):
        print(f"  decoded video PSNR vs fp32 PyTorch: {p['video_psnr_db']:.1f} dB")
    weights = manifest.quantization["int8_weights"]
    if weights:
        print(f"  INT8 weights: {weights['range']} range (+-{weights['max']}), exact on {weights['exact_on']}")
    for kind, key in (("understanding", "all_correct"), ("generation", "both_correct")):
        if kind in manifest.task:
            print(f"  task {kind}: {manifest.task[kind][key]:.1%} on {manifest.task[kind]['n']} held-out clips")
    if not has_vae:
        print("note: built without the VAE decoder graph (--no-vae); `run generate` needs one")
    if target != "tensorrt":
        print(f"note: built for ONNX Runtime; TensorRT engines need an NVIDIA GPU with TensorRT ({reason})")


def run(args: argparse.Namespace) -> dict:
    from haplo.engines.bundle_engines import BundleEngines
    from haplo.export.build import build_bundle, check_output
    from haplo.model.vae import vae_for_checkpoint

    check_output(args.out)  # before any work: never over a path this tool did not make
    model = load_model(args)
    config = model.config
    gen = config.video_generation
    video = (args.frames or gen.num_frames, args.height or gen.height, args.width or gen.width)
    gen.latent_shape(*video)  # validates the size before any work
    vae = None if args.no_vae else vae_for_checkpoint(args.checkpoint, config, args.vae)
    overrides = _graph_precisions(args)  # a malformed GRAPH=PRECISION is reported before the TensorRT check
    target, reason = _target(args)
    _check_weight_only(target, {args.precision, *overrides.values()})
    options = _options(args, video, target, overrides)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    tokenizer = load_tokenizer_for(args, config)
    manifest = build_bundle(model, vae, tokenizer, options, BundleEngines(), log, _task_check(args))
    summary = _summary(args, manifest)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_report(args, manifest, vae is not None, target, reason)
    return summary
