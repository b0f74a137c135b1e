"""What is timed: the runtime's own loops, cut into the quantities the field reports.

Understanding: TTFT (embed + prefill + first token), TPOT (one decode step through every stage and
the LM head), tokens/s. Generation: one guided DDIM step with and without the text-prefix reuse,
the prefix encode, the VAE decode, end to end. All through `haplo.runtime` (decoding, ddim), so every backend runs
exactly the schedule users run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from haplo.bench.timing import TimedBackend, stats
from haplo.model.config import HaploOmniConfig
from haplo.runtime.ddim import denoise, encode_prompt, make_scheduler, predict_v
from haplo.runtime.decoding import DecodeState, decode_step, prefill


def random_prompt(config: HaploOmniConfig, length: int, batch: int = 1, seed: int = 0) -> dict:
    """Plain text token ids of an exact length (no image or video placeholders)."""
    high = min(config.vocab_size, config.image_token_index, config.video_token_index)
    ids = torch.randint(4, high, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _timed_prefill(backend, inputs: dict) -> tuple[float, torch.Tensor, DecodeState]:
    """(seconds for prefill and its greedy token, the token, the state to decode from)."""
    started = time.perf_counter()
    logits, state = prefill(backend, inputs)
    token = logits.argmax(-1)
    return time.perf_counter() - started, token, state


def _timed_decode(backend, token: torch.Tensor, state: DecodeState, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy decode steps after `state`: one row runs on the backend's own
    decode batch where it has one (ONNX Runtime's in-place caches; no per-stage breakdown then)."""
    batch = backend.decode_batch() if token.shape[0] == 1 else None
    if batch is not None:
        batch.add(state)
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        if batch is not None:
            logits = batch.step(token)
        else:
            logits, state = decode_step(backend, token, state)
        token = logits.argmax(-1)
        samples.append(time.perf_counter() - started)
    return samples


def _timed_calls(fn: Callable[[], object], count: int, warm: int) -> list[float]:
    """Seconds of `count` calls of `fn` after `warm` untimed ones."""
    samples = []
    for run in range(warm + count):
        started = time.perf_counter()
        fn()
        if run >= warm:
            samples.append(time.perf_counter() - started)
    return samples


def _add_mean(into: dict, phases: dict, repeats: int) -> None:
    for phase, ms in phases.items():
        into[phase] = into.get(phase, 0.0) + ms / repeats


@torch.no_grad()
def first_token_seconds(backend, inputs: dict) -> float:
    return _timed_prefill(backend, inputs)[0]


@torch.no_grad()
def understanding(backend: TimedBackend, inputs: dict, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Greedy, a fixed number of tokens (no stop token), so every backend does the same work."""
    ttft, tpot, totals, prefill_phases, decode_phases = [], [], [], {}, {}
    batch = inputs["input_ids"].shape[0]
    for run in range(warmup + repeats):
        backend.reset()
        first, token, state = _timed_prefill(backend, inputs)
        prefill_ms = backend.breakdown_ms(1)
        backend.reset()
        steps = _timed_decode(backend, token, state, new_tokens - 1)
        if run < warmup:
            continue
        ttft.append(first)
        tpot.extend(steps)
        totals.append(first + sum(steps))
        _add_mean(prefill_phases, prefill_ms, repeats)
        _add_mean(decode_phases, backend.breakdown_ms(len(steps)), repeats)
    tpot_stats = stats(tpot)
    return {
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "batch": batch,
        "ttft_ms": stats(ttft),
        "tpot_ms": tpot_stats,
        "tokens_per_s": batch * new_tokens / (sum(totals) / len(totals)),
        "decode_tokens_per_s": batch * 1e3 / tpot_stats["mean"] if tpot else None,
        "prefill_stage_ms": prefill_phases,
        "decode_step_stage_ms": decode_phases,
    }


@torch.no_grad()
def generation(
    backend: TimedBackend,
    prompt: dict,
    latent_shape: tuple,
    steps: int,
    guidance: float,
    warmup: int,
    repeats: int,
    seed: int = 0,
    vae: bool = True,
) -> dict:
    """One guided DDIM step (batch [negative, positive]) with and without prefix reuse; VAE; end to end."""
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
    batch = torch.cat([noise, noise])
    scheduler = make_scheduler(backend.config.video_generation)
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[0].expand(2).long()

    prefix_holder = {}
    prefix = _timed_calls(lambda: prefix_holder.update(state=encode_prompt(backend, ids, mask)), repeats, warmup)
    state = prefix_holder["state"]
    backend.reset()
    reuse = stats(_timed_calls(lambda: predict_v(backend, batch, t, ids, mask, state), repeats, warmup))
    phases = backend.breakdown_ms(warmup + repeats)
    full = stats(_timed_calls(lambda: predict_v(backend, batch, t, ids, mask, None), repeats, warmup))
    result = {
        "latent_shape": list(latent_shape),
        "latent_tokens": latent_tokens(backend.config, latent_shape),
        "text_tokens": int(ids.shape[1]),
        "cfg_batch": 2,
        "prefix_encode_ms": stats(prefix),
        "step_ms": reuse,
        "step_without_reuse_ms": full,
        "step_stage_ms": phases,
        "prefix_reuse_saving": 1 - reuse["p50"] / full["p50"],
    }
    if vae:
        result["vae_ms"] = stats(_timed_calls(lambda: backend.vae_decode(noise), max(1, repeats // 2), warmup))

    def end_to_end():
        latents = denoise(backend, ids, mask, noise, steps, guidance, reuse_prefix=True)
        if vae:
            backend.vae_decode(latents)

    # The calls above warmed every graph up; one end-to-end run is the request a user waits for.
    result["end_to_end_ms"] = stats(_timed_calls(end_to_end, 1, warm=0))
    result["end_to_end_steps"] = steps
    return result


def latent_tokens(config: HaploOmniConfig, latent_shape: tuple) -> int:
    frames, _, height, width = latent_shape
    patch = config.video_generation.latent_patch_size
    return frames * (height // patch) * (width // patch)


@torch.no_grad()
def decode_vs_past(backend, config: HaploOmniConfig, past_lengths: list[int], steps: int, seed: int = 0) -> list:
    """Decode-step time as the cache grows: prefill `past` tokens, then time `steps` steps."""
    rows = []
    for past in past_lengths:
        prefill_s, token, state = _timed_prefill(backend, random_prompt(config, past, seed=seed))
        samples = _timed_decode(backend, token, state, steps + 1)
        rows.append({"past_tokens": past, "prefill_ms": prefill_s * 1e3, "step_ms": stats(samples[1:])})
    return rows


@torch.no_grad()
def ddim_vs_latent_tokens(
    backend, config: HaploOmniConfig, videos: list[tuple[int, int, int]], prompt: dict, repeats: int, seed: int = 0
) -> list:
    """Guided DDIM-step time (with prefix reuse) as the video grows."""
    rows = []
    state = encode_prompt(backend, prompt["input_ids"], prompt["attention_mask"])
    for frames, height, width in videos:
        shape = config.video_generation.latent_shape(frames, height, width)
        noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed))
        t = torch.full((2,), 500, dtype=torch.long)
        step = functools.partial(predict_v, backend, noise, t, prompt["input_ids"], prompt["attention_mask"], state)
        samples = _timed_calls(step, repeats, warm=1)
        rows.append(
            {"video": [frames, height, width], "latent_tokens": latent_tokens(config, shape), "step_ms": stats(samples)}
        )
    return rows
