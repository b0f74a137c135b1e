"""TensorRT 11 engines: build from the bundle's ONNX graphs, check, refit, and run.

TensorRT 11 is strongly typed only: precision lives in the graph (casts, Q/DQ), never in builder
flags. Our `haplo`-domain nodes carry a model-local ONNX function; the parser inlines that
function unless the node names a plugin namespace, so `prepare_onnx_for_tensorrt` adds
`plugin_namespace` and the registered Triton plugins (AOT PTX, embedded in the engine) run instead.

Everything here imports `tensorrt` lazily: the module loads, and reports clearly, without it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from haplo.artifacts import sha256_file, write_atomic
from haplo.bundle import STAGE_GRAPHS
from haplo.engines.graph_backend import GraphBackend
from haplo.errors import HaploError

PLUGIN_NAMESPACE = "haplo"
PLUGIN_VERSION = "1"
# ONNX op_type in the `haplo` domain -> the TensorRT plugin name registered in engines/plugins.
PLUGIN_FOR_OP = {
    "MultimodalAdaLN": "MultimodalAdaLN",
    "multimodal_adaln": "MultimodalAdaLN",
    "HybridAttention": "HybridAttention",
    "hybrid_attention": "HybridAttention",
}
METADATA_SUFFIX = ".json"
MASKED_START = 2**30


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


def _require_tensorrt():
    usable, reason = tensorrt_status()
    if not usable:
        raise TensorRTUnavailable(f"{reason}; engines need an NVIDIA GPU with TensorRT (pip install '.[gpu]')")
    import tensorrt as trt

    return trt


# -- ONNX preparation -------------------------------------------------------------------------------


def prepare_onnx_for_tensorrt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Point every `haplo`-domain node at its plugin. Returns (model, plugin ids used).

    The node keeps its inputs/outputs; the plugin reads the same attributes. Nodes whose op has no
    plugin are left alone, so the parser inlines their function (standard ops).
    """
    used = set()
    for node in model.graph.node:
        if node.domain != PLUGIN_NAMESPACE:
            continue
        plugin = PLUGIN_FOR_OP.get(node.op_type)
        if plugin is None:
            continue
        node.op_type = plugin
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend(
            [
                onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION),
            ]
        )
        used.add(f"{PLUGIN_NAMESPACE}::{plugin}")
    return model, sorted(used)


# -- optimisation profiles ----------------------------------------------------------------------------


@dataclass
class ShapeRanges:
    """(min, opt, max) of every dynamic dimension, from the CLI. TensorRT wants past >= 1."""

    batch: tuple[int, int, int] = (1, 1, 2)
    prompt: tuple[int, int, int] = (1, 128, 1024)  # new tokens in one prefill call
    past: tuple[int, int, int] = (1, 512, 4096)  # cached tokens (one dead slot included)
    visual_tokens: tuple[int, int, int] = (1, 48, 17550)
    latent_frames: tuple[int, int, int] = (1, 3, 13)
    latent_height: tuple[int, int, int] = (8, 8, 60)
    latent_width: tuple[int, int, int] = (8, 8, 90)
    image_tiles: tuple[int, int, int] = (1, 1, 10)

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in asdict(self).items():
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"shape range {name}={lo},{opt},{hi}: need 1 <= min <= opt <= max")


def profile_dims(ranges: ShapeRanges, decode: bool) -> dict[str, tuple[int, int, int]]:
    """Dimension name -> (min, opt, max) for the prefill or the decode profile."""
    sequence = (1, 1, 1) if decode else (1, ranges.prompt[1], max(ranges.prompt[2], ranges.visual_tokens[2] + 1))
    past = ranges.past
    return {
        "batch": ranges.batch,
        "sequence": sequence,
        "past_sequence": past,
        "total_sequence": tuple(p + s for p, s in zip(past, sequence)),
        "visual_tokens": ranges.visual_tokens,
        "latent_frames": ranges.latent_frames,
        "latent_height": ranges.latent_height,
        "latent_width": ranges.latent_width,
        "num_tiles": ranges.image_tiles,
    }


