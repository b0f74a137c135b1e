"""Ahead-of-time compilation of the plugin kernels to PTX, without a GPU.

TensorRT's AOT plugins embed PTX in the engine, so the engine runs without Python or Triton.
`tensorrt_plugins.py` calls `compile_adaln` / `compile_attention` from its `aot_impl` for the
device it builds on; `compile_for_config` compiles every variant a model needs (norm modes,
dtypes, attention tiles) for a named architecture and writes them with an index, which checks the
toolchain on a machine without a GPU and gives C++ servers the kernels for inspection.

Under TRITON_INTERPRET=1 (the CPU tests) triton.language's own @jit helpers (tl.sum, tl.max,
tl.sigmoid) are interpreter functions for the life of the process and cannot be compiled, so the
compilation then runs in a child process without it.

Triton appends two pointer parameters (global and profile scratch) after the kernel's own; our
kernels use neither (checked here: both sizes must be 0), so a launcher may leave them null.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from haplo.artifacts import check_output_dir, indexed_dir, write_atomic
from haplo.engines.plugins import kernels
from haplo.errors import HaploError
from haplo.model.config import STAGES

DEFAULT_ARCH = 90  # sm_90 (H100/H200)
DTYPES = ("fp32", "fp16", "bf16")
INDEX_NAME = "kernels.json"
INDEX_FORMAT = "haplo-kernels/1"
# Largest shared memory one block may use (opt-in dynamic shared memory), bytes, per SM.
SHARED_MEMORY_LIMIT = {
    70: 96 << 10,
    75: 64 << 10,
    80: 163 << 10,
    86: 99 << 10,
    87: 163 << 10,
    89: 99 << 10,
    90: 227 << 10,
    100: 227 << 10,
    103: 227 << 10,
    120: 99 << 10,
}


class KernelCompileError(HaploError, RuntimeError):
    """A kernel that Triton could not compile for the requested target."""


@dataclass(frozen=True)
class PtxKernel:
    """One compiled kernel variant: what a launcher needs besides the PTX text."""

    kernel: str  # haplo operator
    name: str  # PTX entry point
    arch: int
    dtype: str
    constants: dict
    num_warps: int
    block_threads: int  # num_warps * 32
    shared_bytes: int
    param_count: int  # our arguments + Triton's two scratch pointers
    ptx: str

    def describe(self) -> dict:
        info = asdict(self)
        del info["ptx"]
        return info


def _jit_function(kernel):
    # Under TRITON_INTERPRET=1, @triton.jit yields an interpreter function; compile its source anyway.
    return kernel if isinstance(kernel, triton.runtime.JITFunction) else triton.runtime.JITFunction(kernel.fn)


def _compile(
    kernel, signature: dict[str, str], constants: dict, arch: int, num_warps: int, num_stages: int = 2
) -> triton.compiler.CompiledKernel:
    try:
        src = ASTSource(
            fn=_jit_function(kernel),
            signature={**signature, **{k: "constexpr" for k in constants}},
            constexprs=constants,
        )
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except Exception as err:  # Triton raises its own compilation errors with the MLIR diagnostics
        raise KernelCompileError(
            f"Triton cannot compile {kernel.__name__} for sm_{arch} with {constants}: {type(err).__name__}: {err}"
        ) from err
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise KernelCompileError(
            f"{kernel.__name__} needs Triton scratch memory, which a TensorRT AOT launch does not provide"
        )
    limit = SHARED_MEMORY_LIMIT.get(arch, 99 << 10)
    if meta.shared > limit:
        raise KernelCompileError(
            f"{kernel.__name__} with {constants} needs {meta.shared} B of shared memory; "
            f"sm_{arch} has {limit} B per block"
        )
    return compiled


def _ptx_kernel(op: str, compiled, arch: int, dtype: str, constants: dict) -> PtxKernel:
    ptx = compiled.asm["ptx"]
    entry = compiled.metadata.name
    params = re.search(rf"\.entry {re.escape(entry)}\((.*?)\)", ptx, re.S)
    return PtxKernel(
        kernel=op,
        name=entry,
        arch=arch,
        dtype=dtype,
        constants=constants,
        num_warps=compiled.metadata.num_warps,
        block_threads=compiled.metadata.num_warps * 32,
        shared_bytes=compiled.metadata.shared,
        param_count=params.group(1).count(".param") if params else -1,
        ptx=ptx,
    )


def _compile_spec(spec: dict) -> PtxKernel:
    """Compile one variant in this process. spec: {"kernel": "adaln" | "attention", **parameters}."""
    params = {k: v for k, v in spec.items() if k != "kernel"}
    if spec["kernel"] == "adaln":
        return _compile_adaln_here(**params)
    return _compile_attention_here(**params)


def _compile_adaln_here(dtype: str, hidden: int, eps: float, layernorm: bool, arch: int) -> PtxKernel:
    pointer = f"*{dtype}"
    signature = {
        name: pointer
        for name in (
            "x_ptr",
            "weight_ptr",
            "bias_ptr",
            "indicator_weight_ptr",
            "indicator_bias_ptr",
            "ssg_l_ptr",
            "ssg_c_ptr",
        )
    }
    signature["hidden"] = "i32"
    signature.update(out_ptr=pointer, gate_ptr=pointer)
    constants = {"EPS": float(eps), "LAYERNORM": bool(layernorm), "BLOCK_H": kernels.adaln_block(hidden)}
    compiled = _compile(kernels.multimodal_adaln_kernel, signature, constants, arch, kernels.adaln_warps(hidden))
    return _ptx_kernel("MultimodalAdaLN", compiled, arch, dtype, constants)


def _compile_attention_here(
    dtype: str, head_dim: int, scale: float, tactic: int, key_start_dtype: str, arch: int
) -> PtxKernel:
    block_m, block_n, warps, stages = kernels.attention_tiles(tactic, dtype == "fp32")
    pointer = f"*{dtype}"
    signature = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        "v_ptr": pointer,
        "key_start_ptr": f"*{key_start_dtype}",
        "q_len": "i32",
        "k_len": "i32",
        "q_heads": "i32",
        "kv_heads": "i32",
        "out_ptr": pointer,
    }
    constants = {
        "SCALE": float(scale),
        "HEAD_DIM": head_dim,
        "BLOCK_D": kernels.attention_block_d(head_dim),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
    }
    compiled = _compile(kernels.hybrid_attention_kernel, signature, constants, arch, warps, stages)
    return _ptx_kernel("HybridAttention", compiled, arch, dtype, constants)


def compile_specs(specs: list[dict]) -> list[PtxKernel]:
    """Compile variants in this process, or all of them in one child when Triton is interpreting."""
    if not triton.knobs.runtime.interpret:
        return [_compile_spec(spec) for spec in specs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, "-m", "haplo.engines.plugins.aot"],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
    )
    if child.returncode:
        raise KernelCompileError(
            child.stderr.strip().splitlines()[-1]
            if child.stderr.strip()
            else f"kernel compiler exited with {child.returncode}"
        )
    return [PtxKernel(**k) for k in json.loads(child.stdout)]


def adaln_spec(dtype: str, hidden: int, eps: float, layernorm: bool, arch: int) -> dict:
    return {
        "kernel": "adaln",
        "dtype": dtype,
        "hidden": hidden,
        "eps": float(eps),
        "layernorm": bool(layernorm),
        "arch": arch,
    }


def attention_spec(dtype: str, head_dim: int, scale: float, tactic: int, key_start_dtype: str, arch: int) -> dict:
    return {
        "kernel": "attention",
        "dtype": dtype,
        "head_dim": head_dim,
        "scale": float(scale),
        "tactic": tactic,
        "key_start_dtype": key_start_dtype,
        "arch": arch,
    }


@functools.cache
def compile_adaln(dtype: str, hidden: int, eps: float, layernorm: bool, arch: int = DEFAULT_ARCH) -> PtxKernel:
    """MultimodalAdaLN for one dtype, hidden size and norm mode. Grid: one program per token row;
    scalar: hidden."""
    return compile_specs([adaln_spec(dtype, hidden, eps, layernorm, arch)])[0]


@functools.cache
def compile_attention(
    dtype: str, head_dim: int, scale: float, tactic: int = 1, key_start_dtype: str = "i64", arch: int = DEFAULT_ARCH
) -> PtxKernel:
    """HybridAttention for one dtype, head size and tile tactic (kernels.ATTENTION_TILES).

    Grid: (cdiv(groups * Lq, BLOCK_M), B * Hkv); scalars: q_len, k_len, q_heads, kv_heads.
    """
    return compile_specs([attention_spec(dtype, head_dim, scale, tactic, key_start_dtype, arch)])[0]


def variants_for_config(config, arch: int = DEFAULT_ARCH, dtypes: Iterable[str] = DTYPES) -> dict[str, dict]:
    """Every kernel variant the model's graphs can ask for (per stage norm mode and widths, per dtype
    and attention tile), as name -> compile spec."""
    variants: dict[str, dict] = {}
    for stage in STAGES:
        stage_cfg = getattr(config, stage)
        hidden, head_dim = stage_cfg.hidden_size, stage_cfg.head_dim
        layernorm = stage_cfg.norm_mode == "layernorm"
        for dtype in dtypes:
            variants[f"adaln_{'ln' if layernorm else 'rms'}_h{hidden}_{dtype}"] = adaln_spec(
                dtype, hidden, stage_cfg.rms_norm_eps, layernorm, arch
            )
            for tactic in kernels.ATTENTION_TILES:
                variants[f"attention_d{head_dim}_t{tactic}_{dtype}"] = attention_spec(
                    dtype, head_dim, head_dim**-0.5, tactic, "i64", arch
                )
    return variants


def check_output(out_dir: Path) -> None:
    """Refuse an output directory this command did not write (a file, or other files inside)."""
    check_output_dir(
        out_dir, lambda d: indexed_dir(d, INDEX_NAME, "format", INDEX_FORMAT, suffix=".ptx"), "kernels directory"
    )


def compile_for_config(
    config, out_dir: Path, arch: int = DEFAULT_ARCH, dtypes: Iterable[str] = DTYPES, log: Callable[[str], None] = print
) -> dict:
    """Compile every variant for `arch`, write NAME.ptx files and kernels.json; return the index."""
    out_dir = Path(out_dir)
    check_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = variants_for_config(config, arch, dtypes)
    started = time.perf_counter()
    log(f"compiling {len(variants)} kernel variants for sm_{arch} with Triton {triton.__version__}")
    compiled = compile_specs(list(variants.values()))
    index = {"format": INDEX_FORMAT, "arch": f"sm_{arch}", "triton": triton.__version__, "kernels": {}}
    for i, (name, kernel) in enumerate(zip(variants, compiled), 1):
        write_atomic(out_dir / f"{name}.ptx", kernel.ptx)
        index["kernels"][name] = {"file": f"{name}.ptx", **kernel.describe()}
        log(
            f"[{i}/{len(variants)}] {name}: {kernel.name}, {kernel.block_threads} threads, "
            f"{kernel.shared_bytes} B shared"
        )
    write_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2))
    log(f"wrote {len(variants)} PTX files and {INDEX_NAME} to {out_dir} in {time.perf_counter() - started:.1f}s")
    return index


if __name__ == "__main__":  # the child of compile_specs: JSON specs on stdin, JSON kernels on stdout
    try:
        kernels_out = [asdict(_compile_spec(spec)) for spec in json.load(sys.stdin)]
    except KernelCompileError as err:
        sys.exit(str(err).splitlines()[0] if str(err) else "kernel compile failed")
    json.dump(kernels_out, sys.stdout)
