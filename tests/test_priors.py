"""Prior conversion: converted layers compute the prior layers (exactly, or within the documented GELU bound)."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

from haplo.model.config import HaploOmniConfig, StageConfig, VideoGenerationConfig, preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.training.priors import (
    GELU_TANH_MAX_ERROR,
    PriorError,
    cogvideox_state_sets,
    cogvideox_time_embedding,
    init_base_decoder_from_qwen2,
    init_from_priors,
    init_post_decoder_from_cogvideox,
    init_pre_decoder_from_clip,
    random_priors,
)

EXACT = 1e-5
TIMESTEP = 300.0


def _config() -> HaploOmniConfig:
    vision = dict(
        vocab_size=128,
        patch_size=14,
        default_image_size=28,
        image_grid_pinpoints=[[28, 28]],
        image_token_index=120,
        video_token_index=121,
    )
    return HaploOmniConfig(
        pre=StageConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            **vision,
        ),
        base=StageConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            **vision,
        ),
        post=StageConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            use_qk_norm=True,
            **vision,
        ),
        video_generation=VideoGenerationConfig(
            latent_channels=4, time_embed_dim=32, text_embed_dim=24, num_frames=5, height=32, width=32
        ),
    )


@torch.no_grad()
def _jitter(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, so that no bias, norm or gate is at its trivial initial value."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return module.eval()


def _clip(**changes) -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return _jitter(CLIPVisionModel(CLIPVisionConfig(**{**cfg, **changes})), 1)


def _qwen(**changes) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return _jitter(Qwen2ForCausalLM(Qwen2Config(**{**cfg, **changes})), 2)


def _cog(activation_fn: str = "gelu-approximate", **changes) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=24,
        num_layers=2,
        patch_size=2,
        sample_height=4,
        sample_width=4,
        sample_frames=5,
        max_text_seq_length=3,
        activation_fn=activation_fn,
        norm_eps=1e-5,
    )
    return _jitter(CogVideoXTransformer3DModel(**{**cfg, **changes}), 3)


def _model() -> HaploOmniForConditionalGeneration:
    return HaploOmniForConditionalGeneration.from_config(_config(), seed=4)


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def converted():
    model, clip, qwen, cog = _model(), _clip(), _qwen(), _cog()
    report = init_from_priors(model, clip, qwen, cog, timestep=TIMESTEP)
    return model, clip, qwen, cog, report


# -- CLIP -> pre -------------------------------------------------------------------------------------


@torch.no_grad()
def test_clip_layers_are_reproduced(converted):
    model, clip, *_ = converted
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    full = torch.zeros(2, 5, dtype=torch.long)  # every key visible to every query: CLIP's attention
    for n, index in enumerate(model.model.stage_layers("pre")):
        ours, _ = model.model.layers[index](x, None, full)
        assert _err(ours, _out(clip.encoder.layers[n](x, None))) <= EXACT


@torch.no_grad()
def test_clip_tower_is_reproduced_with_the_class_row_supplied(converted):
    """Patch embedding, patch positions, pre_norm and all layers; the class row (no HaploOmni counterpart)
    is taken from CLIP to show that dropping it is the only difference."""
    model, clip, *_ = converted
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    patches = model.model.patch_embed(pixels) + model.model.pre_pos_embed
    class_row = (clip.embeddings.class_embedding + clip.embeddings.position_embedding.weight[0]).expand(2, 1, -1)
    x = model.model.pre_norm(torch.cat([class_row, patches], 1))
    for index in model.model.stage_layers("pre"):
        x, _ = model.model.layers[index](x, None, torch.zeros(2, x.shape[1], dtype=torch.long))
    assert _err(x, clip(pixel_values=pixels).last_hidden_state) <= EXACT


# -- Qwen2 -> base -----------------------------------------------------------------------------------


@torch.no_grad()
def test_qwen2_layer_is_reproduced(converted):
    model, _, qwen, _, _ = converted
    x = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(7)[None]
    index = model.model.stage_layers("base")[0]
    ours, _ = model.model.layers[index](x, model.model.rope("base", positions), positions)  # key_start = causal
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    theirs = qwen.model.layers[0](
        x, attention_mask=causal, position_ids=positions, position_embeddings=qwen.model.rotary_emb(x, positions)
    )
    assert _err(ours, _out(theirs)) <= EXACT


@torch.no_grad()
def test_qwen2_stack_norm_and_lm_head_are_reproduced(converted):
    model, _, qwen, _, _ = converted
    x = torch.randn(2, 6, 48, generator=torch.Generator().manual_seed(8))
    positions = torch.arange(6).expand(2, -1)
    h = x
    for index in model.model.stage_layers("base"):
        h, _ = model.model.layers[index](h, model.model.rope("base", positions), positions)
    logits = model.lm_head(model.model.norm(h))
    assert _err(logits, qwen(inputs_embeds=x).logits) <= EXACT


# -- CogVideoX -> post -------------------------------------------------------------------------------


def _post(activation_fn: str, routing: str = "latent"):
    cog, model = _cog(activation_fn), _model()
    init_post_decoder_from_cogvideox(model, cog, timestep=TIMESTEP, routing=routing)
    return cog, model


@torch.no_grad()
def _video_stream_error(cog, model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|ours - CogVideoX|, video) for block n on video rows alone (routing="latent"; empty text)."""
    video = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(9))
    ours, _ = model.model.layers[model.model.stage_layers("post")[n]](video, None, torch.zeros(2, 6, dtype=torch.long))
    temb = cogvideox_time_embedding(cog, TIMESTEP).expand(2, -1)
    theirs, _ = cog.transformer_blocks[n](hidden_states=video, encoder_hidden_states=video[:, :0], temb=temb)
    return (ours - theirs).abs(), video


