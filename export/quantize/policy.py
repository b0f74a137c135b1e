"""Which graph gets which precision, and the INT8 weight range for the CPUs a bundle is for.

The default policy quantizes the decoders (they carry the weights) and keeps the heads, the embeddings
and the VAE in fp32 (small, and the most sensitive). The INT8 weight range follows the CPU: x86 CPUs
without VNNI add u8 x s8 product pairs in saturating int16 (`haplo.cpuinfo`), so weights stay within
+-64 there ("reduced"); CPUs with VNNI / AMX, and TensorRT, get the full +-127.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from haplo.cpuinfo import SATURATION_FREE_WEIGHT_MAX, cpu_info
from haplo.errors import HaploError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int8-weight", "int4")
QUANTIZED = ("int8", "fp8")  # Q/DQ: weights and activations (calibrated ranges)
# Weight-only, ONNX Runtime's MatMulNBits: weight bits; blocks of WEIGHT_BLOCK along the input axis,
# symmetric, activations quantized per block at run time (accuracy level 4, int8 dot products).
WEIGHT_ONLY = {"int8-weight": 8, "int4": 4}
WEIGHT_BLOCK = 32
FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0
INT8_WEIGHT_RANGES = ("auto", "full", "reduced")
# Modules whose matmuls stay fp32 whatever the policy: the per-token switch logits.
ALWAYS_FP32 = ("indicator",)


class QuantizationError(HaploError, ValueError):
    pass


def default_policy(precision: str) -> dict[str, str]:
    """Graph -> precision. Decoders carry the weights; heads, embeddings and the VAE stay fp32 for
    Q/DQ (small, and the most sensitive); casts also cover the vision embedding and the LM head, and
    int8 weight-only the LM head (int4 keeps it in fp32)."""
    if precision not in PRECISIONS:
        raise QuantizationError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    decoders = {"pre_decoder": precision, "base_decoder": precision, "post_decoder": precision}
    if precision in ("fp16", "bf16"):
        decoders.update(embed_vision=precision, lm_head=precision)
    if precision == "int8-weight":  # a decode step reads the LM head's weights once more: int8 too
        decoders.update(lm_head=precision)
    return decoders


@functools.cache
def onnxruntime_runs_bf16() -> bool:
    """Whether this ONNX Runtime's CPU kernels run a bfloat16 MatMul (the build checks every graph
    on them; x86 builds have none)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe", values[:2], values[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # NOT_IMPLEMENTED: no kernel for the type
        return False
    return True


def check_checkable(graph_policy: dict[str, str]) -> None:
    """Refuse, before any work, a precision whose graphs this machine cannot run to check them."""
    bf16 = sorted(graph for graph, precision in graph_policy.items() if precision == "bf16")
    if bf16 and not onnxruntime_runs_bf16():
        raise QuantizationError(
            f"bf16 graphs ({', '.join(bf16)}) cannot be checked here: this ONNX Runtime has no bfloat16 "
            "MatMul on CPU; use --precision fp16 (2-byte weights too; with --target tensorrt its "
            "activations and KV cache are fp16), or fp8 / int8 (bf16 activations for TensorRT)"
        )


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


def int8_weight_plan(choice: str, target: str, cpu=None) -> dict:
    """The INT8 weight range: "full" (+-127) or "reduced" (+-64, exact on every x86 CPU).

    "auto" takes full where it is exact: for TensorRT (GPU integer kernels accumulate in int32; ONNX
    Runtime runs that flavour's Q/DQ in float) and on CPUs with an int32 u8 x s8 dot product."""

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
