"""`haplo-export build`: model -> bundle directory (graphs, manifest, parity report), as named steps.

    plan        what to build: graphs, precision policy, INT8 weight range, the previous bundle
    calibrate   activation ranges and held-out feeds from the PyTorch pipeline (low precision only)
    export      each graph exported (or reused when its content hash matches), checked in fp32,
                rewritten to its precision and checked against the fp32 module
    write       constants, tokenizer and the manifest, in a staging directory
    check       greedy decoding and guided DDIM, PyTorch against the staged bundle on ONNX Runtime
    lower       --target tensorrt, low precision: the decoders' activations and KV cache to bf16 / fp16
                (after the checks, which ONNX Runtime's CPU kernels could not run in bf16)
    engines     TensorRT engines (--target tensorrt), through the engines the caller passes in
    swap        the staging directory replaces the target only when every check passed

An interrupted or failed build never leaves a directory that `Bundle.open` accepts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx
from safetensors.torch import save_file

from haplo.artifacts import check_output_dir, discard_staging, staging_dir, swap_into_place
from haplo.bundle import STAGE_GRAPHS, Bundle, GraphEntry, Manifest, TensorSpec, VaeEntry, is_bundle
from haplo.cpuinfo import cpu_info
from haplo.export import cache, custom_ops, graphs, parity, validate
from haplo.export.graphs import GraphSpec, export_graph, graph_specs
from haplo.export.quantize import activations, calibration, policy, rewrite
from haplo.export.report import append_activations_report, append_task_report, keep_failed_report, write_report
from haplo.export.validate import ParityError, Tolerances, validate_graph
from haplo.model.config import STAGES
from haplo.model.processor import HaploOmniProcessor
from haplo.runtime.backend import Backend
from haplo.runtime.torch_backend import TorchBackend

CHECK_LATENT = (3, 8, 8)  # largest latent (frames, h, w) of the end-to-end checks: 48 latent tokens


@dataclass
class BuildOptions:
    out: Path
    decomposed: bool = False  # standard ops only, no `haplo` nodes
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | fp8 (see haplo.export.quantize)
    target: str = "onnxruntime"  # who runs the graphs: "onnxruntime" | "tensorrt" (INT8 activation scheme)
    int8_weights: str = "auto"  # "auto" | "full" | "reduced": INT8 weight range (see policy.int8_weight_plan)
    graph_precision: dict[str, str] = field(default_factory=dict)  # per-graph overrides of the policy
    exclude_modules: tuple[str, ...] = ()  # module-name regexes kept in fp32
    build_engines: bool = True  # target tensorrt: False writes the TensorRT-ready graphs only
    force: bool = False  # export every graph even if unchanged
    tolerances: Tolerances = field(default_factory=Tolerances)
    video: tuple[int, int, int] | None = None  # (frames, height, width) of the VAE graph; default: config
    check_steps: int = 32  # greedy decode steps compared end to end
    ddim_steps: int = 3
    source: dict = field(default_factory=dict)  # where the weights came from, for the manifest
    min_task_accuracy: float | None = None  # with a TaskCheck: refuse a bundle below it (fraction)


class Engines(Protocol):
    """What a build needs from the engines layer; the caller passes it in (e.g.
    `haplo.engines.bundle_engines.BundleEngines`), so export never imports engines."""

    def open_backend(self, bundle: Bundle, optimization: str) -> Backend:
        """The (staged) bundle on ONNX Runtime at an optimisation level, for the end-to-end checks."""
        ...

    def build_engines(self, root: Path, manifest: Manifest, log: Callable[[str], None]) -> dict:
        """TensorRT engines for the staged bundle at `root`; returns the manifest's `engines` entry."""
        ...


class TaskCheck(Protocol):
    """Task accuracy of a backend over the staged bundle (e.g. `haplo.bench.evaluation.task_check`):
    {"understanding": {"all_correct": ...}, "generation": {"both_correct": ...}}, either optional."""

    def __call__(self, backend: Backend, processor: HaploOmniProcessor, log: Callable[[str], None]) -> dict: ...


