"""Images and videos that arrive inside a chat message as data URLs."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from haplo.serving.protocol import ApiError
from haplo.video import read_frames

VIDEO_EXTENSIONS = {"video/mp4": ".mp4", "video/webm": ".webm", "image/gif": ".gif", "video/quicktime": ".mov"}


def data_url(url: str, param: str) -> tuple[str, bytes]:
    """'data:<mime>;base64,<payload>' -> (mime, bytes)."""
    if not url.startswith("data:"):
        raise ApiError(400, f"{param}: only data: URLs are accepted (data:<mime>;base64,...)", param)
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: a data URL must be base64 (data:<mime>;base64,...)", param)
    try:
        return header.removesuffix(";base64"), base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: invalid base64 in the data URL", param) from None


def decode_image(url: str, param: str) -> Image.Image:
    _, data = data_url(url, param)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise ApiError(400, f"{param}: the image does not decode; send a PNG or JPEG", param) from None


def decode_video(url: str, param: str, frames: int) -> np.ndarray:
    """`frames` RGB frames sampled evenly from the video, [frames, H, W, 3] uint8."""
    mime, data = data_url(url, param)
    extension = VIDEO_EXTENSIONS.get(mime, ".mp4")
    try:
        return read_frames(data, frames, extension)
    except ValueError as err:
        raise ApiError(400, f"{param}: {err}; send an mp4, webm or gif", param) from None
