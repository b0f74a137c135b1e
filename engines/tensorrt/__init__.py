"""TensorRT 11 engines: build them from a bundle's ONNX graphs, check them, and run them.

TensorRT 11 is strongly typed only: precision lives in the graph (casts, Q/DQ), never in builder
flags. Our `haplo`-domain nodes carry a model-local ONNX function; the parser inlines it unless the
node names a plugin namespace, so the registered Triton plugins (AOT PTX, embedded in the engine)
run instead once `prepare_onnx_for_tensorrt` has added one.

- `status`: `tensorrt_status`, `require_tensorrt`, the errors `TensorRTUnavailable` and `EngineError`.
- `prepare`: the ONNX preparation (plugin ids, `prepare_onnx_for_tensorrt`).
- `profiles`: `ShapeRanges` and the optimisation profiles built from them.
- `builder`: `EngineOptions`, the `EngineMetadata` sidecar, `build_engine`, `build_bundle_engines`.
- `runner`: `EngineRunner`, one engine on one CUDA stream (output arenas, CUDA graphs).
- `backend`: `TensorRTBackend`, the runtime backend over a bundle's engines.

The builder and the runner never import each other; only the backend uses both. `tensorrt` itself
is imported lazily everywhere: the package loads, and reports clearly, without it.
"""

from haplo.engines.tensorrt.backend import TensorRTBackend
from haplo.engines.tensorrt.builder import (
    ENGINE_DIR,
    METADATA_SUFFIX,
    EngineMetadata,
    EngineOptions,
    build_bundle_engines,
    build_engine,
    load_metadata,
)
from haplo.engines.tensorrt.prepare import PLUGIN_FOR_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION, prepare_onnx_for_tensorrt
from haplo.engines.tensorrt.profiles import ShapeRanges, graph_profiles, input_shape_range, profile_dims
from haplo.engines.tensorrt.runner import EngineRunner, torch_dtype
from haplo.engines.tensorrt.status import EngineError, TensorRTUnavailable, require_tensorrt, tensorrt_status

__all__ = [
    "ENGINE_DIR",
    "METADATA_SUFFIX",
    "PLUGIN_FOR_OP",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "EngineError",
    "EngineMetadata",
    "EngineOptions",
    "EngineRunner",
    "ShapeRanges",
    "TensorRTBackend",
    "TensorRTUnavailable",
    "build_bundle_engines",
    "build_engine",
    "graph_profiles",
    "input_shape_range",
    "load_metadata",
    "prepare_onnx_for_tensorrt",
    "profile_dims",
    "require_tensorrt",
    "tensorrt_status",
    "torch_dtype",
]
