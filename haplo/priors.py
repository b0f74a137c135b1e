"""Initialise HaploOmni from its priors: CLIP-ViT (pre), Qwen2 (base), CogVideoX (post + generation heads).

How each prior layer becomes a HaploOmni layer (paper section 3.3, "initialised using corresponding
prior models"):

- Norms. A multimodal AdaLN with shift = scale = 0 and gate = 1 in both state sets is the prior's
  plain norm followed by an ungated residual, whatever the switch says. CLIP and Qwen2 layers are
  converted this way, so a converted layer computes the prior layer exactly (RoPE aside: CLIP has
  absolute positions, the pre-decoder adds RoPE; tests compare with RoPE off).
- CLIP's MLP fc2(quick_gelu(fc1 x)) in the gated form down(silu(gate x) * up x): with
  gate = 1.702 fc1 and up = 1 / 1.702 (zero weights, constant bias), silu(1.702 z) / 1.702 =
  z * sigmoid(1.702 z) = quick_gelu(z), exactly. A CLIP with exact GELU is refused (no exact gated form).
- CLIP's class token is dropped: the pre-decoder sees patch tokens only, so `pre_pos_embed` takes
  the patch rows of CLIP's position table and CLIP's `pre_layrnorm` becomes `pre_norm`.
- Qwen2: RMSNorm weights, q/k/v with bias, o_proj without (zero bias), bias-free gated MLP (zero
  biases), final norm, LM head; the embedding only when the pre width equals Qwen2's width.
- CogVideoX: its expert AdaLN (`norm1`/`norm2`: Linear(SiLU(temb)) -> shift, scale, gate for the
  video stream and for the text stream) is evaluated once at a frozen timestep (the paper's "state
  matrix computed offline"): the video triple fills the latent set SSG_L, the text triple the
  condition set SSG_C. The switch starts neutral (indicator weights 0, bias 0: an equal mixture)
  and learns the routing in stage 1; `route_latents=True` sets the bias so every token takes the
  latent set, which reproduces the video stream exactly (used by tests). The feed-forward:
  "swiglu" maps exactly; CogVideoX-2B's "gelu-approximate" is realised as quick_gelu (the CLIP
  mapping), whose largest deviation from tanh-GELU is 0.020 (at |z| ~ 1.9).
- Generation heads: CogVideoX's time_proj/time_embedding, patch_embed (proj, text_proj),
  norm_final, norm_out and proj_out map by name. `temb_token` and `v2t_projector` have no prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

QUICK_GELU = 1.702


class PriorError(ValueError):
    """A prior whose shapes or settings cannot initialise this HaploOmni configuration."""


@dataclass
class PriorReport:
    """Which HaploOmni parameters came from which prior; everything else keeps its initial value."""

    sources: dict[str, str] = field(default_factory=dict)  # parameter -> prior parameter

    def record(self, target: str, source: str) -> None:
        self.sources[target] = source

    def untouched(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if name not in self.sources]


def _copy(report: PriorReport, model: nn.Module, target: str, value: torch.Tensor, source: str) -> None:
    param = model.get_parameter(target)
    if param.shape != value.shape:
        raise PriorError(f"{target} {tuple(param.shape)} cannot take {source} {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
    report.record(target, source)


def _neutral_modulation(report, model, prefix: str) -> None:
    """shift = scale = 0, gate = 1 in both sets: the norm acts as the prior's plain norm."""
    for name in ("SSG_L", "SSG_C"):
        ssg = torch.zeros_like(model.get_parameter(f"{prefix}.{name}"))
        ssg[2] = 1.0
        _copy(report, model, f"{prefix}.{name}", ssg, "neutral modulation")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PriorError(message)


def _stage_layers(model, stage: str) -> range:
    return model.model.stage_layers(stage)


# -- CLIP-ViT -> pre-decoder ------------------------------------------------------------------------

