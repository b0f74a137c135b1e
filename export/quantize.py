"""Precision in the graph: explicit Q/DQ (FP8 E4M3, INT8) and casts (FP16, BF16), per graph.

TensorRT 11 is strongly typed, so the precision of every matmul is what the ONNX graph says. We
calibrate on the PyTorch model running the real pipeline (processor-made prompts with an image,
greedy decoding, guided DDIM over several timesteps), recording the input range of every
`nn.Linear`, then rewrite each exported graph: for a weight MatMul of a quantized module,

    x -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(s_w, axis=1) <- W_q

with per-tensor activation scales and per-output-channel weight scales, the placement TensorRT
fuses into quantized GEMMs. Norms, softmax and the switch logits live inside the `haplo` nodes
(or are excluded by module name in decomposed graphs) and stay in fp32, as do the heads and the
VAE by default (`default_policy`).

INT8 comes in two flavours. `tensorrt`: symmetric signed activations (zero point 0), what
TensorRT requires. `onnxruntime`: asymmetric uint8 activations with int8 weights, the U8S8 pattern
ONNX Runtime's x86 kernels fuse into integer matmuls, which is what makes INT8 faster on CPU.

The weight range of the `onnxruntime` flavour follows the CPU (`int8_weight_plan`): x86 CPUs
without VNNI add u8 x s8 product pairs in saturating int16 (`haplo.cpuinfo`), so weights are kept
within +-64 there ("reduced"); CPUs with VNNI / AMX, and TensorRT, get the full +-127. The manifest
records the choice and the build CPU; `haplo.engines.onnxruntime` refuses a full-range bundle on a
CPU that would saturate it, with the command that rebuilds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from haplo.errors import HaploError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0
INT8_WEIGHT_RANGES = ("auto", "full", "reduced")
# Modules whose matmuls stay fp32 whatever the policy: the per-token switch logits.
ALWAYS_FP32 = ("indicator",)


class QuantizationError(HaploError, ValueError):
    pass


def default_policy(precision: str) -> dict[str, str]:
    """Graph -> precision. Decoders carry the weights; heads, embeddings and the VAE stay fp32 for
    Q/DQ (small, and the most sensitive); casts also cover the vision embedding and the LM head."""
    if precision not in PRECISIONS:
        raise QuantizationError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    decoders = {"pre_decoder": precision, "base_decoder": precision, "post_decoder": precision}
    if precision in ("fp16", "bf16"):
        decoders.update(embed_vision=precision, lm_head=precision)
    return decoders


def resolve_policy(precision: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    policy = default_policy(precision)
    for graph, value in (overrides or {}).items():
        if value not in PRECISIONS:
            raise QuantizationError(f"--graph-precision {graph}={value}: unknown precision")
        policy[graph] = value
    return policy


@dataclass
class QuantizeOptions:
    precision: str = "fp32"
    flavor: str = "onnxruntime"  # int8 activation scheme: "onnxruntime" (u8, asymmetric) | "tensorrt" (s8)
    policy: dict[str, str] = field(default_factory=dict)  # graph -> precision, after overrides
    exclude: tuple[str, ...] = ()  # module-name regexes kept in fp32

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "flavor": self.flavor,
            "policy": self.policy,
            "exclude": list(self.exclude),
        }


# -- calibration ----------------------------------------------------------------------------------


class RangeRecorder:
    """Forward pre-hooks on every nn.Linear: running min / max / absolute max of its input."""

    def __init__(self, model: nn.Module):
        self.ranges: dict[str, list[float]] = {}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def _hook(self, name: str):
        def record(module, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            old = self.ranges.get(name)
            self.ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

        return record

    def close(self) -> dict[str, list[float]]:
        for handle in self.handles:
            handle.remove()
        return self.ranges


def calibration_prompts() -> tuple[list[str], list[str]]:
    questions = [
        "What moves in the picture, and in which direction?",
        "Describe the colours and shapes.",
        "How many objects are there?",
    ]
    captions = [
        "a red square moves from left to right",
        "a blue circle bounces up and down on a white background",
        "a green triangle drifts slowly to the left",
    ]
    return questions, captions


def _shape_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.full((96, 128, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    y, x = rng.integers(0, 60), rng.integers(0, 90)
    pixels[y : y + 30, x : x + 36] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


@torch.no_grad()
def run_pipeline(
    backend, processor, latent_shape: tuple, seed: int = 0, decode_steps: int = 8, ddim_steps: int = 4
) -> None:
    """The real pipeline on `backend`: understanding prompts with an image (prefill + greedy decode)
    and guided DDIM over several timesteps. Calibration and accuracy both drive it."""
    from haplo.runtime.ddim import denoise
    from haplo.runtime.decoding import understand

    questions, captions = calibration_prompts()
    for i, question in enumerate(questions):
        conversation = [{"role": "user", "content": "<image>\n" + question}]
        inputs = processor(conversations=[conversation], images=[_shape_image(seed * 100 + i)])
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        understand(backend, **tensors, max_new_tokens=decode_steps)
    for i, caption in enumerate(captions):
        prompt = processor.process_prompt_for_generation([caption], "")
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed * 100 + i))
        denoise(backend, prompt["input_ids"], prompt["attention_mask"], noise, ddim_steps, 6.5)


def calibrate(model, processor, latent_shape: tuple, seed: int = 0) -> dict[str, list[float]]:
    """Input range [min, max] of every nn.Linear over the calibration pipeline run."""
    from haplo.runtime.torch_backend import TorchBackend

    recorder = RangeRecorder(model)
    try:
        run_pipeline(TorchBackend(model), processor, latent_shape, seed)
    finally:
        ranges = recorder.close()
    return ranges


class RecordingBackend:
    """Wraps a backend and keeps the feeds each decoder graph received (for accuracy checks)."""

    def __init__(self, inner, stage_layers: dict[str, list[int]]):
        self.inner, self.stage_layers = inner, stage_layers
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {stage: [] for stage in stage_layers}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_stage(self, stage, hidden, position_ids, key_start, past=None):
        out = self.inner.run_stage(stage, hidden, position_ids, key_start, past)
        if stage in self.feeds:
            feed = {
                "hidden_states": hidden.float().numpy(),
                "position_ids": position_ids.long().numpy(),
                "key_start": key_start.long().numpy(),
            }
            cfg = self.inner.config.stages[stage]
            for i, n in enumerate(self.stage_layers[stage]):
                if past is None:
                    empty = np.zeros((hidden.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
                    k = v = empty
                else:
                    k, v = (t.float().numpy() for t in past[i])
                feed[f"past_key_values.{n}.key"], feed[f"past_key_values.{n}.value"] = k, v
            self.feeds[stage].append(feed)
        return out

    def sample(self, stage: str, count: int) -> list[dict[str, np.ndarray]]:
        """`count` feeds spread over the run: prefills, decode steps and DDIM steps alike."""
        feeds = self.feeds[stage]
        picks = np.linspace(0, len(feeds) - 1, num=min(count, len(feeds))).round().astype(int)
        return [feeds[i] for i in sorted(set(picks.tolist()))]


def evaluation_feeds(
    model, processor, latent_shape: tuple, stage_layers: dict[str, list[int]], count: int = 8
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs each decoder graph sees on held-out prompts (another seed than calibration)."""
    from haplo.runtime.torch_backend import TorchBackend

    recorder = RecordingBackend(TorchBackend(model), stage_layers)
    run_pipeline(recorder, processor, latent_shape, seed=1, decode_steps=4, ddim_steps=2)
    return {stage: recorder.sample(stage, count) for stage in stage_layers}


