"""`haplo-export build`: model -> bundle directory (graphs, manifest, parity report).

The bundle is assembled in a hidden temporary directory beside the target and renamed into place
only after every graph is exported and validated and the manifest is written, so an interrupted
or failed build never leaves a directory that `Bundle.open` accepts. Graphs whose content hash
(weights, config, export options, exporter code and versions) matches the previous bundle at the
same path are reused instead of exported again, unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol

import onnx
import torch
from safetensors.torch import save_file

import haplo
from haplo.artifacts import STAGING_MARKER, check_output_dir, discard_staging, staging_dir, swap_into_place
from haplo.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STAGE_GRAPHS,
    Bundle,
    BundleError,
    is_bundle,
    sha256_file,
    write_atomic,
)
from haplo.cpuinfo import cpu_info
from haplo.export import custom_ops, graphs, quantize
from haplo.export.graphs import GraphSpec, export_graph, graph_specs
from haplo.export.validate import (
    ParityError,
    Tolerances,
    cpu_session,
    ddim_parity,
    token_agreement,
    validate_graph,
)
from haplo.model.processor import HaploOmniProcessor
from haplo.runtime.backend import Backend
from haplo.runtime.torch_backend import TorchBackend

CODE_FILES = ["ops.py", "layers.py", "modeling.py", "sequence.py"]  # haplo/model code a graph depends on
LIBRARIES = ["torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers", "numpy"]
CHECK_LATENT = (3, 8, 8)  # largest latent (frames, h, w) of the end-to-end checks: 48 latent tokens
REPORT_TITLE = "# Bundle report"


@dataclass
class BuildOptions:
    out: Path
    decomposed: bool = False  # standard ops only, no `haplo` nodes
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | fp8 (see haplo.export.quantize)
    target: str = "onnxruntime"  # who runs the graphs: "onnxruntime" | "tensorrt" (INT8 activation scheme)
    int8_weights: str = "auto"  # "auto" | "full" | "reduced": INT8 weight range (see quantize.int8_weight_plan)
    graph_precision: dict[str, str] = field(default_factory=dict)  # per-graph overrides of the policy
    exclude_modules: tuple[str, ...] = ()  # module-name regexes kept in fp32
    build_engines: bool = True  # target tensorrt: False writes the TensorRT-ready graphs only
    force: bool = False  # export every graph even if unchanged
    tolerances: Tolerances = field(default_factory=Tolerances)
    video: tuple[int, int, int] | None = None  # (frames, height, width) of the VAE graph; default: config
    check_steps: int = 32  # greedy decode steps compared end to end
    ddim_steps: int = 3
    source: dict = field(default_factory=dict)  # where the weights came from, for the manifest


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "haplo": haplo.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _code_digest() -> str:
    digest = hashlib.sha256()
    export_code = sorted(Path(graphs.__file__).parent.glob("*.py"))
    for path in export_code + [Path(haplo.__file__).parent / "model" / f for f in CODE_FILES]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def content_hash(
    spec: GraphSpec,
    config_json: str,
    options: BuildOptions,
    code: str,
    versions: dict,
    precision: str = "fp32",
    calibration: str = "",
) -> str:
    """Changes when anything that shapes the exported graph changes (`calibration`: what the
    quantization of a low-precision graph depends on beyond the weights)."""
    digest = hashlib.sha256()
    low = "" if precision == "fp32" else f"{precision}/{options.target}/{options.exclude_modules}/{calibration}"
    for part in (
        spec.name,
        config_json,
        str(options.decomposed),
        str(graphs.OPSET),
        code,
        low,
        json.dumps({k: versions[k] for k in ("torch", "onnx", "onnxscript")}),
    ):
        digest.update(part.encode())
    for name, tensor in sorted(spec.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, sample in spec.inputs.items():
        digest.update(f"{name}{list(sample.shape)}{sample.dtype}".encode())
    return digest.hexdigest()


def describe_io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(value):
        t = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim],
        }

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]


def _previous_graphs(out: Path) -> dict:
    try:
        previous = Bundle.open(out, verify=False)
    except BundleError:
        return {}
    return {name: (previous, entry) for name, entry in previous.graphs.items()}


def _reuse(entry: dict, previous: Bundle, tmp: Path) -> bool:
    files = [entry["file"]] + ([entry["data"]] if entry.get("data") else [])
    for rel in files:
        src = previous.path(rel)
        if not src.exists() or sha256_file(src) != previous.manifest["files"].get(rel):
            return False
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(previous.path(rel), tmp / rel)
    return True


def _write_report(tmp: Path, manifest: dict, parity: dict) -> None:
    lines = [
        f"{REPORT_TITLE}: {manifest['source'].get('name', '')}",
        "",
        f"precision {manifest['precision']}, opset {manifest['opset']}, "
        f"custom ops {'off (decomposed)' if manifest['custom_ops']['decomposed'] else 'on'}",
        "",
        "| graph | max abs error | cosine | finite | status |",
        "|---|---|---|---|---|",
    ]
    for name, result in parity["graphs"].items():
        status = "ok" if result["ok"] else "FAIL: " + "; ".join(result["problems"])
        lines.append(
            f"| {name} | {result['max_abs_error']:.3g} | {result['cosine']:.7f} | {result['finite']} | {status} |"
        )
    quant = manifest["quantization"]
    if quant["accuracy"]:
        lines += [
            "",
            f"## {manifest['precision']} accuracy (against fp32 PyTorch)",
            "",
            f"policy {json.dumps(quant['policy'])}, INT8 activations for {quant['flavor']}, "
            f"kept in fp32 by pattern: {quant['exclude'] or 'none'}",
            "",
            "| graph | precision | matmuls | weight rel. error (max) | max abs error | cosine | inputs |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in quant["accuracy"].items():
            werr = r.get("weight_relative_error_max")
            lines.append(
                f"| {name} | {r['precision']} | {r.get('matmuls', '-')} | "
                f"{'-' if werr is None else f'{werr:.3g}'} | {r['max_abs_error']:.3g} | {r['cosine']:.6f} | "
                f"{r['inputs']} |"
            )
    und, gen = parity["understanding"], parity["generation"]
    lines += [
        "",
        f"Understanding: teacher-forced greedy agreement {und['agreement']:.1%} over {und['steps']} "
        f"steps (torch vs ONNX Runtime).",
        f"Generation: latents after {gen['steps']} guided DDIM steps, max abs error "
        f"{gen['max_abs_error']:.3g}, cosine {gen['cosine']:.7f}"
        + (f", decoded video PSNR {gen['video_psnr_db']:.1f} dB." if gen.get("video_psnr_db") else "."),
        "",
        f"Tolerances: {json.dumps(parity['tolerances'])}",
        "",
    ]
    (tmp / "report.md").write_text("\n".join(lines))


def check_output(out: Path) -> None:
    """Refuse, before any work, a target that is not absent, empty or a bundle this tool made."""
    check_output_dir(out, is_bundle, "bundle")


def check_latent_shape(latent_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The latent size of the end-to-end checks and calibration: the deployment size capped at
    CHECK_LATENT (frames, h, w). The decoder graphs are dynamic, so a small size checks the same
    graphs, whatever video the VAE graph is built for (49 x 480 x 720 is 17,550 latent tokens)."""
    frames, channels, h, w = latent_shape
    return min(frames, CHECK_LATENT[0]), channels, min(h, CHECK_LATENT[1]), min(w, CHECK_LATENT[2])


