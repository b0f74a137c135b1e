"""Engine build: parse a graph with the plugins swapped in, build it, write the plan and its sidecar.

The sidecar (`<graph>.json` beside `<graph>.plan`, `EngineMetadata`) records what the engine was
built from and for, so the runtime can tell a stale engine from a usable one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from haplo.artifacts import sha256_file, write_atomic
from haplo.bundle import Manifest
from haplo.engines.tensorrt.prepare import plugin_node_count, prepare_onnx_for_tensorrt
from haplo.engines.tensorrt.profiles import ShapeRanges, graph_profiles
from haplo.engines.tensorrt.status import EngineError, require_tensorrt

METADATA_SUFFIX = ".json"
ENGINE_DIR = "engines"


@dataclass
class EngineMetadata:
    graph: str
    source_sha256: str
    precision: str
    tensorrt_version: str
    device_name: str
    compute_capability: str
    profiles: dict = field(default_factory=dict)  # profile name -> input name -> [min, opt, max]
    plugins: list = field(default_factory=list)
    refittable: bool = False
    cuda_driver: str = ""  # the driver's CUDA version the plugin PTX was emitted for ("" before it was recorded)
    plugin_ptx_version: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def mismatch(self, source_sha256: str) -> str | None:
        """Why this engine cannot be used on this machine for this source, or None."""
        import tensorrt as trt

        here = "{}.{}".format(*torch.cuda.get_device_capability())
        if self.source_sha256 != source_sha256:
            return "the ONNX graph changed since the engine was built"
        if self.tensorrt_version != trt.__version__:
            return f"built with TensorRT {self.tensorrt_version}, running {trt.__version__}"
        if self.compute_capability != here:
            return f"built for SM {self.compute_capability}, this GPU is SM {here}"
        from haplo.engines.plugins import aot

        return aot.ptx_mismatch(self.plugin_ptx_version, aot.driver_cuda_version())


@dataclass
class EngineOptions:
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3
    timing_cache: Path | None = None
    refit: bool = False


def graph_source_sha256(onnx_path: Path) -> str:
    """sha256 over a graph file and every external-data file it names (in name order), so new weights
    of the same shapes make a new source: an engine is never reused over weights it was not built from."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    digest = hashlib.sha256(sha256_file(onnx_path).encode())
    for location in locations:
        digest.update(f"\n{location}:{sha256_file(onnx_path.parent / location)}".encode())
    return digest.hexdigest()


def check_plugins_bound(trt, network, expected: int, graph: str) -> None:
    """Every plugin node became a plugin layer. When a plugin fails to bind the parser silently inlines
    the node's ONNX function instead (a dense mask and full score matrix per attention), so a missing
    plugin layer fails the build."""
    found = sum(1 for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    if found < expected:
        raise EngineError(
            f"{graph}: {expected} nodes name a haplo plugin but the parsed network has {found} plugin "
            "layers (the rest were inlined as standard ops); check that the plugins are registered "
            "(`haplo.engines.plugins.tensorrt_plugins.register_plugins`) for this TensorRT version"
        )


def _parse_network(trt, logger, graph: str, onnx_path: Path) -> tuple:
    """Parse the graph with its plugins swapped in. Returns (builder, network, parser, plugin ids).

    The parser owns the parsed weights: the caller keeps it alive until the engine is built.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    model, plugins = prepare_onnx_for_tensorrt(model)
    # Written beside the original so relative external-data paths still resolve.
    prepared = onnx_path.with_name(f".{onnx_path.stem}.tensorrt.onnx")
    onnx.save(model, str(prepared))
    try:
        builder = trt.Builder(logger)
        # Strongly typed always, in TensorRT 11. The plugins have Python (JIT) and PTX (AOT) kernels:
        # take the AOT ones, so the engine runs without Python.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(prepared)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{graph}: TensorRT cannot parse {onnx_path.name}: {errors}")
    finally:
        prepared.unlink(missing_ok=True)
    check_plugins_bound(trt, network, plugin_node_count(model), graph)
    return builder, network, parser, plugins


def _builder_config(trt, builder, profiles: dict[str, dict[str, list]], options: EngineOptions) -> tuple:
    """Builder config with the options, timing cache and one optimisation profile per entry of `profiles`.

    Returns (config, timing cache).
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.exists() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config, timing_cache


def _tensor_specs(tensors: list) -> list[dict]:
    return [{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)} for t in tensors]


