"""A small CogVideoX VAE trained on a dataset's clips: `haplo-train vae`.

The architecture is diffusers' `AutoencoderKLCogVideoX` with reduced widths and the compression of
CogVideoX (8x spatial, 4x temporal, 16 latent channels), so the export path, the VAE decoder graph
and the latent layout are those of the full model. Loss: MSE reconstruction, weighted up on the
pixels that differ from the clip's plain background, + a small KL term. After
training, the scaling factor is set to 1 / std of the training latents (the denoiser's input scale),
and the reconstruction PSNR on held-out clips goes into `vae_report.json` beside the weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import AutoencoderKLCogVideoX
from tqdm.auto import tqdm

from haplo.artifacts import check_output_dir, staging_dir, swap_into_place, write_atomic
from haplo.errors import HaploError
from haplo.training.data import load_frames, read_jsonl

REPORT = "vae_report.json"


class VaeTrainingError(HaploError, ValueError):
    pass


@dataclass
class VaeTrainConfig:
    data: str  # a dataset JSONL: the clips of its generation records
    output_dir: str
    validation: str | None = None  # a dataset JSONL of held-out clips for the PSNR
    block_out_channels: tuple[int, ...] = (8, 16, 16, 16)
    norm_num_groups: int = 4
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 3e-3
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0  # loss weight of pixels that differ from the clip's background
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise VaeTrainingError("steps and batch_size must be >= 1 and learning_rate > 0")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise VaeTrainingError(f"block_out_channels must be multiples of norm_num_groups {self.norm_num_groups}")


def build_vae(cfg: VaeTrainConfig, frames: int, height: int, width: int) -> AutoencoderKLCogVideoX:
    torch.manual_seed(cfg.seed)
    return AutoencoderKLCogVideoX(
        block_out_channels=cfg.block_out_channels,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=cfg.norm_num_groups,
        temporal_compression_ratio=4,
        sample_height=height,
        sample_width=width,
    )


def load_clips(jsonl: str | Path) -> torch.Tensor:
    """uint8 [N, 3, F, H, W]: the distinct videos of a dataset's generation records."""
    records = [r for r in read_jsonl(jsonl) if r["type"] == "generation" and r.get("video")]
    seen = {r["video"]: r for r in records}
    if not seen:
        raise VaeTrainingError(f"{jsonl}: no generation records with a video to train the VAE on")
    clips = [load_frames(r) for r in seen.values()]
    if len({c.shape for c in clips}) > 1:
        raise VaeTrainingError(
            f"{jsonl}: clips of different sizes; make the dataset with one --frames/--height/--width"
        )
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()


def _to_unit(clips: torch.Tensor) -> torch.Tensor:
    return clips.float().div(127.5).sub(1)


def reconstruction_psnr(vae: AutoencoderKLCogVideoX, clips: torch.Tensor, batch: int = 8) -> float:
    """Mean PSNR (dB, 8-bit range) of decode(mode(encode(clip))) over the clips."""
    scores = []
    with torch.no_grad():
        for chunk in clips.split(batch):
            x = _to_unit(chunk)
            out = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            mse = ((out - x) * 127.5).pow(2).flatten(1).mean(1)
            scores += [10 * math.log10(255.0**2 / max(float(m), 1e-10)) for m in mse]
    return float(np.mean(scores))


def latent_std(vae: AutoencoderKLCogVideoX, clips: torch.Tensor, batch: int = 8) -> float:
    with torch.no_grad():
        return float(torch.cat([vae.encode(_to_unit(c)).latent_dist.mode() for c in clips.split(batch)]).std())


def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """[B, 1, F, H, W]: `weight` where a pixel differs from its clip's median colour (the plain
    background), 1 elsewhere, so the few pixels of the shape are not drowned by the background."""
    background = x.flatten(2).median(-1).values[..., None, None, None]  # [B, 3, 1, 1, 1]
    shape = (x - background).abs().amax(1, keepdim=True) > threshold
    return 1 + (weight - 1) * shape.float()


def _fit(vae: AutoencoderKLCogVideoX, clips: torch.Tensor, cfg: VaeTrainConfig) -> list[float]:
    """MSE + KL over random batches of the clips. The decoder's output bias starts at the clips' mean
    colour, so the first steps go to the shapes rather than to moving a zero bias to the background."""
    with torch.no_grad():
        vae.decoder.conv_out.conv.bias.copy_(_to_unit(clips).mean((0, 2, 3, 4)))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.learning_rate, total_steps=cfg.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    vae.train()
    for _ in (bar := tqdm(range(cfg.steps), desc="vae")):
        x = _to_unit(clips[torch.randint(len(clips), (cfg.batch_size,), generator=generator)])
        posterior = vae.encode(x).latent_dist
        out = vae.decode(posterior.sample(generator)).sample
        loss = (foreground_weights(x, cfg.foreground_weight) * (out - x).pow(2)).mean()
        loss = loss + cfg.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _is_vae_dir(path: Path) -> bool:
    return (path / REPORT).is_file()


def train_vae(cfg: VaeTrainConfig) -> dict:
    """Train, set the scaling factor, measure PSNR, write `output_dir` (diffusers layout + report)."""
    out = Path(cfg.output_dir)
    check_output_dir(out, _is_vae_dir, "VAE directory")
    clips = load_clips(cfg.data)
    vae = build_vae(cfg, *clips.shape[2:])
    started = time.perf_counter()
    losses = _fit(vae, clips, cfg)
    seconds = time.perf_counter() - started
    vae.eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, clips))
    held_out = load_clips(cfg.validation) if cfg.validation else clips
    report = {
        "config": asdict(cfg),
        "clips": len(clips),
        "seconds": round(seconds, 1),
        "clips_per_s": round(cfg.steps * cfg.batch_size / seconds, 2),
        "final_loss": losses[-1],
        "scaling_factor": vae.config.scaling_factor,
        "psnr_db": {"train": reconstruction_psnr(vae, clips[:64]), "held_out": reconstruction_psnr(vae, held_out)},
        "held_out": cfg.validation or "train clips (no validation set given)",
    }
    _save(vae, report, out)
    return report


def _save(vae: AutoencoderKLCogVideoX, report: dict, out: Path) -> None:
    tmp = staging_dir(out)
    vae.save_pretrained(str(tmp))
    write_atomic(tmp / REPORT, json.dumps(report, indent=2) + "\n")
    swap_into_place(tmp, out)
