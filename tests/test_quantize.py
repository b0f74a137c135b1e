"""Low-precision bundles on CPU: Q/DQ placement, per-graph accuracy, end-to-end budgets, policy errors,
and INT8 that holds on every x86 CPU (VNNI or not)."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from haplo.bundle import Bundle, BundleError
from haplo.cpuinfo import SATURATION_FREE_WEIGHT_MAX, CpuInfo
from haplo.engines.bundle_engines import BundleEngines
from haplo.engines.onnxruntime import OrtBackend
from haplo.export.build import BuildOptions, build_bundle
from haplo.export.quantize import policy, rewrite
from haplo.export.quantize.policy import QuantizationError, resolve_policy
from haplo.export.validate import Tolerances
from haplo.model.config import preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.tokenizer import build_tokenizer
from haplo.model.vae import build_random_vae


@pytest.fixture(scope="module")
def parts():
    config = preset("tiny")
    return (
        HaploOmniForConditionalGeneration.from_config(config, seed=0),
        build_random_vae(config),
        build_tokenizer(config),
    )


def _build(parts, out, precision, **kw):
    model, vae, tokenizer = parts
    gen = model.config.video_generation
    return build_bundle(
        model,
        vae,
        tokenizer,
        BuildOptions(out=out, precision=precision, video=(gen.num_frames, gen.height, gen.width), **kw),
        BundleEngines(),
        log=lambda _: None,
    )


AVX2 = CpuInfo("AVX2-only x86", "x86_64", ("avx2", "fma"))
VNNI = CpuInfo("AVX-512 VNNI x86", "x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"))
ARM = CpuInfo("Neoverse", "aarch64", ())


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, quant_type", [("fp8", onnx.TensorProto.FLOAT8E4M3FN), ("int8", onnx.TensorProto.INT8)]
)
def test_quantized_bundle(parts, tmp_path, precision, quant_type):
    manifest = _build(parts, tmp_path / precision, precision)
    bundle = Bundle.open(tmp_path / precision)
    for name in ("pre_decoder", "base_decoder", "post_decoder"):
        assert manifest.graphs[name].precision == precision
        graph = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) > manifest.graphs[name].quantization["matmuls"]  # weights + activations
        weights = {t.name: t for t in graph.graph.initializer}
        assert any(weights[n.input[0]].data_type == quant_type for n in dq if n.input[0] in weights)
        assert any(n.domain == "haplo" for n in graph.graph.node)  # norms/attention stay in the custom ops
        accuracy = manifest.quantization["accuracy"][name]
        assert accuracy["cosine"] >= 0.99 and accuracy["finite"]
    assert manifest.graphs["lm_head"].precision == "fp32"
    parity = manifest.parity
    assert parity["token_agreement"] >= 0.95 and parity["ddim_cosine"] >= 0.99 and parity["video_psnr_db"] > 20
    assert "accuracy" in (tmp_path / precision / "report.md").read_text()
    tokens = OrtBackend(bundle).embed_text(__import__("torch").tensor([[1, 2, 3]]))
    assert tokens.shape == (1, 3, parts[0].config.pre.hidden_size)


@pytest.mark.slow
def test_int8_activation_flavours(parts, tmp_path):
    manifest = _build(
        parts,
        tmp_path / "trt",
        "int8",
        target="tensorrt",
        build_engines=False,
        graph_precision={"pre_decoder": "fp32"},
        exclude_modules=(r"mlp\.down_proj",),
    )
    graph = onnx.load(str(Bundle.open(tmp_path / "trt").graph_path("base_decoder")), load_external_data=False)
    zeros = {t.name: t for t in graph.graph.initializer if t.name.endswith("_act_zero")}
    assert zeros and all(t.data_type == onnx.TensorProto.INT8 for t in zeros.values())  # TensorRT: symmetric s8
    assert manifest.quantization["int8_weights"]["range"] == "full"  # GPU kernels accumulate in int32
    assert manifest.onnxruntime_optimization == "ORT_ENABLE_BASIC"  # Q/DQ as written on any CPU
    assert manifest.graphs["pre_decoder"].precision == "fp32"
    assert any("down_proj" in m for m in manifest.graphs["base_decoder"].quantization["kept_fp32"])


def test_policy_errors(parts, tmp_path):
    with pytest.raises(QuantizationError, match="unknown precision"):
        resolve_policy("int2")
    with pytest.raises(QuantizationError, match="unknown graph"):
        _build(parts, tmp_path / "x", "int8", graph_precision={"decoder": "fp32"})
    assert not (tmp_path / "x").exists()


def test_bf16_is_refused_before_any_work_where_onnx_runtime_cannot_check_it(parts, tmp_path, monkeypatch):
    from haplo.export.quantize import policy

    monkeypatch.setattr(policy, "onnxruntime_runs_bf16", lambda: False)
    with pytest.raises(QuantizationError, match=r"bf16 graphs \(lm_head\) cannot be checked here"):
        _build(parts, tmp_path / "x", "fp16", graph_precision={"lm_head": "bf16"})
    assert not (tmp_path / "x").exists()
    policy.check_checkable({"lm_head": "fp16", "pre_decoder": "int8"})  # the others are checked as before


def _int8_weights(path) -> list[np.ndarray]:
    graph = onnx.load(str(path))
    return [
        numpy_helper.to_array(t)
        for t in graph.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_q")
    ]


@pytest.mark.slow
def test_reduced_int8_fits_every_x86_cpu_and_full_is_refused_where_it_would_saturate(parts, tmp_path, monkeypatch):
    manifest = _build(parts, tmp_path / "reduced", "int8", int8_weights="reduced")
    weights = manifest.quantization["int8_weights"]
    assert weights["range"] == "reduced" and weights["max"] == SATURATION_FREE_WEIGHT_MAX == 64
    assert manifest.build_machine["cpu"]["isa"] and manifest.parity["token_agreement"] >= 0.95
    bundle = Bundle.open(tmp_path / "reduced")
    for name in ("pre_decoder", "base_decoder", "post_decoder"):
        ints = _int8_weights(bundle.graph_path(name))
        assert ints and max(int(np.abs(w.astype(np.int32)).max()) for w in ints) <= 64
        assert manifest.graphs[name].quantization["int8_weight_max"] == 64
    from haplo.engines import onnxruntime as ort_engine

    monkeypatch.setattr(ort_engine, "cpu_info", lambda: AVX2)
    OrtBackend(bundle)  # reduced weights: runs on an AVX2-only CPU
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "reduced", full)
    doc = json.loads((full / "manifest.json").read_text())
    doc["quantization"]["int8_weights"].update(range="full", max=127, build_cpu=VNNI.describe())
    (full / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="saturating int16; rebuild it here with `haplo-export build --precision"):
        OrtBackend(Bundle.open(full))
    import onnxruntime as ort

    OrtBackend(Bundle.open(full), optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)  # Q/DQ in float: exact
    monkeypatch.setattr(ort_engine, "cpu_info", lambda: VNNI)
    OrtBackend(Bundle.open(full))


@pytest.mark.parametrize(
    "cpu, target, choice, expected",
    [
        (AVX2, "onnxruntime", "auto", 64),
        (VNNI, "onnxruntime", "auto", 127),
        (ARM, "onnxruntime", "auto", 127),
        (AVX2, "tensorrt", "auto", 127),
        (VNNI, "onnxruntime", "reduced", 64),
        (AVX2, "onnxruntime", "full", 127),
    ],
)
def test_int8_weight_range_follows_the_cpu(cpu, target, choice, expected):
    plan = policy.int8_weight_plan(choice, target, cpu)
    assert plan["max"] == expected and plan["build_cpu"] == cpu.describe()
    assert (plan["exact_on"] == "any CPU") == (expected == 64 or target == "tensorrt")
    with pytest.raises(QuantizationError, match="--int8-weights"):
        policy.int8_weight_plan("7bit", target, cpu)


def _avx2_u8s8(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] as AVX2's vpmaddubsw + vpmaddwd compute it: adjacent products summed in
    saturating int16, then accumulated in int32."""
    a, w = a.astype(np.int32), w.astype(np.int32)
    pairs = a[:, 0::2, None] * w[None, 0::2] + a[:, 1::2, None] * w[None, 1::2]  # [M, K/2, N]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


