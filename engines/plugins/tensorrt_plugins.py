"""TensorRT plugins `haplo::MultimodalAdaLN` and `haplo::HybridAttention` (tensorrt.plugin).

Each plugin is registered with its shape/type function, an autotune function (the I/O types it
accepts and, for attention, two tile tactics TensorRT times), an `aot_impl` that compiles the
Triton kernel to PTX for the build GPU (embedded in the engine: no Python at run time), and an
`impl` that launches the same kernel from Python (used only by networks created with
PREFER_JIT_PYTHON_PLUGINS, e.g. to debug a plugin). haplo.engines.tensorrt builds with
PREFER_AOT_PYTHON_PLUGINS.

Inputs and attributes are those of the `haplo`-domain ONNX nodes (export/custom_ops.py), in the
same order: TensorRT's ONNX parser hands a node's inputs to the plugin by position and its
attributes by name.

No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations as objects.
"""

import os
from types import SimpleNamespace

import torch

from haplo.engines.plugins import aot, kernels
from haplo.errors import HaploError

NAMESPACE = "haplo"
ADALN_ID = f"{NAMESPACE}::MultimodalAdaLN"
ATTENTION_ID = f"{NAMESPACE}::HybridAttention"
PLUGIN_IDS = (ADALN_ID, ATTENTION_ID)
ARCH_ENV = "HAPLO_PLUGIN_ARCH"  # e.g. 90: compile for this SM instead of the visible GPU's

_FLOAT_TYPES = "FP32|FP16|BF16"  # dependent: all float I/O of one plugin share one type
_registered = False


class PluginUnavailable(HaploError, RuntimeError):
    """tensorrt.plugin cannot be imported."""


def target_arch() -> int:
    """The SM the AOT kernels are compiled for: $HAPLO_PLUGIN_ARCH, else the current GPU."""
    if os.environ.get(ARCH_ENV):
        return int(os.environ[ARCH_ENV])
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return aot.DEFAULT_ARCH


def target_ptx_version() -> int | None:
    """The PTX ISA the AOT kernels are emitted at: $HAPLO_PTX_VERSION, else the newest this machine's
    driver JITs, else (no driver) Triton's own choice."""
    if os.environ.get(aot.PTX_ENV):
        return aot.parse_ptx_version(os.environ[aot.PTX_ENV])
    return aot.ptx_version_for(target_arch(), aot.driver_cuda_version())


def _triton_dtype(trt, dtype) -> str:
    table = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int64: "i64", trt.int32: "i32"}
    if dtype not in table:
        raise TypeError(f"haplo plugins do not support {dtype}")
    return table[dtype]


def _static(desc, axis: int, what: str) -> int:
    expr = desc.shape_expr[axis % desc.ndim]
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"{what} must be static in the ONNX graph (it sizes the kernel's tiles)")
    return expr.constant_value()


def _torch_view(trt, tensor) -> torch.Tensor:
    """A device tensor over a plugin I/O buffer (bfloat16 through an int16 view: no array-interface type)."""
    typestr = {trt.float32: "<f4", trt.float16: "<f2", trt.bfloat16: "<i2", trt.int64: "<i8", trt.int32: "<i4"}
    itemsize = int(typestr[tensor.dtype][-1])
    holder = SimpleNamespace(
        __cuda_array_interface__={
            "shape": tuple(tensor.shape),
            "typestr": typestr[tensor.dtype],
            "data": (tensor.data_ptr, False),
            "strides": tuple(s * itemsize for s in tensor.strides),
            "version": 3,
        }
    )
    view = torch.as_tensor(holder, device="cuda")
    return view.view(torch.bfloat16) if tensor.dtype == trt.bfloat16 else view


def register_plugins() -> list[str]:
    """Register both plugins with TensorRT's plugin registry (once per process). Returns their ids."""
    global _registered
    if _registered:
        return list(PLUGIN_IDS)
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as err:  # ImportError, or OSError when the TensorRT libraries are missing
        raise PluginUnavailable(
            f"tensorrt.plugin is not importable ({type(err).__name__}: {err}); the haplo "
            "plugins need TensorRT >= 10.12 with its libraries (pip install '.[gpu]')"
        ) from None
    _define_adaln(trt, trtp)
    _define_attention(trt, trtp)
    _registered = True
    return list(PLUGIN_IDS)