@pytest.mark.parametrize("activation_fn", ["swiglu", "geglu-approximate"])
def test_cogvideox_block_video_stream_exact(activation_fn):
    """Feed-forwards with an exact gated form: the converted block is CogVideoX's video stream."""
    cog, model = _post(activation_fn)
    for n in range(2):
        err, _ = _video_stream_error(cog, model, n)
        assert float(err.max()) <= EXACT


@torch.no_grad()
def test_cogvideox_block_video_stream_within_the_gelu_bound():
    """tanh-GELU realised as quick_gelu: attention is exact, so the only error is the feed-forward's,
    at most GELU_TANH_MAX_ERROR * |gate_ff| * sum_j |out.weight[i, j]| per channel."""
    cog, model = _post("gelu-approximate")
    gate_ff = cogvideox_state_sets(cog, TIMESTEP)[:, 1, 0, 2]  # [layers, width]: norm2, video set, gate row
    for n in range(2):
        err, _ = _video_stream_error(cog, model, n)
        bound = GELU_TANH_MAX_ERROR * gate_ff[n].abs() * cog.transformer_blocks[n].ff.net[2].weight.abs().sum(1)
        assert bool((err <= bound + EXACT).all())
        assert float(err.max()) > EXACT  # the approximation is real: this is not the exact path


@torch.no_grad()
def test_cogvideox_joint_block_with_text_on_the_condition_set():
    """Both streams at once: a test switch sends rows marked on channel 0 to SSG_C (text) and the rest to
    SSG_L (video); then the layer over [text, video] with full attention is CogVideoX's joint block."""
    cog, model = _post("swiglu")
    gen = torch.Generator().manual_seed(10)
    text, video = torch.randn(2, 3, 32, generator=gen), torch.randn(2, 6, 32, generator=gen)
    text[..., 0], video[..., 0] = 100.0, -100.0  # silu: 100 for text, ~0 for video
    temb = cogvideox_time_embedding(cog, TIMESTEP).expand(2, -1)
    for n, index in enumerate(model.model.stage_layers("post")):
        layer = model.model.layers[index]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.indicator.weight.zero_()
            norm.indicator.weight[1, 0] = 1.0  # condition logit = silu(x0)
            norm.indicator.bias.copy_(torch.tensor([50.0, 0.0]))  # latent logit = 50
        ours, _ = layer(torch.cat([text, video], 1), None, torch.zeros(2, 9, dtype=torch.long))
        video_out, text_out = cog.transformer_blocks[n](hidden_states=video, encoder_hidden_states=text, temb=temb)
        assert _err(ours, torch.cat([text_out, video_out], 1)) <= EXACT


