"""Decoded media kept by content (`haplo.serving.media.MediaCache`) and the batched wakeups of the
streams' event loops (`haplo.runtime.requests`)."""

from __future__ import annotations

import asyncio
import base64

import imageio.v3 as iio
import numpy as np
import pytest

from haplo.runtime.requests import Channel
from haplo.serving import media
from haplo.serving.protocol import ApiError
from haplo.training.world import scenes


def _mp4_url(index: int) -> str:
    frames = scenes("test", 8)[index].video(9, 32, 32)
    mp4 = iio.imwrite("<bytes>", frames, extension=".mp4", plugin="FFMPEG", fps=8)
    return f"data:video/mp4;base64,{base64.b64encode(mp4).decode()}"


def test_a_video_is_decoded_once_per_content_and_frame_count():
    cache = media.MediaCache()
    url = _mp4_url(0)
    first = media.decode_video(url, "v", 4, cache)
    again = media.decode_video(url, "v", 4, cache)
    assert again is first and (cache.hits, cache.misses) == (1, 1)
    assert not first.flags.writeable  # shared between requests: nobody may change it
    np.testing.assert_array_equal(first, media.decode_video(url, "v", 4))  # as without the cache
    assert media.decode_video(url, "v", 2, cache).shape[0] == 2 and cache.misses == 2
    assert cache.bytes == first.nbytes + first[:2].nbytes


def test_the_least_recently_used_media_leave_first_within_the_budget():
    urls = [_mp4_url(i) for i in range(3)]
    size = media.decode_video(urls[0], "v", 4).nbytes
    cache = media.MediaCache(2 * size)
    for url in (urls[0], urls[1], urls[0], urls[2]):  # urls[1] is the least recently used when 2 comes
        media.decode_video(url, "v", 4, cache)
    assert cache.bytes == 2 * size
    media.decode_video(urls[0], "v", 4, cache)
    media.decode_video(urls[1], "v", 4, cache)
    assert (cache.hits, cache.misses) == (2, 4)


def test_no_budget_keeps_nothing_and_bad_media_are_never_kept():
    off = media.MediaCache(0)
    url = _mp4_url(0)
    media.decode_video(url, "v", 4, off)
    media.decode_video(url, "v", 4, off)
    assert (off.hits, off.misses, off.bytes) == (0, 2, 0)
    cache = media.MediaCache()
    bad = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
    for _ in range(2):
        with pytest.raises(ApiError, match="does not decode|cannot decode"):
            media.decode_video(bad, "v", 4, cache)
    assert cache.misses == 2 and cache.bytes == 0


def test_tokens_for_many_streams_wake_their_event_loop_once():
    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        channels = [Channel() for _ in range(16)]
        readers = [asyncio.ensure_future(c.aget()) for c in channels]
        await asyncio.sleep(0)  # every reader now waits on its channel
        calls = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: calls.append(a) or original(*a)  # type: ignore[method-assign]
        for i, channel in enumerate(channels):  # one decode step's tokens, before the loop runs again
            channel.put(i)
        got = await asyncio.wait_for(asyncio.gather(*readers), 10)
        return got, len(calls)

    got, wakeups = asyncio.run(main())
    assert got == list(range(16)) and wakeups == 1
