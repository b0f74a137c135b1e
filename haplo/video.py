"""Writing decoded videos: mp4 (H.264 through imageio-ffmpeg) and gif."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from haplo.artifacts import atomic_path


def evenly_spaced(available: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(available), first and last included (frames of a
    clip, or any other sequence sampled the same way)."""
    return np.linspace(0, available - 1, num=count).round().astype(int)


def to_uint8_frames(video) -> np.ndarray:
    """VAE output [C, F, H, W] in [-1, 1] (tensor or array) -> [F, H, W, 3] uint8."""
    array = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    array = np.clip((array + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(array.transpose(1, 2, 3, 0))


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write [F, H, W, 3] uint8 frames as .mp4 or .gif (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: unsupported video format {suffix!r}; use .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staged:
        if suffix == ".mp4":
            # macro_block_size=1: keep the exact frame size instead of padding to multiples of 16
            iio.imwrite(staged, frames, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=1)
        else:
            iio.imwrite(staged, frames, duration=1000 / fps, loop=0)
    return path
