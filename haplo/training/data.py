"""Training data: a JSONL format for understanding and generation, and a synthetic dataset.

One record per line:

    {"type": "understanding", "video": "clips/0001.mp4",            # or "images": ["a.png", ...]
     "conversations": [{"role": "user", "content": "<video>\\nWhat moves?"},
                       {"role": "assistant", "content": "A red square moves to the left."}]}
    {"type": "generation", "video": "clips/0001.mp4", "caption": "A red square moves to the left."}
    {"type": "generation", "image": "stills/0002.png", "caption": "..."}   # a one-frame video

Paths are relative to the JSONL file. Understanding records go through the processor (the answer
tokens are the labels); generation records through the VAE encoder (video -> latents), once, cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from haplo.artifacts import check_output_dir, write_atomic
from haplo.errors import HaploError
from haplo.training.world import QUESTIONS, scenes
from haplo.video import evenly_spaced, write_video


class DataError(HaploError, ValueError):
    pass


def _is_synthetic_dataset(root: Path) -> bool:
    others = [p for p in root.iterdir() if p.name not in ("data.jsonl", "videos")]
    videos = root / "videos"
    return (
        (root / "data.jsonl").is_file()
        and not others
        and (not videos.exists() or all(p.suffix == ".mp4" for p in videos.iterdir()))
    )


def make_synthetic_dataset(
    out: str | Path, count: int, frames: int, height: int, width: int, seed: int = 0, split: str = "train"
) -> Path:
    """Write `count` clips (mp4) of a split of the synthetic world and a data.jsonl with one
    understanding record (the question forms in turn, the caption as the answer) and one generation
    record per clip. Returns the JSONL path. `out` must be new, empty, or a dataset this function wrote."""
    out = Path(out)
    check_output_dir(out, _is_synthetic_dataset, "synthetic dataset")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i, scene in enumerate(scenes(split, count, seed)):
        path = write_video(scene.video(frames, height, width), out / "videos" / f"{i:05d}.mp4", fps=8)
        rel = path.relative_to(out).as_posix()
        question = QUESTIONS[i % len(QUESTIONS)]
        conversation = [
            {"role": "user", "content": f"<video>\n{question}"},
            {"role": "assistant", "content": scene.caption},
        ]
        records.append({"type": "understanding", "video": rel, "conversations": conversation})
        records.append({"type": "generation", "video": rel, "caption": scene.caption})
    jsonl = out / "data.jsonl"
    write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in records))
    return jsonl


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
    import imageio.v3 as iio

    path = Path(record["_root"]) / record[key]
    if not path.exists():
        raise DataError(f"{path}: missing media file of a dataset record")
    if key == "image":
        return np.asarray(Image.open(path).convert("RGB"))[None]
    return np.asarray(iio.imread(path, plugin="FFMPEG"))[..., :3]


def understanding_example(processor, record: dict, video_frames: int) -> dict[str, torch.Tensor]:
    """Processor tensors for one conversation; labels = the assistant's tokens, -100 elsewhere."""
    conversation = record["conversations"]
    prompt = [m for m in conversation if m["role"] != "assistant"]
    images = [Image.open(Path(record["_root"]) / p).convert("RGB") for p in record.get("images", [])]
    videos = None
    if record.get("video"):
        frames = load_frames(record)
        videos = [frames[evenly_spaced(len(frames), min(video_frames, len(frames)))]]
    full = processor(conversations=[conversation], images=images or None, videos=videos, add_generation_prompt=False)
    prefix = processor(conversations=[prompt], images=images or None, videos=videos, add_generation_prompt=True)
    labels = full["input_ids"].clone()
    labels[:, : prefix["input_ids"].shape[1]] = -100
    return {**{k: v for k, v in full.items() if isinstance(v, torch.Tensor)}, "labels": labels}


@torch.no_grad()
def encode_video_latents(vae, frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> latents [1, f, C, h, w] (scaled as the denoiser sees them)."""
    picks = frames[evenly_spaced(len(frames), num_frames)]
    clip = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in picks])
    video = torch.from_numpy(clip).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    latents = vae.encode(video.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return latents.permute(0, 2, 1, 3, 4).float()
