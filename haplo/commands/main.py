"""`haplo-export`: the deployment tool's one entry point.

    haplo-export inspect  --preset haplo-omni-9b
    haplo-export build    --preset tiny --out bundles/tiny
    haplo-export run --bundle bundles/tiny understand --prompt "Describe the video." --video clip.mp4
    haplo-export run understand --prompt "Describe the video." --video clip.mp4   (PyTorch)
    haplo-export run generate   --prompt "A red square moves left." --out out/video.mp4
    haplo-export bench    --preset small --backends torch,onnxruntime --precisions fp32,int8
    haplo-export kernels  --preset tiny --arch 90 --out kernels/sm_90

Every command works on a checkpoint directory (`--checkpoint DIR`) or a built-in preset (`--preset`,
default `tiny`, randomly initialised with `--seed`). Bad input ends with one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from haplo.errors import HaploError, UsageError

DEFAULT_PRESET = "tiny"


class Parser(argparse.ArgumentParser):
    """argparse with one `error:` line (and exit code 2) instead of the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: `kind` within [low, high] (low excluded with `low_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what}")
        return value

    return parse


POSITIVE = _number(int, 1, what="must be >= 1")
NON_NEGATIVE = _number(int, 0, what="must be >= 0")
NON_NEGATIVE_FLOAT = _number(float, 0.0, what="must be >= 0")
FRACTION = _number(float, 0.0, 1.0, what="must be in [0, 1]")
TOP_P = _number(float, 0.0, 1.0, low_open=True, what="must be in (0, 1]; 1 = off")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory (config.json + model.safetensors)")
    source.add_argument(
        "--preset", help=f"built-in configuration: tiny, small, haplo-omni-9b (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset, and of sampling")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="directory of Hugging Face tokenizer files (default: the checkpoint's, else built-in)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-export", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    inspect = sub.add_parser("inspect", help="parameters per stage, bytes per precision, KV cache, latent tokens")
    add_model_args(inspect)
    inspect.add_argument("--frames", type=POSITIVE, help="video frames for the latent-token count (default: config)")
    inspect.add_argument("--height", type=POSITIVE, help="video height in pixels (default: config)")
    inspect.add_argument("--width", type=POSITIVE, help="video width in pixels (default: config)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    build = sub.add_parser("build", help="export the ONNX graphs, check parity, write a bundle")
    add_model_args(build)
    build.add_argument(
        "--out",
        type=Path,
        default=Path("bundles") / DEFAULT_PRESET,
        help="bundle directory: new, empty, or a bundle this tool built (anything else is refused)",
    )
    build.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16", "int8", "fp8"],
        help="precision of the decoder graphs (Q/DQ for int8/fp8, casts for fp16/bf16); heads, "
        "embeddings and the VAE stay fp32 unless --graph-precision says otherwise (default: fp32)",
    )
    build.add_argument(
        "--target",
        default="auto",
        choices=["auto", "tensorrt", "onnxruntime"],
        help="auto: TensorRT engines when an NVIDIA GPU and TensorRT are present, else ONNX Runtime",
    )
    build.add_argument(
        "--no-engines",
        action="store_true",
        help="with --target tensorrt: write the TensorRT-ready graphs (symmetric INT8, plugin "
        "nodes) without building engines, e.g. on a CPU machine; build them later on the GPU",
    )
    build.add_argument(
        "--graph-precision",
        action="append",
        default=[],
        metavar="GRAPH=PRECISION",
        help="override the precision policy for one graph, e.g. lm_head=int8 (repeatable)",
    )
    build.add_argument(
        "--int8-weights",
        default="auto",
        choices=["auto", "full", "reduced"],
        help="INT8 weight range: full (+-127) is exact on CPUs with VNNI/AMX and on TensorRT; "
        "reduced (+-64) on every x86 CPU (AVX2 adds u8 x s8 pairs in saturating int16); auto picks "
        "by this CPU and --target (default: %(default)s)",
    )
    build.add_argument(
        "--exclude-modules",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep matmuls of modules matching REGEX in fp32, e.g. 'layers\\.0\\.' (repeatable)",
    )
    build.add_argument(
        "--quant-min-cosine",
        type=FRACTION,
        default=0.99,
        help="per-graph cosine budget of low-precision graphs against fp32 PyTorch",
    )
    build.add_argument(
        "--quant-min-token-agreement",
        type=FRACTION,
        default=0.9,
        help="greedy agreement budget of low-precision bundles",
    )
    build.add_argument(
        "--quant-min-latent-cosine",
        type=FRACTION,
        default=0.99,
        help="DDIM latent cosine budget of low-precision bundles",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="export every graph again even if unchanged (only over a bundle this tool built)",
    )
    build.add_argument(
        "--decomposed", action="store_true", help="standard ONNX ops only (no haplo-domain nodes, no TensorRT plugins)"
    )
    build.add_argument(
        "--frames", type=POSITIVE, help="video frames the VAE graph is built for, 8k+1 (default: config)"
    )
    build.add_argument("--height", type=POSITIVE, help="video height the VAE graph is built for (default: config)")
    build.add_argument("--width", type=POSITIVE, help="video width the VAE graph is built for (default: config)")
    vae = build.add_mutually_exclusive_group()
    vae.add_argument("--vae", type=Path, help="diffusers AutoencoderKLCogVideoX directory (default: checkpoint/vae)")
    vae.add_argument("--no-vae", action="store_true", help="build without the VAE decoder graph")
    build.add_argument("--tokenizer", type=Path, help="tokenizer files to ship (default: checkpoint's, else built-in)")
    build.add_argument("--atol", type=NON_NEGATIVE_FLOAT, default=1e-4, help="per-graph max abs error budget")
    build.add_argument(
        "--vae-atol",
        type=NON_NEGATIVE_FLOAT,
        default=2 / 255,
        help="the VAE decoder graph's budget: one level of the 8-bit video (default: 2/255)",
    )
    build.add_argument("--min-cosine", type=FRACTION, default=0.9999, help="per-graph cosine budget")
    build.add_argument(
        "--min-token-agreement", type=FRACTION, default=1.0, help="teacher-forced greedy agreement budget over 32 steps"
    )
    build.add_argument(
        "--ddim-atol", type=NON_NEGATIVE_FLOAT, default=1e-3, help="latent error budget after 3 DDIM steps"
    )
    build.add_argument("--json", action="store_true", help="print the manifest summary as JSON")

    run = sub.add_parser("run", help="run the model: PyTorch by default, ONNX Runtime with --bundle")
    run.add_argument("--bundle", type=Path, help="bundle directory from `haplo-export build`")
    run.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnxruntime", "tensorrt"],
        help="runs a bundle: auto = its TensorRT engines when it has them and TensorRT + a GPU are "
        "present, else ONNX Runtime",
    )
    tasks = run.add_subparsers(dest="task", required=True, parser_class=Parser)
    und = tasks.add_parser("understand", help="answer a prompt about images / a video (autoregressive text)")
    add_run_args(und)
    und.add_argument("--prompt", default="Describe what you see.", help="the user's question")
    und.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    und.add_argument("--video", type=Path, help="video file (mp4, gif, ...)")
    und.add_argument("--video-frames", type=POSITIVE, default=8, help="frames sampled uniformly from --video")
    und.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    und.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    und.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="0 = off")
    und.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")

    gen = tasks.add_parser("generate", help="text-to-video (DDIM with classifier-free guidance, VAE decode)")
    add_run_args(gen)
    gen.add_argument("--prompt", default="A red square moves from left to right.")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=POSITIVE, help="DDIM steps (default: config)")
    gen.add_argument("--guidance", type=NON_NEGATIVE_FLOAT, help="classifier-free guidance scale (default: config)")
    gen.add_argument("--frames", type=POSITIVE, help="video frames, 8k+1 (default: config)")
    gen.add_argument("--height", type=POSITIVE, help="video height in pixels (default: config)")
    gen.add_argument("--width", type=POSITIVE, help="video width in pixels (default: config)")
    gen.add_argument("--vae", type=Path, help="diffusers AutoencoderKLCogVideoX directory (default: checkpoint/vae)")
    gen.add_argument(
        "--out", type=Path, default=Path("out/video.mp4"), help="output video, .mp4 (a .gif is written beside it)"
    )
    gen.add_argument(
        "--no-prefix-reuse", action="store_true", help="recompute the text prefix at every step (slower, same result)"
    )
    bench = sub.add_parser(
        "bench",
        help="latency/throughput of every backend and precision, side by side",
        description="Runs torch eager (the baseline), ONNX Runtime and TensorRT (when present) "
        "on the same inputs in one process; writes results.json, table.txt and PNG plots.",
    )
    bench_source = bench.add_mutually_exclusive_group()
    bench_source.add_argument("--checkpoint", type=Path, help="checkpoint directory")
    bench_source.add_argument("--preset", help="built-in configuration (default: small)")
    bench_source.add_argument("--bundle", type=Path, help="benchmark this bundle (torch baseline from its source)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--backends",
        default="torch,onnxruntime,tensorrt",
        help="comma list of torch, torch-compile, onnxruntime, tensorrt (default: %(default)s)",
    )
    bench.add_argument(
        "--precisions",
        default="fp32",
        help="comma list for onnxruntime/tensorrt: fp32, fp16, bf16, int8, fp8 (default: %(default)s)",
    )
    bench.add_argument("--threads", type=POSITIVE, help="intra-op threads for torch and ONNX Runtime (default: cores)")
    bench.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="warm-up runs excluded from the statistics")
    bench.add_argument("--repeats", type=POSITIVE, default=3, help="measured runs")
    bench.add_argument(
        "--new-tokens",
        type=_number(int, 2, what="must be >= 2"),
        default=32,
        help="tokens decoded per understanding run",
    )
    bench.add_argument("--ddim-steps", type=POSITIVE, default=4, help="DDIM steps of the end-to-end generation run")
    bench.add_argument("--no-sweeps", action="store_true", help="skip the cache-length and video-size sweeps")
    bench.add_argument("--past-lengths", default="32,128,256,512,1024", help="decode sweep: cache lengths")
    bench.add_argument(
        "--videos", default="9x64x64,9x128x128,17x128x128,9x192x192", help="DDIM sweep: FRAMESxHEIGHTxWIDTH list"
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest"),
        help="results directory: new, empty, or earlier results of this command",
    )
    bench.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".cache/haplo-bench"),
        help="where the bundles the benchmark builds are kept (reused across runs)",
    )
    bench.add_argument("--json", action="store_true", help="print the result document instead of the table")

    kernels = sub.add_parser(
        "kernels",
        help="compile the TensorRT plugin kernels to PTX for an SM (no GPU needed)",
        description="Compiles every Triton kernel variant the model's engines use (per stage "
        "norm mode and width, per dtype, per attention tile) to PTX for one GPU architecture, "
        "and writes NAME.ptx files with kernels.json (entry points, launch threads, shared "
        "memory). Engine builds compile the same kernels for the build GPU by themselves.",
    )
    add_model_args(kernels)
    kernels.add_argument(
        "--arch",
        type=_number(int, 70, what="Triton targets sm_70 and newer"),
        default=90,
        help="SM number: 80, 89, 90, 100, ... (default: %(default)s)",
    )
    kernels.add_argument(
        "--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16 (default: %(default)s)"
    )
    kernels.add_argument(
        "--out",
        type=Path,
        default=Path("kernels"),
        help="output directory: new, empty, or kernels this command wrote (default: %(default)s)",
    )
    kernels.add_argument("--json", action="store_true", help="print the index as JSON")
    return parser


# -- model loading -------------------------------------------------------------------------------


def load_config(args):
    from haplo.model.config import HaploOmniConfig, preset

    if args.checkpoint is not None:
        from haplo.model.config import ConfigError
        from haplo.model.modeling import CheckpointError

        try:
            return HaploOmniConfig.from_pretrained(args.checkpoint)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    return preset(args.preset or DEFAULT_PRESET)


def load_model(args):
    import torch

    from haplo.model.modeling import HaploOmniForConditionalGeneration

    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    if args.checkpoint is not None:
        return HaploOmniForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype)
    return HaploOmniForConditionalGeneration.from_config(load_config(args), seed=args.seed, dtype=dtype)


def load_tokenizer_for(args, config):
    from haplo.model.tokenizer import build_tokenizer, load_tokenizer

    directory = args.tokenizer
    if directory is None and args.checkpoint is not None and (args.checkpoint / "tokenizer_config.json").exists():
        directory = args.checkpoint
    return load_tokenizer(directory) if directory is not None else build_tokenizer(config)


def load_backend(args, need_vae: bool = True):
    """(backend, processor): ONNX Runtime over a bundle, or PyTorch over a checkpoint / preset."""
    from haplo.model.processor import HaploOmniProcessor

    if getattr(args, "bundle", None) is not None:
        from haplo.bundle import Bundle
        from haplo.engines.onnxruntime import OrtBackend
        from haplo.model.tokenizer import load_tokenizer

        bundle = Bundle.open(args.bundle)
        backend = None
        if args.backend != "onnxruntime" and bundle.manifest.get("engines"):
            from haplo.engines.tensorrt import TensorRTBackend, tensorrt_status

            usable, reason = tensorrt_status()
            if usable:
                backend = TensorRTBackend(bundle)
            elif args.backend == "tensorrt":
                raise UsageError(f"--backend tensorrt: {reason}")
        elif args.backend == "tensorrt":
            raise UsageError(
                f"{args.bundle} has no TensorRT engines; rebuild it with --target tensorrt on a "
                "machine with an NVIDIA GPU, or use --backend onnxruntime"
            )
        backend = backend or OrtBackend(bundle, intra_op_threads=args.threads)
        tokenizer = load_tokenizer(args.tokenizer or bundle.path(bundle.manifest["tokenizer"]))
        return backend, HaploOmniProcessor(tokenizer, backend.config)
    from haplo.model.vae import vae_for_checkpoint
    from haplo.runtime.torch_backend import TorchBackend

    model = load_model(args)
    vae = vae_for_checkpoint(args.checkpoint, model.config, getattr(args, "vae", None)) if need_vae else None
    return TorchBackend(model, vae), HaploOmniProcessor(load_tokenizer_for(args, model.config), model.config)


def note_random_weights(args) -> None:
    if args.checkpoint is None and getattr(args, "bundle", None) is None:
        print(
            f"note: preset {args.preset or DEFAULT_PRESET!r} has random weights (seed {args.seed}): the output "
            "shows the pipeline works, not what a trained model says; pass --checkpoint DIR",
            file=sys.stderr,
        )


def read_video_frames(path: Path, count: int):
    import imageio.v3 as iio
    import numpy as np

    try:
        frames = iio.imread(path, plugin="FFMPEG" if path.suffix.lower() != ".gif" else None)
    except Exception as err:  # imageio raises many types for undecodable input
        raise UsageError(f"{path}: cannot decode the video ({type(err).__name__}); pass an mp4/gif file") from None
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise UsageError(f"{path}: no video frames found")
    picks = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    return frames[picks][..., :3]


# -- commands ------------------------------------------------------------------------------------


def cmd_inspect(args) -> dict:
    from haplo.model.inspection import format_report, inspect_config

    config = load_config(args)
    report = inspect_config(config, args.frames, args.height, args.width)
    name = str(args.checkpoint) if args.checkpoint else (args.preset or DEFAULT_PRESET)
    print(json.dumps(report, indent=2) if args.json else format_report(name, report))
    return report


def cmd_understand(args) -> dict:
    import torch

    from haplo.model.processor import ProcessorError

    for image in args.image:
        if not image.exists():
            raise UsageError(f"{image}: no such image file")
    if args.video is not None and not args.video.exists():
        raise UsageError(f"{args.video}: no such video file")
    from haplo.runtime.decoding import understand

    backend, processor = load_backend(args, need_vae=False)
    placeholders = "<image>\n" * len(args.image) + ("<video>\n" if args.video else "")
    conversation = [{"role": "user", "content": placeholders + args.prompt}]
    videos = [read_video_frames(args.video, args.video_frames)] if args.video else None
    try:
        inputs = processor(conversations=[conversation], images=[str(p) for p in args.image] or None, videos=videos)
    except ProcessorError as err:
        raise UsageError(str(err)) from None
    started = time.perf_counter()
    out = understand(
        backend,
        **{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_token_ids=tuple(processor.stop_token_ids),
        seed=args.seed,
    )
    elapsed = time.perf_counter() - started
    tokens = out.new_tokens[0].tolist()
    text = processor.decode(tokens, skip_special_tokens=True)
    result = {
        "text": text,
        "token_ids": tokens,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "backend": backend.name,
        "seconds": round(elapsed, 4),
    }
    print(json.dumps(result) if args.json else text)
    note_random_weights(args)
    return result


def cmd_generate(args) -> dict:
    from haplo.runtime.pipeline import TextToVideoPipeline
    from haplo.video import to_uint8_frames, write_video

    check_video_out(args.out)
    backend, processor = load_backend(args)
    pipe = TextToVideoPipeline(backend, processor)
    backend.check_vae_size(pipe.latent_shape(args.frames, args.height, args.width))  # before any denoising
    started = time.perf_counter()
    result = pipe(
        args.prompt,
        args.negative_prompt,
        args.steps,
        args.guidance,
        args.frames,
        args.height,
        args.width,
        seed=args.seed,
        reuse_prefix=not args.no_prefix_reuse,
        progress=True,
    )
    frames = to_uint8_frames(result.videos[0])
    fps = backend.config.video_generation.fps
    mp4 = write_video(frames, args.out, fps)
    gif = write_video(frames, args.out.with_suffix(".gif"), fps)
    summary = {
        "video": str(mp4),
        "gif": str(gif),
        "backend": backend.name,
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "latent_shape": list(result.latents.shape[1:]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {mp4} and {gif} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]})"
    )
    note_random_weights(args)
    return summary


def cmd_build(args) -> dict:
    from haplo.engines.bundle_engines import BundleEngines
    from haplo.export.build import BuildOptions, build_bundle, check_output
    from haplo.export.validate import Tolerances
    from haplo.model.vae import vae_for_checkpoint

    check_output(args.out)  # before any work: never over a path this tool did not make
    model = load_model(args)
    config = model.config
    gen = config.video_generation
    video = (args.frames or gen.num_frames, args.height or gen.height, args.width or gen.width)
    config.video_generation.latent_shape(*video)  # validates the size before any work
    vae = None if args.no_vae else vae_for_checkpoint(args.checkpoint, config, args.vae)
    source = {
        "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint else None,
        "preset": None if args.checkpoint else (args.preset or DEFAULT_PRESET),
        "seed": None if args.checkpoint else args.seed,
        "name": str(args.checkpoint) if args.checkpoint else (args.preset or DEFAULT_PRESET),
    }
    overrides = {}
    for item in args.graph_precision:
        graph, _, value = item.partition("=")
        if not value:
            raise UsageError(f"--graph-precision {item!r}: expected GRAPH=PRECISION, e.g. lm_head=fp32")
        overrides[graph.strip()] = value.strip()
    usable, reason = _tensorrt_status()
    target = args.target
    if target == "auto":
        target = "tensorrt" if usable else "onnxruntime"
    elif target == "tensorrt" and not usable and not args.no_engines:
        raise UsageError(
            f"--target tensorrt: TensorRT engines need an NVIDIA GPU with TensorRT ({reason}); "
            "use --target onnxruntime (or auto) on this machine"
        )
    options = BuildOptions(
        out=args.out,
        decomposed=args.decomposed,
        force=args.force,
        video=video,
        source=source,
        precision=args.precision,
        target=target,
        build_engines=not args.no_engines,
        graph_precision=overrides,
        exclude_modules=tuple(args.exclude_modules),
        int8_weights=args.int8_weights,
        tolerances=Tolerances(
            atol=args.atol,
            vae_atol=args.vae_atol,
            min_cosine=args.min_cosine,
            min_token_agreement=args.min_token_agreement,
            ddim_atol=args.ddim_atol,
            quant_min_cosine=args.quant_min_cosine,
            quant_min_token_agreement=args.quant_min_token_agreement,
            quant_min_latent_cosine=args.quant_min_latent_cosine,
        ),
    )
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    manifest = build_bundle(model, vae, load_tokenizer_for(args, config), options, BundleEngines(), log)
    summary = {
        "bundle": str(args.out),
        "precision": manifest["precision"],
        "target": manifest["target"],
        "graphs": list(manifest["graphs"]),
        "engines": list(manifest.get("engines", {})),
        "parity": manifest["parity"],
        "build_seconds": manifest["build_seconds"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        p = manifest["parity"]
        print(
            f"wrote {args.out}: {len(manifest['graphs'])} graphs ({manifest['precision']}), export max abs error "
            f"{max(p['max_abs_error'].values()):.2g}, token agreement {p['token_agreement']:.0%}, "
            f"DDIM latent error {p['ddim_max_abs_error']:.2g} ({manifest['build_seconds']}s)"
        )
        for graph, cosine in p["quantized_cosine"].items():
            print(f"  {graph}: {manifest['graphs'][graph]['precision']} cosine vs fp32 {cosine:.5f}")
        if p.get("video_psnr_db"):
            print(f"  decoded video PSNR vs fp32 PyTorch: {p['video_psnr_db']:.1f} dB")
        weights = manifest["quantization"].get("int8_weights")
        if weights:
            print(f"  INT8 weights: {weights['range']} range (+-{weights['max']}), exact on {weights['exact_on']}")
        if vae is None:
            print("note: built without the VAE decoder graph (--no-vae); `run generate` needs one")
        if target != "tensorrt":
            print(f"note: built for ONNX Runtime; TensorRT engines need an NVIDIA GPU with TensorRT ({reason})")
    return summary


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


def cmd_bench(args) -> dict:
    from haplo.bench.report import table
    from haplo.bench.runner import BenchOptions, check_output, run_benchmark, write_outputs

    check_output(args.out)

    options = BenchOptions(
        preset=args.preset or (None if args.checkpoint or args.bundle else "small"),
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        seed=args.seed,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        precisions=[p.strip() for p in args.precisions.split(",") if p.strip()],
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
    )
    doc = run_benchmark(options)
    paths = write_outputs(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(doc))
        print(f"\nwrote {paths['json']}, {paths['table']} and {len(paths['plots'])} plots in {args.out}")
    return doc


def cmd_kernels(args) -> dict:
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
        index = aot.compile_for_config(
            load_config(args), args.out, args.arch, dtypes, log=(lambda _: None) if args.json else print
        )
    except aot.KernelCompileError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps(index, indent=2))
    return index


def _tensorrt_status() -> tuple[bool, str]:
    from haplo.engines.tensorrt import tensorrt_status

    return tensorrt_status()


def check_video_out(out: Path) -> None:
    """`run generate --out`: an .mp4 path that is not a directory and whose folder can be made."""
    from haplo.artifacts import creatable_parent

    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out}: use a .mp4 path (a .gif is written beside it)")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name a .mp4 file")
    if creatable_parent(out.parent.resolve()) is None:
        raise UsageError(f"--out {out}: cannot create {out.parent} (a parent is a file, or not writable)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or one `error:` line from Parser
        return int(stop.code or 0)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "inspect":
            cmd_inspect(args)
        elif args.command == "build":
            cmd_build(args)
        elif args.command == "bench":
            cmd_bench(args)
        elif args.command == "kernels":
            cmd_kernels(args)
        elif args.task == "understand":
            cmd_understand(args)
        else:
            cmd_generate(args)
    except HaploError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