class Engines(Protocol):
    """What a build needs from the engines layer; the caller passes it in (e.g.
    `haplo.engines.bundle_engines.BundleEngines`), so export never imports engines."""

    def open_backend(self, bundle: Bundle, optimization: str) -> Backend:
        """The (staged) bundle on ONNX Runtime at an optimisation level, for the end-to-end checks."""
        ...

    def build_engines(self, root: Path, manifest: dict, log: Callable[[str], None]) -> dict:
        """TensorRT engines for the staged bundle at `root`; returns the manifest's `engines` entry."""
        ...


def build_bundle(
    model, vae, tokenizer, options: BuildOptions, engines: Engines, log: Callable[[str], None] = print
) -> dict:
    """Export, validate and write a bundle at `options.out`; `vae=None` leaves the VAE graph out.
    Returns the manifest. The bundle appears at `out` only when every check passed."""
    started = time.perf_counter()
    out = Path(options.out)
    check_output(out)
    plan = _plan(model, vae, tokenizer, options, out)
    tmp = staging_dir(out)
    try:
        ranges, eval_feeds = _calibrate(model, plan, log)
        entries, parity_graphs, accuracy = _export_all(plan, ranges, eval_feeds, options, tmp, log)
        save_file(
            {"image_newline": model.model.image_newline.detach().float().contiguous()},
            str(tmp / "constants.safetensors"),
        )
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        manifest = _manifest(model, vae, plan, options, entries, accuracy, ranges)
        _write_manifest(tmp, manifest)  # the end-to-end checks open the bundle as written so far
        parity, failures = _check_end_to_end(model, vae, plan, options, tmp, engines, parity_graphs, accuracy, log)
        manifest["parity"] = _parity_summary(parity, accuracy, failures)
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        _write_report(tmp, manifest, parity)
        if failures:
            report = _keep_failed_report(tmp, out)
            raise ParityError(
                "parity check failed: " + " | ".join(failures) + f" (report: {report}; loosen "
                "the budgets with --atol/--min-cosine/--min-token-agreement or --quant-min-* only if "
                "this is expected, or keep a graph in fp32 with --graph-precision NAME=fp32)"
            )
        if options.target == "tensorrt" and options.build_engines:
            log("building TensorRT engines (plugins for haplo nodes, prefill and decode profiles)")
            manifest["engines"] = engines.build_engines(tmp, manifest, log)
        _write_manifest(tmp, manifest)
        check_output(out)  # again: the build took minutes, and `out` may have changed meanwhile
        swap_into_place(tmp, out)
        return manifest
    except BaseException:
        discard_staging(tmp)
        raise


