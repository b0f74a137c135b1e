"""Autoregressive decoding over any `Backend`: prefill, one step at a time with every stage's cache.

Written once and run unchanged on PyTorch, ONNX Runtime and TensorRT, so that every backend is
compared on the same inputs, seeds and schedule. The DDIM loop is `haplo.runtime.ddim`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from haplo.errors import RequestError
from haplo.model.config import STAGES, HaploOmniConfig
from haplo.model.sequence import scatter_visual_features, understanding_key_start, understanding_positions
from haplo.runtime.backend import Backend, to_device
from haplo.runtime.sampling import DecodeOutput, SamplingParams, next_token


@dataclass
class DecodeState:
    """What a request carries between steps: each stage's cache, key starts, next RoPE position."""

    past: dict = field(default_factory=dict)  # stage -> backend-owned cache
    key_start: torch.Tensor | None = None  # [B, cached length]
    next_position: torch.Tensor | None = None  # [B]

    @property
    def length(self) -> int:
        return 0 if self.key_start is None else self.key_start.shape[-1]


def run_stack(
    backend: Backend,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    key_start: torch.Tensor,
    past: dict | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, dict]:
    """pre -> base -> post on the backend's device. Returns (last_decoder_hidden_state, stage ->
    present cache); with `use_cache=False` no stage keeps its present and the dict is empty."""
    presents = {}
    for stage in STAGES:
        hidden, present = backend.run_stage(
            stage, hidden, position_ids, key_start, None if past is None else past[stage], use_cache
        )
        if use_cache:
            presents[stage] = present
    return hidden, presents


def embed_understanding(
    backend: Backend,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text embeddings with the images' and videos' features in their placeholders: [B, L, pre width]."""
    images = None
    if pixel_values is not None:
        if image_sizes is None:
            raise RequestError("pixel_values need image_sizes (the processor gives both)")
        images = backend.embed_images(pixel_values, image_sizes)
    videos = None if pixel_values_videos is None else backend.embed_videos(pixel_values_videos)
    return scatter_visual_features(backend.config, input_ids, backend.embed_text(input_ids), images, videos)


def forward_tokens(
    backend: Backend,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    attention_start_ids: torch.Tensor | None,
    state: DecodeState,
) -> tuple[torch.Tensor, DecodeState]:
    """Run new tokens (prompt or one decode step) through the stack: last-position logits [B, vocab].
    The mask and start ids are on the backend's device (`prefill` and `decode_step` put them there)."""
    key_start = understanding_key_start(backend.config, attention_mask, attention_start_ids, state.length)
    position_ids = understanding_positions(attention_mask, state.next_position)
    if state.key_start is not None:
        key_start = torch.cat([state.key_start, key_start], dim=-1)
    hidden, presents = run_stack(backend, embeds, position_ids, key_start, state.past or None)
    logits = backend.lm_head(hidden[:, -1:])[:, -1]
    return logits, DecodeState(presents, key_start, position_ids[:, -1] + 1)


def prefill(backend: Backend, inputs: dict) -> tuple[torch.Tensor, DecodeState]:
    """The processor's batch (input_ids, attention_mask, optional pixels and start ids) through the
    stack with empty caches: (next-token logits [B, vocab], the state to decode from), on the
    backend's device (image sizes stay on the host: they shape the tiles)."""
    inputs = {**to_device(inputs, backend.device), "image_sizes": inputs.get("image_sizes")}
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(inputs["input_ids"])
    embeds = embed_understanding(
        backend,
        inputs["input_ids"],
        inputs.get("pixel_values"),
        inputs.get("image_sizes"),
        inputs.get("pixel_values_videos"),
    )
    return forward_tokens(backend, embeds, attention_mask, inputs.get("attention_start_ids"), DecodeState())


def decode_step(
    backend: Backend, token: torch.Tensor, state: DecodeState, live: torch.Tensor | None = None
) -> tuple[torch.Tensor, DecodeState]:
    """One new token per row ([B] ids) after `state`; rows where `live` is False feed padding nobody
    attends. Returns (next-token logits [B, vocab], the state after it)."""
    token = token.to(backend.device)
    step_mask = torch.ones_like(token[:, None]) if live is None else live.to(backend.device).long()[:, None]
    return forward_tokens(backend, backend.embed_text(token[:, None]), step_mask, None, state)


def check_prompt_length(config: HaploOmniConfig, prompt_tokens: int, new_tokens: int = 0) -> None:
    """A prompt (plus the tokens to decode) must fit the model's positions."""
    limit = config.base.max_position_embeddings
    if prompt_tokens + new_tokens > limit:
        extra = f" + {new_tokens} new tokens" if new_tokens else ""
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens{extra}, more than the model's {limit} positions "
            "(max_position_embeddings); shorten the prompt" + (" or ask for fewer new tokens" if new_tokens else "")
        )


@torch.no_grad()
def understand(
    backend: Backend,
    input_ids: torch.Tensor,  # [B, L] left padded
    attention_mask: torch.Tensor | None = None,
    attention_start_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    return_logits: bool = False,
    **sampling,
) -> DecodeOutput:
    """Prefill the prompt, then decode one token at a time with every stage's KV cache.

    Extra keyword arguments are `SamplingParams` fields (max_new_tokens, do_sample, temperature, top_k,
    top_p, stop_token_ids, seed). A row stops at a stop token; the loop ends when every row has.
    """
    params = SamplingParams(**sampling)
    check_prompt_length(backend.config, input_ids.shape[1], params.max_new_tokens)
    pad = backend.config.pad_token_id if pad_token_id is None else pad_token_id
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "attention_start_ids": attention_start_ids,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "pixel_values_videos": pixel_values_videos,
    }
    logits, state = prefill(backend, inputs)
    # one unpadded row: the backend's own in-place decode batch where it has one (ONNX Runtime)
    unpadded = attention_mask is None or bool(attention_mask.all())
    batch = backend.decode_batch() if input_ids.shape[0] == 1 and unpadded else None
    if batch is not None:
        batch.add(state)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    stop = torch.tensor(params.stop_token_ids, dtype=torch.long)
    new_tokens, step_logits = [], []
    for step in range(params.max_new_tokens):
        if return_logits:
            step_logits.append(logits.cpu())
        token = next_token(logits, params, generator).cpu()  # the one host copy per step: [B] ids
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        if batch is not None:
            logits = batch.step(token)
        else:
            logits, state = decode_step(backend, token, state, live=~finished)
    new = torch.stack(new_tokens, dim=1)
    return DecodeOutput(torch.cat([input_ids, new], dim=1), new, step_logits)
