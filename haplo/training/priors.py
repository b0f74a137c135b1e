"""Initialise HaploOmni from its priors (paper section 3.3: "initialized using corresponding prior models").

CLIP-ViT -> pre-decoder, Qwen2 -> base-decoder, CogVideoX -> post-decoder and the generation heads.
Every function returns a `PriorReport`: which HaploOmni parameter came from where, which were left
at their initial values, which prior parameters have no HaploOmni counterpart, and the caveats.

Common rule. A multimodal AdaLN whose two state sets are both (shift 0, scale 0, gate 1) is the plain
norm followed by an ungated residual add, whatever its switch says. CLIP and Qwen2 layers get this
"neutral modulation", so a converted layer computes the prior layer exactly.

Positions. CLIP and CogVideoX-2B use absolute positions (added to the input embeddings, mapped
below); their attention has no RoPE. A pre/post stage with `use_pe` applies RoPE in every layer, so a
converted pre/post layer equals the prior layer with RoPE off (`rope=None`); stage-1 warmup adapts the
layers to it. Qwen2's RoPE is the base stage's own (theta and head_dim are checked).

CLIP-ViT (`transformers.CLIPVisionModel`, hidden_act quick_gelu) -> pre layers:
    layer_norm1 / layer_norm2            -> input_layernorm / post_attention_layernorm (weight, bias)
    self_attn.q/k/v_proj, out_proj      -> self_attn.q/k/v_proj, o_proj (weight, bias)
    mlp: fc2(quick_gelu(fc1 x)), quick_gelu(z) = z * sigmoid(1.702 z) = silu(1.702 z) / 1.702, so
        gate_proj = 1.702 * fc1 (weight and bias), up_proj = the constant 1/1.702 (weight 0, bias
        1/1.702), down_proj = fc2: down(silu(gate x) * up x) = fc2(quick_gelu(fc1 x)) exactly.
        (up = fc1 / 1.702 would give z^2 sigmoid(1.702 z): silu already carries the factor z.)
        Exact-erf GELU has no such form: such a CLIP is refused.
    embeddings.patch_embedding           -> model.patch_embed.proj
    embeddings.position_embedding[1:]   -> model.pre_pos_embed (row 0, the class token's, is dropped
                                           with the class token: the pre-decoder sees patch tokens only)
    pre_layrnorm                         -> model.pre_norm
    unused: class_embedding (no class token), post_layernorm (acts on the pooled class token only).
    Without the class token the patch tokens no longer attend to it, so the converted encoder's patch
    outputs differ from CLIP's by that contribution (the stage-1 distillation target).

Qwen2 (`transformers.Qwen2ForCausalLM`) -> base layers:
    input_layernorm / post_attention_layernorm -> RMSNorm weights, neutral modulation
    q/k/v_proj (with bias) -> same; o_proj (no bias) -> o_proj, bias 0
    gate/up/down_proj (no bias) -> same, biases 0
    model.norm -> model.norm; lm_head -> lm_head
    embed_tokens -> model.embed_tokens only when the pre width equals Qwen2's width: HaploOmni embeds
        text at the pre width (text enters the pre-decoder). Otherwise it keeps its initial value and
        is listed in `unused`.

CogVideoX (`diffusers.CogVideoXTransformer3DModel`, 2-D patches, no RoPE: CogVideoX-2B) -> post layers:
    norm1 / norm2 (CogVideoXLayerNormZero: LayerNorm, then Linear(SiLU(temb)) -> shift, scale, gate,
        enc_shift, enc_scale, enc_gate) -> input_layernorm / post_attention_layernorm: the LayerNorm
        weight/bias, and the modulation evaluated once at a frozen timestep (the paper's "state matrix
        computed offline"): SSG_L = (shift, scale, gate) of the video stream, SSG_C = (enc_shift,
        enc_scale, enc_gate) of the text stream.
    switch (indicator): nothing distinguishes text from latent rows at the post-decoder input before
        the connectors are trained (both arrive through learned projections), so no fixed indicator
        can route them. routing="neutral" (default): weight 0, bias 0, an equal mixture of the two
        sets with the largest switch gradient; the routing is learned in stage 1. routing="latent":
        weight 0, bias (+12, -12), every row takes the video set (condition weight e^-24): the layer
        is CogVideoX's video stream, e.g. for a video-only check.
    attn1.to_q/k/v, to_out.0 -> self_attn.q/k/v_proj, o_proj; attn1.norm_q/norm_k -> norm_q/norm_k.
        CogVideoX's q/k LayerNorms use eps 1e-6, HaploOmni's 1e-5: the normalised q/k shrink by a
        relative 4.5e-6 / var per head (about 5e-6 of a block's output in the tests, 2e-7 with equal eps).
    ff (FeedForward: net.0 = activation with proj, net.2 = out):
        "swiglu" (hidden * silu(gate) halves of proj) -> gate/up/down exactly;
        "geglu-approximate" (diffusers' ApproximateGELU is quick_gelu) -> the CLIP mapping, exactly;
        "gelu-approximate" (CogVideoX-2B, tanh-GELU) and "gelu" -> the CLIP mapping, approximately:
            |quick_gelu(z) - gelu_tanh(z)| <= 0.0207 (largest at |z| ~ 2.29), RMS 0.0069 for
            z ~ N(0, 1) (for erf-GELU: <= 0.0203). A converted layer's output then deviates by at most
            0.0207 * |gate| * sum_j |out.weight[i, j]| per channel i; stage-1 distillation absorbs it.
    heads, by name: time_embedding.linear_1/2, patch_embed.proj / text_proj -> patch_embed_cogvideo.*,
        norm_final, norm_out.linear / norm_out.norm, proj_out. The 3-D sin-cos table is not a
        parameter: it is recomputed from `video_generation` (interpolation scales checked).
    no prior: temb_token (the timestep token) and v2t_projector (latent tokens -> pre width).

Never set here: connectors, image_newline, post_norm / post_linear / post_scale, the pre and base
switches (irrelevant while both state sets are equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haplo.errors import HaploError
from haplo.model.config import HaploOmniConfig

if TYPE_CHECKING:
    from diffusers import CogVideoXTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

QUICK_GELU = 1.702
GELU_TANH_MAX_ERROR = 0.0207  # max_z |z sigmoid(1.702 z) - gelu_tanh(z)|
ROUTE_MARGIN = 12.0  # routing="latent": indicator bias (+12, -12), condition-set weight e^-24
ROUTINGS = ("neutral", "latent")
_EXACT_FF = ("swiglu", "geglu-approximate")
_APPROX_FF = ("gelu-approximate", "gelu")


class PriorError(HaploError, ValueError):
    """A prior whose shapes or settings cannot initialise this HaploOmni configuration."""


@dataclass
class PriorReport:
    """What initialisation from priors did to a model."""

    sources: dict[str, str] = field(default_factory=dict)  # HaploOmni parameter -> its source
    left_at_init: list[str] = field(default_factory=list)  # HaploOmni parameters no prior set
    unused: dict[str, list[str]] = field(default_factory=dict)  # prior -> its parameters not used
    notes: list[str] = field(default_factory=list)  # approximations and caveats

    def summary(self) -> str:
        lines = [f"{len(self.sources)} parameters from priors, {len(self.left_at_init)} left at their initial values"]
        lines += [f"{prior}: unused {', '.join(names)}" for prior, names in self.unused.items() if names]
        return "\n".join(lines + self.notes)


class _Prior:
    """A prior's parameters by name; remembers which were read so the rest can be reported as unused."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        # remove_duplicate=False: a tied lm_head is still reachable by its own name
        self.params = {k: v.detach() for k, v in module.named_parameters(remove_duplicate=False)}
        self.read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.params[key]

    def mark(self, *keys: str) -> None:
        """Count parameters as used that enter through a computation (e.g. the frozen state sets)."""
        self.read.update(k for k in keys if k in self.params)


