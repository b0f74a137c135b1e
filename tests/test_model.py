"""Checkpoint loading, config round trip, KV-cache decoding, padding, sampling, prefix reuse."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from haplo.model.config import HaploOmniConfig, preset
from haplo.model.modeling import CheckpointError, HaploOmniForConditionalGeneration
from haplo.runtime.ddim import encode_prompt, predict_v
from haplo.runtime.decoding import understand
from haplo.runtime.sampling import SamplingParams, next_token
from haplo.runtime.torch_backend import TorchBackend

FIXTURE_CKPT = Path(__file__).parent / "fixtures" / "tiny-a" / "checkpoint"


@pytest.fixture(scope="module")
def tiny():
    return HaploOmniForConditionalGeneration.from_preset("tiny", seed=1)


def uneven_layers_config():
    # fewer post than base layers: the official code's cache slots would collide here
    cfg = preset("tiny")
    cfg.pre.num_hidden_layers, cfg.base.num_hidden_layers, cfg.post.num_hidden_layers = 1, 3, 2
    return cfg


def test_official_config_round_trip(tmp_path):
    original = json.loads((FIXTURE_CKPT / "config.json").read_text())
    config = HaploOmniConfig.from_dict(original)
    written = config.to_dict()
    for key, value in original.items():
        if key not in ("torch_dtype",):
            assert written[key] == value, key
    assert HaploOmniConfig.from_dict(written).to_dict() == written


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = HaploOmniForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        HaploOmniForConditionalGeneration.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        HaploOmniForConditionalGeneration.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights(tmp_path):
    shutil.copytree(FIXTURE_CKPT, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["post_config"]["intermediate_size"] = 256
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the weights.*wrong shape"):
        HaploOmniForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    config["post_config"]["num_hidden_layers"] = 3
    config["post_config"]["intermediate_size"] = 128
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        HaploOmniForConditionalGeneration.from_pretrained(tmp_path / "ckpt")


def test_corrupt_weights(tmp_path):
    shutil.copytree(FIXTURE_CKPT, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt"):
        HaploOmniForConditionalGeneration.from_pretrained(tmp_path / "ckpt")


def test_paper_scale_preset_on_meta_device():
    with torch.device("meta"):
        model = HaploOmniForConditionalGeneration(preset("haplo-omni-9b"))
    total = sum(p.numel() for p in model.parameters())
    assert 8.5e9 < total < 9.5e9
    assert model.lm_head.weight.is_meta


def greedy_without_cache(model, input_ids, attention_mask, steps):
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        logits = model(ids, mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, input_ids.shape[1] :]


@pytest.mark.parametrize("config", [preset("tiny"), uneven_layers_config()], ids=["2-2-2", "1-3-2"])
def test_kv_cache_decoding_equals_recomputation(config):
    model = HaploOmniForConditionalGeneration.from_config(config, seed=3)
    ids = torch.randint(2, 900, (1, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = greedy_without_cache(model, ids, mask, 6)
    assert torch.equal(understand(TorchBackend(model), ids, attention_mask=mask, max_new_tokens=6).new_tokens, expected)


def test_left_padded_batch_matches_single_rows(tiny):
    short, long = torch.randint(2, 900, (1, 4)), torch.randint(2, 900, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    out = understand(TorchBackend(tiny), batch, attention_mask=mask, max_new_tokens=5).new_tokens
    assert torch.equal(out[0], understand(TorchBackend(tiny), short, max_new_tokens=5).new_tokens[0])
    assert torch.equal(out[1], understand(TorchBackend(tiny), long, max_new_tokens=5).new_tokens[0])


def test_stop_tokens_end_rows(tiny):
    ids = torch.randint(2, 900, (2, 5))
    free = understand(TorchBackend(tiny), ids, max_new_tokens=6).new_tokens
    stop = int(free[0, 1])
    out = understand(TorchBackend(tiny), ids, max_new_tokens=6, stop_token_ids=(stop,)).new_tokens
    assert out[0, 1] == stop and (out[0, 2:] == tiny.config.pad_token_id).all()


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingParams(do_sample=True, top_k=1), g).item() == 1
    assert next_token(logits, SamplingParams(do_sample=True, top_p=0.01), g).item() == 1
    draws = {next_token(logits, SamplingParams(do_sample=True, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_sampling_is_reproducible_with_a_seed(tiny):
    ids = torch.randint(2, 900, (1, 5))
    runs = [
        understand(TorchBackend(tiny), ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7).new_tokens
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_prefix_reuse_is_exact_with_padding(tiny):
    ids = torch.randint(2, 900, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    latents = torch.randn(2, 3, 16, 8, 8)
    t = torch.tensor([999, 500])
    backend = TorchBackend(tiny)
    with torch.no_grad():
        reference = tiny.generation_forward(latents, t, ids, mask)
    full = predict_v(backend, latents, t, ids, mask)
    reused = predict_v(backend, latents, t, ids, mask, prefix=encode_prompt(backend, ids, mask))
    torch.testing.assert_close(full, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)


def test_a_stage_without_cache_gives_the_same_output_and_keeps_no_keys(tiny):
    """DDIM steps throw their keys away: `use_cache=False` computes the same hidden states and
    returns no present (each layer's keys and values are freed after the layer)."""
    backend = TorchBackend(tiny)
    width = tiny.config.stages["pre"].hidden_size
    hidden, positions = torch.randn(2, 5, width), torch.arange(5).expand(2, 5)
    key_start = torch.zeros(2, 5, dtype=torch.long)
    with_cache, present = backend.run_stage("pre", hidden, positions, key_start)
    without, none = backend.run_stage("pre", hidden, positions, key_start, use_cache=False)
    assert none is None and len(present) == len(tiny.model.stage_layers("pre"))
    assert torch.equal(with_cache, without)
