"""The one small interface the runtime drives: PyTorch, ONNX Runtime and TensorRT all implement it.

A backend runs the model's pieces, cut where the exported graphs are cut: embeddings, one decoder
stage at a time (with its layers' KV cache in and out), and the heads. Tensors cross the interface
as torch tensors on CPU; a backend may keep its own device-resident state (e.g. ONNX Runtime
OrtValues for the KV cache) behind the opaque `past` objects it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from haplo.config import HaploOmniConfig
from haplo.errors import RequestError

STAGES = ("pre", "base", "post")


class Backend(ABC):
    name: str
    config: HaploOmniConfig

    # -- embeddings (pre width) -------------------------------------------------------------------
    @abstractmethod
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int64 -> [B, L, pre width]."""

    @abstractmethod
    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Processor pixels -> per image [tokens, pre width] (packed, newline tokens included)."""

    @abstractmethod
    def embed_videos(self, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        """[B, F, 3, S, S] -> per video [F * P + 1, pre width]."""

    @abstractmethod
    def embed_generation(self, latents: torch.Tensor, timestep: torch.Tensor):
        """latents [B, F, C, h, w], timestep [B] -> (time_token [B, 1, pre], latent_tokens [B, V, pre],
        temb [B, time_embed_dim])."""

    # -- decoder stages -----------------------------------------------------------------------------
    @abstractmethod
    def run_stage(
        self, stage: str, hidden: torch.Tensor, position_ids: torch.Tensor, key_start: torch.Tensor, past=None
    ):
        """One stage (see HaploOmniModel.stage_forward): hidden [B, L, in width], position_ids [B, L],
        key_start [B, Lpast + L], past = this stage's cache from a previous call or None.
        Returns (hidden [B, L, out width], present) where present is this stage's cache after the call."""

    # -- heads ------------------------------------------------------------------------------------
    @abstractmethod
    def lm_head(self, last_decoder_hidden_state: torch.Tensor) -> torch.Tensor:
        """[B, L, post width] -> logits [B, L, vocab]."""

    @abstractmethod
    def latent_head(self, hidden: torch.Tensor, temb: torch.Tensor, latent_shape: tuple) -> torch.Tensor:
        """latent rows [B, V, post width], temb -> v-prediction [B, F, C, h, w]."""

    @abstractmethod
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, h, w] latents -> [B, 3, frames, H, W] video in [-1, 1]."""

    @abstractmethod
    def check_vae_size(self, latent_shape: tuple[int, int, int, int]) -> None:
        """Raise RequestError unless `vae_decode` can decode latents of (frames, C, h, w)."""

    # -- cache helpers shared by every backend ------------------------------------------------------
    def keep_cache(self, past):
        """A cache that later calls reuse many times (the text prefix); backends that recycle output
        buffers copy it out here."""
        return past

    def expand_past(self, past, repeats: int):
        """The same cache for `repeats` consecutive copies of each batch row (CFG reuse)."""
        return [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in past]


class TorchBackend(Backend):
    """PyTorch eager over the reference model: the baseline every other backend is compared with."""

    name = "torch"

    def __init__(self, model, vae=None):
        self.model, self.vae = model, vae
        self.config = model.config

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.model.dtype) if x.is_floating_point() else x

    @torch.no_grad()
    def embed_text(self, input_ids):
        return self.model.model.embed_tokens(input_ids)

    @torch.no_grad()
    def embed_images(self, pixel_values, image_sizes):
        return self.model.model.embed_images(self._cast(pixel_values), image_sizes)

    @torch.no_grad()
    def embed_videos(self, pixel_values_videos):
        return self.model.model.embed_videos(self._cast(pixel_values_videos))

    @torch.no_grad()
    def embed_generation(self, latents, timestep):
        temb = self.model.time_embed(timestep, latents.shape[0])
        time_token, latent_tokens = self.model.embed_generation_inputs(self._cast(latents), temb)
        return time_token, latent_tokens, temb

    @torch.no_grad()
    def run_stage(self, stage, hidden, position_ids, key_start, past=None):
        return self.model.model.stage_forward(stage, self._cast(hidden), position_ids, key_start, past)

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
        from haplo.vae import decode_latents

        return decode_latents(self.vae, latents)
