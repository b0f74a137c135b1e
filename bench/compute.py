"""The compute bound of a guided DDIM step.

A DDIM step runs every decoder layer over the latent tokens of both guidance rows (negative and
positive) with the text prefix reused: GEMM-bound work, unlike the bandwidth-bound decode step. Its
FLOPs are counted once on the PyTorch reference (every backend runs the same arithmetic); this
machine's GEMM peak is measured on a matmul of the step's own shape (guided latent tokens x hidden x
MLP width) with the benchmark's threads; each CPU backend's step is then reported as achieved FLOP/s
and its share of the peak of the arithmetic it runs (fp32, or int8 for Q/DQ and weight-only int8,
whose MatMulNBits computes in int8 at accuracy level 4).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Which measured peak a precision's arithmetic is held against; absent: no CPU peak applies.
PEAK_OF_PRECISION = {"fp32": "fp32", "int8": "int8", "int8-weight": "int8", "int4": "int8"}


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels; the CPU one computes the same two matmuls.
    return sdpa_flop_count(query, key, value)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention `fn` runs (2 per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def ddim_step_flops(model, vae, prompt: dict, latent_shape: tuple) -> dict:
    """FLOPs of one guided DDIM step (batch [negative, positive]) with and without prefix reuse."""
    from haplo.runtime.ddim import encode_prompt, predict_v
    from haplo.runtime.torch_backend import TorchBackend

    backend = TorchBackend(model, vae)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    latents = torch.zeros((2, *latent_shape))
    t = torch.full((2,), 500, dtype=torch.long)
    state = encode_prompt(backend, ids, mask)
    return {
        "step": counted_flops(lambda: predict_v(backend, latents, t, ids, mask, state)),
        "step_without_reuse": counted_flops(lambda: predict_v(backend, latents, t, ids, mask, None)),
    }


def _best_gflops(fn: Callable[[], object], flops: int, warm: int = 3, repeats: int = 10) -> float:
    for _ in range(warm):
        fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def _matmul_session(a_type: int, weight: np.ndarray, out_type: int, op: str, threads: int):
    """An ONNX Runtime session of one matmul node over a weight initializer."""
    import onnxruntime as ort

    m, k, n = "M", *weight.shape
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "w"], ["y"])],
        "gemm_peak",
        [helper.make_tensor_value_info("a", a_type, [m, k])],
        [helper.make_tensor_value_info("y", out_type, [m, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_peaks(m: int, k: int, n: int, threads: int) -> dict:
    """Best-of-N GFLOP/s of an [m, k] x [k, n] matmul: fp32 in torch and ONNX Runtime (MLAS), and
    ONNX Runtime's u8 x s8 MatMulInteger (the int8 GEMM its quantized graphs run)."""
    rng = np.random.default_rng(0)
    flops = 2 * m * k * n
    a, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    ta, tw, out = torch.from_numpy(a), torch.from_numpy(w), torch.empty(m, n)
    fp32_session = _matmul_session(TensorProto.FLOAT, w, TensorProto.FLOAT, "MatMul", threads)
    a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    int8_session = _matmul_session(TensorProto.UINT8, w8, TensorProto.INT32, "MatMulInteger", threads)
    peaks = {
        "fp32_torch": _best_gflops(lambda: torch.mm(ta, tw, out=out), flops),
        "fp32_onnxruntime": _best_gflops(lambda: fp32_session.run(None, {"a": a}), flops),
        "int8_onnxruntime": _best_gflops(lambda: int8_session.run(None, {"a": a8}), flops),
    }
    return {
        "shape": [m, k, n],
        "threads": threads,
        **peaks,
        "fp32": max(peaks["fp32_torch"], peaks["fp32_onnxruntime"]),
        "int8": peaks["int8_onnxruntime"],
    }


def step_compute(step_flops: int, step_ms: float, peaks: dict, precision: str) -> dict:
    """Achieved GFLOP/s of a DDIM step and its share of the peak of the arithmetic it runs."""
    achieved = step_flops / (step_ms / 1e3) / 1e9
    kind = PEAK_OF_PRECISION.get(precision)
    peak = peaks.get(kind) if kind else None
    return {
        "step_gflop": step_flops / 1e9,
        "achieved_gflops": achieved,
        "peak": kind,
        "peak_gflops": peak,
        "percent_of_peak": 100 * achieved / peak if peak else None,
    }