def _driver_text() -> str:
    from haplo.engines.plugins import aot

    driver = aot.driver_cuda_version()
    return "" if driver is None else f"{driver[0]}.{driver[1]}"


def _ptx_text() -> str:
    from haplo.engines.plugins.tensorrt_plugins import target_ptx_version

    version = target_ptx_version()
    return "" if version is None else f"{version // 10}.{version % 10}"


def _engine_metadata(
    trt, graph: str, onnx_path: Path, precision: str, network, profiles: dict, plugins: list, refit: bool
) -> EngineMetadata:
    """The sidecar of an engine just built from `onnx_path` on this GPU."""
    return EngineMetadata(
        graph=graph,
        source_sha256=graph_source_sha256(onnx_path),
        precision=precision,
        tensorrt_version=trt.__version__,
        device_name=torch.cuda.get_device_name(),
        compute_capability="{}.{}".format(*torch.cuda.get_device_capability()),
        profiles={p: {n: [list(s) for s in v] for n, v in shapes.items()} for p, shapes in profiles.items()},
        plugins=plugins,
        refittable=refit,
        cuda_driver=_driver_text(),
        plugin_ptx_version=_ptx_text(),
        inputs=_tensor_specs([network.get_input(i) for i in range(network.num_inputs)]),
        outputs=_tensor_specs([network.get_output(i) for i in range(network.num_outputs)]),
    )


def build_engine(
    graph: str,
    onnx_path: Path,
    plan_path: Path,
    profiles: dict[str, dict[str, list]],
    precision: str,
    options: EngineOptions,
    logger=None,
) -> EngineMetadata:
    """Parse one graph (plugins swapped in), build it with the given profiles, write plan + sidecar.

    `profiles`: profile name -> input name -> (min, opt, max) shapes. The profile order is the
    index the runner selects (e.g. 0 = prefill, 1 = decode).
    """
    trt = require_tensorrt()
    from haplo.engines.plugins.tensorrt_plugins import register_plugins

    register_plugins()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder, network, parser, plugins = _parse_network(trt, logger, graph, onnx_path)
    config, timing_cache = _builder_config(trt, builder, profiles, options)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{graph}: TensorRT build failed (see the log above)")
    if options.timing_cache is not None:
        write_atomic(options.timing_cache, bytes(timing_cache.serialize()))
    write_atomic(plan_path, bytes(plan))
    meta = _engine_metadata(trt, graph, onnx_path, precision, network, profiles, plugins, options.refit)
    write_atomic(plan_path.with_suffix(METADATA_SUFFIX), json.dumps(asdict(meta), indent=2).encode())
    return meta


def load_metadata(plan_path: Path) -> EngineMetadata:
    """The sidecar beside `plan_path`, or EngineError when it is missing or unreadable."""
    try:
        return EngineMetadata(**json.loads(plan_path.with_suffix(METADATA_SUFFIX).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise EngineError(f"{plan_path}: missing or unreadable engine metadata ({err})") from None


def _manifest_entry(plan: Path, precision: str, profiles: dict, meta: EngineMetadata) -> dict:
    """One graph's entry in the manifest's `engines`."""
    return {
        "file": f"{ENGINE_DIR}/{plan.name}",
        "metadata": f"{ENGINE_DIR}/{plan.stem}{METADATA_SUFFIX}",
        "profiles": list(profiles),
        "precision": precision,
        "plugins": meta.plugins,
        "tensorrt_version": meta.tensorrt_version,
        "compute_capability": meta.compute_capability,
    }


def build_bundle_engines(
    root: Path,
    manifest: Manifest,
    ranges: ShapeRanges,
    options: EngineOptions,
    log: Callable[[str], None] = print,
) -> dict:
    """Build one engine per graph of a (temporary) bundle directory; returns the manifest's `engines`."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engines = {}
    for i, (name, entry) in enumerate(manifest.graphs.items(), 1):
        plan = root / ENGINE_DIR / f"{name}.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        profiles = graph_profiles(entry, ranges)
        started = time.perf_counter()
        meta = build_engine(name, root / entry.file, plan, profiles, entry.precision, options, logger)
        log(
            f"[{i}/{len(manifest.graphs)}] engine {name}: {len(profiles)} profile(s), plugins "
            f"{meta.plugins or 'none'}, {time.perf_counter() - started:.1f}s"
        )
        engines[name] = _manifest_entry(plan, entry.precision, profiles, meta)
    return engines
