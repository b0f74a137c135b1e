"""The memory-bandwidth bound of a decode step.

At batch 1 a decode step multiplies one token's activations by every decoder and LM-head weight
once, so it can be no faster than (bytes of those weights) / (memory bandwidth). We measure this
machine's copy bandwidth and compare the bound with the achieved step time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

DECODE_GRAPHS = ("pre_decoder", "base_decoder", "post_decoder", "lm_head")


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> dict:
    """Best-of-N copy bandwidth (bytes read + written per second), single thread and torch's threads."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * 4

    def best(copy):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            copy()
            times.append(time.perf_counter() - started)
        return moved / min(times) / 1e9

    threaded = best(lambda: dst.copy_(src))
    src_np, dst_np = src.numpy(), dst.numpy()
    single = best(lambda: np.copyto(dst_np, src_np))
    return {"copy_gbs": max(threaded, single), "torch_copy_gbs": threaded, "numpy_copy_gbs": single, "buffer_mib": mib}


def torch_decode_weight_bytes(model) -> int:
    """Decoder layers, connectors, final norms and the LM head: what one decode step reads."""
    keep = (
        "model.layers.",
        "model.pre_connector.",
        "model.post_connector.",
        "model.pre_norm.",
        "model.norm.",
        "model.post_norm.",
        "model.post_linear.",
        "model.post_scale",
        "lm_head.",
    )
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.startswith(keep))


def onnx_initializer_bytes(path: Path) -> int:
    """Bytes of a graph's weights (external data included) without loading them."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in external:
            total += int(external["length"])
        elif tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            total += int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    return total


def bundle_decode_weight_bytes(bundle) -> int:
    return sum(onnx_initializer_bytes(bundle.graph_path(name)) for name in DECODE_GRAPHS if name in bundle.graphs)


def roofline(weight_bytes: int, bandwidth_gbs: float, achieved_step_ms: float) -> dict:
    bound_ms = weight_bytes / (bandwidth_gbs * 1e9) * 1e3
    return {
        "weight_bytes": weight_bytes,
        "bandwidth_gbs": bandwidth_gbs,
        "bound_step_ms": bound_ms,
        "achieved_step_ms": achieved_step_ms,
        "percent_of_bound": 100 * bound_ms / achieved_step_ms,
    }