class _Writer:
    """Copies into a HaploOmni model, checking shapes and recording every source."""

    def __init__(self, model: nn.Module, report: PriorReport, prior: _Prior):
        self.model, self.report, self.prior = model, report, prior

    def put(self, target: str, value: torch.Tensor, source: str) -> None:
        param = self.model.get_parameter(target)
        if param.shape != value.shape:
            raise PriorError(
                f"{target} has shape {tuple(param.shape)} but its source ({source}) has {tuple(value.shape)}"
            )
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))
        self.report.sources[target] = source

    def take(
        self, target: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None, how: str = ""
    ) -> None:
        """target <- fn(prior[key]); a missing key (a layer built without bias or affine) gives the identity
        value: 1 for a norm weight, else 0."""
        if key not in self.prior:
            fill = 1.0 if key.endswith("weight") else 0.0  # only norms can lack a weight
            param = self.model.get_parameter(target)
            self.put(target, torch.full_like(param, fill), f"{fill:g} ({self.prior.name} has no {key})")
            return
        value = self.prior[key]
        self.put(target, value if fn is None else fn(value), f"{self.prior.name}:{key}{how}")

    def linear(self, target: str, key: str, fn=None, how: str = "") -> None:
        self.take(f"{target}.weight", f"{key}.weight", fn, how)
        self.take(f"{target}.bias", f"{key}.bias", fn, how)

    def neutral_modulation(self, target: str) -> None:
        neutral = torch.zeros_like(self.model.get_parameter(f"{target}.SSG_L"))
        neutral[2] = 1.0  # rows: shift, scale, gate
        for name in ("SSG_L", "SSG_C"):
            self.put(f"{target}.{name}", neutral, "neutral modulation (shift 0, scale 0, gate 1)")

    def quick_gelu_mlp(self, target: str, fc1: str, fc2: str, how: str = "") -> None:
        """fc2(quick_gelu(fc1 x)) as down(silu(gate x) * up x): silu(1.702 z) / 1.702 = z sigmoid(1.702 z)."""
        self.linear(f"{target}.gate_proj", fc1, lambda t: t * QUICK_GELU, f" * 1.702{how}")
        up = self.model.get_parameter(f"{target}.up_proj.weight")
        self.put(f"{target}.up_proj.weight", torch.zeros_like(up), "0 (up is the constant 1/1.702)")
        self.put(f"{target}.up_proj.bias", torch.full_like(up[:, 0], 1 / QUICK_GELU), "1/1.702")
        self.linear(f"{target}.down_proj", fc2)

    def finish(self) -> PriorReport:
        self.report.unused[self.prior.name] = sorted(set(self.prior.params) - self.prior.read)
        self.report.left_at_init = [n for n, _ in self.model.named_parameters() if n not in self.report.sources]
        return self.report


