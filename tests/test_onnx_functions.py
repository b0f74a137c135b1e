"""The `haplo` ONNX functions on ONNX Runtime against the PyTorch reference, shape by shape."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from haplo.export.custom_ops import DOMAIN, DOMAIN_VERSION, attach_functions
from haplo.model import ops


def _attention_session(scale: float) -> ort.InferenceSession:
    names = ("query", "key", "value")
    rank4 = ["b", "h", "l", "d"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, rank4) for n in names]
    inputs.append(helper.make_tensor_value_info("key_start", TensorProto.INT64, ["b", "k"]))
    node = helper.make_node("HybridAttention", [*names, "key_start"], ["out"], domain=DOMAIN, scale=scale)
    graph = helper.make_graph(
        [node], "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, rank4)]
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = attach_functions(helper.make_model(graph, opset_imports=opsets, ir_version=10))
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "q_heads, kv_heads, q_len, k_len",
    [(6, 2, 1, 9), (6, 2, 5, 12), (4, 4, 3, 3), (12, 2, 1, 40), (8, 1, 4, 7)],
)
def test_hybrid_attention_function_matches_the_reference(q_heads, kv_heads, q_len, k_len):
    gen = torch.Generator().manual_seed(q_heads * 100 + k_len)
    query = torch.randn(2, q_heads, q_len, 16, generator=gen)
    key, value = (torch.randn(2, kv_heads, k_len, 16, generator=gen) for _ in range(2))
    key_start = torch.arange(k_len).repeat(2, 1)
    key_start[0, : k_len // 3] = ops.MASKED_START  # left padding of row 0
    key_start[1, -q_len:] = k_len - q_len  # a block: the new rows see one another
    if q_len > 1:
        key_start[0, -q_len:] = ops.MASKED_START  # ... and row 0's new keys are padding: rows that see nothing
    expected = ops.reference_hybrid_attention(query, key, value, key_start, 0.25)
    feeds = {"query": query.numpy(), "key": key.numpy(), "value": value.numpy(), "key_start": key_start.numpy()}
    (got,) = _attention_session(0.25).run(None, feeds)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)
