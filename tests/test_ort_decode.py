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