@dataclass
class _Plan:
    """What a build will do, settled before any export."""

    video: tuple[int, int, int] | None  # the VAE graph's (frames, height, width); None: no VAE graph
    latent_shape: tuple[int, int, int, int]  # deployment latents (frames, C, h, w)
    check_shape: tuple[int, int, int, int]  # end-to-end checks and calibration
    specs: list[GraphSpec]
    policy: dict[str, str]
    int8_weights: dict | None
    previous: dict
    processor: object
    versions: dict
    config_json: str
    code: str


def _plan(model, vae, tokenizer, options: BuildOptions, out: Path) -> _Plan:
    gen = model.config.video_generation
    video = options.video or (gen.num_frames, gen.height, gen.width)
    latent_shape = gen.latent_shape(*video)
    specs = graph_specs(model, vae, latent_shape)
    policy = quantize.resolve_policy(options.precision, options.graph_precision)
    unknown = sorted(set(policy) - {spec.name for spec in specs})
    if unknown:
        raise quantize.QuantizationError(
            f"--graph-precision names unknown graph(s) {', '.join(unknown)}; "
            f"graphs: {', '.join(spec.name for spec in specs)}"
        )
    int8 = "int8" in policy.values()
    return _Plan(
        video if vae is not None else None,
        latent_shape,
        check_latent_shape(latent_shape),
        specs,
        policy,
        quantize.int8_weight_plan(options.int8_weights, options.target) if int8 else None,
        {} if options.force else _previous_graphs(out),
        HaploOmniProcessor(tokenizer, model.config),
        library_versions(),
        json.dumps(model.config.to_dict(), sort_keys=True),
        _code_digest(),
    )


def _calibrate(model, plan: _Plan, log) -> tuple[dict | None, dict]:
    """Activation ranges and held-out evaluation feeds, when some graph is quantized."""
    if all(p == "fp32" for p in plan.policy.values()):
        return None, {}
    log(f"calibrating: prompts with images, greedy decoding, guided DDIM at latents {list(plan.check_shape)} (PyTorch)")
    t0 = time.perf_counter()
    ranges = quantize.calibrate(model, plan.processor, plan.check_shape)
    config = model.config
    layers = {
        stage: [i for i in range(config.num_layers) if config.stage_of_layer(i) == stage]
        for stage in ("pre", "base", "post")
    }
    eval_feeds = quantize.evaluation_feeds(model, plan.processor, plan.check_shape, layers)
    log(f"calibrated {len(ranges)} linear layers in {time.perf_counter() - t0:.1f}s")
    return ranges, eval_feeds