def input_shape_range(shape: list, dims: dict[str, tuple[int, int, int]]):
    """A manifest shape ([3, "batch", ...]) -> (min, opt, max) tuples of ints."""
    triples = []
    for d in shape:
        if isinstance(d, int):
            triples.append((d, d, d))
        elif d in dims:
            triples.append(dims[d])
        else:
            raise EngineError(f"no shape range for dynamic dimension {d!r}; add it to ShapeRanges")
    return tuple(tuple(t[i] for t in triples) for i in range(3))


# -- metadata sidecar --------------------------------------------------------------------------------


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
        return None


# -- building ---------------------------------------------------------------------------------------


@dataclass
class EngineOptions:
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3
    timing_cache: Path | None = None
    refit: bool = False


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
    trt = _require_tensorrt()
    from haplo.engines.plugins.tensorrt_plugins import register_plugins

    register_plugins()
    logger = logger or trt.Logger(trt.Logger.WARNING)
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

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{graph}: TensorRT build failed (see the log above)")
    if options.timing_cache is not None:
        write_atomic(options.timing_cache, bytes(timing_cache.serialize()))
    write_atomic(plan_path, bytes(plan))
    io = (
        [network.get_input(i) for i in range(network.num_inputs)],
        [network.get_output(i) for i in range(network.num_outputs)],
    )
    meta = EngineMetadata(
        graph=graph,
        source_sha256=sha256_file(onnx_path),
        precision=precision,
        tensorrt_version=trt.__version__,
        device_name=torch.cuda.get_device_name(),
        compute_capability="{}.{}".format(*torch.cuda.get_device_capability()),
        profiles={p: {n: [list(s) for s in v] for n, v in shapes.items()} for p, shapes in profiles.items()},
        plugins=plugins,
        refittable=options.refit,
        inputs=[{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)} for t in io[0]],
        outputs=[{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)} for t in io[1]],
    )
    write_atomic(plan_path.with_suffix(METADATA_SUFFIX), json.dumps(asdict(meta), indent=2).encode())
    return meta


def refit_engine(plan_path: Path, onnx_path: Path, logger=None) -> None:
    """Swap new weights (same graph) into a refittable engine without rebuilding."""
    trt = _require_tensorrt()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise EngineError(f"{plan_path.name}: weights in {onnx_path.name} do not fit this engine")
    if not refitter.refit_cuda_engine():
        raise EngineError(f"{plan_path.name}: refit failed")
    write_atomic(plan_path, bytes(engine.serialize()))
    meta = json.loads(plan_path.with_suffix(METADATA_SUFFIX).read_text())
    meta["source_sha256"] = sha256_file(onnx_path)
    write_atomic(plan_path.with_suffix(METADATA_SUFFIX), json.dumps(meta, indent=2).encode())