def init_pre_decoder_from_clip(model, clip, report: PriorReport | None = None) -> PriorReport:
    """`clip`: transformers CLIPVisionModel (or its `vision_model`)."""
    report = report or PriorReport()
    vision = getattr(clip, "vision_model", clip)
    cfg, pre = vision.config, model.config.pre
    _check(cfg.hidden_act == "quick_gelu",
           f"CLIP hidden_act {cfg.hidden_act!r}: only quick_gelu has an exact gated-MLP form")
    _check((cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers)
           == (pre.hidden_size, pre.intermediate_size, pre.num_attention_heads, pre.num_hidden_layers),
           f"CLIP (hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, heads {cfg.num_attention_heads}, layers "
           f"{cfg.num_hidden_layers}) does not match the pre-decoder (hidden {pre.hidden_size}, mlp "
           f"{pre.intermediate_size}, heads {pre.num_attention_heads}, layers {pre.num_hidden_layers})")
    _check(pre.norm_mode == "layernorm", "the pre-decoder must use layernorm mode to take CLIP's LayerNorms")
    _check(cfg.patch_size == pre.patch_size and cfg.image_size == pre.default_image_size,
           f"CLIP patch {cfg.patch_size} / image {cfg.image_size} != pre-decoder {pre.patch_size} / "
           f"{pre.default_image_size}")
    emb = vision.embeddings
    _copy(report, model, "model.patch_embed.proj.weight", emb.patch_embedding.weight, "embeddings.patch_embedding")
    # Row 0 of CLIP's table is the class token's position: dropped with the class token.
    _copy(report, model, "model.pre_pos_embed", emb.position_embedding.weight[1:][None], "position_embedding[1:]")
    _copy(report, model, "model.pre_norm.weight", vision.pre_layrnorm.weight, "pre_layrnorm.weight")
    _copy(report, model, "model.pre_norm.bias", vision.pre_layrnorm.bias, "pre_layrnorm.bias")
    for n, index in enumerate(_stage_layers(model, "pre")):
        src, dst = vision.encoder.layers[n], f"model.layers.{index}"
        for ours, theirs in (("input_layernorm", "layer_norm1"), ("post_attention_layernorm", "layer_norm2")):
            _copy(report, model, f"{dst}.{ours}.weight", getattr(src, theirs).weight, f"layers.{n}.{theirs}")
            _copy(report, model, f"{dst}.{ours}.bias", getattr(src, theirs).bias, f"layers.{n}.{theirs}")
            _neutral_modulation(report, model, f"{dst}.{ours}")
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
            for kind in ("weight", "bias"):
                _copy(report, model, f"{dst}.self_attn.{ours}.{kind}", getattr(getattr(src.self_attn, theirs), kind),
                      f"layers.{n}.self_attn.{theirs}.{kind}")
        _quick_gelu_mlp(report, model, f"{dst}.mlp", src.mlp.fc1, src.mlp.fc2, f"layers.{n}.mlp")
    return report


def _quick_gelu_mlp(report, model, dst: str, fc1: nn.Linear, fc2: nn.Linear, name: str) -> None:
    _copy(report, model, f"{dst}.gate_proj.weight", fc1.weight * QUICK_GELU, f"{name}.fc1 x 1.702")
    _copy(report, model, f"{dst}.gate_proj.bias", fc1.bias * QUICK_GELU, f"{name}.fc1 x 1.702")
    # up is the constant 1/1.702: zero weights, constant bias.
    _copy(report, model, f"{dst}.up_proj.weight", torch.zeros_like(fc1.weight), "zero")
    _copy(report, model, f"{dst}.up_proj.bias", torch.full_like(fc1.bias, 1 / QUICK_GELU), "1 / 1.702")
    _copy(report, model, f"{dst}.down_proj.weight", fc2.weight, f"{name}.fc2")
    _copy(report, model, f"{dst}.down_proj.bias", fc2.bias, f"{name}.fc2")


# -- Qwen2 -> base-decoder ---------------------------------------------------------------------------