@pytest.mark.parametrize("weight_max, saturates", [(127, True), (SATURATION_FREE_WEIGHT_MAX, False)])
def test_full_range_int8_saturates_without_vnni_and_reduced_does_not(weight_max, saturates):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 64)).astype(np.float32)
    tensors, _ = rewrite._weight_quant("w", weight, "int8", weight_max)
    w_q = numpy_helper.to_array(tensors[0])
    lo, hi = -1.0, 6.0  # a post-activation range: large positive inputs, zero point near 36
    scale, zero = (numpy_helper.to_array(t) for t in rewrite._activation_params("x", lo, hi, "int8", "onnxruntime"))
    x = rng.uniform(lo, hi, (32, 256)).astype(np.float32)
    x[:, :32] = hi  # a few saturated channels, as after a norm
    a_q = np.clip(np.round(x / scale) + zero, 0, 255).astype(np.uint8)
    exact = a_q.astype(np.int64) @ w_q.astype(np.int64)
    assert (not np.array_equal(_avx2_u8s8(a_q, w_q), exact)) == saturates
    worst = np.full((1, 2), 255, np.uint8) @ np.full((2, 1), -weight_max, np.int64)
    assert (abs(int(worst[0, 0])) > 32767) == saturates  # the worst pair of any input


@pytest.mark.parametrize("precision, bits", [("int4", 4), ("int8-weight", 8)])
def test_weight_only_bundles_use_matmulnbits_and_keep_excluded_modules_in_fp32(parts, tmp_path, precision, bits):
    import torch

    from haplo.runtime.decoding import understand

    # the tiny preset's random weights leave greedy logits almost tied: 4-bit weights flip most argmaxes,
    # so its token budget is off here (the trained haplo-mini keeps 97% at int4)
    loose = Tolerances(quant_min_token_agreement=0.0) if bits == 4 else Tolerances()
    manifest = _build(parts, tmp_path / precision, precision, exclude_modules=(r"mlp\.down_proj",), tolerances=loose)
    bundle = Bundle.open(tmp_path / precision)
    for name in ("pre_decoder", "base_decoder", "post_decoder"):
        graph = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        summary = manifest.graphs[name].quantization
        assert len(nbits) == summary["matmuls"] > 0 and summary["weight_bits"] == bits
        assert all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in nbits)
        assert any("down_proj" in m for m in summary["kept_fp32"])  # --exclude-modules holds
        assert not any(n.op_type == "DequantizeLinear" for n in graph.graph.node)  # weight-only: no Q/DQ
        assert manifest.quantization["accuracy"][name]["cosine"] >= 0.99
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    if bits == 8:
        assert manifest.parity["token_agreement"] >= 0.9
        # the in-place decode path against the bundle's own graphs (the tiny preset's random logits are
        # near ties, so the quantized LM head alone moves tokens against torch; the trained haplo-mini
        # keeps its task accuracy: see the README)
        plain = OrtBackend(bundle)
        plain.decode_batch = lambda: None
        reference = understand(plain, ids, max_new_tokens=8).new_tokens
        candidate = understand(OrtBackend(bundle), ids, max_new_tokens=8).new_tokens
        assert (reference == candidate).float().mean() >= 0.75
    # the in-place decode path folds each bias Add into its MatMulNBits and steps as the bundle's graphs do
    from haplo.engines.ort_decode import SlotBatch, decode_graph
    from haplo.engines.ort_fusions import rope_table
    from haplo.runtime import batching
    from haplo.runtime.decoding import prefill

    path = bundle.graph_path("base_decoder")
    rewritten = decode_graph(
        onnx.load(str(path), load_external_data=False),
        bundle.config.base,
        path.parent,
        rope_table(bundle.config, "base"),
    )
    nbits = {n.output[0]: n for n in rewritten.graph.node if n.op_type == "MatMulNBits"}
    biases = {i.name for i in rewritten.graph.initializer if len(i.dims) == 1}
    layers, cfg = len(bundle.graphs["base_decoder"].layers), bundle.config.base
    assert sum(len(n.input) == 6 for n in nbits.values()) >= layers * 3  # q|k|v, o, gate|up (down is fp32)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    assert sum(next(a.i for a in n.attribute if a.name == "N") == qkv for n in nbits.values()) == layers
    assert (manifest.graphs["lm_head"].precision == "int8-weight") == (bits == 8)
    assert not any(
        n.op_type == "Add" and set(n.input) & set(nbits) and set(n.input) & biases for n in rewritten.graph.node
    )
    backend = OrtBackend(bundle)
    state = prefill(backend, {"input_ids": ids})[1]
    slots, padded = SlotBatch(backend), batching.PaddedBatch(backend)
    slots.add(state)
    padded.add(state)
    token = torch.tensor([11])
    for _ in range(3):
        a, b = slots.step(token), padded.step(token)
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() >= 0.999
        token = b.argmax(-1)
