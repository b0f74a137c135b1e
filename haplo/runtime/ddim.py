"""Classifier-free guided DDIM over any `Backend`: the text prefix cached once, one call per step.

The scheduler is CogVideoX-2B's (v-prediction, zero-terminal-SNR, SNR shift, trailing spacing);
the batch of every denoiser call is [negative prompts, prompts].
"""

from __future__ import annotations

import torch

# the defining module: type checkers read diffusers' top-level name as its dummy placeholder class
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler
from tqdm.auto import tqdm

from haplo.errors import RequestError
from haplo.model.config import VideoGenerationConfig
from haplo.model.sequence import denoise_positions, generation_sequence, prefix_layout
from haplo.runtime.backend import Backend
from haplo.runtime.decoding import DecodeState, check_prompt_length, run_stack


def make_scheduler(gen: VideoGenerationConfig) -> CogVideoXDDIMScheduler:
    """CogVideoX-2B's DDIM: v-prediction, zero-terminal-SNR rescale, SNR shift, trailing spacing."""
    return CogVideoXDDIMScheduler(
        num_train_timesteps=gen.num_train_timesteps,
        beta_start=gen.beta_start,
        beta_end=gen.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=gen.snr_shift_scale,
        timestep_spacing="trailing",
    )


def encode_prompt(backend: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeState:
    """The text prefix's cache in every layer: identical at every DDIM step, so computed once."""
    key_start, position_ids, next_position = prefix_layout(attention_mask.to(backend.device))
    _, presents = run_stack(backend, backend.embed_text(input_ids), position_ids, key_start)
    presents = {stage: backend.keep_cache(cache) for stage, cache in presents.items()}
    return DecodeState(presents, key_start, next_position)


def predict_v(
    backend: Backend,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix: DecodeState | None = None,
) -> torch.Tensor:
    """One denoiser call: v-prediction [B, F, C, h, w]; with `prefix` (the text's cache, any batch of
    prefixes joined by `batching.merge`), only time token + latents run and the ids are not needed."""
    time_token, latent_tokens, temb = backend.embed_generation(latents, timestep)
    num_visual = latent_tokens.shape[1]
    if prefix is None:
        if input_ids is None or attention_mask is None:
            raise ValueError("without a cached prefix, predict_v needs input_ids and attention_mask")
        text = backend.embed_text(input_ids)
        mask = attention_mask.to(backend.device)
        sequence, key_start, position_ids = generation_sequence(text, time_token, latent_tokens, mask)
        hidden, _ = run_stack(backend, sequence, position_ids, key_start, use_cache=False)
    else:
        if prefix.key_start is None or prefix.next_position is None:
            raise ValueError("prefix holds no cached text; build it with encode_prompt")
        key_start, position_ids = denoise_positions(prefix.key_start, prefix.next_position, num_visual)
        sequence = torch.cat([time_token, latent_tokens], 1)
        hidden, _ = run_stack(backend, sequence, position_ids, key_start, prefix.past, use_cache=False)
    return backend.latent_head(hidden[:, -num_visual:], temb, tuple(latents.shape))


@torch.no_grad()
def denoise(
    backend: Backend,
    input_ids: torch.Tensor,  # [2P, L]: P negative prompts, then P prompts, left padded
    attention_mask: torch.Tensor,
    latents: torch.Tensor,  # [P, F, C, h, w] initial noise
    num_inference_steps: int,
    guidance_scale: float,
    scheduler: CogVideoXDDIMScheduler | None = None,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Classifier-free guided DDIM: v = v_neg + g (v_pos - v_neg), batch [negatives, prompts]. The
    loop runs on the backend's device; the latents come back there."""
    check_prompt_length(backend.config, input_ids.shape[1])
    if num_inference_steps < 1:
        raise RequestError(f"the number of DDIM steps must be >= 1, got {num_inference_steps}")
    scheduler = scheduler or make_scheduler(backend.config.video_generation)
    scheduler.set_timesteps(num_inference_steps)
    latents = latents.to(backend.device) * scheduler.init_noise_sigma
    prefix = encode_prompt(backend, input_ids, attention_mask) if reuse_prefix else None
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        batch = torch.cat([latents, latents])
        v = predict_v(backend, batch, t.expand(batch.shape[0]).long(), input_ids, attention_mask, prefix)
        v_negative, v_positive = v.float().chunk(2)
        latents = scheduler.step(
            v_negative + guidance_scale * (v_positive - v_negative), t, latents, return_dict=False
        )[0]
    return latents