def _export_all(plan: _Plan, ranges, eval_feeds, options: BuildOptions, tmp: Path, log):
    entries, parity_graphs, accuracy = {}, {}, {}
    for i, spec in enumerate(plan.specs, 1):
        t0 = time.perf_counter()
        precision = plan.policy.get(spec.name, "fp32")
        entry, result, action = _export_one(spec, precision, plan, ranges, options, tmp, log)
        parity_graphs[spec.name] = result
        line = (
            f"[{i}/{len(plan.specs)}] {spec.name}: {action} in {time.perf_counter() - t0:.1f}s, "
            f"export max abs error {result['max_abs_error']:.2g}, cosine {result['cosine']:.6f}"
        )
        if precision != "fp32":
            accuracy[spec.name] = _graph_accuracy(
                spec, tmp / entry["file"], eval_feeds, precision, entry.get("quantization"), check_level(plan, options)
            )
            line += (
                f"; {precision} vs fp32: cosine {accuracy[spec.name]['cosine']:.6f}, "
                f"max abs error {accuracy[spec.name]['max_abs_error']:.2g}"
            )
        entries[spec.name] = entry
        log(line + ("" if result["ok"] else "  FAIL: " + "; ".join(result["problems"])))
    return entries, parity_graphs, accuracy


def _export_one(spec: GraphSpec, precision: str, plan: _Plan, ranges, options: BuildOptions, tmp: Path, log):
    """One graph: reused from the previous bundle when its content hash matches, else exported,
    validated in fp32 and rewritten to its precision. Returns (manifest entry, fp32 check, action)."""
    rel = f"graphs/{spec.name}.onnx"
    calibration = f"{plan.check_shape}/{(plan.int8_weights or {}).get('max') if precision == 'int8' else ''}"
    digest = content_hash(spec, plan.config_json, options, plan.code, plan.versions, precision, calibration)
    prior = plan.previous.get(spec.name)
    if prior and prior[1].get("content_hash") == digest and _reuse(prior[1], prior[0], tmp):
        action, result, rewrite = "reused", prior[1].get("export_check"), prior[1].get("quantization")
        if result is None:  # bundles of an older layout
            result = validate_graph(spec, tmp / rel, options.tolerances)
    else:
        if spec.name == "vae_decoder":  # static: exported and checked at the video size, which can take minutes
            frames, height, width = plan.video
            log(f"{spec.name}: exporting and checking at {frames} frames of {height}x{width} ...")
        export_graph(spec, tmp / rel, options.decomposed)
        action, rewrite = "exported", None
        result = validate_graph(spec, tmp / rel, options.tolerances)  # the exporter, in fp32
        if precision != "fp32":
            rewrite = quantize.quantize_graph_file(
                tmp / rel, precision, ranges, options.target, options.exclude_modules, plan.int8_weights
            )
            action += f", {precision} ({rewrite['matmuls']} matmuls)"
    proto = onnx.load(str(tmp / rel), load_external_data=False)
    inputs, outputs = describe_io(proto)
    entry = {
        "file": rel,
        "data": f"{rel}.data" if (tmp / f"{rel}.data").exists() else None,
        "inputs": inputs,
        "outputs": outputs,
        "precision": precision,
        "layers": spec.layers,
        "content_hash": digest,
        "custom_ops": sorted({n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}),
        "export_check": {k: v for k, v in result.items() if k != "outputs"},
    }
    if rewrite is not None:
        entry["quantization"] = rewrite
    return entry, result, action


def ort_level(policy: dict[str, str], target: str) -> str:
    """ONNX Runtime's optimisation level for the bundle. FP8 Q/DQ, and the TensorRT flavour of INT8,
    run at the basic level: Q/DQ then execute as written (dequantize, fp32 matmul), the exact
    semantics TensorRT implements, on any CPU. ONNX Runtime's own INT8 flavour runs fully optimised,
    where its integer kernels take the Q/DQ pairs."""
    lowp = set(policy.values())
    return "ORT_ENABLE_BASIC" if "fp8" in lowp or ("int8" in lowp and target == "tensorrt") else "ORT_ENABLE_ALL"


