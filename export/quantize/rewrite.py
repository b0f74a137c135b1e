"""The graph rewrite: explicit Q/DQ (FP8 E4M3, INT8) and casts (FP16, BF16) in an exported graph.

For a weight MatMul of a quantized module:

    x -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(s_w, axis=1) <- W_q

with per-tensor activation scales and per-output-channel weight scales, the placement TensorRT fuses
into quantized GEMMs. INT8 comes in two flavours: `tensorrt` (symmetric signed activations, zero
point 0, what TensorRT requires) and `onnxruntime` (asymmetric uint8 activations with int8 weights,
the U8S8 pattern ONNX Runtime's x86 kernels fuse into integer matmuls).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from haplo.export.graphs import save_graph
from haplo.export.quantize.policy import ALWAYS_FP32, FP8_MAX, INT8_MAX, QUANTIZED, WEIGHT_BLOCK, WEIGHT_ONLY


def _module_of(node: onnx.NodeProto) -> str | None:
    """The nn.Module a node came from, from the exporter's name-scope metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in json.loads(prop.value.replace("'", '"')) if s]
            modules = [s for s in scopes if "." in s or s in ("lm_head",)]
            return modules[-1] if modules else (scopes[-2] if len(scopes) > 1 else None)
    return None


def _lookup(ranges: dict[str, list[float]], module: str) -> list[float] | None:
    if module in ranges:
        return ranges[module]
    matches = [name for name in ranges if name.endswith("." + module) or module.endswith("." + name)]
    return ranges[matches[0]] if len(matches) == 1 else None


def _fp8_tensor(name: str, values: np.ndarray) -> TensorProto:
    raw = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.float8_e4m3fn)
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT8E4M3FN, dims=list(values.shape))
    tensor.raw_data = raw.view(torch.uint8).numpy().tobytes()
    return tensor


def _cast_tensor(name: str, values: np.ndarray, precision: str) -> TensorProto:
    if precision == "fp16":
        return numpy_helper.from_array(values.astype(np.float16), name)
    raw = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    tensor.raw_data = raw.view(torch.int16).numpy().tobytes()
    return tensor


def _weight_quant(
    name: str, weight: np.ndarray, precision: str, int8_max: float = INT8_MAX
) -> tuple[list[TensorProto], float]:
    """Per-output-channel symmetric weights of a [K, N] MatMul operand: (tensors, relative error)."""
    amax = np.abs(weight).max(axis=0)
    amax = np.where(amax > 0, amax, 1.0).astype(np.float32)
    if precision == "int8":
        scale = (amax / int8_max).astype(np.float32)
        q = np.clip(np.round(weight / scale), -int8_max, int8_max).astype(np.int8)
        restored = q.astype(np.float32) * scale
        tensors = [
            numpy_helper.from_array(q, name + "_q"),
            numpy_helper.from_array(scale, name + "_scale"),
            numpy_helper.from_array(np.zeros_like(q, shape=scale.shape), name + "_zero"),
        ]
    else:
        scale = (amax / FP8_MAX).astype(np.float32)
        fp8 = torch.from_numpy(weight / scale).to(torch.float8_e4m3fn)
        restored = fp8.float().numpy() * scale
        tensors = [
            _fp8_tensor(name + "_q", weight / scale),
            numpy_helper.from_array(scale, name + "_scale"),
            _fp8_tensor(name + "_zero", np.zeros(scale.shape, np.float32)),
        ]
    error = float(np.linalg.norm(restored - weight) / max(np.linalg.norm(weight), 1e-30))
    return tensors, error


def _activation_params(name: str, lo: float, hi: float, precision: str, flavor: str) -> list[TensorProto]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if precision == "fp8":
        scale = max(abs(lo), abs(hi)) / FP8_MAX or 1.0
        return [
            numpy_helper.from_array(np.array(scale, np.float32), name + "_scale"),
            _fp8_tensor(name + "_zero", np.zeros((), np.float32)),
        ]
    if flavor == "onnxruntime":  # uint8 asymmetric: the U8S8 integer kernels
        scale = (hi - lo) / 255.0 or 1.0
        zero = int(np.clip(round(-lo / scale), 0, 255))
        return [
            numpy_helper.from_array(np.array(scale, np.float32), name + "_scale"),
            numpy_helper.from_array(np.array(zero, np.uint8), name + "_zero"),
        ]
    scale = max(abs(lo), abs(hi)) / INT8_MAX or 1.0  # TensorRT: symmetric, zero point 0
    return [
        numpy_helper.from_array(np.array(scale, np.float32), name + "_scale"),
        numpy_helper.from_array(np.array(0, np.int8), name + "_zero"),
    ]


