"""Calibration: activation ranges of every nn.Linear, and held-out feeds for the accuracy checks.

Both come from the PyTorch model running the real pipeline (processor-made prompts with an image,
greedy decoding, guided DDIM over several timesteps), through the runtime every backend uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from haplo.runtime.ddim import denoise
from haplo.runtime.decoding import understand
from haplo.runtime.torch_backend import TorchBackend
from haplo.video import evenly_spaced


class RangeRecorder:
    """Forward pre-hooks on every nn.Linear: running min / max / absolute max of its input."""

    def __init__(self, model: nn.Module):
        self.ranges: dict[str, list[float]] = {}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def _hook(self, name: str):
        def record(module, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            old = self.ranges.get(name)
            self.ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

        return record

    def close(self) -> dict[str, list[float]]:
        for handle in self.handles:
            handle.remove()
        return self.ranges


def calibration_prompts() -> tuple[list[str], list[str]]:
    questions = [
        "What moves in the picture, and in which direction?",
        "Describe the colours and shapes.",
        "How many objects are there?",
    ]
    captions = [
        "a red square moves from left to right",
        "a blue circle bounces up and down on a white background",
        "a green triangle drifts slowly to the left",
    ]
    return questions, captions


def _shape_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.full((96, 128, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    y, x = rng.integers(0, 60), rng.integers(0, 90)
    pixels[y : y + 30, x : x + 36] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


@torch.no_grad()
def run_pipeline(
    backend, processor, latent_shape: tuple, seed: int = 0, decode_steps: int = 8, ddim_steps: int = 4
) -> None:
    """The real pipeline on `backend`: understanding prompts with an image (prefill + greedy decode)
    and guided DDIM over several timesteps. Calibration and accuracy both drive it."""

    questions, captions = calibration_prompts()
    for i, question in enumerate(questions):
        conversation = [{"role": "user", "content": "<image>\n" + question}]
        inputs = processor(conversations=[conversation], images=[_shape_image(seed * 100 + i)])
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        understand(backend, **tensors, max_new_tokens=decode_steps)
    for i, caption in enumerate(captions):
        prompt = processor.process_prompt_for_generation([caption], "")
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed * 100 + i))
        denoise(backend, prompt["input_ids"], prompt["attention_mask"], noise, ddim_steps, 6.5)


def calibrate(model, processor, latent_shape: tuple, seed: int = 0) -> dict[str, list[float]]:
    """Input range [min, max] of every nn.Linear over the calibration pipeline run."""
    recorder = RangeRecorder(model)
    try:
        run_pipeline(TorchBackend(model), processor, latent_shape, seed)
    finally:
        ranges = recorder.close()
    return ranges


class RecordingBackend:
    """Wraps a backend and keeps the feeds each decoder graph received (for accuracy checks)."""

    def __init__(self, inner, stage_layers: dict[str, list[int]]):
        self.inner, self.stage_layers = inner, stage_layers
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {stage: [] for stage in stage_layers}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_stage(self, stage, hidden, position_ids, key_start, past=None, use_cache=True):
        out = self.inner.run_stage(stage, hidden, position_ids, key_start, past, use_cache)
        if stage in self.feeds:
            feed = {
                "hidden_states": hidden.float().cpu().numpy(),
                "position_ids": position_ids.long().cpu().numpy(),
                "key_start": key_start.long().cpu().numpy(),
            }
            cfg = self.inner.config.stages[stage]
            for i, n in enumerate(self.stage_layers[stage]):
                if past is None:
                    empty = np.zeros(cfg.kv_shape(hidden.shape[0], 0), np.float32)
                    k = v = empty
                else:
                    k, v = (t.float().cpu().numpy() for t in past[i])
                feed[f"past_key_values.{n}.key"], feed[f"past_key_values.{n}.value"] = k, v
            self.feeds[stage].append(feed)
        return out

    def sample(self, stage: str, count: int) -> list[dict[str, np.ndarray]]:
        """`count` feeds spread over the run: prefills, decode steps and DDIM steps alike."""
        feeds = self.feeds[stage]
        picks = evenly_spaced(len(feeds), min(count, len(feeds)))
        return [feeds[i] for i in sorted(set(picks.tolist()))]


def evaluation_feeds(
    model, processor, latent_shape: tuple, stage_layers: dict[str, list[int]], count: int = 8
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs each decoder graph sees on held-out prompts (another seed than calibration)."""
    recorder = RecordingBackend(TorchBackend(model), stage_layers)
    run_pipeline(recorder, processor, latent_shape, seed=1, decode_steps=4, ddim_steps=2)
    return {stage: recorder.sample(stage, count) for stage in stage_layers}