def check_level(plan: _Plan, options: BuildOptions) -> str:
    """The level the build's own checks run at: the bundle's, except for full-range INT8 on a CPU that
    would saturate it, where Q/DQ run as written, computing what the CPUs the bundle is for compute."""
    if (plan.int8_weights or {}).get("range") == "full" and not cpu_info().int8_dot_int32:
        return "ORT_ENABLE_BASIC"
    return ort_level(plan.policy, options.target)


def _manifest(model, vae, plan: _Plan, options: BuildOptions, entries: dict, accuracy: dict, ranges) -> dict:
    config = model.config
    quantization = {
        **quantize.QuantizeOptions(options.precision, options.target, plan.policy, options.exclude_modules).to_dict(),
        "int8_weights": plan.int8_weights,
        "calibration": _calibration_summary(ranges, plan.check_shape),
        "accuracy": accuracy,
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "precision": options.precision,
        "target": options.target,
        "onnxruntime_optimization": ort_level(plan.policy, options.target),
        "quantization": quantization,
        "requirements": _requirements(entries),
        "build_machine": _build_machine(),
        "source": options.source,
        "model": config.to_dict(),
        "opset": graphs.OPSET,
        "custom_ops": {
            "domain": custom_ops.DOMAIN,
            "version": custom_ops.DOMAIN_VERSION,
            "decomposed": options.decomposed,
        },
        "graphs": entries,
        "constants": "constants.safetensors",
        "tokenizer": "tokenizer",
        "vae": None,
        "versions": plan.versions,
    }
    if vae is not None:
        manifest["vae"] = {
            "latent_shape": list(plan.latent_shape),
            "video": list(plan.video),
            "scaling_factor": float(vae.config.scaling_factor),
        }
    return manifest


def _build_machine() -> dict:
    return {"cpu": cpu_info().to_dict()}


def _check_end_to_end(
    model,
    vae,
    plan: _Plan,
    options: BuildOptions,
    tmp: Path,
    engines: Engines,
    parity_graphs: dict,
    accuracy: dict,
    log,
) -> tuple[dict, list[str]]:
    """Greedy decoding and guided DDIM, torch against ONNX Runtime on the bundle as written."""
    log(f"checking end to end: greedy decoding and DDIM at latents {list(plan.check_shape)}, torch vs ONNX Runtime")
    torch_backend = TorchBackend(model, vae)
    ort_backend = engines.open_backend(Bundle.open(tmp, verify=False), check_level(plan, options))
    understanding = token_agreement(
        torch_backend, ort_backend, _understanding_sample(plan.processor), options.check_steps
    )
    prompt = plan.processor.process_prompt_for_generation(["a red square moves from left to right"], "")
    noise = torch.randn((1, *plan.check_shape), generator=torch.Generator().manual_seed(0))
    lowp = options.precision != "fp32" or bool(accuracy)
    decode = lowp and plan.video is not None and plan.check_shape == plan.latent_shape
    generation = ddim_parity(
        torch_backend,
        ort_backend,
        prompt["input_ids"],
        prompt["attention_mask"],
        noise,
        options.ddim_steps,
        decode=decode,
    )
    generation["latent_shape"] = list(plan.check_shape)
    if lowp and not decode:
        generation["video_psnr_note"] = (
            "not measured: no VAE graph"
            if plan.video is None
            else f"not measured: the VAE graph is built for latents {list(plan.latent_shape)}"
        )
    parity = {
        "graphs": parity_graphs,
        "understanding": understanding,
        "generation": generation,
        "tolerances": options.tolerances.to_dict(),
    }
    return parity, _failures(parity, accuracy, lowp, options.tolerances)


