"""Continuous batching over any `Backend`: many understanding requests share one decode step, and
video jobs share one guided DDIM step.

    sched = Scheduler(backend)                         # starts its own thread
    stream = sched.submit(processor(conversations=[chat]), SamplingParams(max_new_tokens=32))
    for token_id in stream: ...                        # or `async for`, or stream.result()
    job = sched.submit_video(video_request(...)); job.result(); job.video

Understanding: a new request is prefilled alone, gives its first token at once, and joins the running
batch at the next step; every step feeds each row's last token through the stack once for the whole
batch (`decoding.decode_step`). Rows of different lengths are aligned by left padding
(`haplo.runtime.batching`), so a row's tokens are the ones it would get alone. Finished and cancelled
rows leave at the step they end. Between two decode steps at most `max_prefill_tokens` of prompts are
prefilled (at least one prompt), so running rows wait a bounded time. Admission holds the batch to
`max_batch` rows and its KV cache, projected to the end of the longest row, to `max_kv_bytes`;
beyond `max_queue` waiting requests, `submit` raises `QueueFull`. A prompt that begins with the
tokens and media of an earlier one is prefilled from that one's kept cache (`haplo.runtime.prefix_cache`,
up to `prefix_cache_bytes`): only its remaining tokens run, and they count against the prefill budget.

Video: each job's [negative, prompt] text prefix is encoded once (`ddim.encode_prompt`); jobs of one
latent shape are denoised together, each at its own timestep, and a job joins at a step boundary.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

# the defining module: type checkers read diffusers' top-level name as its dummy placeholder class
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler

from haplo.errors import HaploError, RequestError
from haplo.runtime import batching
from haplo.runtime.backend import Backend
from haplo.runtime.ddim import encode_prompt, make_scheduler, predict_v
from haplo.runtime.decoding import DecodeState, check_prompt_length, prefill
from haplo.runtime.prefix_cache import PrefixCache
from haplo.runtime.requests import TextStream, VideoJob, VideoRequest
from haplo.runtime.sampling import SamplingParams, next_token


class QueueFull(HaploError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SchedulerConfig:
    max_batch: int = 16  # understanding rows decoded together
    max_kv_bytes: int | None = None  # the running batch's KV cache, projected to its end; None: no cap
    max_queue: int = 64  # waiting requests (both kinds) before submit raises QueueFull
    max_video_batch: int = 4  # video jobs denoised together
    max_prefill_tokens: int = 1024  # prompt tokens prefilled between two decode steps (one prompt at least)
    prefix_cache_bytes: int = 256 * 2**20  # kept prompt prefixes (chat history, shared media); 0: none

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_video_batch", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise RequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_kv_bytes is not None and self.max_kv_bytes <= 0:
            raise RequestError(f"max_kv_bytes must be > 0, got {self.max_kv_bytes}")
        if self.prefix_cache_bytes < 0:
            raise RequestError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")


class Observer:
    """Where the scheduler reports timings and outcomes (a server's metrics); these do nothing."""

    def observe(self, metric: str, seconds: float) -> None:
        """metric: "ttft", "tpot" or "ddim_step"."""

    def finished(self, kind: str, status: str) -> None:
        """kind: "chat" or "video"; status: "finished", "cancelled" or "failed"."""


@dataclass
class _Row:
    """A running understanding request: the token it feeds next, its sampler."""

    stream: TextStream
    generator: torch.Generator | None
    pending: int = 0

    @property
    def remaining(self) -> int:
        return self.stream.params.max_new_tokens - len(self.stream.tokens)


@dataclass
class _VideoRow:
    job: VideoJob
    ddim: CogVideoXDDIMScheduler  # the job's own: its timesteps and step rule
    latents: torch.Tensor


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        config: SchedulerConfig | None = None,
        observer: Observer | None = None,
        start: bool = True,
    ) -> None:
        self.backend, self.config = backend, config or SchedulerConfig()
        self.observer = observer or Observer()
        self._bytes_per_token = batching.kv_bytes_per_token(backend)
        self._wake = threading.Condition()
        self._waiting: list[TextStream] = []
        self._waiting_videos: list[VideoJob] = []
        self._rows: list[_Row] = []
        self._prefilled = 0  # prompt tokens prefilled in this step
        self._batch = self._new_batch()
        self._videos: list[_VideoRow] = []
        self._prefix = DecodeState()
        size = self.config.prefix_cache_bytes
        self.prefix_cache = PrefixCache(backend, size) if size else None
        self._durations: list[float] = []  # recent request durations, for Retry-After
        self._closing = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="haplo-scheduler", daemon=True)
            self._thread.start()

    def _new_batch(self):
        """The backend's own batch store (ONNX Runtime: caches updated in place), else padded rows."""
        return self.backend.decode_batch() or batching.PaddedBatch(self.backend)

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> TextStream:
        """Queue one understanding request (the processor's output for one conversation)."""
        if inputs["input_ids"].shape[0] != 1:
            raise RequestError(f"submit takes one conversation, got a batch of {inputs['input_ids'].shape[0]}")
        stream = TextStream(inputs, params)
        check_prompt_length(self.backend.config, stream.prompt_tokens, params.max_new_tokens)
        need = (stream.prompt_tokens + params.max_new_tokens) * self._bytes_per_token
        if self.config.max_kv_bytes is not None and need > self.config.max_kv_bytes:
            raise RequestError(
                f"the request needs {need / 2**20:.1f} MiB of KV cache (prompt + max_tokens), more than the "
                f"server's cap of {self.config.max_kv_bytes / 2**20:.1f} MiB; ask for fewer tokens"
            )
        self._enqueue(self._waiting, stream)
        return stream

    def submit_video(self, request: VideoRequest) -> VideoJob:
        """Queue one text-to-video job."""
        if request.steps < 1:
            raise RequestError(f"the number of DDIM steps must be >= 1, got {request.steps}")
        check_prompt_length(self.backend.config, request.input_ids.shape[1])
        if request.decode:
            f, c, h, w = request.noise.shape[1:]
            self.backend.check_vae_size((f, c, h, w))
        job = VideoJob(request)
        self._enqueue(self._waiting_videos, job)
        return job

    def _enqueue(self, queue: list, handle) -> None:
        with self._wake:
            if self._closing:
                raise RequestError("the scheduler is shutting down")
            if len(self._waiting) + len(self._waiting_videos) >= self.config.max_queue:
                raise QueueFull(
                    f"{self.config.max_queue} requests are already waiting; retry later", self._retry_after()
                )
            queue.append(handle)
            self._wake.notify_all()

    def _retry_after(self) -> int:
        recent = self._durations[-16:]
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1

    # -- state ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """A snapshot: queue depth, running rows and jobs, KV-cache bytes in use."""
        with self._wake:
            waiting, waiting_videos = len(self._waiting), len(self._waiting_videos)
        kv = self._batch.cache_bytes() + batching.cache_bytes(self.backend, self._prefix)
        return {
            "queue_depth": waiting + waiting_videos,
            "waiting_chat": waiting,
            "waiting_video": waiting_videos,
            "running_batch": len(self._rows),
            "running_video": len(self._videos),
            "kv_cache_bytes": kv,
            "prefix_cache_bytes": 0 if self.prefix_cache is None else self.prefix_cache.bytes,
        }

    @property
    def idle(self) -> bool:
        with self._wake:
            return not (self._waiting or self._waiting_videos or self._rows or self._videos)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or self._has_work(), timeout=1.0)
                if self._closing:
                    break
            self.step()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._waiting_videos or self._rows or self._videos)

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit waiting requests, one decode step for the batch, one DDIM step."""
        self._admit_chat()
        self._decode()
        self._admit_videos()
        self._denoise()

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until nothing is left (a scheduler made with start=False)."""
        while not self.idle:
            self.step()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still queued or running are cancelled."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for handle in [*self._waiting, *self._waiting_videos, *(r.stream for r in self._rows)]:
            handle._finish("cancelled")
        for video in self._videos:
            video.job._finish("cancelled")

    # -- understanding ----------------------------------------------------------------------------
    def _next(self, queue: list, fits):
        """Pop the first waiting handle if `fits` admits it (else None); cancelled ones are finished."""
        with self._wake:
            while queue and queue[0].cancelled:
                self._end(queue.pop(0), "cancelled")
            return queue.pop(0) if queue and fits(queue[0]) else None

    def _fits_prefill(self, stream: TextStream) -> bool:
        """Within this step's prefill budget (the first prompt always is) and the batch's caps."""
        budget = self.config.max_prefill_tokens
        return (self._prefilled == 0 or self._prefilled + stream.prompt_tokens <= budget) and self._fits_chat(stream)

    def _fits_chat(self, stream: TextStream) -> bool:
        rows = len(self._rows) + 1
        if rows > self.config.max_batch:
            return False
        if self.config.max_kv_bytes is None or not self._rows:
            return True  # alone, submit already checked it fits
        length = max(self._batch.length, stream.prompt_tokens)
        remaining = max([r.remaining for r in self._rows] + [stream.params.max_new_tokens])
        return rows * (length + remaining) * self._bytes_per_token <= self.config.max_kv_bytes

    def _admit_chat(self) -> None:
        self._prefilled = 0  # running rows wait for this step's prefills: bound the stall
        while (stream := self._next(self._waiting, self._fits_prefill)) is not None:
            try:
                row, state = self._prefill(stream)
            except Exception as err:  # one bad request must not stop the others
                self._prefilled += stream.prompt_tokens
                self._end(stream, "failed", err)
                continue
            if row is not None:
                self._batch.add(state)
                self._rows.append(row)

    def _prefill(self, stream: TextStream) -> tuple[_Row | None, DecodeState]:
        """The prompt through the stack and the first token: the row to join, or None when it is done."""
        stream.status, stream.timings.started = "running", time.perf_counter()
        params = stream.params
        generator = None
        if params.do_sample:
            generator = torch.Generator()
            generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        if self.prefix_cache is None:
            (logits, state), reused = prefill(self.backend, stream.inputs), 0
        else:
            logits, state, reused = self.prefix_cache.prefill(stream.inputs)
        stream.reused_tokens = reused
        self._prefilled += stream.prompt_tokens - reused
        row = _Row(stream, generator)
        self.observer.observe("ttft", self._emit(row, logits) - stream.timings.submitted)
        return (None if stream.done else row), state

    def _emit(self, row: _Row, logits: torch.Tensor, token: int | None = None) -> float:
        """Sample the row's next token from [1, vocab] logits (unless the caller chose it) and hand it
        out; returns the time."""
        stream = row.stream
        if token is None:
            token = int(next_token(logits, stream.params, row.generator)[0])
        stream.tokens.append(token)
        row.pending = token
        stream._emit(token)
        if token in stream.params.stop_token_ids:
            stream.finish_reason = "stop"
        elif row.remaining <= 0:
            stream.finish_reason = "length"
        if stream.finish_reason is not None:
            self._end(stream, "finished")
        return stream.timings.tokens[-1]

    def _decode(self) -> None:
        self._drop_rows()
        if not self._rows:
            return
        tokens = torch.tensor([r.pending for r in self._rows], dtype=torch.long)
        try:
            logits = self._batch.step(tokens)
        except Exception as err:
            for row in self._rows:
                self._end(row.stream, "failed", err)
            self._rows, self._batch = [], self._new_batch()
            return
        # the greedy rows' ids in one argmax and one copy to the host, not one per row
        greedy = logits.argmax(-1).tolist() if any(not r.stream.params.do_sample for r in self._rows) else []
        for i, row in enumerate(self._rows):
            before = row.stream.timings.tokens[-1]
            token = None if row.stream.params.do_sample else greedy[i]
            self.observer.observe("tpot", self._emit(row, logits[i : i + 1], token) - before)
        self._drop_rows()

    def _drop_rows(self) -> None:
        """Finished and cancelled rows leave the batch (and their cache slots) now."""
        for row in self._rows:
            if row.stream.cancelled and not row.stream.done:
                self._end(row.stream, "cancelled")
        keep = [i for i, r in enumerate(self._rows) if not r.stream.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    def _end(self, handle, status: str, error: BaseException | None = None) -> None:
        if isinstance(handle, TextStream) and handle.finish_reason is None:
            handle.finish_reason = "cancelled" if status == "cancelled" else None
        handle._finish(status, error)
        self._durations.append(handle.timings.finished - handle.timings.submitted)
        del self._durations[:-64]
        self.observer.finished(handle.kind, status)

    # -- video ------------------------------------------------------------------------------------
    def _fits_video(self, job: VideoJob) -> bool:
        if len(self._videos) >= self.config.max_video_batch:
            return False
        return not self._videos or tuple(job.request.noise.shape) == tuple(self._videos[0].latents.shape)

    def _admit_videos(self) -> None:
        while (job := self._next(self._waiting_videos, self._fits_video)) is not None:
            try:
                row, prefix = self._start_video(job)
            except Exception as err:
                self._end(job, "failed", err)
                continue
            self._prefix = prefix if not self._videos else batching.merge(self.backend, [self._prefix, prefix])
            self._videos.append(row)

    def _start_video(self, job: VideoJob) -> tuple[_VideoRow, DecodeState]:
        job.status, job.timings.started = "running", time.perf_counter()
        request = job.request
        ddim = make_scheduler(self.backend.config.video_generation)
        ddim.set_timesteps(request.steps)
        prefix = encode_prompt(self.backend, request.input_ids, request.attention_mask)
        return _VideoRow(job, ddim, request.noise.to(self.backend.device) * ddim.init_noise_sigma), prefix

    def _denoise(self) -> None:
        self._drop_videos()
        if not self._videos:
            return
        started = time.perf_counter()
        try:
            self._guided_step()
        except Exception as err:
            for row in self._videos:
                self._end(row.job, "failed", err)
            self._videos, self._prefix = [], DecodeState()
            return
        self.observer.observe("ddim_step", time.perf_counter() - started)
        for row in self._videos:
            if row.job.step == row.job.request.steps:
                self._finish_video(row)
        self._drop_videos()

    def _guided_step(self) -> None:
        """Every running job one DDIM step, in one CFG batch [neg_1, pos_1, neg_2, pos_2, ...]."""
        latents = torch.cat([torch.cat([r.latents, r.latents]) for r in self._videos])
        steps = [r.ddim.timesteps[r.job.step] for r in self._videos]
        timestep = torch.stack([t for t in steps for _ in range(2)]).long()
        v = predict_v(self.backend, latents, timestep, prefix=self._prefix).float()
        for i, (row, t) in enumerate(zip(self._videos, steps)):
            v_negative, v_positive = v[2 * i : 2 * i + 1], v[2 * i + 1 : 2 * i + 2]
            guided = v_negative + row.job.request.guidance_scale * (v_positive - v_negative)
            row.latents = row.ddim.step(guided, int(t), row.latents, return_dict=False)[0]
            row.job.step += 1
            row.job._emit(row.job.step)

    def _finish_video(self, row: _VideoRow) -> None:
        job = row.job
        job.latents = row.latents.cpu()  # what a caller holds lives on the host
        try:
            if job.request.decode:
                job.video = self.backend.vae_decode(row.latents).cpu()
        except Exception as err:
            self._end(job, "failed", err)
            return
        self._end(job, "finished")

    def _drop_videos(self) -> None:
        for row in self._videos:
            if row.job.cancelled and not row.job.done:
                self._end(row.job, "cancelled")
        keep = [i for i, r in enumerate(self._videos) if not r.job.done]
        if len(keep) == len(self._videos):
            return
        rows = [j for i in keep for j in (2 * i, 2 * i + 1)]
        self._videos = [self._videos[i] for i in keep]
        self._prefix = batching.select(self.backend, self._prefix, rows) if keep else DecodeState()
