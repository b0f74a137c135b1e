"""Golden vectors of the official implementation (tests/fixtures/tiny-a, see its README), in fp32."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from haplo.model import ops
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.sequence import generation_positions, understanding_key_start
from haplo.runtime.ddim import denoise, make_scheduler
from haplo.runtime.decoding import understand
from haplo.runtime.torch_backend import TorchBackend

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-a"
ATOL = 1e-4


@pytest.fixture(scope="module")
def vectors():
    return load_file(str(FIXTURE / "vectors.safetensors"))


@pytest.fixture(scope="module")
def model():
    return HaploOmniForConditionalGeneration.from_pretrained(FIXTURE / "checkpoint")


@pytest.fixture(scope="module")
def official_model():
    """The same weights with the official unpadded-batch behaviour (block mask dropped)."""
    m = HaploOmniForConditionalGeneration.from_pretrained(FIXTURE / "checkpoint")
    m.config.official_mask_quirk = True
    return m


def assert_close(actual, expected, valid=None, atol=ATOL):
    if valid is not None:  # compare real (non-padding) positions only
        actual, expected = actual[valid.bool()], expected[valid.bool()]
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


def understanding_inputs(vectors, case):
    names = {"input_ids", "attention_mask", "attention_start_ids", "pixel_values", "image_sizes", "pixel_values_videos"}
    return {n: vectors[f"{case}.{n}"] for n in names if f"{case}.{n}" in vectors}


@pytest.mark.parametrize("case", ["und_img", "und_vid"])
def test_understanding_official_quirk(official_model, vectors, case):
    inputs = understanding_inputs(vectors, case)
    with torch.no_grad():
        out = official_model(**inputs, output_hidden_states=True)
    valid = inputs["attention_mask"]
    assert_close(out.logits, vectors[f"{case}.logits"], valid)
    assert_close(out.last_hidden_state, vectors[f"{case}.last_hidden_state"], valid)
    assert_close(out.last_decoder_hidden_state, vectors[f"{case}.last_decoder_hidden_state"], valid)
    assert len(out.hidden_states) == 7
    for i, hidden in enumerate(out.hidden_states):
        assert_close(hidden, vectors[f"{case}.debug.hidden_states.{i:02d}"], valid)


def test_packed_image_embeds(model, vectors):
    with torch.no_grad():
        packed = model.model.embed_images(vectors["und_img.pixel_values"], vectors["und_img.image_sizes"])
    assert_close(torch.cat(packed), vectors["und_img.debug.packed_image_embeds"])


@pytest.mark.parametrize("case", ["und_img", "und_vid"])
def test_understanding_paper_mask(model, vectors, case):
    """Default: the block-bidirectional mask the paper describes (official `*_bidir` vectors)."""
    inputs = understanding_inputs(vectors, case)
    key_start = understanding_key_start(model.config, inputs["attention_mask"], inputs["attention_start_ids"])
    mask = ops.block_mask(key_start, key_start.shape[-1])
    assert torch.equal(mask, vectors[f"{case}_bidir.attend_mask"])
    with torch.no_grad():
        out = model(**inputs)
    valid = inputs["attention_mask"]
    assert_close(out.logits, vectors[f"{case}_bidir.logits"], valid)
    assert_close(out.last_hidden_state, vectors[f"{case}_bidir.last_hidden_state"], valid)
    assert_close(out.last_decoder_hidden_state, vectors[f"{case}_bidir.last_decoder_hidden_state"], valid)


def test_paper_and_quirk_differ_after_the_image(model, official_model, vectors):
    inputs = understanding_inputs(vectors, "und_img")
    with torch.no_grad():
        paper, quirk = model(**inputs).logits, official_model(**inputs).logits
    first_image = int((inputs["input_ids"][0] == model.config.image_token_index).nonzero()[0])
    assert_close(paper[:, :first_image], quirk[:, :first_image])
    assert (paper[:, first_image:] - quirk[:, first_image:]).abs().max() > 0.1


def test_greedy_decoding(official_model, vectors):
    inputs = understanding_inputs(vectors, "und_img")
    out = understand(TorchBackend(official_model), **inputs, max_new_tokens=5, return_logits=True)
    assert torch.equal(out.new_tokens, vectors["generate.new_tokens"])
    assert torch.equal(out.sequences, vectors["generate.sequences"])
    assert_close(torch.stack(out.step_logits), vectors["generate.step_logits"])


def test_generation_forward(model, vectors):
    args = [vectors[f"genfwd.{n}"] for n in ("latents", "timestep", "input_ids", "attention_mask")]
    with torch.no_grad():
        sample = model.generation_forward(*args)
        table = model.patch_embed_cogvideo.position_table(2, 8, 8, "cpu", torch.float32)
        temb = model.time_embed(args[1], 2)
    assert_close(sample, vectors["genfwd.sample"])
    assert_close(table, vectors["genfwd.debug.pos_embedding"][0])
    assert_close(temb, vectors["genfwd.debug.time_embedding"])
    key_start, positions = generation_positions(args[3], 32)
    assert torch.equal(positions, vectors["genfwd.position_ids"])
    mask = ops.block_mask(key_start, key_start.shape[-1])
    real_rows = torch.cat([args[3], torch.ones(2, 33, dtype=torch.long)], 1).bool()
    # padding rows differ by design (official: attend everything; ours: nothing); real rows are equal
    assert torch.equal(mask[:, 0][real_rows], vectors["genfwd.hybrid_mask"][:, 0][real_rows])


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_ddim_three_steps(model, vectors, reuse_prefix):
    scheduler = make_scheduler(model.config.video_generation)
    latents = denoise(
        TorchBackend(model),
        vectors["ddim.input_ids"],
        vectors["ddim.attention_mask"],
        vectors["ddim.initial_latents"],
        num_inference_steps=3,
        guidance_scale=6.5,
        scheduler=scheduler,
        reuse_prefix=reuse_prefix,
    )
    assert torch.equal(scheduler.timesteps, vectors["ddim.timesteps"])
    assert_close(
        torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64), vectors["ddim.debug.alphas_cumprod"], atol=1e-12
    )
    assert_close(latents, vectors["ddim.final_latents"], atol=5e-4)
