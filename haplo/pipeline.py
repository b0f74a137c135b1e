"""Text-to-video: classifier-free guidance over a CogVideoX DDIM loop, then the VAE decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CogVideoXDDIMScheduler
from tqdm.auto import tqdm

from haplo.config import VideoGenerationConfig
from haplo.vae import decode_latents


def make_scheduler(gen: VideoGenerationConfig) -> CogVideoXDDIMScheduler:
    """CogVideoX-2B's DDIM: v-prediction, zero-terminal-SNR rescale, SNR shift, trailing spacing."""
    return CogVideoXDDIMScheduler(
        num_train_timesteps=gen.num_train_timesteps, beta_start=gen.beta_start, beta_end=gen.beta_end,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=gen.snr_shift_scale,
        timestep_spacing="trailing",
    )


@dataclass
class VideoOutput:
    latents: torch.Tensor  # [num_prompts, F, C, h, w]
    videos: torch.Tensor | None = None  # [num_prompts, 3, frames, H, W] in [-1, 1]


class TextToVideoPipeline:
    """model + processor (+ VAE) -> videos. The text prefix's K/V is computed once per request."""

    def __init__(self, model, processor=None, vae=None, scheduler: CogVideoXDDIMScheduler | None = None):
        self.model, self.processor, self.vae = model, processor, vae
        self.scheduler = scheduler or make_scheduler(model.config.video_generation)

    @torch.no_grad()
    def denoise(
        self,
        input_ids: torch.Tensor,  # [2P, L]: P negative prompts, then P prompts, left padded
        attention_mask: torch.Tensor,
        latents: torch.Tensor,  # [P, F, C, h, w] initial noise
        num_inference_steps: int,
        guidance_scale: float,
        reuse_prefix: bool = True,
        progress: bool = True,
    ) -> torch.Tensor:
        model, scheduler = self.model, self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        latents = latents * scheduler.init_noise_sigma
        prefix = model.encode_prompt(input_ids, attention_mask) if reuse_prefix else None
        for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
            batch = torch.cat([latents, latents]).to(model.dtype)
            timestep = t.expand(batch.shape[0]).long()
            if prefix is not None:
                v = model.denoise(batch, timestep, prefix)
            else:
                v = model.generation_forward(batch, timestep, input_ids, attention_mask)
            v_negative, v_positive = v.float().chunk(2)
            v = v_negative + guidance_scale * (v_positive - v_negative)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        output_type: str = "video",  # "video" | "latent"
        reuse_prefix: bool = True,
        progress: bool = True,
    ) -> VideoOutput:
        gen = self.model.config.video_generation
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = self.processor.process_prompt_for_generation(prompts, negative_prompt)
        shape = gen.latent_shape(num_frames or gen.num_frames, height or gen.height, width or gen.width)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((len(prompts), *shape), generator=generator).to(self.model.device)
        latents = self.denoise(batch["input_ids"].to(self.model.device), batch["attention_mask"].to(self.model.device),
                               latents, num_inference_steps or gen.num_inference_steps,
                               gen.guidance_scale if guidance_scale is None else guidance_scale,
                               reuse_prefix, progress)
        if output_type == "latent" or self.vae is None:
            return VideoOutput(latents)
        return VideoOutput(latents, decode_latents(self.vae, latents))
