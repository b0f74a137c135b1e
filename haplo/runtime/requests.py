"""What a caller holds for a submitted request: a token stream or a video job, usable from threads and asyncio.

The scheduler's thread produces events; the caller consumes them with a plain `for` loop (blocking),
`async for` (awaiting, without a thread per request), `result()` / `wait()`, and stops them with
`cancel()`. Nothing here runs the model.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from haplo.runtime.sampling import SamplingParams

_ids = itertools.count(1)


class Channel:
    """Events from one producer thread to one consumer, who may block or await."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def put(self, item: Any) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            _WAKEUPS.resolve(loop, future)

    def get(self, timeout: float | None = None) -> Any:
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise TimeoutError(f"no event within {timeout} s")
            return self._items.popleft()

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._ready:
                if self._items:
                    return self._items.popleft()
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _Wakeups:
    """Futures to resolve on their event loops, handed over in batches: the first future pending on a
    loop schedules one callback that resolves all of them, so the tokens of every row of one decode
    step wake a server's loop once instead of once per row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}

    def resolve(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        with self._lock:
            pending = self._pending.setdefault(loop, [])
            pending.append(future)
            if len(pending) > 1:
                return  # a callback is already on its way
        try:
            loop.call_soon_threadsafe(self._drain, loop)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            with self._lock:
                self._pending.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            futures = self._pending.pop(loop, [])
        for future in futures:
            _resolve(future)


_WAKEUPS = _Wakeups()


@dataclass
class Timings:
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # admitted (prefill or first step begins)
    tokens: list[float] = field(default_factory=list)  # when each token (or DDIM step) was produced
    finished: float | None = None


class Handle:
    """The common part: an id, a cancel flag, a final status, the event channel."""

    kind = "request"

    def __init__(self) -> None:
        self.id = f"{self.kind}-{next(_ids)}"
        self.timings = Timings()
        self.status = "queued"  # queued | running | finished | cancelled | failed
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._channel = Channel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the request: its batch row and cache are freed at the scheduler's next step."""
        self._cancelled.set()

    # -- producer side (the scheduler) ------------------------------------------------------------
    def _emit(self, event: Any) -> None:
        self.timings.tokens.append(time.perf_counter())
        self._channel.put(event)

    def _finish(self, status: str, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.status, self.error = status, error
        self.timings.finished = time.perf_counter()
        self._done.set()
        self._channel.put(_END)

    # -- consumer side ----------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def __iter__(self):
        while (event := self._channel.get()) is not _END:
            yield event
        self._raise()

    async def __aiter__(self):
        while (event := await self._channel.aget()) is not _END:
            yield event
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


_END = object()


class TextStream(Handle):
    """One understanding request: iterate to get its new token ids as they are decoded.

    After the end, `finish_reason` is "stop" (a stop token), "length" (max_new_tokens) or
    "cancelled"; `tokens` holds every new id (the stop token included, as `understand` gives it)."""

    kind = "chat"

    def __init__(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> None:
        super().__init__()
        self.inputs, self.params = inputs, params
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.reused_tokens = 0  # prompt tokens prefilled from a kept prefix (`haplo.runtime.prefix_cache`)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until the request ends; its new token ids."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s")
        self._raise()
        return list(self.tokens)


@dataclass
class VideoRequest:
    """One text-to-video job: the CFG pair [negative, prompt] and its initial noise."""

    input_ids: torch.Tensor  # [2, L] negative prompt, prompt; left padded
    attention_mask: torch.Tensor  # [2, L]
    noise: torch.Tensor  # [1, F, C, h, w] initial noise (before init_noise_sigma)
    steps: int
    guidance_scale: float
    decode: bool = True  # False: stop at the latents


class VideoJob(Handle):
    """One video job: iterate to get the number of each DDIM step as it completes; then `latents`
    and (when decoded) `video` [1, 3, frames, H, W] in [-1, 1], both on the host."""

    kind = "video"

    def __init__(self, request: VideoRequest) -> None:
        super().__init__()
        self.request = request
        self.step = 0
        self.latents: torch.Tensor | None = None
        self.video: torch.Tensor | None = None

    @property
    def progress(self) -> float:
        """Fraction of the DDIM steps done (the VAE decode is the last 0%)."""
        return self.step / self.request.steps

    def result(self, timeout: float | None = None) -> VideoJob:
        if not self.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish within {timeout} s")
        self._raise()
        return self
