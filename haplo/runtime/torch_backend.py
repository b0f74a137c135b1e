"""PyTorch eager over the reference model: the baseline every other backend is compared with."""

from __future__ import annotations

import torch

from haplo.errors import RequestError
from haplo.model.vae import decode_latents
from haplo.runtime.backend import Backend


class TorchBackend(Backend):
    """PyTorch eager over `HaploOmniForConditionalGeneration` (and its VAE, for `vae_decode`), on the
    model's device: inputs go there, and results and caches stay there (on a GPU, the GPU baseline)."""

    name = "torch"

    def __init__(self, model, vae=None):
        self.model, self.vae = model, vae
        self.config = model.config
        self.device = model.device
        self.cache_element_size = torch.empty((), dtype=model.dtype).element_size()

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.model.dtype) if x.is_floating_point() else x.to(self.device)

    @torch.no_grad()
    def embed_text(self, input_ids):
        return self.model.model.embed_tokens(self._cast(input_ids))

    @torch.no_grad()
    def embed_images(self, pixel_values, image_sizes):
        return self.model.model.embed_images(self._cast(pixel_values), image_sizes)

    @torch.no_grad()
    def embed_videos(self, pixel_values_videos):
        return self.model.model.embed_videos(self._cast(pixel_values_videos))

    @torch.no_grad()
    def embed_generation(self, latents, timestep):
        temb = self.model.time_embed(self._cast(timestep), latents.shape[0])
        time_token, latent_tokens = self.model.embed_generation_inputs(self._cast(latents), temb)
        return time_token, latent_tokens, temb

    @torch.no_grad()
    def run_stage(self, stage, hidden, position_ids, key_start, past=None, use_cache=True):
        return self.model.model.stage_forward(
            stage, self._cast(hidden), self._cast(position_ids), self._cast(key_start), past, use_cache=use_cache
        )

    @torch.no_grad()
    def lm_head(self, last_decoder_hidden_state):
        return self.model.lm_head(self.model.model.lm_hidden(self._cast(last_decoder_hidden_state)))

    @torch.no_grad()
    def latent_head(self, hidden, temb, latent_shape):
        return self.model.latent_head(self._cast(hidden), self._cast(temb), latent_shape)

    def check_vae_size(self, latent_shape):
        if self.vae is None:
            raise RequestError(
                "no VAE to decode the video with: pass --vae DIR (a diffusers AutoencoderKLCogVideoX "
                "directory), or a checkpoint with a vae/ folder"
            )

    @torch.no_grad()
    def vae_decode(self, latents):
        self.check_vae_size(tuple(latents.shape[1:]))
        return decode_latents(self.vae, latents)
