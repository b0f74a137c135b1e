"""The two HaploOmni-specific operators, as plain PyTorch: the reference every backend matches.

`multimodal_adaln` (paper Algorithm 1, as the official code realises it) and `hybrid_attention`
(scaled dot-product attention under the block-start mask). The model calls them through this
module, which dispatches to the active entry of an explicit registry (`IMPLEMENTATIONS`): the
reference below, the ONNX custom ops while exporting (`haplo.export.custom_ops`), the Triton
kernels of the TensorRT plugins (`haplo.engines.plugins.kernels`). `using(name)` activates one.

Block-start mask. Every key position j carries `key_start[b, j]`, the smallest absolute query
position allowed to see it; key j is visible to query i iff `key_start[b, j] <= i`. Text tokens
carry their own index (causal), all tokens of one image/frame block carry the block's first index
(bidirectional inside, causal outside), padding keys carry `MASKED_START` (never visible). Queries
are the last `Lq` of the `Lk` key slots (the KV cache holds the earlier ones), so query row r has
absolute position `Lk - Lq + r`. A query row that sees no key at all (left padding) outputs zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# int32-safe "never visible": larger than any sequence position.
MASKED_START = 2**30


def reference_multimodal_adaln(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    bias: torch.Tensor | None,  # [H] (layernorm mode only)
    indicator_weight: torch.Tensor,  # [2, H]
    indicator_bias: torch.Tensor,  # [2]
    ssg_l: torch.Tensor,  # [3, H] rows: shift, scale, gate (latent set)
    ssg_c: torch.Tensor,  # [3, H] rows: shift, scale, gate (condition set)
    eps: float,
    mode: str = "rmsnorm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise, route each token between two (shift, scale, gate) sets, modulate.

    Returns (modulated [..., H], gate [..., H]). The switch reads the normalised input without the
    weight in rmsnorm mode but the raw input in layernorm mode, as the official code does.
    """
    if mode == "rmsnorm":
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = unit * weight
        switch_in = unit
    elif mode == "layernorm":
        normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        switch_in = x
    else:
        raise ValueError(f"unknown norm mode {mode!r}")
    switch = torch.softmax(F.linear(F.silu(switch_in), indicator_weight, indicator_bias), dim=-1)
    # [..., 2] x [2, 3, H] -> [..., 3, H]: index 0 weights the latent set, index 1 the condition set.
    shift, scale, gate = torch.einsum("...s,srh->...rh", switch, torch.stack([ssg_l, ssg_c])).unbind(-2)
    return normed * (1 + scale) + shift, gate


def block_mask(key_start: torch.Tensor, query_len: int) -> torch.Tensor:
    """Dense boolean mask [B, 1, Lq, Lk] of the block-start predicate (reference and tests only)."""
    key_len = key_start.shape[-1]
    query_pos = torch.arange(key_len - query_len, key_len, device=key_start.device)
    return key_start[:, None, None, :] <= query_pos[None, None, :, None]


def reference_hybrid_attention(
    query: torch.Tensor,  # [B, Hq, Lq, D]
    key: torch.Tensor,  # [B, Hkv, Lk, D]
    value: torch.Tensor,  # [B, Hkv, Lk, D]
    key_start: torch.Tensor,  # [B, Lk] integer
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the block-start mask with grouped KV heads. Returns [B, Hq, Lq, D]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    allowed = block_mask(key_start, query.shape[2])
    any_visible = allowed.any(-1, keepdim=True)
    # Rows with nothing visible would be NaN under -inf; give them a harmless mask and zero them.
    allowed = allowed | ~any_visible
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)
    return out * any_visible.to(out.dtype)


def causal_key_start(attention_mask: torch.Tensor) -> torch.Tensor:
    """Block starts for plain causal attention over a (left-)padded batch: [B, L] -> [B, L]."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return apply_padding(positions.expand_as(attention_mask), attention_mask)


def apply_padding(key_start: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Padding keys (attention_mask == 0) are never visible."""
    if attention_mask is None:
        return key_start
    return torch.where(attention_mask.bool(), key_start, torch.full_like(key_start, MASKED_START))


# -- the registry the model's calls dispatch through --------------------------------------------


@dataclass(frozen=True)
class Operators:
    """One implementation of both operators, with the reference's signatures."""

    multimodal_adaln: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    hybrid_attention: Callable[..., torch.Tensor]


REFERENCE = Operators(reference_multimodal_adaln, reference_hybrid_attention)
IMPLEMENTATIONS: dict[str, Operators] = {"reference": REFERENCE}
_active: list[str] = ["reference"]  # a stack: the last entry is in use


def register(name: str, operators: Operators) -> None:
    """Make an implementation available to `using(name)`."""
    IMPLEMENTATIONS[name] = operators


def active() -> Operators:
    return IMPLEMENTATIONS[_active[-1]]


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """While active, the model's operator calls go to the implementation registered as `name`."""
    if name not in IMPLEMENTATIONS:
        raise KeyError(f"no operator implementation {name!r}; registered: {', '.join(IMPLEMENTATIONS)}")
    _active.append(name)
    try:
        yield
    finally:
        _active.pop()


def multimodal_adaln(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's call of `reference_multimodal_adaln`, on the active implementation."""
    return active().multimodal_adaln(*args, **kwargs)


def hybrid_attention(*args, **kwargs) -> torch.Tensor:
    """The model's call of `reference_hybrid_attention`, on the active implementation."""
    return active().hybrid_attention(*args, **kwargs)
