"""Writing decoded videos: mp4 (H.264 through imageio-ffmpeg) and gif."""

from __future__ import annotations

import io
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


def read_frames(source: str | Path | bytes, count: int, extension: str = ".mp4") -> np.ndarray:
    """`count` frames sampled evenly from a video file or its bytes (mp4, webm, gif, ...), RGB uint8
    [frames, H, W, 3]. Raises ValueError when it does not decode or holds no frames."""
    if not isinstance(source, bytes):
        extension = Path(source).suffix.lower() or extension
    try:
        frames = _decode(source, extension)
    except Exception as err:  # the decoders raise many types for undecodable input
        raise ValueError(f"cannot decode the video ({type(err).__name__})") from None
    if frames.ndim == 3 and extension == ".gif":
        frames = frames[None]
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError("no video frames found")
    return frames[evenly_spaced(len(frames), min(count, len(frames)))][..., :3]


def _decode(source: str | Path | bytes, extension: str) -> np.ndarray:
    """Every frame: in-process with PyAV where it is installed (the `serve` extra; about 10x faster
    than a short clip through an ffmpeg subprocess), else imageio's ffmpeg; gif through imageio."""
    if extension != ".gif":
        try:
            import av
        except ImportError:
            av = None
        if av is not None:
            with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
                return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return np.asarray(iio.imread(source, extension=extension, plugin=None if extension == ".gif" else "FFMPEG"))


def video_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    """[F, H, W, 3] uint8 frames as an mp4 file's bytes (H.264), for a server's response."""
    return iio.imwrite(
        "<bytes>", frames, extension=".mp4", plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=1
    )


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
