"""Measuring: percentile stats over repeats, peak resident memory, and per-stage time of a backend."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import psutil
import torch

from haplo.runtime.backend import Backend


def stats(samples_s: list[float]) -> dict:
    """Milliseconds: p50/p90/p99/mean/min over warm samples (seconds in)."""
    if not samples_s:
        return {"n": 0}
    ms = np.asarray(samples_s) * 1e3
    return {
        "n": int(ms.size),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
    }


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak_mib` is the largest value seen.

    RSS is process-wide: a segment's peak includes whatever earlier segments left allocated, so the
    report gives both the peak and the growth over the segment's starting RSS.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.start_mib = self.peak_mib = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.process.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.start_mib = self.peak_mib = self.process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.process.memory_info().rss / 2**20)

    def to_dict(self) -> dict:
        return {"peak_rss_mib": round(self.peak_mib, 1), "rss_growth_mib": round(self.peak_mib - self.start_mib, 1)}


def gpu_peak_memory_mib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # no CUDA build: nothing to report
        pass
    return None


# Which bucket of the per-stage breakdown each backend call belongs to.
PHASES = {
    "embed_text": "embed",
    "embed_images": "embed",
    "embed_videos": "embed",
    "embed_generation": "embed",
    "lm_head": "heads",
    "latent_head": "heads",
    "vae_decode": "vae",
}


class TimedBackend(Backend):
    """Wraps a backend and adds up wall time per phase (embed, pre, base, post, heads, vae).

    Results stay on the backend's device, so a phase on a GPU ends with a synchronize: its wall time
    includes its device work.
    """

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.config, self.device = inner.name, inner.config, inner.device
        self.cache_element_size = inner.cache_element_size
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    @contextmanager
    def _timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[phase] += time.perf_counter() - started
            self.calls[phase] += 1

    def _call(self, method: str, *args):
        with self._timed(PHASES[method]):
            return getattr(self.inner, method)(*args)

    def decode_batch(self):
        return self.inner.decode_batch()

    def cache_tensors(self, past):
        return self.inner.cache_tensors(past)

    def cache_from_tensors(self, tensors):
        return self.inner.cache_from_tensors(tensors)

    def embed_text(self, input_ids):
        return self._call("embed_text", input_ids)

    def embed_images(self, pixel_values, image_sizes):
        return self._call("embed_images", pixel_values, image_sizes)

    def embed_videos(self, pixel_values_videos):
        return self._call("embed_videos", pixel_values_videos)

    def embed_generation(self, latents, timestep):
        return self._call("embed_generation", latents, timestep)

    def run_stage(self, stage, hidden, position_ids, key_start, past=None, use_cache=True):
        with self._timed(stage):
            return self.inner.run_stage(stage, hidden, position_ids, key_start, past, use_cache)

    def lm_head(self, last_decoder_hidden_state):
        return self._call("lm_head", last_decoder_hidden_state)

    def latent_head(self, hidden, temb, latent_shape):
        return self._call("latent_head", hidden, temb, latent_shape)

    def vae_decode(self, latents):
        return self._call("vae_decode", latents)

    def check_vae_size(self, latent_shape):
        return self.inner.check_vae_size(latent_shape)

    def keep_cache(self, past):
        return self.inner.keep_cache(past)

    def breakdown_ms(self, per: int) -> dict:
        """Mean milliseconds per phase, dividing the totals by `per` (runs or steps)."""
        return {phase: 1e3 * total / max(per, 1) for phase, total in sorted(self.totals.items())}
