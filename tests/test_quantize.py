"""Low-precision bundles on CPU: Q/DQ placement, per-graph accuracy, end-to-end budgets, policy errors."""

import onnx
import pytest

from haplo.config import preset
from haplo.engines.bundle import Bundle
from haplo.engines.onnxruntime import OrtBackend
from haplo.export.bundle import BuildOptions, build_bundle
from haplo.export.quantize import QuantizationError, resolve_policy
from haplo.modeling import HaploOmniForConditionalGeneration
from haplo.tokenizer import build_tokenizer
from haplo.vae import build_random_vae


@pytest.fixture(scope="module")
def parts():
    config = preset("tiny")
    return (HaploOmniForConditionalGeneration.from_config(config, seed=0), build_random_vae(config),
            build_tokenizer(config))


def _build(parts, out, precision, **kw):
    model, vae, tokenizer = parts
    gen = model.config.video_generation
    return build_bundle(model, vae, tokenizer, BuildOptions(out=out, precision=precision,
                                                            video=(gen.num_frames, gen.height, gen.width), **kw),
                        log=lambda _: None)


@pytest.mark.parametrize("precision, quant_type", [("fp8", onnx.TensorProto.FLOAT8E4M3FN),
                                                   ("int8", onnx.TensorProto.INT8)])
def test_quantized_bundle(parts, tmp_path, precision, quant_type):
    manifest = _build(parts, tmp_path / precision, precision)
    bundle = Bundle.open(tmp_path / precision)
    for name in ("pre_decoder", "base_decoder", "post_decoder"):
        assert manifest["graphs"][name]["precision"] == precision
        graph = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) > manifest["graphs"][name]["quantization"]["matmuls"]  # weights + activations
        weights = {t.name: t for t in graph.graph.initializer}
        assert any(weights[n.input[0]].data_type == quant_type for n in dq if n.input[0] in weights)
        assert any(n.domain == "haplo" for n in graph.graph.node)  # norms/attention stay in the custom ops
        accuracy = manifest["quantization"]["accuracy"][name]
        assert accuracy["cosine"] >= 0.99 and accuracy["finite"]
    assert manifest["graphs"]["lm_head"]["precision"] == "fp32"
    parity = manifest["parity"]
    assert parity["token_agreement"] >= 0.9 and parity["ddim_cosine"] >= 0.99 and parity["video_psnr_db"] > 20
    assert "accuracy" in (tmp_path / precision / "report.md").read_text()
    tokens = OrtBackend(bundle).embed_text(__import__("torch").tensor([[1, 2, 3]]))
    assert tokens.shape == (1, 3, parts[0].config.pre.hidden_size)


def test_int8_activation_flavours(parts, tmp_path):
    manifest = _build(parts, tmp_path / "trt", "int8", target="tensorrt", build_engines=False,
                      graph_precision={"pre_decoder": "fp32"}, exclude_modules=(r"mlp\.down_proj",))
    graph = onnx.load(str(Bundle.open(tmp_path / "trt").graph_path("base_decoder")), load_external_data=False)
    zeros = {t.name: t for t in graph.graph.initializer if t.name.endswith("_act_zero")}
    assert zeros and all(t.data_type == onnx.TensorProto.INT8 for t in zeros.values())  # TensorRT: symmetric s8
    assert manifest["graphs"]["pre_decoder"]["precision"] == "fp32"
    assert any("down_proj" in m for m in manifest["graphs"]["base_decoder"]["quantization"]["kept_fp32"])


def test_policy_errors(parts, tmp_path):
    with pytest.raises(QuantizationError, match="unknown precision"):
        resolve_policy("int4")
    with pytest.raises(QuantizationError, match="unknown graph"):
        _build(parts, tmp_path / "x", "int8", graph_precision={"decoder": "fp32"})
    assert not (tmp_path / "x").exists()
