"""Low-precision activations for TensorRT: the lowering pass in fp16 on ONNX Runtime against PyTorch,
a bf16 TensorRT bundle's structure, and ONNX Runtime bundles that keep fp32 activations."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from haplo.bundle import STAGE_GRAPHS, Bundle, BundleError, Manifest
from haplo.engines.bundle_engines import BundleEngines
from haplo.export import validate
from haplo.export.build import BuildOptions, build_bundle
from haplo.export.graphs import export_graph, graph_specs
from haplo.export.quantize import activations, rewrite
from haplo.export.quantize.rewrite import _module_of
from haplo.model.config import preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny")
    return HaploOmniForConditionalGeneration.from_config(config, seed=0), build_tokenizer(config)


def _base_spec(model):
    return next(s for s in graph_specs(model, None, (1, 16, 4, 4)) if s.name == "base_decoder")


def test_the_fp16_lowered_decoder_runs_on_onnxruntime_and_matches_torch(tiny, tmp_path):
    spec = _base_spec(tiny[0])
    export_graph(spec, tmp_path / "base.onnx")
    model = onnx.load(str(tmp_path / "base.onnx"))
    rewrite.rewrite_graph(model, "fp16", None, "tensorrt")
    summary = activations.lower_activations(model, TensorProto.FLOAT16)
    assert summary["casts_removed"] > 0 and summary["kv_cache_dtype"] == "float16"
    result = validate.lowered_fp16_accuracy(spec, model)
    assert result["finite"] and result["samples"] == 2
    assert result["cosine"] > 0.9999 and result["max_abs_error"] < 5e-3, result
    structure = validate.lowered_structure(model, TensorProto.FLOAT16)
    assert not structure["problems"] and structure["kv_cache_tensors"] == 8 and structure["plugin_inputs"] > 0


def _build(tiny, out, precision, target):
    model, tokenizer = tiny
    options = BuildOptions(
        out=out, precision=precision, target=target, build_engines=False, check_steps=4, ddim_steps=1
    )
    return build_bundle(model, None, tokenizer, options, BundleEngines(), log=lambda _: None)


def _types(path) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    return {**types, **{t.name: t.data_type for t in graph.initializer}}


def test_an_fp8_tensorrt_bundle_has_bf16_kv_cache_plugin_io_and_matmuls(tiny, tmp_path):
    manifest = _build(tiny, tmp_path / "trt", "fp8", "tensorrt")  # fp8 Q/DQ over bf16 activations
    bundle = Bundle.open(tmp_path / "trt")
    for name in STAGE_GRAPHS.values():
        entry = bundle.graphs[name]
        assert entry.activations == "bfloat16" and manifest.graphs[name].activations == "bfloat16"
        kv = [t for t in entry.inputs + entry.outputs if activations.is_kv_cache(t.name)]
        assert kv and all(t.dtype == "bfloat16" for t in kv)
        model = onnx.load(str(bundle.graph_path(name)))
        onnx.checker.check_model(model, full_check=True)
        types = _types(bundle.graph_path(name))
        plugin = [i for n in model.graph.node if n.domain == "haplo" for i in n.input[:3]]
        assert plugin and all(types[i] == TensorProto.BFLOAT16 for i in plugin)
        plugin_out = [o for n in model.graph.node if n.domain == "haplo" for o in n.output]
        assert all(types[o] == TensorProto.BFLOAT16 for o in plugin_out)
        fp32_matmuls = [
            n for n in model.graph.node if n.op_type == "MatMul" and types[n.output[0]] == TensorProto.FLOAT
        ]
        assert all("indicator" in (_module_of(n) or "") for n in fp32_matmuls)  # only the switch logits
        record = manifest.quantization["activations"][name]
        assert record["dtype"] == "bfloat16" and record["fp16_check"]["cosine"] > 0.99  # fp8 error included
    assert bundle.graphs["lm_head"].activations == "float32"
    assert "## Activations for TensorRT" in (tmp_path / "trt" / "report.md").read_text()
    from haplo.engines.onnxruntime import OrtBackend
    from haplo.engines.tensorrt.backend import cache_element_size

    assert cache_element_size(bundle) == 2  # the scheduler's KV bytes count bf16 elements
    with pytest.raises(BundleError, match="built for TensorRT with bfloat16 activations"):
        OrtBackend(bundle)


def test_an_fp16_tensorrt_bundle_is_lowered_once_per_decoder(tiny, tmp_path, monkeypatch):
    calls = []
    lower = activations.lower_activations
    monkeypatch.setattr(activations, "lower_activations", lambda m, d: calls.append(d) or lower(m, d))
    manifest = _build(tiny, tmp_path / "trt16", "fp16", "tensorrt")
    assert calls == [TensorProto.FLOAT16] * len(STAGE_GRAPHS)  # the checked graph is the one written
    for name in STAGE_GRAPHS.values():
        assert manifest.graphs[name].activations == "float16"
        assert manifest.quantization["activations"][name]["fp16_check"]["cosine"] > 0.9999


def test_onnxruntime_bundles_keep_fp32_activations_and_old_manifests_open(tiny, tmp_path):
    manifest = _build(tiny, tmp_path / "ort", "fp16", "onnxruntime")
    assert "activations" not in manifest.quantization
    for name in STAGE_GRAPHS.values():
        entry = manifest.graphs[name]
        assert entry.activations == "float32" and "activations" not in (entry.quantization or {})
        assert all(t.dtype == "float32" for t in entry.inputs + entry.outputs if activations.is_kv_cache(t.name))
    data = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    for entry in data["graphs"].values():
        del entry["activations"]  # a bundle written before the field existed
    assert Manifest.from_dict(data, tmp_path).graphs["base_decoder"].activations == "float32"


def test_only_tensorrt_low_precision_lowers():
    assert activations.activation_dtype("fp8", "tensorrt") == TensorProto.BFLOAT16
    assert activations.activation_dtype("fp16", "tensorrt") == TensorProto.FLOAT16
    assert activations.activation_dtype("fp8", "onnxruntime") is None
    assert activations.activation_dtype("fp32", "tensorrt") is None
    assert activations.activation_dtype("int4", "tensorrt") is None
    assert np.dtype(onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)).name == "bfloat16"