def rewrite_graph(
    model: onnx.ModelProto,
    precision: str,
    ranges: dict[str, list[float]] | None,
    flavor: str = "onnxruntime",
    exclude: tuple[str, ...] = (),
    int8_max: float = INT8_MAX,
) -> dict:
    """Rewrite every weight MatMul of `model` in place to `precision`. Returns what was done."""
    if precision == "fp32":
        return {"matmuls": 0}
    if precision in WEIGHT_ONLY:
        return _weight_only(model, precision, exclude)
    rewrite = _Rewrite(precision, flavor, int8_max)
    inits = {t.name: t for t in model.graph.initializer}
    patterns = [re.compile(p) for p in exclude]
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            rewrite.nodes.append(node)
            continue
        module = _module_of(node) or ""
        rng = _lookup(ranges or {}, module) if precision in QUANTIZED else None
        kept = any(k in module for k in ALWAYS_FP32) or any(p.search(module) for p in patterns)
        if kept or (precision in QUANTIZED and rng is None):
            rewrite.kept.append(module)
            rewrite.nodes.append(node)
            continue
        rewrite.matmul(node, numpy_helper.to_array(weight), rng)
        rewrite.done.append(module)
    return rewrite.apply(model)


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _weight_only(model: onnx.ModelProto, precision: str, exclude: tuple[str, ...]) -> dict:
    """Weight MatMuls to ONNX Runtime's MatMulNBits (its own quantizer), but those kept in fp32."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in [h for h in root.handlers if h not in handlers]:  # its import configures logging at INFO
        root.removeHandler(handler)
    root.setLevel(level)

    patterns = [re.compile(p) for p in exclude]
    kept = [
        node
        for node in model.graph.node
        if node.op_type == "MatMul"
        and (
            any(k in (_module_of(node) or "") for k in ALWAYS_FP32)
            or any(p.search(_module_of(node) or "") for p in patterns)
        )
    ]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=WEIGHT_ONLY[precision],
        block_size=WEIGHT_BLOCK,
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_exclude=[n.name for n in kept],
    )
    kept_modules = sorted({_module_of(n) or n.name for n in kept})  # before the graph is replaced
    with _quiet("onnxruntime.quantization", "onnx_ir"):  # both log every node at INFO
        quantizer.process()
    model.CopyFrom(quantizer.model.model)
    done = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    return {
        "matmuls": done,
        "kept_fp32": kept_modules,
        "weight_bits": WEIGHT_ONLY[precision],
        "block_size": WEIGHT_BLOCK,
    }


class _Rewrite:
    """The nodes and initializers of a graph being rewritten, and what was done to it."""

    def __init__(self, precision: str, flavor: str, int8_max: float):
        self.precision, self.flavor, self.int8_max = precision, flavor, int8_max
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.done: list[str] = []
        self.kept: list[str] = []
        self.weight_errors: list[float] = []
        self.dead_weights: set[str] = set()
        self.activations: dict[str, str] = {}  # fp32 tensor -> its Q/DQ (or Cast) output, shared by consumers

    def matmul(self, node: onnx.NodeProto, weight: np.ndarray, rng: list[float] | None) -> None:
        """Rewrite one weight MatMul (`rng`: its input's calibrated range, for Q/DQ)."""
        self.dead_weights.add(node.input[1])
        if rng is not None:
            self._qdq(node, weight, rng)
        else:
            self._cast(node, weight)

    def _qdq(self, node: onnx.NodeProto, weight: np.ndarray, rng: list[float]) -> None:
        """x -> Q -> DQ -> MatMul <- DQ(per-output-channel weights) <- W_q."""
        x, w_name = node.input[0], node.input[1]
        tensors, error = _weight_quant(w_name, weight, self.precision, self.int8_max)
        self.weight_errors.append(error)
        self.inits += tensors
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [t.name for t in tensors],
                [w_name + "_dq"],
                name=w_name + "_DequantizeLinear",
                axis=1,
            )
        )
        if x not in self.activations:
            params = _activation_params(f"{x}_act", *rng, self.precision, self.flavor)
            self.inits += params
            names = [params[0].name, params[1].name]
            self.nodes.append(helper.make_node("QuantizeLinear", [x, *names], [x + "_q"], name=x + "_QuantizeLinear"))
            self.nodes.append(
                helper.make_node("DequantizeLinear", [x + "_q", *names], [x + "_dq"], name=x + "_DequantizeLinear")
            )
            self.activations[x] = x + "_dq"
        node.input[0], node.input[1] = self.activations[x], w_name + "_dq"
        self.nodes.append(node)

    def _cast(self, node: onnx.NodeProto, weight: np.ndarray) -> None:
        """fp16 / bf16: the matmul runs in the low precision, the rest of the graph in fp32."""
        x, w_name = node.input[0], node.input[1]
        low = TensorProto.FLOAT16 if self.precision == "fp16" else TensorProto.BFLOAT16
        self.inits.append(_cast_tensor(w_name + "_low", weight, self.precision))
        if x not in self.activations:
            self.nodes.append(helper.make_node("Cast", [x], [x + "_low"], name=x + "_Cast", to=low))
            self.activations[x] = x + "_low"
        out = node.output[0]
        node.input[0], node.input[1], node.output[0] = self.activations[x], w_name + "_low", out + "_low"
        self.nodes.append(node)
        self.nodes.append(helper.make_node("Cast", [out + "_low"], [out], name=out + "_Cast", to=TensorProto.FLOAT))

    def apply(self, model: onnx.ModelProto) -> dict:
        """Replace the graph's nodes and initializers (weights nobody reads any more dropped)."""
        still_used = {i for n in self.nodes for i in n.input}
        kept = [t for t in model.graph.initializer if t.name not in self.dead_weights or t.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + self.inits)
        del model.graph.node[:]
        model.graph.node.extend(self.nodes)
        errors = self.weight_errors
        return {
            "matmuls": len(self.done),
            "kept_fp32": sorted(set(self.kept)),
            "weight_relative_error_max": max(errors) if errors else None,
            "weight_relative_error_mean": float(np.mean(errors)) if errors else None,
        }


def quantize_graph_file(
    path: Path,
    precision: str,
    ranges: dict | None,
    flavor: str,
    exclude: tuple[str, ...] = (),
    int8_weights: dict | None = None,
) -> dict:
    """Rewrite an exported graph (with its external data) in place, atomically."""
    model = onnx.load(str(path))  # weights included, so the old data file can go
    int8_max = float((int8_weights or {}).get("max", INT8_MAX))
    summary = rewrite_graph(model, precision, ranges, flavor, exclude, int8_max)
    if precision == "int8":
        summary["int8_weight_max"] = int(int8_max)
    save_graph(model, path)  # inside the build's staging directory: a failure discards it all
    return summary