def _require_equal(prior: str, stage: str, pairs: dict[str, tuple[Any, Any]]) -> None:
    """One error listing every setting where the prior and the HaploOmni stage disagree."""
    bad = [f"{key}: {prior} {a!r} vs {stage} {b!r}" for key, (a, b) in pairs.items() if a != b]
    if bad:
        raise PriorError(f"{prior} does not match the HaploOmni {stage}: " + "; ".join(bad))


def _stage_layers(model: nn.Module, stage: str) -> range:
    return model.model.stage_layers(stage)


# -- CLIP-ViT -> pre-decoder ------------------------------------------------------------------------


def init_pre_decoder_from_clip(model: nn.Module, clip: nn.Module, report: PriorReport | None = None) -> PriorReport:
    """Pre layers, patch embedding, patch positions and pre_norm from a CLIPVisionModel (see the module doc)."""
    report = PriorReport() if report is None else report
    vision = getattr(clip, "vision_model", clip)  # transformers < 5 nests the tower
    cfg, pre = vision.config, model.config.pre
    if cfg.hidden_act != "quick_gelu":
        raise PriorError(
            f"CLIP hidden_act {cfg.hidden_act!r}: only quick_gelu has an exact gated-MLP form "
            "(silu(1.702 z) / 1.702); convert a quick_gelu CLIP such as ViT-L/14-336"
        )
    _require_equal(
        "CLIP",
        "pre-decoder",
        {
            "hidden_size": (cfg.hidden_size, pre.hidden_size),
            "intermediate_size": (cfg.intermediate_size, pre.intermediate_size),
            "num_hidden_layers": (cfg.num_hidden_layers, pre.num_hidden_layers),
            "num_attention_heads": (cfg.num_attention_heads, pre.num_attention_heads),
            "num_key_value_heads": (cfg.num_attention_heads, pre.num_key_value_heads),
            "patch_size": (cfg.patch_size, pre.patch_size),
            "patches per tile": ((cfg.image_size // cfg.patch_size) ** 2, model.config.tokens_per_tile),
            "num_channels": (cfg.num_channels, 3),
            "norm_mode": ("layernorm", pre.norm_mode),
            "layer norm eps": (cfg.layer_norm_eps, pre.rms_norm_eps),
            "pre_norm eps": (cfg.layer_norm_eps, model.model.pre_norm.eps),
            "q/k norms": (False, pre.use_qk_norm),
        },
    )
    w = _Writer(model, report, _Prior("clip", vision))
    w.take("model.patch_embed.proj.weight", "embeddings.patch_embedding.weight")
    w.take(
        "model.pre_pos_embed",
        "embeddings.position_embedding.weight",
        lambda t: t[1:][None],
        " rows 1: (class position dropped)",
    )
    w.linear("model.pre_norm", "pre_layrnorm")
    for n, index in enumerate(_stage_layers(model, "pre")):
        src, dst = f"encoder.layers.{n}", f"model.layers.{index}"
        for ours, theirs in (("input_layernorm", "layer_norm1"), ("post_attention_layernorm", "layer_norm2")):
            w.linear(f"{dst}.{ours}", f"{src}.{theirs}")
            w.neutral_modulation(f"{dst}.{ours}")
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
            w.linear(f"{dst}.self_attn.{ours}", f"{src}.self_attn.{theirs}")
        w.quick_gelu_mlp(f"{dst}.mlp", f"{src}.mlp.fc1", f"{src}.mlp.fc2")
    report.notes.append(
        "clip: class token dropped (class_embedding and position row 0 unused); post_layernorm "
        "acts on the pooled class token only; converted layers equal CLIP's with RoPE off"
    )
    return w.finish()


# -- Qwen2 -> base-decoder ---------------------------------------------------------------------------


def _qwen_rope(cfg) -> tuple[float | None, str]:
    """(theta, rope type) across transformers versions (`rope_parameters` in 5.x, `rope_theta` before)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, kind


def init_base_decoder_from_qwen2(model: nn.Module, qwen: nn.Module, report: PriorReport | None = None) -> PriorReport:
    """Base layers, model.norm, lm_head (and embed_tokens when widths allow) from a Qwen2ForCausalLM."""
    report = PriorReport() if report is None else report
    cfg, base = qwen.config, model.config.base
    theta, rope_type = _qwen_rope(cfg)
    sliding = any(t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or []))
    _require_equal(
        "Qwen2",
        "base-decoder",
        {
            "hidden_size": (cfg.hidden_size, base.hidden_size),
            "intermediate_size": (cfg.intermediate_size, base.intermediate_size),
            "num_hidden_layers": (cfg.num_hidden_layers, base.num_hidden_layers),
            "num_attention_heads": (cfg.num_attention_heads, base.num_attention_heads),
            "num_key_value_heads": (cfg.num_key_value_heads, base.num_key_value_heads),
            "head_dim": (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, base.head_dim),
            "vocab_size": (cfg.vocab_size, base.vocab_size),
            "rope_theta": (None if theta is None else float(theta), float(base.rope_theta)),
            "rope type": (rope_type, "default"),
            "RoPE on": (True, base.use_pe),
            "rms_norm_eps": (cfg.rms_norm_eps, base.rms_norm_eps),
            "hidden_act": (cfg.hidden_act, "silu"),
            "norm_mode": ("rmsnorm", base.norm_mode),
            "q/k norms": (False, base.use_qk_norm),
            "sliding-window layers": (sliding, False),
        },
    )
    w = _Writer(model, report, _Prior("qwen2", qwen))
    for n, index in enumerate(_stage_layers(model, "base")):
        src, dst = f"model.layers.{n}", f"model.layers.{index}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w.take(f"{dst}.{norm}.weight", f"{src}.{norm}.weight")
            w.neutral_modulation(f"{dst}.{norm}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w.linear(f"{dst}.self_attn.{proj}", f"{src}.self_attn.{proj}")  # o_proj: no bias -> 0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w.linear(f"{dst}.mlp.{proj}", f"{src}.mlp.{proj}")  # no biases -> 0
    w.take("model.norm.weight", "model.norm.weight")
    w.take("lm_head.weight", "lm_head.weight")
    if model.config.pre.hidden_size == cfg.hidden_size:
        w.take("model.embed_tokens.weight", "model.embed_tokens.weight")
    else:
        report.notes.append(
            f"qwen2: embed_tokens not copied: HaploOmni embeds text at the pre width "
            f"{model.config.pre.hidden_size}, Qwen2 at {cfg.hidden_size}"
        )
    return w.finish()


# -- CogVideoX -> post-decoder and generation heads ----------------------------------------------------


@torch.no_grad()
def cogvideox_time_embedding(cog: nn.Module, timestep: float) -> torch.Tensor:
    """CogVideoX's temb [1, time_embed_dim] at one timestep."""
    dtype = cog.time_embedding.linear_1.weight.dtype
    t = torch.tensor([float(timestep)], device=cog.time_embedding.linear_1.weight.device)
    return cog.time_embedding(cog.time_proj(t).to(dtype))


@torch.no_grad()
def cogvideox_state_sets(cog: nn.Module, timestep: float) -> torch.Tensor:
    """The frozen state matrices: [layers, 2 (norm1, norm2), 2 (video = SSG_L, text = SSG_C), 3 (shift, scale,
    gate), width], i.e. Linear(SiLU(temb)) of every CogVideoXLayerNormZero at `timestep`, in float32."""
    temb = F.silu(cogvideox_time_embedding(cog, timestep).float())
    rows = []
    for block in cog.transformer_blocks:
        per_norm = []
        for norm in (block.norm1, block.norm2):
            bias = None if norm.linear.bias is None else norm.linear.bias.float()
            mod = F.linear(temb, norm.linear.weight.float(), bias)[0]  # shift, scale, gate, enc_shift, ...
            per_norm.append(mod.view(2, 3, -1))
        rows.append(torch.stack(per_norm))
    return torch.stack(rows)


def init_post_decoder_from_cogvideox(
    model: nn.Module,
    cog: nn.Module,
    timestep: float = 500.0,
    routing: str = "neutral",
    report: PriorReport | None = None,
) -> PriorReport:
    """Post layers (state sets frozen at `timestep`) and the generation heads from a CogVideoXTransformer3DModel."""
    report = PriorReport() if report is None else report
    if routing not in ROUTINGS:
        raise PriorError(f"routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    cfg, post, gen = cog.config, model.config.post, model.config.video_generation
    unsupported = {
        "patch_size_t (CogVideoX 1.5)": cfg.patch_size_t,
        "use_rotary_positional_embeddings (CogVideoX-5B)": cfg.use_rotary_positional_embeddings,
        "use_learned_positional_embeddings": cfg.use_learned_positional_embeddings,
        "ofs_embed_dim": cfg.ofs_embed_dim,
    }
    for name, value in unsupported.items():
        if value:
            raise PriorError(
                f"CogVideoX {name}={value!r} is not supported: HaploOmni's post-decoder follows "
                "CogVideoX-2B (2-D patches, 3-D sin-cos positions, no RoPE)"
            )
    if cfg.activation_fn not in _EXACT_FF + _APPROX_FF:
        raise PriorError(
            f"CogVideoX activation_fn {cfg.activation_fn!r}: supported are {', '.join(_EXACT_FF + _APPROX_FF)}"
        )
    blocks = cog.transformer_blocks
    ff_width = blocks[0].ff.net[2].in_features if len(blocks) else post.intermediate_size
    _require_equal(
        "CogVideoX",
        "post-decoder",
        {
            "width": (cfg.num_attention_heads * cfg.attention_head_dim, post.hidden_size),
            "num_layers": (cfg.num_layers, post.num_hidden_layers),
            "num_attention_heads": (cfg.num_attention_heads, post.num_attention_heads),
            "num_key_value_heads": (cfg.num_attention_heads, post.num_key_value_heads),
            "feed-forward width": (ff_width, post.intermediate_size),
            "norm_mode": ("layernorm", post.norm_mode),
            "norm_eps": (cfg.norm_eps, post.rms_norm_eps),
            "q/k norms": (True, post.use_qk_norm),
            "time_embed_dim": (cfg.time_embed_dim, gen.time_embed_dim),
            "in_channels": (cfg.in_channels, gen.latent_channels),
            "out_channels": (cfg.out_channels or cfg.in_channels, gen.latent_channels),
            "patch_size": (cfg.patch_size, gen.latent_patch_size),
            "text_embed_dim": (cfg.text_embed_dim, gen.text_embed_dim),
            "spatial_interpolation_scale": (cfg.spatial_interpolation_scale, gen.spatial_interpolation_scale),
            "temporal_interpolation_scale": (cfg.temporal_interpolation_scale, gen.temporal_interpolation_scale),
            "temporal_compression_ratio": (cfg.temporal_compression_ratio, gen.vae_temporal_compression),
            "flip_sin_to_cos": (cfg.flip_sin_to_cos, model.time_proj.flip_sin_to_cos),
            "freq_shift": (cfg.freq_shift, model.time_proj.downscale_freq_shift),
            "timestep_activation_fn": (cfg.timestep_activation_fn, "silu"),
            "norm_final eps": (cfg.norm_eps, model.norm_final.eps),
            "norm_out eps": (cfg.norm_eps, model.norm_out.norm.eps),
        },
    )
    w = _Writer(model, report, _Prior("cogvideox", cog))
    states = cogvideox_state_sets(cog, timestep)
    at = f" at t={timestep:g}"
    if routing == "neutral":
        switch_bias, how = torch.zeros(2), "switch neutral (routing learned in stage 1)"
    else:
        switch_bias, how = torch.tensor([ROUTE_MARGIN, -ROUTE_MARGIN]), "switch: every row to the latent set"
    for n, index in enumerate(_stage_layers(model, "post")):
        src, dst = f"transformer_blocks.{n}", f"model.layers.{index}"
        for k, (ours, theirs) in enumerate((("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"))):
            w.linear(f"{dst}.{ours}", f"{src}.{theirs}.norm")
            w.prior.mark(f"{src}.{theirs}.linear.weight", f"{src}.{theirs}.linear.bias")  # in `states`
            w.put(f"{dst}.{ours}.SSG_L", states[n, k, 0], f"cogvideox:{src}.{theirs} video (shift, scale, gate){at}")
            w.put(f"{dst}.{ours}.SSG_C", states[n, k, 1], f"cogvideox:{src}.{theirs} text (shift, scale, gate){at}")
            indicator = model.get_parameter(f"{dst}.{ours}.indicator.weight")
            w.put(f"{dst}.{ours}.indicator.weight", torch.zeros_like(indicator), how)
            w.put(f"{dst}.{ours}.indicator.bias", switch_bias, how)
        for ours, theirs in (
            ("q_proj", "to_q"),
            ("k_proj", "to_k"),
            ("v_proj", "to_v"),
            ("o_proj", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        ):
            w.linear(f"{dst}.self_attn.{ours}", f"{src}.attn1.{theirs}")
        _feed_forward(w, f"{dst}.mlp", f"{src}.ff", cfg.activation_fn)
    for ours, theirs in (
        ("time_embedding.linear_1", "time_embedding.linear_1"),
        ("time_embedding.linear_2", "time_embedding.linear_2"),
        ("patch_embed_cogvideo.proj", "patch_embed.proj"),
        ("patch_embed_cogvideo.text_proj", "patch_embed.text_proj"),
        ("norm_final", "norm_final"),
        ("norm_out.linear", "norm_out.linear"),
        ("norm_out.norm", "norm_out.norm"),
        ("proj_out", "proj_out"),
    ):
        w.linear(ours, theirs)
    report.notes.append(f"cogvideox: state sets frozen{at}; {how}")
    report.notes.append(
        "cogvideox: q/k LayerNorm eps 1e-6 in CogVideoX, 1e-5 in HaploOmni; converted layers "
        "equal CogVideoX's with RoPE off"
    )
    if cfg.activation_fn in _APPROX_FF:
        report.notes.append(
            f"cogvideox: feed-forward {cfg.activation_fn} realised as quick_gelu, "
            f"|activation error| <= {GELU_TANH_MAX_ERROR}"
        )
    report.notes.append("cogvideox: temb_token and v2t_projector have no prior")
    return w.finish()


def _feed_forward(w: _Writer, dst: str, src: str, activation: str) -> None:
    if activation == "swiglu":  # proj -> (hidden, gate) halves, hidden * silu(gate): the gated MLP itself
        w.linear(f"{dst}.up_proj", f"{src}.net.0.proj", lambda t: t.chunk(2)[0], " (hidden half)")
        w.linear(f"{dst}.gate_proj", f"{src}.net.0.proj", lambda t: t.chunk(2)[1], " (gate half)")
        w.linear(f"{dst}.down_proj", f"{src}.net.2")
    else:
        how = "" if activation == "geglu-approximate" else f" ({activation} approximated by quick_gelu)"
        w.quick_gelu_mlp(dst, f"{src}.net.0.proj", f"{src}.net.2", how)


# -- all three, and seeded random priors for tests and demos -------------------------------------------


def init_from_priors(
    model: nn.Module,
    clip: nn.Module | None = None,
    qwen: nn.Module | None = None,
    cog: nn.Module | None = None,
    timestep: float = 500.0,
    routing: str = "neutral",
) -> PriorReport:
    """Whichever priors are given, into one report."""
    report = PriorReport()
    if clip is not None:
        init_pre_decoder_from_clip(model, clip, report)
    if qwen is not None:
        init_base_decoder_from_qwen2(model, qwen, report)
    if cog is not None:
        init_post_decoder_from_cogvideox(model, cog, timestep, routing, report)
    return report


def clip_config_for(config: HaploOmniConfig) -> CLIPVisionConfig:
    """A quick_gelu CLIPVisionConfig shaped like `config.pre`."""
    from transformers import CLIPVisionConfig

    pre = config.pre
    return CLIPVisionConfig(
        hidden_size=pre.hidden_size,
        intermediate_size=pre.intermediate_size,
        num_hidden_layers=pre.num_hidden_layers,
        num_attention_heads=pre.num_attention_heads,
        image_size=config.base.default_image_size,
        patch_size=pre.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=pre.rms_norm_eps,
    )


def qwen2_config_for(config: HaploOmniConfig) -> Qwen2Config:
    """A Qwen2Config shaped like `config.base`."""
    from transformers import Qwen2Config

    base = config.base
    return Qwen2Config(
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        vocab_size=base.vocab_size,
        rope_theta=base.rope_theta,
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=False,
    )


def cogvideox_kwargs_for(config: HaploOmniConfig, activation_fn: str = "gelu-approximate") -> dict:
    """CogVideoXTransformer3DModel arguments shaped like `config.post` and `config.video_generation`."""
    post, gen = config.post, config.video_generation
    return dict(
        num_attention_heads=post.num_attention_heads,
        attention_head_dim=post.head_dim,
        in_channels=gen.latent_channels,
        out_channels=gen.latent_channels,
        time_embed_dim=gen.time_embed_dim,
        text_embed_dim=gen.text_embed_dim,
        num_layers=post.num_hidden_layers,
        patch_size=gen.latent_patch_size,
        sample_height=gen.height // gen.vae_spatial_compression,
        sample_width=gen.width // gen.vae_spatial_compression,
        sample_frames=gen.num_frames,
        temporal_compression_ratio=gen.vae_temporal_compression,
        max_text_seq_length=16,
        activation_fn=activation_fn,
        norm_eps=post.rms_norm_eps,
        spatial_interpolation_scale=gen.spatial_interpolation_scale,
        temporal_interpolation_scale=gen.temporal_interpolation_scale,
    )


def random_priors(
    config: HaploOmniConfig, seed: int = 0
) -> tuple[CLIPVisionModel, Qwen2ForCausalLM, CogVideoXTransformer3DModel]:
    """Seeded random (CLIPVisionModel, Qwen2ForCausalLM, CogVideoXTransformer3DModel) shaped for `config`."""
    from diffusers import CogVideoXTransformer3DModel
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        clip = CLIPVisionModel(clip_config_for(config)).eval()
        qwen = Qwen2ForCausalLM(qwen2_config_for(config)).eval()
        cog = CogVideoXTransformer3DModel(**cogvideox_kwargs_for(config)).eval()
    return clip, qwen, cog
