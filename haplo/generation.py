"""Autoregressive decoding for understanding: prefill, then one token at a time through all stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, L + new] prompt ids followed by the new ids
    new_tokens: torch.Tensor  # [B, new], finished rows padded with pad_token_id
    step_logits: list = field(default_factory=list)  # raw next-token logits per step, [B, vocab] each


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B, vocab] raw logits -> [B] ids: greedy, or temperature -> top-k -> top-p sampling."""
    if not params.do_sample:
        return logits.argmax(-1)
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


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,  # [B, L] left padded
    attention_mask: torch.Tensor | None = None,
    attention_start_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    return_logits: bool = False,
    **sampling,
) -> GenerateOutput:
    """Prefill the prompt, then decode with the KV cache of all three stages.

    Keyword arguments not listed are `SamplingParams` fields (max_new_tokens, do_sample, temperature,
    top_k, top_p, stop_token_ids, seed). A row stops at a stop token; the loop ends when all rows did.
    """
    params = SamplingParams(**sampling)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(params.seed)
    out = model(input_ids, attention_mask, attention_start_ids, pixel_values, image_sizes, pixel_values_videos,
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    stop = torch.tensor(params.stop_token_ids, dtype=torch.long, device=input_ids.device)
    new_tokens, step_logits = [], []
    for step in range(params.max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        token = next_token(logits, params, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        step_mask = (~finished).long()[:, None]  # finished rows feed padding that nobody attends
        out = model(token[:, None], step_mask, None, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    new = torch.stack(new_tokens, dim=1)
    return GenerateOutput(torch.cat([input_ids, new], dim=1), new, step_logits)
