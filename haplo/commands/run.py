"""`haplo-export run understand|generate`: the model on PyTorch, or on a bundle with `--bundle`.

`--bundle` and `--backend` go before or after the task (`run --bundle B understand` or `run understand
--bundle B`); given in both places, the value after the task wins."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from haplo.commands.common import (
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    TOP_P,
    Parser,
    add_run_args,
    load_backend,
    note_random_weights,
)
from haplo.errors import UsageError

if TYPE_CHECKING:
    import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("run", help="run the model: PyTorch by default, ONNX Runtime with --bundle")
    add_bundle_args(parser)
    tasks = parser.add_subparsers(dest="task", required=True, parser_class=Parser)
    _add_understand(tasks)
    _add_generate(tasks)
    parser.set_defaults(handler=run)
    return parser


def add_bundle_args(parser: argparse.ArgumentParser, after_task: bool = False) -> None:
    """--bundle and --backend. On a task parser (`after_task`) they have no default (SUPPRESS): argparse
    copies a task's values over the `run` parser's, so a value given after the task wins and an absent
    one keeps what `run` parsed (its default, or the value given before the task)."""
    parser.add_argument(
        "--bundle",
        type=Path,
        default=argparse.SUPPRESS if after_task else None,
        help="bundle directory from `haplo-export build`",
    )
    parser.add_argument(
        "--backend",
        default=argparse.SUPPRESS if after_task else "auto",
        choices=["auto", "onnxruntime", "tensorrt"],
        help="runs a bundle: auto = its TensorRT engines when it has them and TensorRT + a GPU are "
        "present, else ONNX Runtime",
    )


def _add_understand(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser("understand", help="answer a prompt about images / a video (autoregressive text)")
    add_run_args(parser)
    add_bundle_args(parser, after_task=True)
    parser.add_argument(
        "--prompt",
        help="the user's question (default: what moves and where, for a video or an image; else a description)",
    )
    parser.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--video", type=Path, help="video file (mp4, gif, ...)")
    media.add_argument(
        "--demo-clip",
        type=Path,
        metavar="PATH.mp4",
        help="make a held-out clip of the synthetic world (scene chosen by --seed), write it to PATH and ask about it",
    )
    parser.add_argument("--video-frames", type=POSITIVE, default=8, help="frames sampled uniformly from --video")
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="0 = off")
    parser.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")


def _add_generate(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser("generate", help="text-to-video (DDIM with classifier-free guidance, VAE decode)")
    add_run_args(parser)
    add_bundle_args(parser, after_task=True)
    parser.add_argument("--prompt", default="A red square moves to the left.", help="caption of the video to make")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=POSITIVE, help="DDIM steps (default: config)")
    parser.add_argument("--guidance", type=NON_NEGATIVE_FLOAT, help="classifier-free guidance scale (default: config)")
    parser.add_argument("--frames", type=POSITIVE, help="video frames, 8k+1 (default: config)")
    parser.add_argument("--height", type=POSITIVE, help="video height in pixels (default: config)")
    parser.add_argument("--width", type=POSITIVE, help="video width in pixels (default: config)")
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKLCogVideoX directory (default: checkpoint/vae)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/video.mp4"), help="output video, .mp4 (a .gif is written beside it)"
    )
    parser.add_argument(
        "--no-prefix-reuse", action="store_true", help="recompute the text prefix at every step (slower, same result)"
    )


def run(args: argparse.Namespace) -> dict:
    return understand(args) if args.task == "understand" else generate(args)


# -- understand ----------------------------------------------------------------------------------


def read_video_frames(path: Path, count: int) -> np.ndarray:
    """`count` frames sampled uniformly from the video at `path`, RGB uint8 (frames, height, width, 3)."""
    from haplo.video import read_frames

    try:
        return read_frames(path, count)
    except ValueError as err:
        raise UsageError(f"{path}: {err}; pass an mp4/gif file") from None


def _check_media(args: argparse.Namespace) -> None:
    for image in args.image:
        if not image.exists():
            raise UsageError(f"{image}: no such image file")
    if args.video is not None and not args.video.exists():
        raise UsageError(f"{args.video}: no such video file")


def _demo_clip(args: argparse.Namespace) -> str:
    """Write a scene of the held-out test split (number --seed of its first 96) as --demo-clip and
    use it as --video; returns the scene's caption."""
    from haplo.training.world import scenes
    from haplo.video import write_video

    check_video_out(args.demo_clip, "--demo-clip")
    scene = scenes("test", 96)[args.seed % 96]
    args.video = write_video(scene.video(9, 64, 64), args.demo_clip, fps=8)
    return scene.caption


