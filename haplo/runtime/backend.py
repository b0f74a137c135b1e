"""The one small interface the runtime drives: PyTorch, ONNX Runtime and TensorRT all implement it.

A backend runs the model's pieces, cut where the exported graphs are cut: embeddings, one decoder
stage at a time (with its layers' KV cache in and out), and the heads. Tensors cross the interface
as torch tensors on the backend's `device` (the CPU for ONNX Runtime, the GPU for TensorRT, the
model's device for PyTorch): a backend takes inputs from any device and returns its results where it
computed them, so a stage's output goes to the next stage without a host round trip. The runtime
moves the processor's host tensors there once per request (`to_device`) and brings back only what a
caller reads on the host: the sampled token ids, and a finished video. A backend may keep its own
state (e.g. ONNX Runtime OrtValues for the KV cache) behind the opaque `past` objects it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from haplo.model.config import HaploOmniConfig


def to_device(tensors: dict, device: torch.device) -> dict:
    """The tensors of a processor batch on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


class Backend(ABC):
    name: str
    config: HaploOmniConfig
    device: torch.device = torch.device("cpu")  # where the tensors it returns live

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
        self,
        stage: str,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_start: torch.Tensor,
        past=None,
        use_cache: bool = True,
    ):
        """One stage (see HaploOmniModel.stage_forward): hidden [B, L, in width], position_ids [B, L],
        key_start [B, Lpast + L], past = this stage's cache from a previous call or None.
        Returns (hidden [B, L, out width], present) where present is this stage's cache after the call;
        with `use_cache=False` (a DDIM step: its keys are thrown away) present is None and the backend
        need not keep it."""

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

    # -- cache -------------------------------------------------------------------------------------
    cache_element_size: int = 4  # bytes of one cached key or value element (fp32)

    def cache_tensors(self, past) -> list[torch.Tensor]:
        """A stage's cache as torch tensors, key then value per layer, each [B, Hkv, L, D]: what the
        scheduler pads, joins and splits by row (`haplo.runtime.batching`). Default: (k, v) per layer."""
        return [t for kv in past for t in kv]

    def cache_from_tensors(self, tensors: list[torch.Tensor]):
        """The inverse of `cache_tensors`: the backend's own cache object."""
        return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]

    def decode_batch(self):
        """A backend's own running-batch store for the scheduler (add / keep / step, see
        `haplo.runtime.batching.PaddedBatch`), or None: rows padded and joined through `run_stage`."""
        return None

    def keep_cache(self, past):
        """A cache that later calls reuse many times (the text prefix); backends that recycle output
        buffers copy it out here."""
        return past