@torch.no_grad()
def test_cogvideox_generation_heads_are_reproduced(converted):
    model, _, _, cog, _ = converted
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 2, 4, 8, 8, generator=gen)  # [B, F, C, H, W]
    text = torch.randn(2, 3, 24, generator=gen)  # CogVideoX adds positions to exactly max_text_seq_length rows
    t = torch.tensor([TIMESTEP, 700.0])
    temb = model.time_embed(t, 2)
    assert _err(temb, cog.time_embedding(cog.time_proj(t))) <= EXACT
    assert _err(model.patch_embed_cogvideo(latents), cog.patch_embed(text, latents)[:, 3:]) <= EXACT
    captured = {}
    cog.norm_final.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
    sample = cog(hidden_states=latents, encoder_hidden_states=text, timestep=t).sample
    assert _err(model.latent_head(captured["hidden"], temb, latents.shape), sample) <= EXACT


def test_neutral_routing_mixes_the_frozen_state_sets(converted):
    model, *_, cog, report = converted
    states = cogvideox_state_sets(cog, TIMESTEP)
    norm = model.model.layers[model.model.stage_layers("post")[1]].post_attention_layernorm
    assert torch.equal(norm.indicator.weight, torch.zeros_like(norm.indicator.weight))
    assert torch.equal(norm.indicator.bias, torch.zeros(2))
    assert torch.allclose(norm.SSG_L, states[1, 1, 0]) and torch.allclose(norm.SSG_C, states[1, 1, 1])
    assert not torch.allclose(norm.SSG_L, norm.SSG_C)


# -- report and errors ---------------------------------------------------------------------------------


def test_report_lists_every_parameter(converted):
    model, *_, report = converted
    names = [n for n, _ in model.named_parameters()]
    assert set(report.sources).isdisjoint(report.left_at_init)
    assert set(report.sources) | set(report.left_at_init) == set(names)
    prefixes = (
        "model.embed_tokens",
        "model.image_newline",
        "model.pre_connector",
        "model.post_connector",
        "model.post_norm",
        "model.post_linear",
        "model.post_scale",
        "temb_token",
        "v2t_projector",
    )
    left = {n for n in report.left_at_init if not n.startswith(prefixes)}
    pre_and_base = model.model.stage_layers("pre")[0], model.model.stage_layers("base")[-1]
    assert all(".indicator." in n and pre_and_base[0] <= int(n.split(".")[2]) <= pre_and_base[1] for n in left)
    assert report.unused == {
        "clip": ["embeddings.class_embedding", "post_layernorm.bias", "post_layernorm.weight"],
        "qwen2": ["model.embed_tokens.weight"],
        "cogvideox": [],
    }
    assert report.sources["model.pre_pos_embed"].startswith("clip:embeddings.position_embedding.weight")
    assert report.sources["model.layers.2.self_attn.o_proj.bias"].startswith("0 (qwen2 has no")


def test_mismatches_are_refused():
    model = _model()
    with pytest.raises(PriorError, match="num_hidden_layers: CLIP 3 vs pre-decoder 2"):
        init_pre_decoder_from_clip(model, _clip(num_hidden_layers=3))
    with pytest.raises(PriorError, match="quick_gelu"):
        init_pre_decoder_from_clip(model, _clip(hidden_act="gelu"))
    with pytest.raises(PriorError, match="rope_theta: Qwen2 10000.0 vs base-decoder 1000000.0"):
        init_base_decoder_from_qwen2(model, _qwen(rope_theta=10000.0))
    with pytest.raises(PriorError, match="width: CogVideoX 48 vs post-decoder 32"):
        init_post_decoder_from_cogvideox(model, _cog(num_attention_heads=3))
    rms_pre = HaploOmniForConditionalGeneration.from_config(preset("tiny"), seed=0)
    with pytest.raises(PriorError, match="norm_mode: CLIP 'layernorm' vs pre-decoder 'rmsnorm'"):
        init_pre_decoder_from_clip(rms_pre, random_priors(preset("tiny-priors"))[0])


def test_random_priors_are_deterministic():
    config = preset("tiny-priors")
    first, second = random_priors(config, seed=3), random_priors(config, seed=3)
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
