"""The runtime: schedules autoregressive decoding and DDIM loops over any `Backend`.

Both loops are written once and run unchanged on PyTorch, ONNX Runtime and TensorRT, so that every
backend is compared on the same inputs, seeds and schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from haplo.backend import STAGES, Backend
from haplo.errors import RequestError
from haplo.generation import GenerateOutput, SamplingParams, next_token
from haplo.modeling import (
    denoise_positions,
    generation_positions,
    scatter_visual_features,
    understanding_key_start,
    understanding_positions,
)


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
) -> tuple[torch.Tensor, dict]:
    """pre -> base -> post. Returns (last_decoder_hidden_state, stage -> present cache)."""
    presents = {}
    for stage in STAGES:
        hidden, presents[stage] = backend.run_stage(
            stage, hidden, position_ids, key_start, None if past is None else past[stage]
        )
    return hidden, presents


def embed_understanding(
    backend: Backend, input_ids, pixel_values=None, image_sizes=None, pixel_values_videos=None
) -> torch.Tensor:
    images = None if pixel_values is None else backend.embed_images(pixel_values, image_sizes)
    videos = None if pixel_values_videos is None else backend.embed_videos(pixel_values_videos)
    return scatter_visual_features(backend.config, input_ids, backend.embed_text(input_ids), images, videos)


def forward_tokens(
    backend: Backend,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    attention_start_ids: torch.Tensor | None,
    state: DecodeState,
) -> tuple[torch.Tensor, DecodeState]:
    """Run new tokens (prompt or one decode step) through the stack: last-position logits [B, vocab]."""
    key_start = understanding_key_start(backend.config, attention_mask, attention_start_ids, state.length)
    position_ids = understanding_positions(attention_mask, state.next_position)
    if state.key_start is not None:
        key_start = torch.cat([state.key_start, key_start], dim=-1)
    hidden, presents = run_stack(backend, embeds, position_ids, key_start, state.past or None)
    logits = backend.lm_head(hidden[:, -1:])[:, -1]
    return logits, DecodeState(presents, key_start, position_ids[:, -1] + 1)


def check_prompt_length(config, prompt_tokens: int, new_tokens: int = 0) -> None:
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
) -> GenerateOutput:
    """Prefill the prompt, then decode one token at a time with every stage's KV cache.

    Extra keyword arguments are `SamplingParams` fields (max_new_tokens, do_sample, temperature, top_k,
    top_p, stop_token_ids, seed). A row stops at a stop token; the loop ends when every row has.
    """
    params = SamplingParams(**sampling)
    check_prompt_length(backend.config, input_ids.shape[1], params.max_new_tokens)
    pad = backend.config.pad_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    embeds = embed_understanding(backend, input_ids, pixel_values, image_sizes, pixel_values_videos)
    logits, state = forward_tokens(backend, embeds, attention_mask, attention_start_ids, DecodeState())
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    stop = torch.tensor(params.stop_token_ids, dtype=torch.long)
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
        logits, state = forward_tokens(backend, backend.embed_text(token[:, None]), step_mask, None, state)
    new = torch.stack(new_tokens, dim=1)
    return GenerateOutput(torch.cat([input_ids, new], dim=1), new, step_logits)


def encode_prompt(backend: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeState:
    """The text prefix's cache in every layer: identical at every DDIM step, so computed once."""
    text_len = input_ids.shape[1]
    key_start, position_ids = generation_positions(attention_mask, 0)  # text + time token: keep the text
    key_start, position_ids = key_start[:, :text_len], position_ids[:, :text_len]
    _, presents = run_stack(backend, backend.embed_text(input_ids), position_ids, key_start)
    presents = {stage: backend.keep_cache(cache) for stage, cache in presents.items()}
    return DecodeState(presents, key_start, attention_mask.long().sum(-1))


def predict_v(
    backend: Backend,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: DecodeState | None = None,
) -> torch.Tensor:
    """One denoiser call: v-prediction [B, F, C, h, w]; with `prefix`, only time token + latents run."""
    time_token, latent_tokens, temb = backend.embed_generation(latents, timestep)
    num_visual = latent_tokens.shape[1]
    if prefix is None:
        sequence = torch.cat([backend.embed_text(input_ids), time_token, latent_tokens], dim=1)
        key_start, position_ids = generation_positions(attention_mask, num_visual)
        hidden, _ = run_stack(backend, sequence, position_ids, key_start)
    else:
        key_start, position_ids = denoise_positions(prefix.key_start, prefix.next_position, num_visual)
        hidden, _ = run_stack(backend, torch.cat([time_token, latent_tokens], 1), position_ids, key_start, prefix.past)
    return backend.latent_head(hidden[:, -num_visual:], temb, tuple(latents.shape))


@torch.no_grad()
def denoise(
    backend: Backend,
    input_ids: torch.Tensor,  # [2P, L]: P negative prompts, then P prompts, left padded
    attention_mask: torch.Tensor,
    latents: torch.Tensor,  # [P, F, C, h, w] initial noise
    num_inference_steps: int,
    guidance_scale: float,
    scheduler=None,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Classifier-free guided DDIM: v = v_neg + g (v_pos - v_neg), batch [negatives, prompts]."""
    check_prompt_length(backend.config, input_ids.shape[1])
    if num_inference_steps < 1:
        raise RequestError(f"the number of DDIM steps must be >= 1, got {num_inference_steps}")
    if scheduler is None:
        from haplo.pipeline import make_scheduler

        scheduler = make_scheduler(backend.config.video_generation)
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    prefix = encode_prompt(backend, input_ids, attention_mask) if reuse_prefix else None
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        batch = torch.cat([latents, latents])
        v = predict_v(backend, batch, t.expand(batch.shape[0]).long(), input_ids, attention_mask, prefix)
        v_negative, v_positive = v.float().chunk(2)
        latents = scheduler.step(
            v_negative + guidance_scale * (v_positive - v_negative), t, latents, return_dict=False
        )[0]
    return latents
