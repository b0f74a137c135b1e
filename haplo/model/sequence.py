"""How a request becomes one sequence: visual features in their placeholders, key starts, positions.

The model's own forward, the runtime (on every backend) and training all lay sequences out with
these functions, so the three cannot disagree. Key starts are the block-start mask of
`haplo.model.ops`: key j is visible to query i iff key_start[b, j] <= i.

    understanding   [left padding | text with image/video blocks]        causal, blocks bidirectional
    generation      [left padding | text | time token | latent tokens]   latents one bidirectional block
    after a prefix  [cached text] + [time token | latent tokens]         the same layout, text cached
"""

from __future__ import annotations

import torch

from haplo.model import ops
from haplo.model.config import HaploOmniConfig


def visual_slots(config: HaploOmniConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """Where `input_ids` hold an image or video placeholder (a bool mask of their shape)."""
    return (input_ids == config.image_token_index) | (input_ids == config.video_token_index)


def scatter_visual_features(
    config: HaploOmniConfig, input_ids: torch.Tensor, embeds: torch.Tensor, images: list | None, videos: list | None
) -> torch.Tensor:
    """Place per-image / per-video features [tokens, D], in order, at the placeholder ids of `input_ids`."""
    for token_id, features, kind in (
        (config.image_token_index, images, "image"),
        (config.video_token_index, videos, "video"),
    ):
        slots = input_ids == token_id
        count = int(slots.sum())
        if features is None:
            if count:
                raise ValueError(f"input_ids hold {count} {kind} placeholders but no {kind} pixels were given")
            continue
        stacked = torch.cat(list(features))
        if stacked.shape[0] != count:
            raise ValueError(
                f"{kind} features give {stacked.shape[0]} tokens but input_ids hold {count} "
                f"{kind} placeholders; build inputs with HaploOmniProcessor"
            )
        embeds = embeds.masked_scatter(slots[..., None], stacked.to(embeds.dtype))
    return embeds


def understanding_key_start(
    config: HaploOmniConfig,
    attention_mask: torch.Tensor,
    attention_start_ids: torch.Tensor | None,
    past_length: int = 0,
) -> torch.Tensor:
    """Block starts of new tokens (absolute slots), padding masked out. Without start ids, or with the
    official quirk on a batch without padding, attention is plain causal."""
    if attention_start_ids is None or (config.official_mask_quirk and bool(attention_mask.all())):
        positions = torch.arange(past_length, past_length + attention_mask.shape[-1], device=attention_mask.device)
        attention_start_ids = positions.expand_as(attention_mask)
    return ops.apply_padding(attention_start_ids, attention_mask)


def understanding_positions(attention_mask: torch.Tensor, next_position: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE positions count real tokens only (RoPE is relative, so left padding does not matter)."""
    offset = 0 if next_position is None else next_position[:, None]
    return (offset + attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def generation_positions(attention_mask: torch.Tensor, num_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key starts and RoPE positions for [left-padded text | time token | latent tokens].

    Text and the time token are causal; the latent tokens form one bidirectional block that sees
    everything real. Returns (key_start [B, S], position_ids [B, S]).
    """
    batch, text_len = attention_mask.shape
    device = attention_mask.device
    text_start = ops.apply_padding(torch.arange(text_len, device=device).expand(batch, text_len), attention_mask)
    time_start = torch.full((batch, 1), text_len, device=device)
    latent_start = torch.full((batch, num_visual), text_len + 1, device=device)
    key_start = torch.cat([text_start, time_start, latent_start], dim=1)
    real = torch.cat([attention_mask.long(), torch.ones(batch, 1 + num_visual, dtype=torch.long, device=device)], 1)
    return key_start, (real.cumsum(-1) - 1).clamp(min=0)


def generation_sequence(
    text: torch.Tensor,  # [B, L, D] embedded prompt, left padded
    time_token: torch.Tensor,  # [B, 1, D]
    latent_tokens: torch.Tensor,  # [B, V, D]
    attention_mask: torch.Tensor,  # [B, L]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoiser call's whole sequence: (sequence [B, L + 1 + V, D], key_start, position_ids)."""
    key_start, position_ids = generation_positions(attention_mask, latent_tokens.shape[1])
    return torch.cat([text, time_token, latent_tokens], dim=1), key_start, position_ids


def prefix_layout(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text prefix of the generation layout, computed once and cached for every DDIM step:
    (key_start [B, L], position_ids [B, L], next_position [B])."""
    text_len = attention_mask.shape[1]
    key_start, position_ids = generation_positions(attention_mask, 0)  # text + time token: keep the text
    return key_start[:, :text_len], position_ids[:, :text_len], attention_mask.long().sum(-1)


def denoise_positions(prefix_key_start: torch.Tensor, next_position: torch.Tensor, num_visual: int):
    """Key starts and positions of [time token | latents] after a cached text prefix."""
    batch, text_len = prefix_key_start.shape
    new_start = torch.full((batch, 1 + num_visual), text_len + 1, device=prefix_key_start.device)
    new_start[:, 0] = text_len
    position_ids = next_position[:, None] + torch.arange(1 + num_visual, device=prefix_key_start.device)
    return torch.cat([prefix_key_start, new_start], dim=1), position_ids
