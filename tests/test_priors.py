"""Prior conversion: a converted layer computes the prior layer (exactly where the mapping is exact)."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from haplo.config import preset
from haplo.layers import rope_cos_sin
from haplo.modeling import HaploOmniForConditionalGeneration
from haplo.priors import (
    PriorError,
    cogvideox_kwargs_for,
    init_from_priors,
    init_post_decoder_from_cogvideox,
    random_priors,
)


@pytest.fixture(scope="module")
def converted():
    config = preset("tiny-priors")
    clip, qwen, cog = random_priors(config, seed=0)
    model = HaploOmniForConditionalGeneration.from_config(config, seed=1)
    report = init_from_priors(model, clip, qwen, cog, timestep=400.0)
    return model, clip, qwen, cog, report


def _visible_to_all(batch, length):
    return torch.zeros(batch, length, dtype=torch.long)  # every key's block starts at 0


def test_clip_layer_is_reproduced(converted):
    model, clip, *_ = converted
    torch.manual_seed(0)
    x = torch.randn(2, 9, model.config.pre.hidden_size)
    ours, _ = model.model.layers[0](x, None, _visible_to_all(2, 9))
    theirs = getattr(clip, "vision_model", clip).encoder.layers[0](x, None)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert (ours - theirs).abs().max() < 1e-5


def test_clip_embeddings_drop_the_class_token(converted):
    model, clip, *_ = converted
    pixels = torch.randn(1, 3, model.config.pre.default_image_size, model.config.pre.default_image_size)
    ours = model.model.pre_norm(model.model.patch_embed(pixels) + model.model.pre_pos_embed)
    vision = getattr(clip, "vision_model", clip)  # transformers 5 flattens CLIPVisionModel
    theirs = vision.pre_layrnorm(vision.embeddings(pixels))[:, 1:]
    assert (ours - theirs).abs().max() < 1e-5


def test_qwen2_layer_is_reproduced(converted):
    model, _, qwen, *_ = converted
    cfg = model.config.base
    index = model.model.stage_layers("base")[0]
    torch.manual_seed(0)
    x = torch.randn(1, 7, cfg.hidden_size)
    positions = torch.arange(7)[None]
    ours, _ = model.model.layers[index](x, rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta), positions)
    rotary = qwen.model.rotary_emb(x, positions)
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    theirs = qwen.model.layers[0](x, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert (ours - theirs).abs().max() < 1e-5


def _cog_video_stream(cog, block, video, text, timestep):
    temb = cog.time_embedding(cog.time_proj(torch.tensor([timestep])))
    out, _ = block(hidden_states=video, encoder_hidden_states=text, temb=temb)
    return out


@pytest.mark.parametrize("activation, tolerance", [("swiglu", 1e-4), ("gelu-approximate", 5e-2)])
def test_cogvideox_block_at_the_frozen_timestep(activation, tolerance):
    config = preset("tiny-priors")
    torch.manual_seed(0)
    cog = CogVideoXTransformer3DModel(**cogvideox_kwargs_for(config, activation)).eval()
    model = HaploOmniForConditionalGeneration.from_config(config, seed=1)
    init_post_decoder_from_cogvideox(model, cog, timestep=300.0, route_latents=True)
    index = model.model.stage_layers("post")[0]
    video = torch.randn(1, 6, config.post.hidden_size)
    # With every token on the latent set, a sequence of video tokens alone is CogVideoX's video stream
    # attending to an empty text.
    text = torch.zeros(1, 0, config.post.hidden_size)
    with torch.no_grad():
        ours, _ = model.model.layers[index](video, None, _visible_to_all(1, 6))
        theirs = _cog_video_stream(cog, cog.transformer_blocks[0], video, text, 300.0)
    assert (ours - theirs).abs().max() < tolerance


def test_report_and_shape_errors(converted):
    model, clip, qwen, cog, report = converted
    untouched = report.untouched(model)
    assert "temb_token.weight" in untouched and "v2t_projector.weight" in untouched
    assert "model.layers.0.self_attn.q_proj.weight" not in untouched
    other = HaploOmniForConditionalGeneration.from_config(preset("tiny"), seed=0)  # rmsnorm pre-decoder
    with pytest.raises(PriorError, match="layernorm"):
        init_from_priors(other, clip=clip)