def load_metadata(plan_path: Path) -> EngineMetadata:
    try:
        return EngineMetadata(**json.loads(plan_path.with_suffix(METADATA_SUFFIX).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise EngineError(f"{plan_path}: missing or unreadable engine metadata ({err})") from None


# -- running ----------------------------------------------------------------------------------------


def torch_dtype(trt_dtype):
    import tensorrt as trt

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
        trt.fp8: torch.float8_e4m3fn,
    }
    return table[trt_dtype]


class EngineRunner:
    """One engine, one execution context, on one CUDA stream.

    Output buffers are preallocated flat arenas that grow to the largest shape seen, so steady-state
    calls allocate nothing. Outputs of one call stay valid until the next call with the same `slot`:
    decoder stages alternate two slots, so this step's `present` never overwrites the `past` it
    reads. With `cuda_graphs`, a call whose shapes repeat (every DDIM step after the first) replays a
    captured CUDA graph instead of enqueueing again.
    """

    def __init__(self, plan_path: Path, stream=None, cuda_graphs: bool = False):
        trt = _require_tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: cannot deserialize (corrupt file or other TensorRT version)")
        self.context = self.engine.create_execution_context()
        self.stream = stream or torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.arenas: dict[tuple[str, int], torch.Tensor] = {}
        self.profile = -1
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}

    def select_profile(self, index: int) -> None:
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profile = index

    def _output(self, name: str, shape, slot: int) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        arena = self.arenas.get((name, slot))
        if arena is None or arena.numel() < numel:
            arena = torch.empty(max(numel, 1), dtype=self.dtypes[name], device="cuda")
            self.arenas[(name, slot)] = arena
        return arena[:numel].view(*shape)

    def _enqueue(self, feeds: dict, slot: int) -> dict:
        for name in self.inputs:
            tensor = feeds[name]
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = self._output(name, tuple(self.context.get_tensor_shape(name)), slot)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the log)")
        return outputs

    def __call__(self, feeds: dict, profile: int = 0, slot: int = 0) -> dict:
        """feeds: input name -> CUDA tensor (dtype as the engine expects). Returns name -> CUDA tensor."""
        feeds = {n: feeds[n].to(device="cuda", dtype=self.dtypes[n]).contiguous() for n in self.inputs}
        self.select_profile(profile)
        if not self.cuda_graphs:
            with torch.cuda.stream(self.stream):
                out = self._enqueue(feeds, slot)
            self.stream.synchronize()
            return out
        key = (profile, slot, *(tuple(feeds[n].shape) for n in self.inputs))
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.graphs and self.seen[key] < 2:  # capture only shapes that repeat (DDIM steps)
            with torch.cuda.stream(self.stream):
                out = self._enqueue(feeds, slot)
            self.stream.synchronize()
            return out
        if key not in self.graphs:
            static = {n: t.clone() for n, t in feeds.items()}
            with torch.cuda.stream(self.stream):
                self._enqueue(static, slot)  # warm-up outside capture: lazy allocations happen here
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                outputs = self._enqueue(static, slot)
            self.graphs[key] = (graph, static, outputs)
        graph, static, outputs = self.graphs[key]
        for name, tensor in feeds.items():
            static[name].copy_(tensor)
        graph.replay()
        self.stream.synchronize()
        return outputs


# -- bundles: engines for every graph, and the runtime backend over them ---------------------------------

ENGINE_DIR = "engines"


def graph_profiles(entry: dict, ranges: ShapeRanges) -> dict[str, dict[str, tuple]]:
    """Decoders get a prefill and a decode profile (index 0 and 1); every other graph one profile."""
    kinds = {"prefill": False, "decode": True} if entry.get("layers") else {"default": False}
    return {
        name: {i["name"]: input_shape_range(i["shape"], profile_dims(ranges, decode)) for i in entry["inputs"]}
        for name, decode in kinds.items()
    }


def build_bundle_engines(root: Path, manifest: dict, ranges: ShapeRanges, options: EngineOptions, log=print) -> dict:
    """Build one engine per graph of a (temporary) bundle directory; returns the manifest's `engines`."""
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engines = {}
    for i, (name, entry) in enumerate(manifest["graphs"].items(), 1):
        plan = root / ENGINE_DIR / f"{name}.plan"
        plan.parent.mkdir(parents=True, exist_ok=True)
        profiles = graph_profiles(entry, ranges)
        started = time.perf_counter()
        meta = build_engine(name, root / entry["file"], plan, profiles, entry["precision"], options, logger)
        log(
            f"[{i}/{len(manifest['graphs'])}] engine {name}: {len(profiles)} profile(s), plugins "
            f"{meta.plugins or 'none'}, {time.perf_counter() - started:.1f}s"
        )
        engines[name] = {
            "file": f"{ENGINE_DIR}/{plan.name}",
            "metadata": f"{ENGINE_DIR}/{plan.stem}{METADATA_SUFFIX}",
            "profiles": list(profiles),
            "precision": entry["precision"],
            "plugins": meta.plugins,
            "tensorrt_version": meta.tensorrt_version,
            "compute_capability": meta.compute_capability,
        }
    return engines


