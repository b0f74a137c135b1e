"""Ahead-of-time compilation of the plugin kernels to PTX, without a GPU.

TensorRT's AOT plugins embed PTX in the engine, so the engine runs without Python or Triton.
`tensorrt_plugins.py` calls `compile_adaln` / `compile_attention` from its `aot_impl` for the
device it builds on; `compile_for_config` compiles every variant a model needs (norm modes,
dtypes, attention tiles) for a named architecture and writes them with an index, which checks the
toolchain on a machine without a GPU and gives C++ servers the kernels for inspection.

Under TRITON_INTERPRET=1 (the CPU tests) triton.language's own @jit helpers (tl.sum, tl.max,
tl.sigmoid) are interpreter functions for the life of the process and cannot be compiled, so the
compilation then runs in a child process without it.

Three things a TensorRT AOT launch needs of the PTX, made sure of here:
- Triton appends two pointer parameters (global and profile scratch) after the kernel's own, which
  TensorRT does not pass. Our kernels use neither (both sizes must be 0 and the body must not name
  them), so they are taken out of the entry's parameter list.
- The PTX ISA version must be one the driver can JIT: Triton takes it from its bundled ptxas (CUDA 13:
  `.version 9.x`), so it is set from the driver's CUDA version where a driver is present
  (`driver_cuda_version`, `ptx_isa_for_driver`), or given (`--ptx-version`, $HAPLO_PTX_VERSION).
- Shared memory stays within 48 KB per block (`kernels.SHARED_BUDGET`): `KernelLaunchParams` has no
  opt-in for more.

The PTX that ships is assembled once more with Triton's bundled ptxas for its target (`ptxas_usage`),
which proves the edited entry assembles and gives its registers and spill bytes: a kernel must not
spill registers to local memory (attention then retries with smaller tiles, as for shared memory).

Every pointer parameter is compiled as 16-byte aligned (`tt.divisibility`, as Triton's JIT specialises
an aligned tensor): the plugins' tensors are TensorRT's own activations and constants, allocated
aligned, so with the row widths compile-time constants the loads and stores vectorise.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
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
# The newest PTX ISA (x10) a driver of each CUDA version JITs (NVIDIA's PTX ISA release notes).
PTX_ISA_OF_CUDA = {
    (11, 8): 78,
    (12, 0): 80,
    (12, 1): 81,
    (12, 2): 82,
    (12, 3): 83,
    (12, 4): 84,
    (12, 5): 85,
    (12, 6): 85,
    (12, 8): 87,
    (12, 9): 88,
    (13, 0): 90,
}
# The oldest PTX ISA that can target each SM (Triton targets the arch-specific sm_90a / sm_100a).
MIN_PTX_ISA = {70: 60, 75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 103: 88, 120: 87}
PTX_ENV = "HAPLO_PTX_VERSION"  # e.g. 8.4: emit this PTX ISA version instead of the driver's


class KernelCompileError(HaploError, RuntimeError):
    """A kernel that Triton could not compile for the requested target."""


class SharedMemoryError(KernelCompileError):
    """A compiled kernel needs more shared memory per block than a TensorRT AOT launch gives."""


class RegisterSpillError(KernelCompileError):
    """A compiled kernel spills registers to local memory."""


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
    param_count: int  # the kernel's own arguments (Triton's scratch pointers are taken out)
    ptx_version: str  # the PTX ISA of `.version`
    ptx: str
    registers: int = 0  # per thread, as ptxas assembles the PTX for its target
    spill_bytes: int = 0  # local-memory spill stores + loads per thread (must be 0)

    def describe(self) -> dict:
        info = asdict(self)
        del info["ptx"]
        return info


def _jit_function(kernel):
    # Under TRITON_INTERPRET=1, @triton.jit yields an interpreter function; compile its source anyway.
    return kernel if isinstance(kernel, triton.runtime.JITFunction) else triton.runtime.JITFunction(kernel.fn)


def _compile(
    kernel,
    signature: dict[str, str],
    constants: dict,
    arch: int,
    num_warps: int,
    num_stages: int = 2,
    ptx_version: int | None = None,
) -> triton.compiler.CompiledKernel:
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    fn = _jit_function(kernel)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, t in signature.items() if t[0] == "*"}
    try:
        src = ASTSource(
            fn=fn,
            signature={**signature, **{k: "constexpr" for k in constants}},
            constexprs=constants,
            attrs=aligned,
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # Triton raises its own compilation errors with the MLIR diagnostics
        raise KernelCompileError(
            f"Triton cannot compile {kernel.__name__} for sm_{arch} with {constants}: {type(err).__name__}: {err}"
        ) from err
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise KernelCompileError(
            f"{kernel.__name__} needs Triton scratch memory, which a TensorRT AOT launch does not provide"
        )
    if meta.shared > kernels.SHARED_BUDGET:
        raise SharedMemoryError(
            f"{kernel.__name__} with {constants} needs {meta.shared} B of shared memory; a TensorRT AOT launch "
            f"gets {kernels.SHARED_BUDGET} B per block (KernelLaunchParams has no opt-in for more)"
        )
    return compiled


def strip_scratch_params(ptx: str, entry: str, own: int) -> str:
    """The PTX with the entry's parameters after the first `own` removed (Triton's scratch pointers);
    refuses when the body uses one of them."""
    found = re.search(rf"(\.entry {re.escape(entry)}\()(.*?)(\n\))", ptx, re.S)
    if found is None:
        raise KernelCompileError(f"no .entry {entry} in the PTX")
    params = [p.strip() for p in found.group(2).split(",") if p.strip()]
    extra = [p.split()[-1] for p in params[own:]]
    for name in extra:
        if len(re.findall(rf"\b{re.escape(name)}\b", ptx)) > 1:
            raise KernelCompileError(f"{entry} uses {name}, a parameter TensorRT's launch does not pass")
    kept = ",\n".join(f"\t{p}" for p in params[:own])
    return ptx[: found.start(2)] + "\n" + kept + ptx[found.end(2) :]


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of a PTX module's kernel, assembled by Triton's ptxas for its `.target`."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target (sm_(\d+)\w*)", ptx, re.M)
    if target is None:
        raise KernelCompileError("the PTX names no .target")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        cmd = [get_ptxas(int(target.group(2))).path, "-v", f"--gpu-name={target.group(1)}", str(source)]
        run = subprocess.run([*cmd, "-o", str(Path(tmp, "kernel.cubin"))], capture_output=True, text=True)
    if run.returncode:
        raise KernelCompileError(f"ptxas cannot assemble the PTX: {run.stderr.strip()[-500:]}")
    registers = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    if registers is None or spills is None:
        raise KernelCompileError(f"ptxas -v gave no register use: {run.stderr.strip()[-300:]}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def _ptx_kernel(op: str, compiled, arch: int, dtype: str, constants: dict, own: int) -> PtxKernel:
    entry = compiled.metadata.name
    ptx = strip_scratch_params(compiled.asm["ptx"], entry, own)
    registers, spill_bytes = ptxas_usage(ptx)
    if spill_bytes:
        raise RegisterSpillError(f"{op} with {constants} spills {spill_bytes} B of registers per thread")
    params = re.search(rf"\.entry {re.escape(entry)}\((.*?)\)", ptx, re.S)
    version = re.search(r"^\.version (\S+)", ptx, re.M)
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
        ptx_version=version.group(1) if version else "",
        ptx=ptx,
        registers=registers,
        spill_bytes=spill_bytes,
    )


# -- the PTX ISA a driver takes ------------------------------------------------------------------


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the CUDA driver API this machine's libcuda gives, or None without a driver."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def ptx_isa_for_driver(major: int, minor: int) -> int:
    """The newest PTX ISA (x10) a driver of CUDA major.minor JITs; a version newer than the table's
    takes the newest known entry of its major (or of all)."""
    if (major, minor) in PTX_ISA_OF_CUDA:
        return PTX_ISA_OF_CUDA[(major, minor)]
    older = [v for (ma, mi), v in PTX_ISA_OF_CUDA.items() if (ma, mi) < (major, minor)]
    if not older:
        raise KernelCompileError(f"CUDA {major}.{minor} is older than any driver the plugins support (11.8+)")
    return max(older)


def ptx_version_for(arch: int, driver: tuple[int, int] | None) -> int | None:
    """The PTX ISA to emit for `arch` under `driver` (None: no driver here, Triton's default)."""
    if driver is None:
        return None
    isa = ptx_isa_for_driver(*driver)
    needed = MIN_PTX_ISA.get(arch, 0)
    if isa < needed:
        raise KernelCompileError(
            f"the CUDA {driver[0]}.{driver[1]} driver JITs PTX up to {isa / 10:.1f}, and sm_{arch} needs "
            f"{needed / 10:.1f}; update the NVIDIA driver"
        )
    return isa


def ptx_mismatch(ptx_version: str, driver: tuple[int, int] | None) -> str | None:
    """Why PTX of ISA `ptx_version` ("8.4"; "" = not recorded) cannot be JIT-compiled by `driver`, or None."""
    if not ptx_version or driver is None:
        return None
    newest = ptx_isa_for_driver(*driver)
    if parse_ptx_version(ptx_version) > newest:
        return (
            f"its plugin kernels are PTX {ptx_version}, newer than the CUDA {driver[0]}.{driver[1]} driver "
            f"JITs ({newest / 10:.1f})"
        )
    return None


def parse_ptx_version(text: str) -> int:
    """'8.4' (or '84') -> 84."""
    major, dot, minor = text.strip().partition(".")
    if not (major.isdigit() and (minor.isdigit() or not dot)):
        raise KernelCompileError(f"PTX version {text!r}: give MAJOR.MINOR, e.g. 8.4")
    return int(major) * 10 + int(minor) if dot else int(major)


def _compile_spec(spec: dict) -> PtxKernel:
    """Compile one variant in this process. spec: {"kernel": "adaln" | "attention", **parameters}."""
    params = {k: v for k, v in spec.items() if k != "kernel"}
    if spec["kernel"] == "adaln":
        return _compile_adaln_here(**params)
    return _compile_attention_here(**params)


def _compile_adaln_here(
    dtype: str, hidden: int, eps: float, layernorm: bool, arch: int, ptx_version: int | None = None
) -> PtxKernel:
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
    signature["rows"] = "i32"
    signature.update(out_ptr=pointer, gate_ptr=pointer)
    constants = {
        "EPS": float(eps),
        "LAYERNORM": bool(layernorm),
        "HIDDEN": hidden,
        "BLOCK_H": kernels.adaln_block(hidden),
        "ROWS": kernels.adaln_rows(hidden),
    }
    warps = kernels.adaln_warps(hidden)
    compiled = _compile(kernels.multimodal_adaln_kernel, signature, constants, arch, warps, ptx_version=ptx_version)
    return _ptx_kernel("MultimodalAdaLN", compiled, arch, dtype, constants, len(signature))


def _compile_attention_here(
    dtype: str,
    head_dim: int,
    scale: float,
    tactic: int,
    key_start_dtype: str,
    arch: int,
    ptx_version: int | None = None,
) -> PtxKernel:
    """The tactic's tiles, or smaller ones where the compiled kernel exceeds `kernels.SHARED_BUDGET` or
    spills registers."""
    tiles, error = None, None
    for shrink in range(8):
        smaller = kernels.attention_tiles(tactic, dtype == "fp32", head_dim, shrink)
        if smaller == tiles:  # the smallest tiles did not fit either
            break
        tiles = smaller
        try:
            return _compile_attention_tiles(dtype, head_dim, scale, key_start_dtype, arch, ptx_version, *tiles)
        except (SharedMemoryError, RegisterSpillError) as err:
            error = err
    assert error is not None
    raise error


def _compile_attention_tiles(
    dtype: str,
    head_dim: int,
    scale: float,
    key_start_dtype: str,
    arch: int,
    ptx_version: int | None,
    block_m: int,
    block_n: int,
    warps: int,
    stages: int,
) -> PtxKernel:
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
    compiled = _compile(kernels.hybrid_attention_kernel, signature, constants, arch, warps, stages, ptx_version)
    return _ptx_kernel("HybridAttention", compiled, arch, dtype, constants, len(signature))


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


def adaln_spec(dtype: str, hidden: int, eps: float, layernorm: bool, arch: int, ptx_version: int | None = None) -> dict:
    return {
        "ptx_version": ptx_version,
        "kernel": "adaln",
        "dtype": dtype,
        "hidden": hidden,
        "eps": float(eps),
        "layernorm": bool(layernorm),
        "arch": arch,
    }


def attention_spec(
    dtype: str,
    head_dim: int,
    scale: float,
    tactic: int,
    key_start_dtype: str,
    arch: int,
    ptx_version: int | None = None,
) -> dict:
    return {
        "ptx_version": ptx_version,
        "kernel": "attention",
        "dtype": dtype,
        "head_dim": head_dim,
        "scale": float(scale),
        "tactic": tactic,
        "key_start_dtype": key_start_dtype,
        "arch": arch,
    }


@functools.cache
def compile_adaln(
    dtype: str, hidden: int, eps: float, layernorm: bool, arch: int = DEFAULT_ARCH, ptx_version: int | None = None
) -> PtxKernel:
    """MultimodalAdaLN for one dtype, hidden size and norm mode. Grid: cdiv(rows, ROWS) programs;
    scalar: rows (token rows)."""
    return compile_specs([adaln_spec(dtype, hidden, eps, layernorm, arch, ptx_version)])[0]


@functools.cache
def compile_attention(
    dtype: str,
    head_dim: int,
    scale: float,
    tactic: int = 1,
    key_start_dtype: str = "i64",
    arch: int = DEFAULT_ARCH,
    ptx_version: int | None = None,
) -> PtxKernel:
    """HybridAttention for one dtype, head size and tile tactic (kernels.ATTENTION_TILES).

    Grid: (cdiv(groups * Lq, BLOCK_M), B * Hkv); scalars: q_len, k_len, q_heads, kv_heads.
    """
    return compile_specs([attention_spec(dtype, head_dim, scale, tactic, key_start_dtype, arch, ptx_version)])[0]


def variants_for_config(
    config, arch: int = DEFAULT_ARCH, dtypes: Iterable[str] = DTYPES, ptx_version: int | None = None
) -> dict[str, dict]:
    """Every kernel variant the model's graphs can ask for (per stage norm mode and widths, per dtype
    and attention tile), as name -> compile spec."""
    variants: dict[str, dict] = {}
    for stage in STAGES:
        stage_cfg = getattr(config, stage)
        hidden, head_dim = stage_cfg.hidden_size, stage_cfg.head_dim
        layernorm = stage_cfg.norm_mode == "layernorm"
        for dtype in dtypes:
            variants[f"adaln_{'ln' if layernorm else 'rms'}_h{hidden}_{dtype}"] = adaln_spec(
                dtype, hidden, stage_cfg.rms_norm_eps, layernorm, arch, ptx_version
            )
            for tactic in kernels.ATTENTION_TILES:
                variants[f"attention_d{head_dim}_t{tactic}_{dtype}"] = attention_spec(
                    dtype, head_dim, head_dim**-0.5, tactic, "i64", arch, ptx_version
                )
    return variants


def check_output(out_dir: Path) -> None:
    """Refuse an output directory this command did not write (a file, or other files inside)."""
    check_output_dir(
        out_dir, lambda d: indexed_dir(d, INDEX_NAME, "format", INDEX_FORMAT, suffix=".ptx"), "kernels directory"
    )


def compile_for_config(
    config,
    out_dir: Path,
    arch: int = DEFAULT_ARCH,
    dtypes: Iterable[str] = DTYPES,
    log: Callable[[str], None] = print,
    ptx_version: int | None = None,
) -> dict:
    """Compile every variant for `arch`, write NAME.ptx files and kernels.json; return the index."""
    out_dir = Path(out_dir)
    check_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = variants_for_config(config, arch, dtypes, ptx_version)
    started = time.perf_counter()
    log(f"compiling {len(variants)} kernel variants for sm_{arch} with Triton {triton.__version__}")
    compiled = compile_specs(list(variants.values()))
    index = {"format": INDEX_FORMAT, "arch": f"sm_{arch}", "triton": triton.__version__, "kernels": {}}
    index["ptx_version"] = compiled[0].ptx_version if compiled else None
    for i, (name, kernel) in enumerate(zip(variants, compiled), 1):
        write_atomic(out_dir / f"{name}.ptx", kernel.ptx)
        index["kernels"][name] = {"file": f"{name}.ptx", **kernel.describe()}
        log(
            f"[{i}/{len(variants)}] {name}: {kernel.name}, {kernel.block_threads} threads, "
            f"{kernel.shared_bytes} B shared, {kernel.registers} registers"
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
