"""ONNX Runtime's decode path: stage graphs rewritten to GroupQueryAttention over caches updated in
place give the logits and tokens of the bundle's own graphs."""

from __future__ import annotations

import onnx
import pytest
import torch

from haplo.bundle import STAGE_GRAPHS, Bundle
from haplo.engines.onnxruntime import OrtBackend
from haplo.engines.ort_decode import DecodeGraphError, SlotBatch, decode_graph
from haplo.model.processor import HaploOmniProcessor
from haplo.model.tokenizer import load_tokenizer
from haplo.runtime import batching
from haplo.runtime.decoding import prefill, understand


@pytest.fixture(scope="module")
def ort(cli_bundle):
    bundle = Bundle.open(cli_bundle)
    backend = OrtBackend(bundle)
    return backend, HaploOmniProcessor(load_tokenizer(bundle.path(bundle.manifest.tokenizer)), backend.config)


def test_the_rewrite_replaces_every_cache_concat_and_the_mask(ort):
    backend, _ = ort
    path = backend.bundle.graph_path(STAGE_GRAPHS["base"])
    model = decode_graph(onnx.load(str(path), load_external_data=False), backend.config.base)
    ops = [n.op_type for n in model.graph.node]
    layers = len(backend.bundle.graphs[STAGE_GRAPHS["base"]].layers)
    assert ops.count("GroupQueryAttention") == layers and "HybridAttention" not in ops
    assert not any(n.op_type == "Concat" and n.input[0].startswith("past_key_values") for n in model.graph.node)
    names = [i.name for i in model.graph.input]
    assert "key_start" not in names and {"seqlens_k", "total_sequence_length"} <= set(names)
    with pytest.raises(DecodeGraphError, match="no HybridAttention"):
        decode_graph(
            onnx.load(str(backend.bundle.graph_path("lm_head")), load_external_data=False), backend.config.base
        )


def test_a_slot_batch_steps_as_the_padded_batch_does_through_joins_leaves_and_growth(ort):
    backend, processor = ort
    prompts = ["hi", "Describe what you see, briefly.", "What moves in the video, and in which direction?"]
    states = [prefill(backend, processor(text=p))[1] for p in prompts]
    slots, padded = SlotBatch(backend), batching.PaddedBatch(backend)
    for state in states:
        slots.add(state)
        padded.add(state)
    tokens = torch.tensor([5, 6, 7])
    for step in range(70):  # past the first capacity (64 slots): the buffers grow and keep their rows
        if step == 30:  # the middle row leaves
            slots.keep([0, 2])
            padded.keep([0, 2])
            tokens = tokens[[0, 2]]
        a, b = slots.step(tokens), padded.step(tokens)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        tokens = a.argmax(-1)
    assert slots.rows == 2 and slots.length == max(s.length for s in (states[0], states[2])) + 70
    assert slots.buffers["base"][0].shape[2] >= slots.length
    # bound again only where the rows or the buffers changed: the first step, the leave, the growth
    assert 3 <= slots.bindings_made <= 4


def test_understand_on_one_row_takes_the_in_place_path_and_gives_the_same_tokens(ort, monkeypatch):
    backend, processor = ort
    inputs = processor(text="Describe what you see.")
    fast = understand(backend, **inputs, max_new_tokens=24).new_tokens
    calls = []
    monkeypatch.setattr(SlotBatch, "step", lambda self, t, _s=SlotBatch.step: calls.append(1) or _s(self, t))
    understand(backend, **inputs, max_new_tokens=4)
    assert calls  # the one-row loop went through the slot batch
    monkeypatch.setattr(OrtBackend, "decode_batch", lambda self: None)
    assert torch.equal(understand(backend, **inputs, max_new_tokens=24).new_tokens, fast)


