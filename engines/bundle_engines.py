"""What a bundle build asks of the engines: ONNX Runtime over the staged bundle, TensorRT engines.

`haplo.export.build.build_bundle` takes any object with these two methods (its `Engines`
protocol), so export and engines never import each other; the commands pass a `BundleEngines`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from haplo.bundle import Bundle, Manifest
from haplo.engines.onnxruntime import OrtBackend


class BundleEngines:
    """`ranges` / `options`: the TensorRT shape ranges and engine options (defaults when None)."""

    def __init__(self, ranges=None, options=None):
        self.ranges, self.options = ranges, options

    def open_backend(self, bundle: Bundle, optimization: str) -> OrtBackend:
        return OrtBackend(bundle, optimization=getattr(ort.GraphOptimizationLevel, optimization))

    def build_engines(self, root: Path, manifest: Manifest, log: Callable[[str], None]) -> dict:
        from haplo.engines.tensorrt.builder import EngineOptions, build_bundle_engines
        from haplo.engines.tensorrt.profiles import ShapeRanges

        ranges = self.ranges or ShapeRanges.for_config(manifest.config)
        return build_bundle_engines(root, manifest, ranges, self.options or EngineOptions(), log)
