"""Building blocks of a HaploOmni decoder layer. Parameter names match the official checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haplo.model import ops
from haplo.model.config import ConnectorConfig, StageConfig


class MultimodalNorm(nn.Module):
    """Multimodal AdaLN (paper Alg. 1): norm, then a per-token switch between two shift/scale/gate sets.

    With `modulated=False` it is the plain stage norm (`model.norm`): no switch, no gate.
    """

    def __init__(self, hidden_size: int, mode: str = "rmsnorm", eps: float = 1e-6, modulated: bool = True):
        super().__init__()
        self.mode, self.eps, self.modulated = mode, eps, modulated
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias: nn.Parameter | None
        if mode == "layernorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.bias = None
        if modulated:
            # rows: (shift, scale, gate); SSG_L is weighted by switch index 0, SSG_C by index 1
            self.SSG_C = nn.Parameter(torch.zeros(3, hidden_size))
            self.SSG_L = nn.Parameter(torch.zeros(3, hidden_size))
            self.indicator = nn.Linear(hidden_size, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if not self.modulated:
            if self.mode == "layernorm":
                return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return ops.multimodal_adaln(
            x,
            self.weight,
            self.bias,
            self.indicator.weight,
            self.indicator.bias,
            self.SSG_L,
            self.SSG_C,
            self.eps,
            self.mode,
        )


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] for integer positions [B, L] (frequencies repeated for both halves)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). x: [B, H, L, D], cos/sin: [B, L, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: StageConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)
        if config.use_qk_norm:
            self.norm_q = nn.LayerNorm(self.head_dim)
            self.norm_k = nn.LayerNorm(self.head_dim)
        self.use_qk_norm = config.use_qk_norm

    def forward(
        self,
        x: torch.Tensor,  # [B, L, H]
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        key_start: torch.Tensor,  # [B, Lpast + L]
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x [B, Hkv, Lpast, D]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = ops.hybrid_attention(q, k, v, key_start, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)


class GatedMLP(nn.Module):
    def __init__(self, config: StageConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """x += attn(norm1(x)) * gate1; x += mlp(norm2(x)) * gate2, with multimodal AdaLN norms."""

    def __init__(self, config: StageConfig):
        super().__init__()
        self.input_layernorm = MultimodalNorm(config.hidden_size, config.norm_mode, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = MultimodalNorm(config.hidden_size, config.norm_mode, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x, rope, key_start, past=None):
        h, gate = self.input_layernorm(x)
        h, present = self.self_attn(h, rope, key_start, past)
        x = x + h * gate
        h, gate = self.post_attention_layernorm(x)
        x = x + self.mlp(h) * gate
        return x, present


class Connector(nn.Module):
    """Width change between stages: projection r, transform t = Linear(SiLU(LN(r))), mixed by a switch.

    Output t * m0 + r * m1 with m = softmax(indicator(SiLU(.))); the switch reads r without pre-norm
    and t with pre-norm (paper Eq. 3-5 as realised officially).
    """

    def __init__(self, in_dim: int, out_dim: int, config: ConnectorConfig):
        super().__init__()
        self.use_pre_norm = config.use_pre_norm
        self.affine = nn.Linear(in_dim, out_dim, bias=config.use_affine_bias)
        self.transform = nn.Sequential(nn.LayerNorm(out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.connector_indicator = nn.Sequential(nn.SiLU(), nn.Linear(out_dim, 2))
        if self.use_pre_norm:
            self.pre_norm = nn.LayerNorm(in_dim)
            self.scale = nn.Parameter(torch.ones(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_pre_norm:
            residual = self.affine(self.pre_norm(x)) * self.scale
            transformed = self.transform(residual)
            switch = torch.softmax(self.connector_indicator(transformed), dim=-1)
        else:
            residual = self.affine(x)
            transformed = self.transform(residual)
            switch = torch.softmax(self.connector_indicator(residual), dim=-1)
        return transformed * switch[..., :1] + residual * switch[..., 1:]
