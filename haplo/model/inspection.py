"""Sizes of a HaploOmni configuration, computed on the meta device (nothing is allocated)."""

from __future__ import annotations

import torch

from haplo.model.config import HaploOmniConfig, kv_cache_bytes_per_token

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
GENERATION_HEADS = (
    "time_embedding",
    "temb_token",
    "v2t_projector",
    "patch_embed_cogvideo",
    "norm_final",
    "norm_out",
    "proj_out",
)
PRE_EXTRAS = ("model.embed_tokens", "model.patch_embed", "model.pre_pos_embed", "model.image_newline", "model.pre_norm")


def parameter_group(name: str, config: HaploOmniConfig) -> str:
    """Which part of the model a parameter belongs to: pre, base, post, connectors, lm_head, generation_heads."""
    if name.startswith("model.layers."):
        return config.stage_of_layer(int(name.split(".")[2]))
    if name.startswith(PRE_EXTRAS):
        return "pre"
    if name.startswith("model.norm."):
        return "base"
    if name.startswith(("model.post_norm", "model.post_linear", "model.post_scale")):
        return "post"
    if name.startswith(("model.pre_connector", "model.post_connector")):
        return "connectors"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith(GENERATION_HEADS):
        return "generation_heads"
    raise KeyError(name)


def inspect_config(
    config: HaploOmniConfig, num_frames: int | None = None, height: int | None = None, width: int | None = None
) -> dict:
    """Parameters per stage, weight bytes per precision, KV-cache bytes per token, latent tokens."""
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    with torch.device("meta"):
        model = HaploOmniForConditionalGeneration(config)
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = parameter_group(name, config)
        groups[group] = groups.get(group, 0) + param.numel()
    total = sum(groups.values())
    gen = config.video_generation
    num_frames, height, width = num_frames or gen.num_frames, height or gen.height, width or gen.width
    frames, channels, lat_h, lat_w = gen.latent_shape(num_frames, height, width)
    return {
        "parameters": {**groups, "total": total},
        "weight_bytes": {p: total * b for p, b in BYTES_PER_ELEMENT.items()},
        "kv_cache_bytes_per_token": {
            p: kv_cache_bytes_per_token(config, b) for p, b in BYTES_PER_ELEMENT.items() if p != "fp32"
        },
        "layers": {name: s.num_hidden_layers for name, s in config.stages.items()},
        "hidden_size": {name: s.hidden_size for name, s in config.stages.items()},
        "video": {
            "frames": num_frames,
            "height": height,
            "width": width,
            "latent_shape": [frames, channels, lat_h, lat_w],
            "latent_tokens": gen.latent_tokens(num_frames, height, width),
        },
        "image_tokens_per_tile": config.tokens_per_tile,
    }


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return f"{n}{unit}"


def format_report(name: str, report: dict) -> str:
    params = report["parameters"]
    lines = [f"HaploOmni {name}", "parameters:"]
    for group in ("pre", "base", "post", "connectors", "lm_head", "generation_heads", "total"):
        lines.append(f"  {group:<17} {params.get(group, 0):>15,}  ({human(params.get(group, 0))})")
    lines.append("weights: " + ", ".join(f"{p} {human(b, 'B')}" for p, b in report["weight_bytes"].items()))
    lines.append(
        "KV cache per token: "
        + ", ".join(f"{p} {human(b, 'B')}" for p, b in report["kv_cache_bytes_per_token"].items())
    )
    v = report["video"]
    lines.append(
        f"video {v['frames']}x{v['height']}x{v['width']}: latents {v['latent_shape']}, "
        f"{v['latent_tokens']:,} latent tokens"
    )
    lines.append(f"image tokens per tile: {report['image_tokens_per_tile']}")
    return "\n".join(lines)
