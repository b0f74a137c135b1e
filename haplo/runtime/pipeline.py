"""Text-to-video: classifier-free guidance over a CogVideoX DDIM loop, then the VAE decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the defining module: type checkers read diffusers' top-level name as its dummy placeholder class
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler

from haplo.runtime.backend import Backend
from haplo.runtime.ddim import denoise, make_scheduler
from haplo.runtime.requests import VideoRequest


@dataclass
class VideoOutput:
    """On the host, whatever device the backend denoised on."""

    latents: torch.Tensor  # [num_prompts, F, C, h, w]
    videos: torch.Tensor | None = None  # [num_prompts, 3, frames, H, W] in [-1, 1]


class TextToVideoPipeline:
    """prompts -> processor -> guided DDIM on a backend -> VAE decode.

    `backend` is any `haplo.runtime.backend.Backend` (e.g. `TorchBackend(model, vae)` or an ONNX Runtime bundle).
    """

    def __init__(self, backend: Backend, processor=None, scheduler: CogVideoXDDIMScheduler | None = None):
        self.backend, self.processor = backend, processor
        self.scheduler = scheduler or make_scheduler(backend.config.video_generation)

    def latent_shape(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """Latents of a video size (the config's default where None); refuses sizes the VAE cannot decode."""
        gen = self.backend.config.video_generation
        return gen.latent_shape(
            gen.num_frames if num_frames is None else num_frames,
            gen.height if height is None else height,
            gen.width if width is None else width,
        )

    def request(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        decode: bool = True,
    ) -> VideoRequest:
        """One prompt as a job for `Scheduler.submit_video`: the same ids and noise `__call__` uses."""
        gen = self.backend.config.video_generation
        batch = self.processor.process_prompt_for_generation([prompt], negative_prompt)
        shape = self.latent_shape(num_frames, height, width)
        if decode:
            self.backend.check_vae_size(shape)
        return VideoRequest(
            batch["input_ids"],
            batch["attention_mask"],
            torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)),
            gen.num_inference_steps if num_inference_steps is None else num_inference_steps,
            gen.guidance_scale if guidance_scale is None else guidance_scale,
            decode,
        )

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
        gen = self.backend.config.video_generation
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = self.processor.process_prompt_for_generation(prompts, negative_prompt)
        shape = self.latent_shape(num_frames, height, width)
        if output_type != "latent":
            self.backend.check_vae_size(shape)  # before the loop, not after it
        latents = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed))
        steps = gen.num_inference_steps if num_inference_steps is None else num_inference_steps
        latents = denoise(
            self.backend,
            batch["input_ids"],
            batch["attention_mask"],
            latents,
            steps,
            gen.guidance_scale if guidance_scale is None else guidance_scale,
            self.scheduler,
            reuse_prefix,
            progress,
        )
        if output_type == "latent":
            return VideoOutput(latents.cpu())
        return VideoOutput(latents.cpu(), self.backend.vae_decode(latents).cpu())
