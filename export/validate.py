"""Parity of exported graphs against PyTorch, per graph and end to end (what goes in parity.json).

Per graph (on the export sample and on a second sample of other shapes): output names, dimension
names, shapes, max abs error, cosine similarity, NaN/Inf. End to end: teacher-forced greedy token
agreement over N decode steps (every step scores the candidate's argmax on the reference's
prefix, so one early flip does not hide the rest), and the latents after a few guided DDIM steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from haplo.bundle import STAGE_GRAPHS
from haplo.errors import HaploError
from haplo.export.graphs import GraphSpec
from haplo.export.quantize import activations
from haplo.runtime.backend import Backend
from haplo.runtime.ddim import denoise
from haplo.runtime.decoding import decode_step, prefill, understand

_FLOATS = activations.FLOATS


@dataclass
class Tolerances:
    atol: float = 1e-4  # per-graph max abs error
    # The VAE decoder's budget: one level of the 8-bit video it is written as (values in [-1, 1]), so an
    # export within it writes the same pixels up to rounding ties. At 480 x 720 x 49 the fp32 reductions
    # of its group norms over 2.7M values differ between ONNX Runtime and PyTorch by ~5e-3.
    vae_atol: float = 2 / 255
    min_cosine: float = 0.9999  # per-graph cosine similarity
    min_token_agreement: float = 1.0  # teacher-forced greedy agreement
    ddim_atol: float = 1e-3  # latents after the DDIM check
    # Budgets of quantized / low-precision bundles, against the fp32 PyTorch model.
    quant_min_cosine: float = 0.99  # per low-precision graph
    quant_min_token_agreement: float = 0.9
    # Latents after 3 guided DDIM steps drift more than one graph's output: the shipped haplo-mini's
    # int8 / fp8 bundles land at 0.983 / 0.988 with task accuracy equal to fp32 (100% on 96 clips
    # and 48 captions) and a decoded-video PSNR of 28 dB, so 0.98 is the budget.
    quant_min_latent_cosine: float = 0.98

    def to_dict(self) -> dict:
        return asdict(self)

    def atol_for(self, graph: str) -> float:
        return self.vae_atol if graph == "vae_decoder" else self.atol


class ParityError(HaploError, RuntimeError):
    """Exported graphs that do not reproduce PyTorch within the tolerances."""


def compare(actual: np.ndarray, expected: np.ndarray) -> dict:
    actual64, expected64 = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    finite = bool(np.isfinite(actual64).all())
    norm = np.linalg.norm(actual64) * np.linalg.norm(expected64)
    cosine = float(actual64 @ expected64 / norm) if norm > 0 else float(np.array_equal(actual64, expected64))
    return {
        "max_abs_error": float(np.abs(actual64 - expected64).max()) if actual64.size else 0.0,
        "cosine": cosine,
        "finite": finite,
        "shape": list(actual.shape),
    }


def cpu_session(onnx_path, optimization: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    """A one-shot CPU session for a check: no memory arena, so a large graph's buffers go back to the OS."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena, options.enable_mem_pattern, options.log_severity_level = False, False, 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def validate_graph(spec: GraphSpec, onnx_path, tolerances: Tolerances) -> dict:
    """Run one exported graph in ONNX Runtime against its torch module on both samples."""
    session = cpu_session(onnx_path)
    problems = []
    names = [o.name for o in session.get_outputs()]
    if names != spec.outputs:
        problems.append(f"output names {names} != {spec.outputs}")
    for value in list(session.get_inputs()) + list(session.get_outputs()):
        wanted = spec.dims.get(value.name)
        if wanted is not None and [d if isinstance(d, str) else d for d in value.shape] != wanted:
            problems.append(f"{value.name} dims {value.shape} != {wanted}")
    worst = {"max_abs_error": 0.0, "cosine": 1.0, "finite": True}
    outputs = {}
    for sample in (s for s in (spec.inputs, spec.check_inputs) if s):
        got = session.run(None, {k: v.numpy() for k, v in sample.items()})
        with torch.no_grad():
            want = spec.module(*sample.values())
        want = want if isinstance(want, tuple) else (want,)
        for name, a, b in zip(spec.outputs, got, want):
            if list(a.shape) != list(b.shape):
                problems.append(f"{name} shape {list(a.shape)} != torch {list(b.shape)}")
                continue
            stats = compare(a, b.float().numpy())
            outputs[name] = stats
            worst["max_abs_error"] = max(worst["max_abs_error"], stats["max_abs_error"])
            worst["cosine"] = min(worst["cosine"], stats["cosine"])
            worst["finite"] &= stats["finite"]
    if not worst["finite"]:
        problems.append("NaN or Inf in the outputs")
    atol = tolerances.atol_for(spec.name)
    if worst["max_abs_error"] > atol:
        problems.append(f"max abs error {worst['max_abs_error']:.3g} > {atol:g}")
    if worst["cosine"] < tolerances.min_cosine:
        problems.append(f"cosine {worst['cosine']:.6f} < {tolerances.min_cosine}")
    return {**worst, "outputs": outputs, "problems": problems, "ok": not problems}