def weights_source(checkpoint: Path | None, preset: str | None, seed: int, name: str) -> dict:
    """The manifest's `source`: the checkpoint the weights came from, else the preset and its seed."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "preset": None if checkpoint else preset,
        "seed": None if checkpoint else seed,
        "name": name,
    }


def check_output(out: Path) -> None:
    """Refuse, before any work, a target that is not absent, empty or a bundle this tool made."""
    check_output_dir(out, is_bundle, "bundle")


def check_latent_shape(latent_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The latent size of the end-to-end checks and calibration: the deployment size capped at
    CHECK_LATENT (frames, h, w). The decoder graphs are dynamic, so a small size checks the same
    graphs, whatever video the VAE graph is built for (49 x 480 x 720 is 17,550 latent tokens)."""
    frames, channels, h, w = latent_shape
    return min(frames, CHECK_LATENT[0]), channels, min(h, CHECK_LATENT[1]), min(w, CHECK_LATENT[2])


def build_bundle(
    model,
    vae,
    tokenizer,
    options: BuildOptions,
    engines: Engines,
    log: Callable[[str], None] = print,
    task: TaskCheck | None = None,
) -> Manifest:
    """Export, validate and write a bundle at `options.out`; `vae=None` leaves the VAE graph out.
    With `task`, the staged bundle's task accuracy goes into the manifest and the report (and is
    held to `min_task_accuracy`). Returns the manifest. The bundle appears at `out` only when every
    check passed."""
    started = time.perf_counter()
    out = Path(options.out)
    check_output(out)
    plan = _plan(model, vae, tokenizer, options, out)
    tmp = staging_dir(out)
    try:
        exported = _export_graphs(model, plan, options, tmp, log)
        manifest = _write(model, vae, tokenizer, plan, options, exported, tmp)
        _check_parity(model, vae, plan, options, exported, manifest, engines, tmp, log)
        if task is not None:
            _check_task(task, plan, options, manifest, engines, tmp, log)
        _lower(plan, options, exported, manifest, tmp, log)
        if options.target == "tensorrt" and options.build_engines:
            log("building TensorRT engines (plugins for haplo nodes, prefill and decode profiles)")
            manifest.engines = engines.build_engines(tmp, manifest, log)
        manifest.build_seconds = round(time.perf_counter() - started, 2)
        manifest.write(tmp)
        check_output(out)  # again: the build took minutes, and `out` may have changed meanwhile
        swap_into_place(tmp, out)
        return manifest
    except BaseException:
        discard_staging(tmp)
        raise


# -- plan ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a build will do, settled before any export."""

    out: Path
    video: tuple[int, int, int] | None  # the VAE graph's (frames, height, width); None: no VAE graph
    latent_shape: tuple[int, int, int, int]  # deployment latents (frames, C, h, w)
    check_shape: tuple[int, int, int, int]  # end-to-end checks and calibration
    specs: list[GraphSpec]
    policy: dict[str, str]
    int8_weights: dict | None
    previous: dict[str, tuple[Bundle, GraphEntry]]
    processor: HaploOmniProcessor
    versions: dict
    config_json: str
    code: str


def _plan(model, vae, tokenizer, options: BuildOptions, out: Path) -> _Plan:
    gen = model.config.video_generation
    video = options.video or (gen.num_frames, gen.height, gen.width)
    latent_shape = gen.latent_shape(*video)
    specs = graph_specs(model, vae, latent_shape)
    graph_policy = policy.resolve_policy(options.precision, options.graph_precision)
    unknown = sorted(set(graph_policy) - {spec.name for spec in specs})
    if unknown:
        raise policy.QuantizationError(
            f"--graph-precision names unknown graph(s) {', '.join(unknown)}; "
            f"graphs: {', '.join(spec.name for spec in specs)}"
        )
    policy.check_checkable(graph_policy)
    int8 = "int8" in graph_policy.values()
    return _Plan(
        out,
        video if vae is not None else None,
        latent_shape,
        check_latent_shape(latent_shape),
        specs,
        graph_policy,
        policy.int8_weight_plan(options.int8_weights, options.target) if int8 else None,
        {} if options.force else cache.previous_graphs(out),
        HaploOmniProcessor(tokenizer, model.config),
        cache.library_versions(),
        json.dumps(model.config.to_dict(), sort_keys=True),
        cache.code_digest(),
    )