def init_base_decoder_from_qwen2(model, qwen, report: PriorReport | None = None) -> PriorReport:
    """`qwen`: transformers Qwen2ForCausalLM."""
    report = report or PriorReport()
    cfg, base = qwen.config, model.config.base
    _check((cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers, cfg.vocab_size)
           == (base.hidden_size, base.intermediate_size, base.num_attention_heads, base.num_key_value_heads,
               base.num_hidden_layers, base.vocab_size),
           f"Qwen2 (hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, heads {cfg.num_attention_heads}/"
           f"{cfg.num_key_value_heads}, layers {cfg.num_hidden_layers}, vocab {cfg.vocab_size}) does not match the "
           f"base-decoder (hidden {base.hidden_size}, mlp {base.intermediate_size}, heads {base.num_attention_heads}/"
           f"{base.num_key_value_heads}, layers {base.num_hidden_layers}, vocab {base.vocab_size})")
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    _check(theta is None or float(theta) == float(base.rope_theta),
           f"Qwen2 rope_theta {theta} != base-decoder rope_theta {base.rope_theta}")
    _check(base.norm_mode == "rmsnorm", "the base-decoder must use rmsnorm mode to take Qwen2's RMSNorms")
    src_model = qwen.model
    for n, index in enumerate(_stage_layers(model, "base")):
        src, dst = src_model.layers[n], f"model.layers.{index}"
        for ours in ("input_layernorm", "post_attention_layernorm"):
            _copy(report, model, f"{dst}.{ours}.weight", getattr(src, ours).weight, f"layers.{n}.{ours}")
            _neutral_modulation(report, model, f"{dst}.{ours}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layer = getattr(src.self_attn, proj)
            _copy(report, model, f"{dst}.self_attn.{proj}.weight", layer.weight, f"layers.{n}.self_attn.{proj}")
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            _copy(report, model, f"{dst}.self_attn.{proj}.bias", bias, f"layers.{n}.self_attn.{proj}.bias or 0")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(src.mlp, proj)
            _copy(report, model, f"{dst}.mlp.{proj}.weight", layer.weight, f"layers.{n}.mlp.{proj}")
            _copy(report, model, f"{dst}.mlp.{proj}.bias", torch.zeros(layer.out_features), "zero (no bias)")
    _copy(report, model, "model.norm.weight", src_model.norm.weight, "norm")
    _copy(report, model, "lm_head.weight", qwen.lm_head.weight, "lm_head")
    if model.config.pre.hidden_size == cfg.hidden_size:
        _copy(report, model, "model.embed_tokens.weight", src_model.embed_tokens.weight, "embed_tokens")
    return report


# -- CogVideoX -> post-decoder and generation heads ----------------------------------------------------

@torch.no_grad()
def frozen_modulation(cog, block, timestep: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """norm1/norm2 of one CogVideoX block at a fixed timestep -> (SSG_L1, SSG_C1, SSG_L2, SSG_C2), each [3, H]."""
    t = torch.tensor([timestep], dtype=torch.float32)
    temb = cog.time_embedding(cog.time_proj(t).to(cog.time_embedding.linear_1.weight.dtype))
    sets = []
    for norm in (block.norm1, block.norm2):
        shift, scale, gate, enc_shift, enc_scale, enc_gate = norm.linear(norm.silu(temb)).chunk(6, dim=1)
        sets += [torch.cat([shift, scale, gate]), torch.cat([enc_shift, enc_scale, enc_gate])]
    return tuple(sets)


def init_post_decoder_from_cogvideox(model, cog, timestep: float = 500.0, route_latents: bool = False,
                                     report: PriorReport | None = None) -> PriorReport:
    """`cog`: diffusers CogVideoXTransformer3DModel (2-D patches, no RoPE, as CogVideoX-2B)."""
    report = report or PriorReport()
    cfg, post, gen = cog.config, model.config.post, model.config.video_generation
    width = cfg.num_attention_heads * cfg.attention_head_dim
    _check((width, cfg.num_attention_heads, cfg.num_layers) == (post.hidden_size, post.num_attention_heads,
                                                                 post.num_hidden_layers),
           f"CogVideoX (width {width}, heads {cfg.num_attention_heads}, layers {cfg.num_layers}) does not match the "
           f"post-decoder (width {post.hidden_size}, heads {post.num_attention_heads}, layers "
           f"{post.num_hidden_layers})")
    _check(post.norm_mode == "layernorm" and post.use_qk_norm,
           "the post-decoder must use layernorm mode with q/k norms to take CogVideoX's blocks")
    _check(cfg.patch_size_t is None, "CogVideoX 1.5 (temporal patches) is not supported; use a 2-D patch model")
    _check(cfg.activation_fn in ("gelu-approximate", "swiglu"),
           f"CogVideoX activation {cfg.activation_fn!r}: supported are gelu-approximate and swiglu")
    _check(cfg.time_embed_dim == gen.time_embed_dim and cfg.in_channels == gen.latent_channels,
           f"CogVideoX time_embed_dim/in_channels {cfg.time_embed_dim}/{cfg.in_channels} != "
           f"{gen.time_embed_dim}/{gen.latent_channels}")
    inner = cog.transformer_blocks[0].ff.net[2].in_features
    _check(inner == post.intermediate_size,
           f"CogVideoX feed-forward width {inner} != post-decoder intermediate_size {post.intermediate_size}")
    for n, index in enumerate(_stage_layers(model, "post")):
        src, dst = cog.transformer_blocks[n], f"model.layers.{index}"
        ssg_l1, ssg_c1, ssg_l2, ssg_c2 = frozen_modulation(cog, src, timestep)
        for ours, norm, ssg_l, ssg_c in (("input_layernorm", src.norm1, ssg_l1, ssg_c1),
                                         ("post_attention_layernorm", src.norm2, ssg_l2, ssg_c2)):
            prefix = f"{dst}.{ours}"
            _copy(report, model, f"{prefix}.weight", norm.norm.weight, f"blocks.{n}.{ours[:4]}.norm")
            _copy(report, model, f"{prefix}.bias", norm.norm.bias, f"blocks.{n}.{ours[:4]}.norm")
            _copy(report, model, f"{prefix}.SSG_L", ssg_l, f"blocks.{n} video (shift, scale, gate) at t={timestep:g}")
            _copy(report, model, f"{prefix}.SSG_C", ssg_c, f"blocks.{n} text (shift, scale, gate) at t={timestep:g}")
            indicator_bias = torch.tensor([30.0, -30.0]) if route_latents else torch.zeros(2)
            _copy(report, model, f"{prefix}.indicator.weight", torch.zeros(2, post.hidden_size), "switch init")
            _copy(report, model, f"{prefix}.indicator.bias", indicator_bias, "switch init")
        attn = src.attn1
        for ours, theirs in (("q_proj", attn.to_q), ("k_proj", attn.to_k), ("v_proj", attn.to_v),
                             ("o_proj", attn.to_out[0])):
            _copy(report, model, f"{dst}.self_attn.{ours}.weight", theirs.weight, f"blocks.{n}.attn1.{ours}")
            bias = theirs.bias if theirs.bias is not None else torch.zeros(theirs.out_features)
            _copy(report, model, f"{dst}.self_attn.{ours}.bias", bias, f"blocks.{n}.attn1.{ours}.bias")
        for ours, theirs in (("norm_q", attn.norm_q), ("norm_k", attn.norm_k)):
            _copy(report, model, f"{dst}.self_attn.{ours}.weight", theirs.weight, f"blocks.{n}.attn1.{ours}")
            _copy(report, model, f"{dst}.self_attn.{ours}.bias", theirs.bias, f"blocks.{n}.attn1.{ours}")
        _feed_forward(report, model, f"{dst}.mlp", src.ff, cfg.activation_fn, f"blocks.{n}.ff")
    for ours, theirs in (("time_embedding.linear_1", cog.time_embedding.linear_1),
                         ("time_embedding.linear_2", cog.time_embedding.linear_2),
                         ("patch_embed_cogvideo.proj", cog.patch_embed.proj),
                         ("patch_embed_cogvideo.text_proj", cog.patch_embed.text_proj),
                         ("norm_final", cog.norm_final), ("norm_out.linear", cog.norm_out.linear),
                         ("norm_out.norm", cog.norm_out.norm), ("proj_out", cog.proj_out)):
        for kind in ("weight", "bias"):
            _copy(report, model, f"{ours}.{kind}", getattr(theirs, kind), f"{ours}.{kind}")
    return report


def _feed_forward(report, model, dst: str, ff, activation: str, name: str) -> None:
    act, out = ff.net[0], ff.net[2]
    if activation == "swiglu":  # proj -> (hidden, gate) halves, hidden * silu(gate): the gated MLP itself
        hidden_w, gate_w = act.proj.weight.chunk(2, dim=0)
        hidden_b, gate_b = act.proj.bias.chunk(2, dim=0)
        _copy(report, model, f"{dst}.gate_proj.weight", gate_w, f"{name}.proj (gate half)")
        _copy(report, model, f"{dst}.gate_proj.bias", gate_b, f"{name}.proj (gate half)")
        _copy(report, model, f"{dst}.up_proj.weight", hidden_w, f"{name}.proj (hidden half)")
        _copy(report, model, f"{dst}.up_proj.bias", hidden_b, f"{name}.proj (hidden half)")
        _copy(report, model, f"{dst}.down_proj.weight", out.weight, f"{name}.out")
        _copy(report, model, f"{dst}.down_proj.bias", out.bias, f"{name}.out")
    else:  # tanh-GELU realised as quick_gelu
        _quick_gelu_mlp(report, model, dst, act.proj, out, name)


# -- configs of tiny priors (tests, demos) ---------------------------------------------------------------

def clip_config_for(config):
    from transformers import CLIPVisionConfig

    pre = config.pre
    return CLIPVisionConfig(hidden_size=pre.hidden_size, intermediate_size=pre.intermediate_size,
                            num_hidden_layers=pre.num_hidden_layers, num_attention_heads=pre.num_attention_heads,
                            image_size=pre.default_image_size, patch_size=pre.patch_size, hidden_act="quick_gelu",
                            layer_norm_eps=pre.rms_norm_eps)


def qwen2_config_for(config):
    from transformers import Qwen2Config

    base = config.base
    return Qwen2Config(hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
                       num_hidden_layers=base.num_hidden_layers, num_attention_heads=base.num_attention_heads,
                       num_key_value_heads=base.num_key_value_heads, vocab_size=base.vocab_size,
                       rope_theta=base.rope_theta, rms_norm_eps=base.rms_norm_eps, tie_word_embeddings=False)


def cogvideox_kwargs_for(config, activation_fn: str = "gelu-approximate") -> dict:
    post, gen = config.post, config.video_generation
    return dict(num_attention_heads=post.num_attention_heads, attention_head_dim=post.head_dim,
                in_channels=gen.latent_channels, out_channels=gen.latent_channels, time_embed_dim=gen.time_embed_dim,
                text_embed_dim=gen.text_embed_dim, num_layers=post.num_hidden_layers, patch_size=gen.latent_patch_size,
                sample_height=gen.height // gen.vae_spatial_compression,
                sample_width=gen.width // gen.vae_spatial_compression,
                sample_frames=gen.num_frames, max_text_seq_length=16, activation_fn=activation_fn,
                norm_eps=post.rms_norm_eps,
                spatial_interpolation_scale=gen.spatial_interpolation_scale,
                temporal_interpolation_scale=gen.temporal_interpolation_scale)


def random_priors(config, seed: int = 0):
    """Seeded random CLIP / Qwen2 / CogVideoX shaped for `config` (no downloads: tests and demos)."""
    from diffusers import CogVideoXTransformer3DModel
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    torch.manual_seed(seed)
    clip = CLIPVisionModel(clip_config_for(config)).eval()
    qwen = Qwen2ForCausalLM(qwen2_config_for(config)).eval()
    cog = CogVideoXTransformer3DModel(**cogvideox_kwargs_for(config)).eval()
    return clip, qwen, cog


def init_from_priors(model, clip=None, qwen=None, cog=None, timestep: float = 500.0) -> PriorReport:
    report = PriorReport()
    if clip is not None:
        init_pre_decoder_from_clip(model, clip, report)
    if qwen is not None:
        init_base_decoder_from_qwen2(model, qwen, report)
    if cog is not None:
        init_post_decoder_from_cogvideox(model, cog, timestep, report=report)
    return report
