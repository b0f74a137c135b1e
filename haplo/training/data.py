"""Training data: a JSONL format for understanding and generation, and a synthetic dataset.

One record per line:

    {"type": "understanding", "video": "clips/0001.mp4",            # or "images": ["a.png", ...]
     "conversations": [{"role": "user", "content": "<video>\\nWhat moves?"},
                       {"role": "assistant", "content": "A red square moves to the left."}]}
    {"type": "generation", "video": "clips/0001.mp4", "caption": "A red square moves to the left."}
    {"type": "generation", "image": "stills/0002.png", "caption": "..."}   # a one-frame video

Paths are relative to the JSONL file; a media value `world:video/...` or `world:still/...` (a
`Scene.ref`) is a clip of the synthetic world, rendered when read, so a dataset of many thousand
clips is one small file. Understanding records go through the processor (the answer
tokens are the labels); generation records through the VAE encoder (video -> latents), once, cached.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from haplo.artifacts import atomic_path, check_output_dir, write_atomic
from haplo.errors import HaploError
from haplo.training.world import IMAGE_QUESTIONS, QUESTIONS, is_ref, motion_still, question_for, render_ref, scenes
from haplo.video import evenly_spaced, write_video


class DataError(HaploError, ValueError):
    pass


def _is_synthetic_dataset(root: Path) -> bool:
    others = [p for p in root.iterdir() if p.name not in ("data.jsonl", "videos", "stills")]
    media = {"videos": ".mp4", "stills": ".png"}
    return (
        (root / "data.jsonl").is_file()
        and not others
        and all(not (root / d).exists() or all(p.suffix == x for p in (root / d).iterdir()) for d, x in media.items())
    )


MEDIA = ("files", "world")


def make_synthetic_dataset(
    out: str | Path,
    count: int,
    frames: int,
    height: int,
    width: int,
    seed: int = 0,
    split: str = "train",
    media: str = "files",
    generation: int | None = None,
) -> Path:
    """Write a data.jsonl of `count` clips of a split of the synthetic world with, per clip, an
    understanding record for the video and one for its still (the motion as a fading trail; the
    question form drawn per clip, the caption as the answer) and a generation record. `media="files"`
    writes each clip (mp4) and still (png) beside it; `"world"` refers to them as `world:` scenes.
    `generation` limits the generation records to the first clips (the default: every clip).
    Returns the JSONL path. `out` must be new, empty, or a dataset this function wrote."""
    if media not in MEDIA:
        raise DataError(f"media must be one of {', '.join(MEDIA)}, got {media!r}")
    out = Path(out)
    check_output_dir(out, _is_synthetic_dataset, "synthetic dataset")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, scene in enumerate(scenes(split, count, seed)):
        if media == "world":
            video, still = scene.ref("video", frames, height, width), scene.ref("still", frames, height, width)
        else:
            video, still = _write_media(scene, out, i, frames, height, width)
        records.append(_question(scene, "video", video, question_for(scene, QUESTIONS)))
        records.append(_question(scene, "images", [still], question_for(scene, IMAGE_QUESTIONS, salt=1)))
        if generation is None or i < generation:
            records.append({"type": "generation", "video": video, "caption": scene.caption})
    jsonl = out / "data.jsonl"
    write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in records))
    return jsonl


def _write_media(scene, out: Path, i: int, frames: int, height: int, width: int) -> tuple[str, str]:
    """videos/i.mp4 and stills/i.png of a scene; their paths relative to `out`."""
    for folder in ("videos", "stills"):
        (out / folder).mkdir(exist_ok=True)
    clip = scene.video(frames, height, width)
    video = write_video(clip, out / "videos" / f"{i:05d}.mp4", fps=8).relative_to(out).as_posix()
    still = f"stills/{i:05d}.png"
    with atomic_path(out / still) as tmp:
        Image.fromarray(motion_still(clip)).save(tmp, format="PNG")
    return video, still


def _question(scene, key: str, media, question: str) -> dict:
    placeholder = "<video>" if key == "video" else "<image>"
    conversation = [
        {"role": "user", "content": f"{placeholder}\n{question}"},
        {"role": "assistant", "content": scene.caption},
    ]
    return {"type": "understanding", key: media, "conversations": conversation}


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset file; make one with `haplo-train synthetic --out DIR`")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        kind = record.get("type")
        if kind == "understanding" and not record.get("conversations"):
            raise DataError(f"{path}:{number}: an understanding record needs 'conversations'")
        if kind == "generation" and not (record.get("caption") and (record.get("video") or record.get("image"))):
            raise DataError(f"{path}:{number}: a generation record needs 'caption' and 'video' or 'image'")
        if kind not in ("understanding", "generation"):
            raise DataError(f"{path}:{number}: type must be 'understanding' or 'generation', got {kind!r}")
        record["_root"] = str(path.parent)
        records.append(record)
    return records


def load_frames(record: dict, key: str = "video") -> np.ndarray:
    """uint8 [F, H, W, 3] of a record's video (or its image as one frame), decoded once per file
    (a `world:` scene is rendered)."""
    if is_ref(record[key]):
        try:
            frames = render_ref(record[key])
        except ValueError as err:
            raise DataError(str(err)) from None
        return frames if key == "video" else frames[:1]
    path = Path(record["_root"]) / record[key]
    if not path.exists():
        raise DataError(f"{path}: missing media file of a dataset record")
    return _decoded(str(path), key == "image")


@functools.lru_cache(maxsize=8192)  # a training run reads every clip once per epoch
def _decoded(path: str, image: bool) -> np.ndarray:
    import imageio.v3 as iio

    frames = np.asarray(Image.open(path).convert("RGB"))[None] if image else iio.imread(path, plugin="FFMPEG")
    frames = np.ascontiguousarray(np.asarray(frames)[..., :3])
    frames.flags.writeable = False  # shared by every reader of the cache
    return frames


def understanding_batch(processor, records: list[dict], video_frames: int) -> dict[str, torch.Tensor]:
    """Processor tensors for conversations, left padded into one batch (their images and videos in
    order); labels = the assistant's tokens, -100 elsewhere."""
    conversations = [r["conversations"] for r in records]
    prompts = [[m for m in c if m["role"] != "assistant"] for c in conversations]
    images = [Image.fromarray(load_frames({**r, "image": p}, "image")[0]) for r in records for p in r.get("images", [])]
    videos = [_sampled(r, video_frames) for r in records if r.get("video")]
    media = {"images": images or None, "videos": videos or None}
    full = processor(conversations=conversations, add_generation_prompt=False, **media)
    prefix = processor(conversations=prompts, add_generation_prompt=True, **media)
    answer = full["attention_mask"].sum(1) - prefix["attention_mask"].sum(1)  # left padding: the last tokens
    columns = torch.arange(full["input_ids"].shape[1])
    labels = torch.where(columns >= full["input_ids"].shape[1] - answer[:, None], full["input_ids"], -100)
    return {**{k: v for k, v in full.items() if isinstance(v, torch.Tensor)}, "labels": labels}


def _sampled(record: dict, count: int) -> np.ndarray:
    frames = load_frames(record)
    return frames[evenly_spaced(len(frames), min(count, len(frames)))]


@torch.no_grad()
def encode_video_latents(vae, frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> latents [1, f, C, h, w] (scaled as the denoiser sees them)."""
    picks = frames[evenly_spaced(len(frames), num_frames)]
    clip = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in picks])
    video = torch.from_numpy(clip).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    latents = vae.encode(video.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return latents.permute(0, 2, 1, 3, 4).float()
