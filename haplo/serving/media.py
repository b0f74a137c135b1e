"""Images and videos that arrive inside a chat message as data URLs, decoded once per content.

Clients send the same media again and again (a chat resends its whole history every turn), and
decoding a short mp4 costs about as much CPU as prefilling its tokens, so `MediaCache` keeps decoded
media by a digest of its bytes, least recently used first out, within a byte budget.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

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


T = TypeVar("T")


class MediaCache:
    """Decoded media by (kind, digest of the bytes, frames), thread-safe; `max_bytes` 0 keeps nothing."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], T], size: Callable[[T], int]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
        value = make()  # outside the lock: two requests decode different media at once
        nbytes = size(value)
        with self._lock:
            if key not in self._items and nbytes <= self.max_bytes:
                self._items[key] = (value, nbytes)
                self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]
        return value


NO_CACHE = MediaCache(0)


def _key(kind: str, data: bytes, *extra) -> tuple:
    return (kind, hashlib.sha256(data).digest(), *extra)


def decode_image(url: str, param: str, cache: MediaCache = NO_CACHE) -> Image.Image:
    """The image of a data URL, RGB. Callers must not change it (it may be the cache's)."""
    _, data = data_url(url, param)
    return cache.get(_key("image", data), lambda: _open_image(data, param), lambda im: im.width * im.height * 3)


def _open_image(data: bytes, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise ApiError(400, f"{param}: the image does not decode; send a PNG or JPEG", param) from None


def decode_video(url: str, param: str, frames: int, cache: MediaCache = NO_CACHE) -> np.ndarray:
    """`frames` RGB frames sampled evenly from the video, [frames, H, W, 3] uint8, read-only."""
    mime, data = data_url(url, param)
    extension = VIDEO_EXTENSIONS.get(mime, ".mp4")
    read = lambda: _read_video(data, frames, extension, param)  # noqa: E731
    return cache.get(_key("video", data, frames), read, lambda array: array.nbytes)


def _read_video(data: bytes, frames: int, extension: str, param: str) -> np.ndarray:
    try:
        video = read_frames(data, frames, extension)
    except ValueError as err:
        raise ApiError(400, f"{param}: {err}; send an mp4, webm or gif", param) from None
    video = np.ascontiguousarray(video)
    video.flags.writeable = False
    return video
