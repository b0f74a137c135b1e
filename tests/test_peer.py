"""The speed peer of `bench --peer onnxruntime-genai`: its shape, its build, its timing, the ratios."""

from __future__ import annotations

import json
import sys

import pytest

from haplo.bench import peer
from haplo.bench.roofline import torch_decode_weight_bytes
from haplo.model.config import preset


def test_the_peer_has_the_base_shape_and_our_decode_step_bytes():
    config = preset("small")
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    ours = torch_decode_weight_bytes(HaploOmniForConditionalGeneration.from_config(config, seed=0))
    spec = peer.peer_spec(config, ours)
    assert (spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads) == (768, 12, 2)
    assert (spec.intermediate_size, spec.vocab_size) == (config.base.intermediate_size, config.vocab_size)
    one_layer = peer.peer_spec(config, 0)  # at least one layer
    layer_bytes = peer.PeerSpec(**{**one_layer.__dict__, "num_hidden_layers": 2}).decode_weight_bytes - (
        one_layer.decode_weight_bytes
    )
    assert abs(spec.decode_weight_bytes - ours) <= layer_bytes / 2  # the nearest layer count


def test_the_peers_byte_count_is_what_transformers_allocates():
    spec = peer.PeerSpec(64, 128, 2, 4, 2, 512)
    model = peer._random_qwen2(spec, seed=0)
    counted = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("model.embed_tokens"))
    assert counted == spec.decode_weight_bytes


def test_a_tiny_peer_builds_and_decodes_the_asked_tokens(tmp_path):
    spec = peer.PeerSpec(64, 128, 2, 4, 2, 512)
    path, build_s = peer.build(spec, "fp32", tmp_path, threads=1, seed=0, log=lambda _: None)
    assert build_s > 0 and not (path / "hf").exists()
    config = json.loads((path / "model" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    result = peer.measure(path, prompt_tokens=12, new_tokens=5, warmup=0, repeats=2)
    assert result["ttft_ms"]["n"] == 2 and result["tpot_ms"]["n"] == 2 * 4 and result["tokens_per_s"] > 0
    again, _ = peer.build(spec, "fp32", tmp_path, threads=2, seed=0, log=pytest.fail)  # reused, threads updated
    assert again == path
    assert (
        json.loads((path / "model" / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
            "intra_op_num_threads"
        ]
        == 2
    )


def test_ours_over_the_peer_pairs_precisions():
    def entry(key, backend, precision, ttft, tpot, status="ok"):
        und = {"ttft_ms": {"p50": ttft}, "tpot_ms": {"p50": tpot}}
        return {"key": key, "backend": backend, "precision": precision, "status": status, "understanding": und}

    results = {
        "fp32": {"precision": "fp32", "status": "ok", "ttft_ms": {"p50": 10.0}, "tpot_ms": {"p50": 2.0}},
        "int8": {"precision": "int8", "status": "error", "reason": "x"},
    }
    entries = [entry("torch", "torch", "fp32", 30, 4), entry("onnxruntime-int8", "onnxruntime", "int8", 5, 1)]
    ratios = peer.compare(entries, results)
    assert ratios == {"torch": {"peer_precision": "fp32", "ttft": 3.0, "tpot": 2.0}}  # no int8 peer: no ratio


def test_a_missing_peer_install_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(peer.PeerError, match=r"pip install -c constraints.txt -e '\.\[peer\]'"):
        peer.require()


def test_the_peer_section_is_validated_and_tabled():
    from haplo.bench.report import SchemaError, peer_lines, validate

    doc = {k: {} for k in ("created", "command", "machine", "versions", "settings", "sweeps")}
    doc.update(schema="haplo-bench/1", backends=[])
    model = {"architecture": "Qwen2", **peer.PeerSpec(64, 128, 2, 4, 2, 512).__dict__, "decode_weight_bytes": 10}
    ok = {"precision": "fp32", "status": "ok", "ttft_ms": {"p50": 2.0}, "tpot_ms": {"p50": 0.5}, "tokens_per_s": 2e3}
    doc["peer"] = {
        "name": peer.NAME,
        "version": "0.18.0",
        "model": model,
        "our_decode_weight_bytes": 11,
        "results": [ok, {"precision": "int8", "status": "error", "reason": "builder failed"}],
        "ratio_ours_to_peer": {"onnxruntime-fp32": {"peer_precision": "fp32", "ttft": 3.0, "tpot": 2.5}},
    }
    validate(doc)
    text = "\n".join(peer_lines(doc["peer"]))
    assert "Qwen2 of 2 layers" in text and "int8: error: builder failed" in text and "TPOT 2.50x" in text
    del ok["tpot_ms"]
    with pytest.raises(SchemaError, match="peer fp32: missing 'tpot_ms'"):
        validate(doc)


def test_a_peer_directory_the_tool_did_not_make_is_left_alone(tmp_path):
    from haplo.errors import HaploError

    spec = peer.PeerSpec(64, 128, 2, 4, 2, 512)
    path, _ = peer.build(spec, "fp32", tmp_path / "made", threads=1, seed=0, log=lambda _: None)
    mine = tmp_path / "work" / path.relative_to(tmp_path / "made")  # the same place under another work dir
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(HaploError, match="--work-dir"):
        peer.build(spec, "fp32", tmp_path / "work", threads=1, seed=0, log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1