@torch.no_grad()
def token_agreement(reference: Backend, candidate: Backend, inputs: dict, steps: int = 32) -> dict:
    """Greedy decode on `reference`; the candidate predicts each next token from the same prefix."""
    ref = understand(reference, **inputs, max_new_tokens=steps)
    tokens = ref.new_tokens
    logits, state = prefill(candidate, inputs)
    agree = []
    for step in range(tokens.shape[1]):
        agree.append(logits.argmax(-1) == tokens[:, step])
        if step + 1 < tokens.shape[1]:
            logits, state = decode_step(candidate, tokens[:, step], state)
    agree = torch.stack(agree, dim=1)
    mismatches = (~agree).nonzero()
    return {
        "steps": int(tokens.shape[1]),
        "agreement": float(agree.float().mean()),
        "first_mismatch_step": int(mismatches[0, 1]) if len(mismatches) else None,
        "reference_tokens": tokens.tolist(),
    }


def psnr(actual: np.ndarray, expected: np.ndarray, peak_to_peak: float = 2.0) -> float:
    """Video PSNR in dB for values in [-1, 1]."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak_to_peak**2 / mse)


@torch.no_grad()
def ddim_parity(
    reference: Backend,
    candidate: Backend,
    input_ids,
    attention_mask,
    latents,
    steps: int = 3,
    guidance: float = 6.5,
    decode: bool = False,
) -> dict:
    """Latents after `steps` guided DDIM steps on both; with `decode`, the video PSNR of the VAE decode."""
    a = denoise(reference, input_ids, attention_mask, latents, steps, guidance)
    b = denoise(candidate, input_ids, attention_mask, latents, steps, guidance)
    result = {"steps": steps, "guidance": guidance, **compare(b.numpy(), a.numpy())}
    if decode:
        result["video_psnr_db"] = psnr(candidate.vae_decode(b).numpy(), reference.vae_decode(a).numpy())
    return result


# -- low-precision graphs against fp32 PyTorch ----------------------------------------------------


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


def low_precision_accuracy(
    spec: GraphSpec, path: Path, eval_feeds: dict, precision: str, rewrite: dict | None, ort_level: str
) -> dict:
    """A low-precision graph against the fp32 PyTorch module, on real pipeline inputs for decoders."""
    session = cpu_session(path, ort_level)
    stage = {v: k for k, v in STAGE_GRAPHS.items()}.get(spec.name)
    if stage is not None and eval_feeds.get(stage):
        feeds, source = eval_feeds[stage], "pipeline inputs (held-out prompts, decode and DDIM steps)"
    else:
        feeds = [{k: v.numpy() for k, v in sample.items()} for sample in (spec.inputs, spec.check_inputs) if sample]
        source = "export samples"
    result = graph_accuracy(lambda feed: session.run(None, feed), spec.module, feeds)
    result = {**result, "precision": precision, "inputs": source, **(rewrite or {})}
    if result["cosine"] < 0.999:
        result["note"] = shortfall_note(precision, rewrite)
    return result


# -- lowered activations (TensorRT): structure, and the same pass in fp16 on ONNX Runtime -------------


def lowered_structure(model: onnx.ModelProto, dtype: int) -> dict:
    """A graph whose activations were lowered to `dtype`: valid ONNX (full check), KV cache I/O and
    plugin-node float inputs of that dtype, and the float32 matmuls left (the kept switch logits)."""
    onnx.checker.check_model(model, full_check=True)
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    kv = [v.name for v in [*graph.input, *graph.output] if activations.is_kv_cache(v.name)]
    plugin_inputs = [i for n in graph.node if n.domain == "haplo" for i in n.input if types.get(i) in _FLOATS]
    problems = [f"KV cache {n} is not {activations.LOW_DTYPES[dtype]}" for n in kv if types.get(n) != dtype]
    problems += [f"plugin input {i} is not {activations.LOW_DTYPES[dtype]}" for i in plugin_inputs if types[i] != dtype]
    return {
        "checker": "ok",
        "kv_cache_tensors": len(kv),
        "plugin_inputs": len(plugin_inputs),
        "fp32_matmuls": [n.name for n in graph.node if n.op_type == "MatMul" and types.get(n.output[0]) == _FLOATS[0]],
        "problems": problems,
    }


def lowered_fp16_accuracy(spec: GraphSpec, lowered: onnx.ModelProto) -> dict:
    """A graph the lowering pass took to fp16 (ONNX Runtime CPU has fp16 matmul / add / softmax, not
    bf16), run on ONNX Runtime against the fp32 torch module on the export samples."""
    options = ort.SessionOptions()
    options.graph_optimization_level, options.log_severity_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 3
    session = ort.InferenceSession(lowered.SerializeToString(), options, providers=["CPUExecutionProvider"])
    halves = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    feeds = [
        {k: v.numpy().astype(np.float16) if k in halves else v.numpy() for k, v in sample.items()}
        for sample in (spec.inputs, spec.check_inputs)
        if sample
    ]
    return {**graph_accuracy(lambda feed: session.run(None, feed), spec.module, feeds), "dtype": "float16"}