def ort_level(graph_policy: dict[str, str], target: str) -> str:
    """ONNX Runtime's optimisation level for the bundle. FP8 Q/DQ, and the TensorRT flavour of INT8,
    run at the basic level: Q/DQ then execute as written (dequantize, fp32 matmul), the exact
    semantics TensorRT implements, on any CPU. ONNX Runtime's own INT8 flavour runs fully optimised,
    where its integer kernels take the Q/DQ pairs."""
    lowp = set(graph_policy.values())
    return "ORT_ENABLE_BASIC" if "fp8" in lowp or ("int8" in lowp and target == "tensorrt") else "ORT_ENABLE_ALL"


def check_level(plan: _Plan, options: BuildOptions) -> str:
    """The level the build's own checks run at: the bundle's, except for full-range INT8 on a CPU that
    would saturate it, where Q/DQ run as written, computing what the CPUs the bundle is for compute."""
    if (plan.int8_weights or {}).get("range") == "full" and not cpu_info().int8_dot_int32:
        return "ORT_ENABLE_BASIC"
    return ort_level(plan.policy, options.target)


# -- calibrate, export or reuse, quantize -------------------------------------------------------------


@dataclass
class _Exported:
    entries: dict[str, GraphEntry] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)  # graph -> fp32 export check against PyTorch
    accuracy: dict[str, dict] = field(default_factory=dict)  # low-precision graph -> accuracy vs fp32
    ranges: dict | None = None  # calibrated activation ranges (None: nothing quantized)


def _calibrate(model, plan: _Plan, log) -> tuple[dict | None, dict]:
    """Activation ranges and held-out evaluation feeds, when some graph is quantized."""
    if all(p == "fp32" for p in plan.policy.values()):
        return None, {}
    log(f"calibrating: prompts with images, greedy decoding, guided DDIM at latents {list(plan.check_shape)} (PyTorch)")
    t0 = time.perf_counter()
    ranges = calibration.calibrate(model, plan.processor, plan.check_shape)
    layers = {stage: list(model.config.stage_layers(stage)) for stage in STAGES}
    eval_feeds = calibration.evaluation_feeds(model, plan.processor, plan.check_shape, layers)
    log(f"calibrated {len(ranges)} linear layers in {time.perf_counter() - t0:.1f}s")
    return ranges, eval_feeds


def _export_graphs(model, plan: _Plan, options: BuildOptions, tmp: Path, log) -> _Exported:
    ranges, eval_feeds = _calibrate(model, plan, log)
    exported = _Exported(ranges=ranges)
    for i, spec in enumerate(plan.specs, 1):
        t0 = time.perf_counter()
        precision = plan.policy.get(spec.name, "fp32")
        entry, check, action = _export_or_reuse(spec, precision, plan, ranges, options, tmp, log)
        exported.entries[spec.name], exported.checks[spec.name] = entry, check
        line = (
            f"[{i}/{len(plan.specs)}] {spec.name}: {action} in {time.perf_counter() - t0:.1f}s, "
            f"export max abs error {check['max_abs_error']:.2g}, cosine {check['cosine']:.6f}"
        )
        if precision != "fp32":
            level = check_level(plan, options)
            accuracy = validate.low_precision_accuracy(
                spec, tmp / entry.file, eval_feeds, precision, entry.quantization, level
            )
            exported.accuracy[spec.name] = accuracy
            line += (
                f"; {precision} vs fp32: cosine {accuracy['cosine']:.6f}, max abs error {accuracy['max_abs_error']:.2g}"
            )
        log(line + ("" if check["ok"] else "  FAIL: " + "; ".join(check["problems"])))
    return exported