def _decode_run(model, folder, layers, feeds, caches):
    """One step of a rewritten stage graph, caches bound in place as `SlotBatch` binds them."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("hidden_states_out", "cpu")
    caches = [c.copy() for c in caches]
    for i, n in enumerate(layers):
        for j, kind in enumerate(("key", "value")):
            value = onnxruntime.OrtValue.ortvalue_from_numpy(caches[2 * i + j])
            binding.bind_ortvalue_input(f"past_key_values.{n}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{n}.{kind}", value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), caches


@pytest.mark.parametrize("stage", ["pre", "base", "post"])
def test_the_fused_decode_graph_computes_the_unfused_one(tmp_path, stage):
    """AdaLN in both norm modes, RoPE inside attention, qk-norm moved before the head split, packed
    projections and skip norms: same hidden states and the same cache writes, at two rows of different
    lengths whose positions are not their cache lengths."""
    import dataclasses

    import numpy as np

    from haplo.engines.ort_fusions import rope_table
    from haplo.export.graphs import _decoder_stage, _Samples, export_graph
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    config = preset("tiny")
    config = dataclasses.replace(config, post=dataclasses.replace(config.post, use_qk_norm=True))
    model = HaploOmniForConditionalGeneration.from_config(config, seed=0).eval()
    with torch.no_grad():  # the AdaLN switch sets and the indicator away from their zero init
        for name, param in model.named_parameters():
            if "SSG" in name or "indicator" in name:
                param.normal_(0, 0.5)
    spec = _decoder_stage(model, stage, STAGE_GRAPHS[stage], _Samples(config.vocab_size))
    path = tmp_path / f"{stage}.onnx"
    export_graph(spec, path)
    cfg = config.stages[stage]
    rng = np.random.default_rng(0)
    lengths = [9, 4]
    feeds = {
        "hidden_states": rng.standard_normal((2, 1, spec.inputs["hidden_states"].shape[-1])).astype(np.float32),
        "position_ids": np.array([[n + 3 * i + 2] for i, n in enumerate(lengths)], dtype=np.int64),
        "seqlens_k": np.array(lengths, dtype=np.int32),
        "total_sequence_length": np.array(max(lengths) + 1, dtype=np.int32),
    }
    caches = [rng.standard_normal(cfg.kv_shape(2, 16)).astype(np.float32) for _ in range(2 * len(spec.layers))]
    graphs = {
        fused: decode_graph(
            onnx.load(str(path), load_external_data=False), cfg, path.parent, rope_table(config, stage), fused=fused
        )
        for fused in (True, False)
    }
    nodes = graphs[True].graph.node
    ops = [n.op_type for n in nodes]
    layers = len(spec.layers)
    assert "MultimodalAdaLN" not in ops and "RotaryEmbedding" not in ops  # rotated inside attention
    assert "Transpose" not in ops  # every head split and merge reads GroupQueryAttention's layout
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert all(any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in attention)
    packed_qkv = sum(n.input[1] == "" for n in attention)  # q, k, v from one matmul
    assert packed_qkv == (0 if cfg.use_qk_norm else layers)
    plain_ops = [n.op_type for n in graphs[False].graph.node]
    assert plain_ops.count("MatMul") - ops.count("MatMul") == 3 * layers  # q|k|v and gate|up packed
    assert ops.count("SkipSimplifiedLayerNormalization") + ops.count("SkipLayerNormalization") >= 2 * layers - 1
    (fused, fused_caches), (plain, plain_caches) = (
        _decode_run(graphs[f], tmp_path, spec.layers, feeds, caches) for f in (True, False)
    )
    np.testing.assert_allclose(fused, plain, atol=2e-5, rtol=1e-4)
    for a, b in zip(fused_caches, plain_caches):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_spinning_takes_one_of_its_modes():
    from haplo.engines.onnxruntime import SPINNING, session_options
    from haplo.errors import HaploError

    for mode in SPINNING:
        session_options(spinning=mode)
    with pytest.raises(HaploError, match="choose one of off, run, on"):
        session_options(spinning=True)