def _define_adaln(trt, trtp) -> None:
    TD, T = trtp.TensorDesc, trtp.Tensor

    @trtp.register(ADALN_ID)
    def adaln_desc(
        x: TD,
        weight: TD,
        bias: TD,
        indicator_weight: TD,
        indicator_bias: TD,
        ssg_l: TD,
        ssg_c: TD,
        epsilon: float,
        layernorm: int,
    ) -> tuple[TD, TD]:
        return x.like(), x.like()  # (modulated, gate)

    @trtp.autotune(ADALN_ID)
    def adaln_autotune(
        x: TD,
        weight: TD,
        bias: TD,
        indicator_weight: TD,
        indicator_bias: TD,
        ssg_l: TD,
        ssg_c: TD,
        outputs: tuple[TD, TD],
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join([_FLOAT_TYPES] * 9), "LINEAR")]

    @trtp.aot_impl(ADALN_ID)
    def adaln_aot(
        x: TD,
        weight: TD,
        bias: TD,
        indicator_weight: TD,
        indicator_bias: TD,
        ssg_l: TD,
        ssg_c: TD,
        epsilon: float,
        layernorm: int,
        outputs: tuple[TD, TD],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        hidden = _static(x, -1, "MultimodalAdaLN: the hidden size")
        kernel = aot.compile_adaln(
            _triton_dtype(trt, x.dtype), hidden, epsilon, bool(layernorm), target_arch(), target_ptx_version()
        )
        rows = x.shape_expr.numel() // hidden
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, kernel.constants["ROWS"])  # ROWS token rows per program
        launch.block_x = kernel.block_threads
        launch.shared_mem = kernel.shared_bytes
        scalars = trtp.SymIntExprs(1)
        scalars[0] = trtp.SymInt32(rows)
        return kernel.name, kernel.ptx, launch, scalars

    @trtp.impl(ADALN_ID)
    def adaln_impl(
        x: T,
        weight: T,
        bias: T,
        indicator_weight: T,
        indicator_bias: T,
        ssg_l: T,
        ssg_c: T,
        epsilon: float,
        layernorm: int,
        outputs: tuple[T, T],
        stream: int,
    ) -> None:
        views = [_torch_view(trt, t) for t in (x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            kernels.multimodal_adaln(
                *views,
                epsilon,
                "layernorm" if layernorm else "rmsnorm",
                outputs=tuple(_torch_view(trt, o) for o in outputs),
            )


def _define_attention(trt, trtp) -> None:
    TD, T = trtp.TensorDesc, trtp.Tensor

    @trtp.register(ATTENTION_ID)
    def attention_desc(query: TD, key: TD, value: TD, key_start: TD, scale: float) -> tuple[TD]:
        return (query.like(),)

    @trtp.autotune(ATTENTION_ID)
    def attention_autotune(
        query: TD, key: TD, value: TD, key_start: TD, outputs: tuple[TD]
    ) -> list[trtp.AutoTuneCombination]:
        types = f"{_FLOAT_TYPES}, {_FLOAT_TYPES}, {_FLOAT_TYPES}, INT64*INT32, {_FLOAT_TYPES}"
        return [trtp.AutoTuneCombination(types, "LINEAR", list(kernels.ATTENTION_TILES))]

    @trtp.aot_impl(ATTENTION_ID)
    def attention_aot(
        query: TD, key: TD, value: TD, key_start: TD, scale: float, outputs: tuple[TD], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        q_heads = _static(query, 1, "HybridAttention: the query head count")
        kv_heads = _static(key, 1, "HybridAttention: the KV head count")
        head_dim = _static(query, 3, "HybridAttention: the head size")
        tile = tactic if tactic in kernels.ATTENTION_TILES else 1  # tactic 0: TensorRT's default
        key_start_dtype = _triton_dtype(trt, key_start.dtype)
        dtype = _triton_dtype(trt, query.dtype)
        kernel = aot.compile_attention(
            dtype, head_dim, scale, tile, key_start_dtype, target_arch(), target_ptx_version()
        )
        q_len, k_len = query.shape_expr[2], key.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(q_len * (q_heads // kv_heads), kernel.constants["BLOCK_M"])
        launch.grid_y = query.shape_expr[0] * kv_heads
        launch.block_x = kernel.block_threads
        launch.shared_mem = kernel.shared_bytes
        scalars = trtp.SymIntExprs(4)
        for i, value_ in enumerate((q_len, k_len, q_heads, kv_heads)):
            scalars[i] = trtp.SymInt32(value_)
        return kernel.name, kernel.ptx, launch, scalars

    @trtp.impl(ATTENTION_ID)
    def attention_impl(
        query: T, key: T, value: T, key_start: T, scale: float, outputs: tuple[T], stream: int, tactic: int
    ) -> None:
        views = [_torch_view(trt, t) for t in (query, key, value, key_start)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            kernels.hybrid_attention(
                *views,
                scale,
                tactic=tactic if tactic in kernels.ATTENTION_TILES else None,
                output=_torch_view(trt, outputs[0]),
            )