def _failures(parity: dict, accuracy: dict, lowp: bool, tol: Tolerances) -> list[str]:
    understanding, generation = parity["understanding"], parity["generation"]
    failures = [f"{n} (export): {'; '.join(r['problems'])}" for n, r in parity["graphs"].items() if not r["ok"]]
    failures += [
        f"{n} ({r['precision']}): cosine {r['cosine']:.5f} < {tol.quant_min_cosine}"
        for n, r in accuracy.items()
        if r["cosine"] < tol.quant_min_cosine
    ]
    min_agreement = tol.quant_min_token_agreement if lowp else tol.min_token_agreement
    if understanding["agreement"] < min_agreement:
        failures.append(f"greedy token agreement {understanding['agreement']:.1%} < {min_agreement:.1%}")
    if lowp and generation["cosine"] < tol.quant_min_latent_cosine:
        failures.append(f"DDIM latent cosine {generation['cosine']:.5f} < {tol.quant_min_latent_cosine}")
    if not lowp and generation["max_abs_error"] > tol.ddim_atol:
        failures.append(f"DDIM latents max abs error {generation['max_abs_error']:.3g} > {tol.ddim_atol:g}")
    return failures


def _parity_summary(parity: dict, accuracy: dict, failures: list[str]) -> dict:
    graphs_, und, gen = parity["graphs"], parity["understanding"], parity["generation"]
    return {
        "ok": not failures,
        "failures": failures,
        "max_abs_error": {n: r["max_abs_error"] for n, r in graphs_.items()},
        "cosine": {n: r["cosine"] for n, r in graphs_.items()},
        "token_agreement": und["agreement"],
        "ddim_max_abs_error": gen["max_abs_error"],
        "ddim_cosine": gen["cosine"],
        "ddim_latent_shape": gen["latent_shape"],
        "video_psnr_db": gen.get("video_psnr_db"),
        "quantized_cosine": {n: r["cosine"] for n, r in accuracy.items()},
    }


def _keep_failed_report(tmp: Path, out: Path) -> Path:
    """The report of a failed build, beside the target; never over a file this tool did not write."""
    report = out.with_name(out.name + ".failed-report.md")
    if report.exists() and not report.read_text(errors="replace").startswith(REPORT_TITLE):
        report = out.with_name(f"{out.name}.failed-report-{uuid.uuid4().hex[:8]}.md")
    write_atomic(report, (tmp / "report.md").read_bytes())
    return report


def _graph_accuracy(
    spec: GraphSpec, path: Path, eval_feeds: dict, precision: str, rewrite: dict | None, ort_level: str
) -> dict:
    """A low-precision graph against the fp32 PyTorch module, on real pipeline inputs for decoders."""
    session = cpu_session(path, ort_level)
    stage = {v: k for k, v in STAGE_GRAPHS.items()}.get(spec.name)
    if stage is not None and eval_feeds.get(stage):
        feeds, source = eval_feeds[stage], "pipeline inputs (held-out prompts, decode and DDIM steps)"
    else:
        feeds = [{k: v.numpy() for k, v in sample.items()} for sample in (spec.inputs, spec.check_inputs) if sample]
        source = "export samples"
    result = quantize.graph_accuracy(lambda feed: session.run(None, feed), spec.module, feeds)
    result = {**result, "precision": precision, "inputs": source, **(rewrite or {})}
    if result["cosine"] < 0.999:
        result["note"] = quantize.shortfall_note(precision, rewrite)
    return result


def _calibration_summary(ranges: dict | None, latent_shape: tuple) -> dict | None:
    if ranges is None:
        return None
    prompts, captions = quantize.calibration_prompts()
    return {
        "linear_layers": len(ranges),
        "understanding_prompts": len(prompts),
        "generation_prompts": len(captions),
        "latent_shape": list(latent_shape),
        "method": "min/max of every nn.Linear input over the real pipeline (PyTorch, fp32)",
    }


def _requirements(entries: dict) -> dict:
    """What a server needs to load these graphs (also what TensorRT needs for plugins)."""
    ops = sorted({op for entry in entries.values() for op in entry["custom_ops"]})
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


def _understanding_sample(processor) -> dict:
    """A prompt with one image, through the real processor."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[10:30, 20:50] = (220, 40, 40)
    conversation = [{"role": "user", "content": "<image>\nWhat moves, and where?"}]
    return processor(conversations=[conversation], images=[Image.fromarray(pixels)])


def _write_manifest(tmp: Path, manifest: dict) -> None:
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, STAGING_MARKER):
            files[path.relative_to(tmp).as_posix()] = sha256_file(path)
    manifest["files"] = files
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