def _export_or_reuse(spec: GraphSpec, precision: str, plan: _Plan, ranges, options: BuildOptions, tmp: Path, log):
    """One graph: reused from the previous bundle when its content hash matches, else exported,
    validated in fp32 and rewritten to its precision. Returns (manifest entry, fp32 check, action)."""
    rel = f"graphs/{spec.name}.onnx"
    digest = cache.content_hash(spec, plan.config_json, _export_key(precision, plan, options), plan.code, plan.versions)
    prior = plan.previous.get(spec.name)
    lowered = prior is not None and prior[1].activations != "float32"  # the checks need the graph before lowering
    if prior and not lowered and prior[1].content_hash == digest and cache.reuse(prior[1], prior[0], tmp):
        check, qdq, action = prior[1].export_check, prior[1].quantization, "reused"
    else:
        if spec.name == "vae_decoder":  # static: exported and checked at the video size, which can take minutes
            frames, height, width = plan.video or (0, 0, 0)
            log(f"{spec.name}: exporting and checking at {frames} frames of {height}x{width} ...")
        export_graph(spec, tmp / rel, options.decomposed)
        check, qdq, action = validate_graph(spec, tmp / rel, options.tolerances), None, "exported"
        if precision != "fp32":
            qdq = rewrite.quantize_graph_file(
                tmp / rel, precision, ranges, options.target, options.exclude_modules, plan.int8_weights
            )
            action += f", {precision} ({qdq['matmuls']} matmuls)"
    return _graph_entry(spec, tmp, rel, precision, digest, check, qdq), check, action


def _export_key(precision: str, plan: _Plan, options: BuildOptions) -> dict:
    """The options that shape a graph: a low-precision graph also depends on its quantization."""
    key: dict = {"decomposed": options.decomposed, "precision": precision}
    if precision != "fp32":
        weight_max = (plan.int8_weights or {}).get("max") if precision == "int8" else None
        key.update(target=options.target, exclude=list(options.exclude_modules), calibration=plan.check_shape)
        key["int8_weight_max"] = weight_max
    return key


def _graph_entry(spec: GraphSpec, tmp: Path, rel: str, precision: str, digest: str, check: dict, qdq) -> GraphEntry:
    proto = onnx.load(str(tmp / rel), load_external_data=False)
    return GraphEntry(
        file=rel,
        data=f"{rel}.data" if (tmp / f"{rel}.data").exists() else None,
        inputs=[_tensor_spec(v) for v in proto.graph.input],
        outputs=[_tensor_spec(v) for v in proto.graph.output],
        precision=precision,
        layers=spec.layers,
        content_hash=digest,
        custom_ops=sorted({n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}),
        export_check={k: v for k, v in check.items() if k != "outputs"},
        quantization=qdq,
    )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return TensorSpec(value.name, dtype, [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim])


# -- write ----------------------------------------------------------------------------------------------


def _write(model, vae, tokenizer, plan: _Plan, options: BuildOptions, exported: _Exported, tmp: Path) -> Manifest:
    """Constants, tokenizer and the manifest so far: the end-to-end checks open the bundle as written."""
    save_file(
        {"image_newline": model.model.image_newline.detach().float().contiguous()},
        str(tmp / "constants.safetensors"),
    )
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    manifest = _manifest(model, vae, plan, options, exported)
    manifest.write(tmp)
    return manifest