class TensorRTBackend(GraphBackend):
    """The runtime over a bundle's engines: device-resident KV cache, CUDA graphs for repeated shapes.

    TensorRT profiles need past length >= 1, so every decoder call carries one dead cache slot in
    front (zeros, key start MASKED_START: never visible); the runtime's block starts are shifted
    by one to match, so masks and RoPE positions are unchanged.
    """

    name = "tensorrt"

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> "TensorRTBackend":
        return cls(bundle, **kwargs)

    def __init__(self, bundle, cuda_graphs: bool = True, rebuild: bool = True):
        super().__init__(bundle)
        _require_tensorrt()
        if not self.bundle.manifest.get("engines"):
            from haplo.bundle import BundleError

            raise BundleError(
                f"{self.bundle.root}: the bundle has no TensorRT engines; build it with "
                "`haplo-export build --target tensorrt` on a machine with an NVIDIA GPU"
            )
        self.cuda_graphs, self.rebuild = cuda_graphs, rebuild
        self.runners: dict[str, EngineRunner] = {}
        self.slots = {stage: 0 for stage in STAGE_GRAPHS}

    def runner(self, graph: str) -> EngineRunner:
        if graph not in self.runners:
            entry = self.bundle.manifest["engines"][graph]
            plan, source = self.bundle.path(entry["file"]), self.bundle.graph_path(graph)
            meta = load_metadata(plan)
            reason = meta.mismatch(sha256_file(source))
            if reason is not None:
                if not self.rebuild:
                    raise EngineError(f"{plan}: {reason}; rebuild the bundle's engines")
                profiles = {
                    p: {n: tuple(tuple(s) for s in v) for n, v in shapes.items()} for p, shapes in meta.profiles.items()
                }
                build_engine(graph, source, plan, profiles, meta.precision, EngineOptions(refit=meta.refittable))
            self.runners[graph] = EngineRunner(plan, cuda_graphs=self.cuda_graphs)
        return self.runners[graph]

    def run(self, graph, **inputs):
        runner = self.runner(graph)
        out = runner(inputs)
        return [out[name].float().cpu() for name in runner.outputs]

    def run_stage(self, stage, hidden, position_ids, key_start, past=None):
        graph = STAGE_GRAPHS[stage]
        layers = self.bundle.graphs[graph]["layers"]
        batch = hidden.shape[0]
        key_start = key_start.long()
        key_start = torch.where(key_start < MASKED_START, key_start + 1, key_start)
        key_start = torch.cat([torch.full((batch, 1), MASKED_START, dtype=torch.long), key_start], dim=1)
        if past is None:
            cfg = self.config.stages[stage]
            dead = torch.zeros(batch, cfg.num_key_value_heads, 1, cfg.head_dim, device="cuda")
            past = [dead] * (2 * len(layers))
        feeds = {"hidden_states": hidden, "position_ids": position_ids.long(), "key_start": key_start}
        for i, n in enumerate(layers):
            feeds[f"past_key_values.{n}.key"], feeds[f"past_key_values.{n}.value"] = past[2 * i], past[2 * i + 1]
        # Alternate output slots: this call's present must not overwrite the past it reads.
        self.slots[stage] ^= 1
        out = self.runner(graph)(feeds, profile=1 if hidden.shape[1] == 1 else 0, slot=self.slots[stage])
        presents = [out[f"present.{n}.{kind}"] for n in layers for kind in ("key", "value")]
        return out["hidden_states_out"].float().cpu(), presents

    def keep_cache(self, past):
        # A cache reused by many later calls (the text prefix) must leave the runner's output arenas.
        return [t.clone() for t in past]

    def expand_past(self, past, repeats):
        return [t.repeat_interleave(repeats, 0) for t in past]
