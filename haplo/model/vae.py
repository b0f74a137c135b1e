"""The CogVideoX causal 3-D VAE (diffusers `AutoencoderKLCogVideoX`): 8x spatial, 4x temporal, 16 channels."""

from __future__ import annotations

from pathlib import Path

import torch

# the defining module: type checkers read diffusers' top-level name as its dummy placeholder class
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import AutoencoderKLCogVideoX

from haplo.errors import HaploError
from haplo.model.config import HaploOmniConfig


class VAEError(HaploError, ValueError):
    pass


def load_vae(directory: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKLCogVideoX:
    """A diffusers-format VAE directory (e.g. CogVideoX-2b's `vae/`), loaded offline."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise VAEError(f"{directory}: no VAE config.json; pass a diffusers AutoencoderKLCogVideoX directory")
    try:
        vae = AutoencoderKLCogVideoX.from_pretrained(directory, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise VAEError(f"{directory}: cannot load the VAE ({err})") from None
    return vae.eval()


def build_random_vae(config: HaploOmniConfig, seed: int = 0) -> AutoencoderKLCogVideoX:
    """A small randomly initialised VAE with the real architecture and compression factors.

    Used by presets, which have no trained weights; a checkpoint's `vae/` folder replaces it.
    """
    gen = config.video_generation
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=gen.latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=gen.vae_temporal_compression,
        sample_height=gen.height,
        sample_width=gen.width,
        scaling_factor=gen.vae_scaling_factor,
    )
    return vae.eval()


def vae_for_checkpoint(checkpoint: str | Path | None, config: HaploOmniConfig, vae_dir: str | Path | None = None):
    """An explicit VAE directory, else the checkpoint's `vae/` folder; a preset (no checkpoint) gets a
    seeded random VAE like its random weights. A checkpoint without `vae/` is refused, never filled in."""
    if vae_dir is not None:
        return load_vae(vae_dir)
    if checkpoint is None:
        return build_random_vae(config)
    if (Path(checkpoint) / "vae" / "config.json").exists():
        return load_vae(Path(checkpoint) / "vae")
    raise VAEError(
        f"{checkpoint} has no vae/ folder: pass --vae DIR (a diffusers AutoencoderKLCogVideoX "
        "directory, e.g. CogVideoX-2b's vae/), or build without the VAE decoder graph with --no-vae"
    )


@torch.no_grad()
def decode_latents(vae: AutoencoderKLCogVideoX, latents: torch.Tensor) -> torch.Tensor:
    """[B, F, C, h, w] latents -> [B, 3, frames, H, W] video in [-1, 1]."""
    latents = latents.permute(0, 2, 1, 3, 4).to(vae.dtype) / vae.config["scaling_factor"]
    return vae.decode(latents).sample.clamp(-1, 1)