def _manifest(model, vae, plan: _Plan, options: BuildOptions, exported: _Exported) -> Manifest:
    rules = policy.QuantizeOptions(options.precision, options.target, plan.policy, options.exclude_modules)
    quantization = {
        **rules.to_dict(),
        "int8_weights": plan.int8_weights,
        "calibration": _calibration_summary(exported.ranges, plan.check_shape),
        "accuracy": exported.accuracy,
    }
    vae_entry = None
    if vae is not None and plan.video is not None:
        vae_entry = VaeEntry(list(plan.latent_shape), list(plan.video), float(vae.config.scaling_factor))
    return Manifest(
        precision=options.precision,
        target=options.target,
        onnxruntime_optimization=ort_level(plan.policy, options.target),
        quantization=quantization,
        requirements=_requirements(exported.entries),
        build_machine={"cpu": cpu_info().to_dict()},
        source=options.source,
        model=model.config.to_dict(),
        opset=graphs.OPSET,
        custom_ops={
            "domain": custom_ops.DOMAIN,
            "version": custom_ops.DOMAIN_VERSION,
            "decomposed": options.decomposed,
        },
        graphs=exported.entries,
        constants="constants.safetensors",
        tokenizer="tokenizer",
        vae=vae_entry,
        versions=plan.versions,
    )


def _calibration_summary(ranges: dict | None, latent_shape: tuple) -> dict | None:
    if ranges is None:
        return None
    prompts, captions = calibration.calibration_prompts()
    return {
        "linear_layers": len(ranges),
        "understanding_prompts": len(prompts),
        "generation_prompts": len(captions),
        "latent_shape": list(latent_shape),
        "method": "min/max of every nn.Linear input over the real pipeline (PyTorch, fp32)",
    }


def _requirements(entries: dict[str, GraphEntry]) -> dict:
    """What a server needs to load these graphs (also what TensorRT needs for plugins)."""
    ops = sorted({op for entry in entries.values() for op in entry.custom_ops})
    return {
        "onnx_opset": graphs.OPSET,
        "onnx_ir_version": graphs.IR_VERSION,
        "plugins": [
            {"name": f"{custom_ops.DOMAIN}::{op}", "namespace": custom_ops.DOMAIN, "version": "1"} for op in ops
        ],
        "notes": "ONNX Runtime runs haplo-domain nodes through their model-local functions; TensorRT binds them to "
        "the plugins of haplo.engines.plugins (plugin_namespace 'haplo') at build time and embeds their "
        "ahead-of-time compiled PTX in the engine, so running an engine needs no plugin library or Python.",
    }


# -- check the task -----------------------------------------------------------------------------------


def _check_task(task: TaskCheck, plan: _Plan, options: BuildOptions, manifest: Manifest, engines, tmp: Path, log):
    """The staged bundle on ONNX Runtime asked the held-out questions; below the floor, refused."""
    backend = engines.open_backend(Bundle.open(tmp, verify=False), check_level(plan, options))
    manifest.task = task(backend, plan.processor, log)
    append_task_report(tmp, manifest.task)
    floor = options.min_task_accuracy
    scores = {
        name: manifest.task[kind][key]
        for name, kind, key in (
            ("understanding", "understanding", "all_correct"),
            ("generation", "generation", "both_correct"),
        )
        if kind in manifest.task
    }
    low = {name: score for name, score in scores.items() if floor is not None and score < floor}
    if low:
        report = keep_failed_report(tmp, plan.out)
        found = ", ".join(f"{name} {score:.1%}" for name, score in low.items())
        raise ParityError(
            f"task accuracy below --quant-min-task-accuracy {floor:.1%}: {found} (report: {report}); keep "
            "the worst graphs in fp32 with --graph-precision NAME=fp32 or --exclude-modules, or use a higher precision"
        )


# -- check parity -------------------------------------------------------------------------------------


