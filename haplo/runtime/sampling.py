"""Sampling for autoregressive decoding: parameters, the next-token rule, the output record.

The decode loop itself is `haplo.runtime.decoding.understand`, shared by every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from haplo.errors import RequestError


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or (self.do_sample and self.temperature == 0):
            raise RequestError(f"temperature must be > 0 when sampling (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class DecodeOutput:
    sequences: torch.Tensor  # [B, L + new] prompt ids followed by the new ids
    new_tokens: torch.Tensor  # [B, new], finished rows padded with pad_token_id
    step_logits: list = field(default_factory=list)  # raw next-token logits per step, [B, vocab] each


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B, vocab] raw logits -> [B] ids: greedy on the logits' device, or temperature -> top-k -> top-p
    sampling on the generator's (the host's for a seeded `torch.Generator()`: a seed draws the same
    tokens on every backend)."""
    if not params.do_sample:
        return logits.argmax(-1)
    if generator is not None:
        logits = logits.to(generator.device)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already cover top_p; the top token always stays
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
