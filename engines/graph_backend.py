"""What every bundle-driven backend shares: graph names, vision packing, the VAE's fixed size.

ONNX Runtime and TensorRT differ only in how one graph runs (`run`) and where a decoder stage
keeps its KV cache (`run_stage`); the rest is written once here.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from safetensors.torch import load_file

from haplo.bundle import Bundle
from haplo.errors import RequestError
from haplo.model import vision
from haplo.runtime.backend import Backend


class GraphBackend(Backend):
    def __init__(self, bundle: Bundle | str, device: torch.device | str = "cpu"):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.device = torch.device(device)
        self.constants = load_file(str(self.bundle.path(self.bundle.manifest.constants)), device=str(self.device))

    @abstractmethod
    def run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run one graph: tensors in from any device, out on `device`, in the graph's output order;
        the results are the caller's (no later call overwrites them)."""

    def embed_text(self, input_ids):
        return self.run("embed_text", input_ids=input_ids.long())[0]

    def _patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.run("embed_vision", pixel_values=pixels.float())[0]

    def embed_images(self, pixel_values, image_sizes):
        stage = self.config.base
        images = vision.image_tiles(pixel_values, image_sizes, stage)
        newline = self.constants["image_newline"] if stage.image_newline else None
        return vision.pack_images(self._patch_features(images.pixels), images, newline, stage)

    def embed_videos(self, pixel_values_videos):
        features = self._patch_features(pixel_values_videos.flatten(0, 1))
        return vision.pack_videos(features, pixel_values_videos.shape[0], self.constants["image_newline"])

    def embed_generation(self, latents, timestep):
        return tuple(self.run("embed_generation", latents=latents.float(), timestep=timestep.long()))

    def lm_head(self, last_decoder_hidden_state):
        return self.run("lm_head", last_decoder_hidden_state=last_decoder_hidden_state.float())[0]

    def latent_head(self, hidden, temb, latent_shape):
        latents = torch.zeros(latent_shape, device=self.device)  # only its shape is read by the graph
        return self.run("latent_head", hidden_states=hidden.float(), temb=temb.float(), latents=latents)[0]

    def check_vae_size(self, latent_shape):
        built = self.bundle.manifest.vae
        if built is None or "vae_decoder" not in self.bundle.graphs:
            raise RequestError(
                f"{self.bundle.root} has no VAE decoder graph (built with --no-vae); rebuild it with "
                "--vae DIR to decode videos"
            )
        if list(latent_shape) != built.latent_shape:
            f, height, width = built.video
            raise RequestError(
                f"the bundle's VAE graph decodes {f} frames of {height}x{width} only; ask for "
                f"--frames {f} --height {height} --width {width}, or rebuild the bundle with "
                "--frames/--height/--width of this video"
            )

    def vae_decode(self, latents):
        self.check_vae_size(tuple(latents.shape[1:]))
        scale = self.bundle.manifest.vae.scaling_factor  # check_vae_size: there is a VAE graph
        scaled = latents.permute(0, 2, 1, 3, 4).float() / scale
        # The causal 3-D VAE is exported for one fixed latent size and batch 1: decode row by row.
        return torch.cat([self.run("vae_decoder", latents=row[None])[0] for row in scaled])
