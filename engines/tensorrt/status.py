"""Whether TensorRT can run here, and the errors the TensorRT engines raise.

`tensorrt` is imported only inside the functions: this module loads, and reports clearly, without it.
"""

from __future__ import annotations

from types import ModuleType

import torch

from haplo.errors import HaploError


class TensorRTUnavailable(HaploError, RuntimeError):
    """TensorRT or an NVIDIA GPU is missing."""


class EngineError(HaploError, RuntimeError):
    """An engine that cannot be built or loaded, with the reason."""


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT imports and a CUDA device is present."""
    try:
        import tensorrt as trt
    except Exception as err:  # the bindings raise ImportError or OSError when libraries are absent
        return False, f"TensorRT is not importable ({type(err).__name__}: {str(err).splitlines()[0]})"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but no NVIDIA GPU is visible"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or TensorRTUnavailable saying what is missing."""
    usable, reason = tensorrt_status()
    if not usable:
        raise TensorRTUnavailable(f"{reason}; engines need an NVIDIA GPU with TensorRT (pip install '.[gpu]')")
    import tensorrt as trt

    return trt