def _default_prompt(args: argparse.Namespace) -> str:
    from haplo.training.world import IMAGE_QUESTIONS, QUESTIONS

    if args.video is not None:
        return QUESTIONS[0]
    return IMAGE_QUESTIONS[0] if args.image else "Describe what you see."


def _processor_inputs(args: argparse.Namespace, processor) -> dict:
    from haplo.model.processor import ProcessorError

    placeholders = "<image>\n" * len(args.image) + ("<video>\n" if args.video else "")
    conversation = [{"role": "user", "content": placeholders + (args.prompt or _default_prompt(args))}]
    videos = [read_video_frames(args.video, args.video_frames)] if args.video else None
    try:
        return processor(conversations=[conversation], images=[str(p) for p in args.image] or None, videos=videos)
    except ProcessorError as err:
        raise UsageError(str(err)) from None


def understand(args: argparse.Namespace) -> dict:
    import torch

    from haplo.runtime.decoding import understand as decode

    truth = _demo_clip(args) if args.demo_clip else None
    _check_media(args)
    backend, processor = load_backend(args, need_vae=False)
    inputs = _processor_inputs(args, processor)
    started = time.perf_counter()
    out = decode(
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
    if truth is not None:
        result.update(clip=str(args.video), clip_shows=truth)
    print(json.dumps(result) if args.json else text)
    if truth is not None and not args.json:
        print(f"note: {args.video} shows: {truth}", file=sys.stderr)
    note_random_weights(args)
    return result


# -- generate ------------------------------------------------------------------------------------


def check_video_out(out: Path, flag: str = "--out") -> None:
    """An .mp4 path to write: not a directory, and its folder can be made."""
    from haplo.artifacts import creatable_parent

    if out.suffix.lower() != ".mp4":
        raise UsageError(
            f"{flag} {out}: use a .mp4 path" + (" (a .gif is written beside it)" if flag == "--out" else "")
        )
    if out.is_dir():
        raise UsageError(f"{flag} {out}: is a directory; name a .mp4 file")
    if creatable_parent(out.parent.resolve()) is None:
        raise UsageError(f"{flag} {out}: cannot create {out.parent} (a parent is a file, or not writable)")


def _write_videos(args: argparse.Namespace, result, fps: int) -> tuple[Path, Path, tuple[int, ...]]:
    """(mp4, gif, frames shape): the first generated video written as `--out` and a .gif beside it."""
    from haplo.video import to_uint8_frames, write_video

    frames = to_uint8_frames(result.videos[0])
    mp4 = write_video(frames, args.out, fps)
    gif = write_video(frames, args.out.with_suffix(".gif"), fps)
    return mp4, gif, tuple(frames.shape)


def generate(args: argparse.Namespace) -> dict:
    from haplo.runtime.pipeline import TextToVideoPipeline

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
    mp4, gif, shape = _write_videos(args, result, backend.config.video_generation.fps)
    summary = {
        "video": str(mp4),
        "gif": str(gif),
        "backend": backend.name,
        "frames": int(shape[0]),
        "height": int(shape[1]),
        "width": int(shape[2]),
        "latent_shape": list(result.latents.shape[1:]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(summary) if args.json else f"wrote {mp4} and {gif} ({shape[0]} frames, {shape[1]}x{shape[2]})")
    note_random_weights(args)
    return summary