# -- graph rewriting --------------------------------------------------------------------------------


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


def int8_weight_plan(choice: str, target: str, cpu=None) -> dict:
    """The INT8 weight range: "full" (+-127) or "reduced" (+-64, exact on every x86 CPU).

    "auto" takes full where it is exact: for TensorRT (GPU integer kernels accumulate in int32; ONNX
    Runtime runs that flavour's Q/DQ in float) and on CPUs with an int32 u8 x s8 dot product."""
    from haplo.cpuinfo import SATURATION_FREE_WEIGHT_MAX, cpu_info

    if choice not in INT8_WEIGHT_RANGES:
        raise QuantizationError(f"--int8-weights {choice!r}: choose one of {', '.join(INT8_WEIGHT_RANGES)}")
    cpu = cpu or cpu_info()
    if choice == "auto":
        choice = "full" if target == "tensorrt" or cpu.int8_dot_int32 else "reduced"
    full = choice == "full"
    needs = (
        "any CPU"
        if not full or target == "tensorrt"
        else "a CPU with an int32 u8 x s8 dot product (x86 with AVX512-VNNI, AVX-VNNI or AMX; non-x86)"
    )
    return {
        "range": choice,
        "max": int(INT8_MAX) if full else SATURATION_FREE_WEIGHT_MAX,
        "build_cpu": cpu.describe(),
        "exact_on": needs,
    }


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
    inits = {t.name: t for t in model.graph.initializer}
    patterns = [re.compile(p) for p in exclude]
    new_nodes, new_inits, done, kept, weight_errors = [], [], [], [], []
    activations: dict[str, str] = {}  # fp32 tensor -> its Q/DQ (or Cast) output, shared by consumers
    dead_weights = set()
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        module = _module_of(node) or ""
        if any(k in module for k in ALWAYS_FP32) or any(p.search(module) for p in patterns):
            kept.append(module)
            new_nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        values = numpy_helper.to_array(weight)
        if precision in QUANTIZED:
            rng = _lookup(ranges or {}, module)
            if rng is None:
                kept.append(module)
                new_nodes.append(node)
                continue
            tensors, error = _weight_quant(w_name, values, precision, int8_max)
            weight_errors.append(error)
            new_inits += tensors
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [t.name for t in tensors],
                    [w_name + "_dq"],
                    name=w_name + "_DequantizeLinear",
                    axis=1,
                )
            )
            if x not in activations:
                params = _activation_params(f"{x}_act", *rng, precision, flavor)
                new_inits += params
                names = [params[0].name, params[1].name]
                new_nodes.append(
                    helper.make_node("QuantizeLinear", [x, *names], [x + "_q"], name=x + "_QuantizeLinear")
                )
                new_nodes.append(
                    helper.make_node("DequantizeLinear", [x + "_q", *names], [x + "_dq"], name=x + "_DequantizeLinear")
                )
                activations[x] = x + "_dq"
            node.input[0], node.input[1] = activations[x], w_name + "_dq"
            new_nodes.append(node)
        else:  # fp16 / bf16: the matmul runs in the low precision, the rest of the graph in fp32
            low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
            new_inits.append(_cast_tensor(w_name + "_low", values, precision))
            if x not in activations:
                new_nodes.append(helper.make_node("Cast", [x], [x + "_low"], name=x + "_Cast", to=low))
                activations[x] = x + "_low"
            out = node.output[0]
            node.input[0], node.input[1], node.output[0] = activations[x], w_name + "_low", out + "_low"
            new_nodes.append(node)
            new_nodes.append(helper.make_node("Cast", [out + "_low"], [out], name=out + "_Cast", to=TensorProto.FLOAT))
        dead_weights.add(w_name)
        done.append(module)
    still_used = {i for n in new_nodes for i in n.input}
    kept_inits = [t for t in model.graph.initializer if t.name not in dead_weights or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits + new_inits)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return {
        "matmuls": len(done),
        "kept_fp32": sorted(set(kept)),
        "weight_relative_error_max": max(weight_errors) if weight_errors else None,
        "weight_relative_error_mean": float(np.mean(weight_errors)) if weight_errors else None,
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
    data = path.with_name(path.name + ".data")
    staged = path.with_name(f".{path.name}.tmp")
    data.unlink(missing_ok=True)  # inside the build's temporary directory: a failure discards it all
    onnx.save_model(
        model,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    staged.replace(path)
    return summary


def shortfall_note(precision: str, rewrite: dict | None) -> str:
    """Why a low-precision graph lands below cosine 0.999, and what to do about it."""
    count = (rewrite or {}).get("matmuls", "its")
    if precision == "fp8":
        cause = (
            "E4M3 keeps 3 mantissa bits, so both operands of every matmul carry up to 6% rounding error per "
            f"element; over the graph's {count} quantized matmuls in sequence the errors add up"
        )
    elif precision == "int8":
        cause = (
            f"per-tensor 8-bit activation scales lose resolution where a few channels are large; over {count} "
            "matmuls in sequence the errors add up"
        )
    else:
        cause = f"{precision} rounding over {count} matmuls"
    return (
        f"{cause}. Keep this graph at higher precision with --graph-precision NAME=fp16 (or fp32), or keep "
        "its most sensitive modules in fp32 with --exclude-modules REGEX."
    )


def graph_accuracy(session_run: Callable[[dict], list[np.ndarray]], module: nn.Module, feeds: list[dict]) -> dict:
    """Worst max abs error and cosine over a graph's outputs and feeds, against the fp32 torch module."""
    from haplo.export.validate import compare

    worst = {"max_abs_error": 0.0, "cosine": 1.0, "finite": True, "samples": len(feeds)}
    for feed in feeds:
        got = session_run(feed)
        with torch.no_grad():
            want = module(*[torch.from_numpy(v) for v in feed.values()])
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            if a.size == 0:
                continue
            stats = compare(a, b.float().numpy())
            worst["max_abs_error"] = max(worst["max_abs_error"], stats["max_abs_error"])
            worst["cosine"] = min(worst["cosine"], stats["cosine"])
            worst["finite"] &= stats["finite"]
    return worst