def _check_parity(
    model, vae, plan: _Plan, options: BuildOptions, exported: _Exported, manifest: Manifest, engines, tmp: Path, log
) -> None:
    """Torch against the staged bundle; writes parity.json and report.md, raises ParityError on a failure."""
    log(f"checking end to end: greedy decoding and DDIM at latents {list(plan.check_shape)}, torch vs ONNX Runtime")
    candidate = engines.open_backend(Bundle.open(tmp, verify=False), check_level(plan, options))
    low_precision = options.precision != "fp32" or bool(exported.accuracy)
    shapes = parity.CheckShapes(plan.check_shape, plan.latent_shape, plan.video is not None)
    steps = (options.check_steps, options.ddim_steps)
    understanding, generation = parity.end_to_end(
        TorchBackend(model, vae), candidate, plan.processor, shapes, low_precision, steps
    )
    record = {
        "graphs": exported.checks,
        "understanding": understanding,
        "generation": generation,
        "tolerances": options.tolerances.to_dict(),
    }
    failed = parity.failures(record, exported.accuracy, low_precision, options.tolerances)
    manifest.parity = parity.summary(record, exported.accuracy, failed)
    (tmp / "parity.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(tmp, manifest, record)
    if failed:
        report = keep_failed_report(tmp, plan.out)
        raise ParityError(
            "parity check failed: " + " | ".join(failed) + f" (report: {report}; loosen "
            "the budgets with --atol/--min-cosine/--min-token-agreement or --quant-min-* only if "
            "this is expected, or keep a graph in fp32 with --graph-precision NAME=fp32)"
        )


# -- lower the activations (TensorRT) -----------------------------------------------------------------


def _lower(plan: _Plan, options: BuildOptions, exported: _Exported, manifest: Manifest, tmp: Path, log) -> None:
    """The low-precision decoders of a TensorRT bundle, checked on ONNX Runtime as rewritten, get
    low-precision activations and KV cache; each is checked for structure and, through the same pass
    in fp16, for accuracy on ONNX Runtime. Summaries go into the graph entries and the manifest."""
    specs = {spec.name: spec for spec in plan.specs}
    lowered: dict[str, dict] = {}
    for name in STAGE_GRAPHS.values():
        entry = exported.entries.get(name)
        dtype = activations.activation_dtype(entry.precision, options.target) if entry else None
        if entry is None or dtype is None:
            continue
        lowered[name] = _lower_graph(specs[name], entry, dtype, tmp, options.tolerances.quant_min_cosine)
        exported.entries[name] = _graph_entry(
            specs[name], tmp, entry.file, entry.precision, entry.content_hash, entry.export_check, entry.quantization
        )
        exported.entries[name].activations = activations.dtype_name(dtype)
        check = lowered[name]["fp16_check"]
        log(
            f"{name}: activations and KV cache {activations.dtype_name(dtype)} "
            f"({lowered[name]['tensors_lowered']} tensors, {lowered[name]['tensors_kept_fp32']} kept fp32); "
            f"the pass in fp16 on ONNX Runtime vs PyTorch: cosine {check['cosine']:.6f}, "
            f"max abs error {check['max_abs_error']:.2g}"
        )
    if lowered:
        manifest.graphs = exported.entries
        manifest.quantization["activations"] = lowered
        append_activations_report(tmp, lowered)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _lower_graph(spec: GraphSpec, entry: GraphEntry, dtype: int, tmp: Path, min_cosine: float) -> dict:
    """One graph file lowered in place; refused when malformed, or when the pass in fp16 is not finite
    or below the low-precision cosine budget against PyTorch."""
    path = tmp / entry.file
    model = onnx.load(str(path))
    fp16 = model if dtype == onnx.TensorProto.FLOAT16 else _copy(model)  # an fp16 target is lowered once
    summary = activations.lower_activations(fp16, onnx.TensorProto.FLOAT16)
    fp16_check = validate.lowered_fp16_accuracy(spec, fp16)
    if fp16 is not model:
        summary = activations.lower_activations(model, dtype)
    structure = validate.lowered_structure(model, dtype)
    problems = structure["problems"] + ([] if fp16_check["finite"] else ["NaN or Inf in fp16"])
    if fp16_check["cosine"] < min_cosine:
        problems.append(f"fp16 cosine {fp16_check['cosine']:.5f} < {min_cosine}")
    if problems:
        raise ParityError(f"{spec.name}: lowered activations: {'; '.join(problems)}")
    graphs.save_graph(model, path)
    entry.quantization = {**(entry.quantization or {}), "activations": summary}
    return {**summary, "structure": structure, "fp16_check": fp16_check}
