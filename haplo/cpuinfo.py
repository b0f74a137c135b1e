"""What the CPU can do, as far as numerics depend on it: model name, ISA, integer dot products.

INT8 matmuls on x86 differ by ISA. With AVX-512 VNNI, AVX-VNNI or AMX the u8 x s8 dot product
accumulates straight into int32. Without them (AVX2, AVX-512 without VNNI) ONNX Runtime's kernels
use `vpmaddubsw`, which adds two adjacent u8 x s8 products into a *saturating int16*: with 8-bit
weights, 2 x 255 x 127 = 64,770 overflows 32,767 and the matmul silently clips. Weights within
+-64 keep every pair within 2 x 255 x 64 = 32,640, exact on every x86 CPU.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flags that give an int32-accumulating u8 x s8 dot product.
INT_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
)
INT16_MAX = 32767
U8_MAX = 255
# Largest |weight| whose adjacent u8 x s8 pair cannot saturate int16: 2 * 255 * 64 = 32,640.
SATURATION_FREE_WEIGHT_MAX = INT16_MAX // (2 * U8_MAX)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str  # platform.machine(): x86_64, aarch64, ...
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i386", "i686")

    @property
    def int8_dot_int32(self) -> bool:
        """True where an u8 x s8 matmul with full 8-bit weights is exact (no int16 intermediate)."""
        return not self.is_x86 or any(f in self.flags for f in INT_DOT_FLAGS)

    @property
    def isa(self) -> str:
        """Short ISA summary for reports: 'AVX-512 + VNNI', 'AVX2 (no VNNI)', ..."""
        if not self.is_x86:
            return self.arch
        base = "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else "SSE"
        dot = [
            name
            for flag, name in (("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX"))
            if flag in self.flags
        ]
        return f"{base} + {' + '.join(dot)}" if dot else f"{base} (no VNNI)"

    def describe(self) -> str:
        return f"{self.model} ({self.isa})"

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "isa": self.isa, "int8_dot_int32": self.int8_dot_int32}


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _numpy_flags() -> set[str]:
    """Fallback where /proc/cpuinfo is missing (macOS, Windows): numpy's runtime dispatch table."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return set()
    names = {
        "AVX2": "avx2",
        "FMA3": "fma",
        "AVX512F": "avx512f",
        "AVX512BW": "avx512bw",
        "AVX512_CLX": "avx512_vnni",
        "AVX512_SPR": "amx_int8",
    }
    return {flag for key, flag in names.items() if features.get(key)}


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    if not flags:
        flags = _numpy_flags()
    return CpuInfo(
        model or platform.processor() or platform.machine(),
        platform.machine(),
        tuple(f for f in REPORTED_FLAGS if f in flags),
    )
