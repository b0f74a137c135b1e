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
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

import haplo
from haplo.engines.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, BundleError, sha256_file, write_atomic
from haplo.export import custom_ops, graphs, quantize
from haplo.export.graphs import GraphSpec, export_graph, graph_specs
from haplo.export.validate import ParityError, Tolerances, ddim_parity, token_agreement, validate_graph

CODE_FILES = ["ops.py", "layers.py", "modeling.py"]  # model code a graph depends on, besides export/
LIBRARIES = ["torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers", "numpy"]


@dataclass
class BuildOptions:
    out: Path
    decomposed: bool = False  # standard ops only, no `haplo` nodes
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | fp8 (see haplo.export.quantize)
    target: str = "onnxruntime"  # who runs the graphs: "onnxruntime" | "tensorrt" (INT8 activation scheme)
    graph_precision: dict[str, str] = field(default_factory=dict)  # per-graph overrides of the policy
    exclude_modules: tuple[str, ...] = ()  # module-name regexes kept in fp32
    build_engines: bool = True  # target tensorrt: False writes the TensorRT-ready graphs only
    engine_ranges: object = None  # haplo.engines.tensorrt.ShapeRanges for --target tensorrt
    engine_options: object = None  # haplo.engines.tensorrt.BuildOptions
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
    for path in export_code + [Path(haplo.__file__).parent / f for f in CODE_FILES]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def content_hash(spec: GraphSpec, config_json: str, options: BuildOptions, code: str, versions: dict,
                 precision: str = "fp32") -> str:
    """Changes when anything that shapes the exported graph changes."""
    digest = hashlib.sha256()
    low = "" if precision == "fp32" else f"{precision}/{options.target}/{options.exclude_modules}"
    for part in (spec.name, config_json, str(options.decomposed), str(graphs.OPSET), code, low,
                 json.dumps({k: versions[k] for k in ("torch", "onnx", "onnxscript")})):
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
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]


def _previous_graphs(out: Path) -> dict:
    try:
        previous = Bundle.open(out, verify=False)
    except BundleError:
        return {}
    return {name: (previous, entry) for name, entry in previous.graphs.items()}


def _reuse(name: str, entry: dict, previous: Bundle, tmp: Path) -> bool:
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
    lines = [f"# Bundle report: {manifest['source'].get('name', '')}", "",
             f"precision {manifest['precision']}, opset {manifest['opset']}, "
             f"custom ops {'off (decomposed)' if manifest['custom_ops']['decomposed'] else 'on'}", "",
             "| graph | max abs error | cosine | finite | status |", "|---|---|---|---|---|"]
    for name, result in parity["graphs"].items():
        status = "ok" if result["ok"] else "FAIL: " + "; ".join(result["problems"])
        lines.append(f"| {name} | {result['max_abs_error']:.3g} | {result['cosine']:.7f} | {result['finite']} | "
                     f"{status} |")
    quant = manifest["quantization"]
    if quant["accuracy"]:
        lines += ["", f"## {manifest['precision']} accuracy (against fp32 PyTorch)", "",
                  f"policy {json.dumps(quant['policy'])}, INT8 activations for {quant['flavor']}, "
                  f"kept in fp32 by pattern: {quant['exclude'] or 'none'}", "",
                  "| graph | precision | matmuls | weight rel. error (max) | max abs error | cosine | inputs |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in quant["accuracy"].items():
            werr = r.get("weight_relative_error_max")
            lines.append(f"| {name} | {r['precision']} | {r.get('matmuls', '-')} | "
                         f"{'-' if werr is None else f'{werr:.3g}'} | {r['max_abs_error']:.3g} | {r['cosine']:.6f} | "
                         f"{r['inputs']} |")
    und, gen = parity["understanding"], parity["generation"]
    lines += ["", f"Understanding: teacher-forced greedy agreement {und['agreement']:.1%} over {und['steps']} "
              f"steps (torch vs ONNX Runtime).",
              f"Generation: latents after {gen['steps']} guided DDIM steps, max abs error "
              f"{gen['max_abs_error']:.3g}, cosine {gen['cosine']:.7f}"
              + (f", decoded video PSNR {gen['video_psnr_db']:.1f} dB." if gen.get("video_psnr_db") else "."), "",
              f"Tolerances: {json.dumps(parity['tolerances'])}", ""]
    (tmp / "report.md").write_text("\n".join(lines))


def build_bundle(model, vae, tokenizer, options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Export, validate and write a bundle at `options.out`. Returns the manifest."""
    from haplo.backend import TorchBackend
    from haplo.engines.onnxruntime import OrtBackend
    from haplo.processor import HaploOmniProcessor

    started = time.perf_counter()
    out = Path(options.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = model.config
        gen = config.video_generation
        frames, height, width = options.video or (gen.num_frames, gen.height, gen.width)
        latent_shape = gen.latent_shape(frames, height, width)
        specs = graph_specs(model, vae, latent_shape)
        versions = library_versions()
        config_json = json.dumps(config.to_dict(), sort_keys=True)
        code = _code_digest()
        previous = {} if options.force else _previous_graphs(out)
        policy = quantize.resolve_policy(options.precision, options.graph_precision)
        unknown = sorted(set(policy) - {spec.name for spec in specs})
        if unknown:
            raise quantize.QuantizationError(f"--graph-precision names unknown graph(s) {', '.join(unknown)}; "
                                             f"graphs: {', '.join(spec.name for spec in specs)}")
        processor = HaploOmniProcessor(tokenizer, config)
        ranges, eval_feeds = None, {}
        if any(p != "fp32" for p in policy.values()):
            log(f"calibrating {options.precision}: prompts with images, greedy decoding, guided DDIM (PyTorch)")
            t0 = time.perf_counter()
            ranges = quantize.calibrate(model, processor, latent_shape)
            layers = {stage: [i for i in range(config.num_layers) if config.stage_of_layer(i) == stage]
                      for stage in ("pre", "base", "post")}
            eval_feeds = quantize.evaluation_feeds(model, processor, latent_shape, layers)
            log(f"calibrated {len(ranges)} linear layers in {time.perf_counter() - t0:.1f}s")
        ort_level = "ORT_ENABLE_BASIC" if "fp8" in policy.values() else "ORT_ENABLE_ALL"
        entries, parity_graphs, accuracy = {}, {}, {}
        for i, spec in enumerate(specs, 1):
            rel = f"graphs/{spec.name}.onnx"
            precision = policy.get(spec.name, "fp32")
            digest = content_hash(spec, config_json, options, code, versions, precision)
            prior = previous.get(spec.name)
            t0 = time.perf_counter()
            if prior and prior[1].get("content_hash") == digest and _reuse(spec.name, prior[1], prior[0], tmp):
                action = "reused"
                result, rewrite = prior[1].get("export_check"), prior[1].get("quantization")
                if result is None:  # bundles of an older layout
                    result = validate_graph(spec, tmp / rel, options.tolerances)
            else:
                export_graph(spec, tmp / rel, options.decomposed)
                action = "exported"
                result = validate_graph(spec, tmp / rel, options.tolerances)  # the exporter, in fp32
                rewrite = None
                if precision != "fp32":
                    rewrite = quantize.quantize_graph_file(tmp / rel, precision, ranges, options.target,
                                                           options.exclude_modules)
                    action += f", {precision} ({rewrite['matmuls']} matmuls)"
            proto = onnx.load(str(tmp / rel), load_external_data=False)
            parity_graphs[spec.name] = result
            line = (f"[{i}/{len(specs)}] {spec.name}: {action} in {time.perf_counter() - t0:.1f}s, "
                    f"export max abs error {result['max_abs_error']:.2g}, cosine {result['cosine']:.6f}")
            if precision != "fp32":
                accuracy[spec.name] = _graph_accuracy(spec, tmp / rel, eval_feeds, precision, rewrite, ort_level)
                line += (f"; {precision} vs fp32: cosine {accuracy[spec.name]['cosine']:.6f}, "
                         f"max abs error {accuracy[spec.name]['max_abs_error']:.2g}")
            inputs, outputs = describe_io(proto)
            data = tmp / f"{rel}.data"
            entries[spec.name] = {
                "file": rel, "data": f"{rel}.data" if data.exists() else None, "inputs": inputs, "outputs": outputs,
                "precision": precision, "layers": spec.layers, "content_hash": digest,
                "custom_ops": sorted({n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}),
            }
            entries[spec.name]["export_check"] = {k: v for k, v in result.items() if k != "outputs"}
            if rewrite is not None:
                entries[spec.name]["quantization"] = rewrite
            log(line + ("" if result["ok"] else "  FAIL: " + "; ".join(result["problems"])))

        save_file({"image_newline": model.model.image_newline.detach().float().contiguous()},
                  str(tmp / "constants.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "precision": options.precision,
            "target": options.target, "onnxruntime_optimization": ort_level,
            "quantization": {**quantize.QuantizeOptions(options.precision, options.target, policy,
                                                        options.exclude_modules).to_dict(),
                             "calibration": _calibration_summary(ranges), "accuracy": accuracy},
            "requirements": _requirements(entries),
            "source": options.source, "model": config.to_dict(), "opset": graphs.OPSET,
            "custom_ops": {"domain": custom_ops.DOMAIN, "version": custom_ops.DOMAIN_VERSION,
                           "decomposed": options.decomposed},
            "graphs": entries, "constants": "constants.safetensors", "tokenizer": "tokenizer",
            "vae": {"latent_shape": list(latent_shape), "video": [frames, height, width],
                    "scaling_factor": float(vae.config.scaling_factor)},
            "versions": versions,
        }
        # The end-to-end checks run on the bundle as written so far, as `run --bundle` will.
        _write_manifest(tmp, manifest)
        log("checking end to end: greedy decoding and DDIM, torch vs ONNX Runtime")
        torch_backend, ort_backend = TorchBackend(model, vae), OrtBackend(Bundle.open(tmp, verify=False))
        inputs = _understanding_sample(processor, config)
        understanding = token_agreement(torch_backend, ort_backend, inputs, options.check_steps)
        prompt = processor.process_prompt_for_generation(["a red square moves from left to right"], "")
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(0))
        generation = ddim_parity(torch_backend, ort_backend, prompt["input_ids"], prompt["attention_mask"], noise,
                                 options.ddim_steps, decode=options.precision != "fp32")
        parity = {"graphs": parity_graphs, "understanding": understanding, "generation": generation,
                  "tolerances": options.tolerances.to_dict()}
        tol = options.tolerances
        failures = [f"{n} (export): {'; '.join(r['problems'])}" for n, r in parity_graphs.items() if not r["ok"]]
        failures += [f"{n} ({r['precision']}): cosine {r['cosine']:.5f} < {tol.quant_min_cosine}"
                     for n, r in accuracy.items() if r["cosine"] < tol.quant_min_cosine]
        lowp = options.precision != "fp32" or bool(accuracy)
        min_agreement = tol.quant_min_token_agreement if lowp else tol.min_token_agreement
        if understanding["agreement"] < min_agreement:
            failures.append(f"greedy token agreement {understanding['agreement']:.1%} < {min_agreement:.1%}")
        if lowp and generation["cosine"] < tol.quant_min_latent_cosine:
            failures.append(f"DDIM latent cosine {generation['cosine']:.5f} < {tol.quant_min_latent_cosine}")
        if not lowp and generation["max_abs_error"] > tol.ddim_atol:
            failures.append(f"DDIM latents max abs error {generation['max_abs_error']:.3g} > {tol.ddim_atol:g}")
        manifest["parity"] = {
            "ok": not failures,
            "max_abs_error": {n: r["max_abs_error"] for n, r in parity_graphs.items()},
            "cosine": {n: r["cosine"] for n, r in parity_graphs.items()},
            "token_agreement": understanding["agreement"], "ddim_max_abs_error": generation["max_abs_error"],
            "ddim_cosine": generation["cosine"], "video_psnr_db": generation.get("video_psnr_db"),
            "quantized_cosine": {n: r["cosine"] for n, r in accuracy.items()},
        }
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        _write_report(tmp, manifest, parity)
        if failures:
            failed_report = out.with_name(out.name + ".failed-report.md")
            shutil.copyfile(tmp / "report.md", failed_report)
            raise ParityError("parity check failed: " + " | ".join(failures) + f" (report: {failed_report}; loosen "
                              "the budgets with --atol/--min-cosine/--min-token-agreement or --quant-min-* only if "
                              "this is expected, or keep a graph in fp32 with --graph-precision NAME=fp32)")
        if options.target == "tensorrt" and options.build_engines:
            from haplo.engines import tensorrt as trt_engines

            log("building TensorRT engines (plugins for haplo nodes, prefill and decode profiles)")
            manifest["engines"] = trt_engines.build_bundle_engines(
                tmp, manifest, options.engine_ranges or trt_engines.ShapeRanges(),
                options.engine_options or trt_engines.BuildOptions(), log)
        _write_manifest(tmp, manifest)
        _replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _graph_accuracy(spec: GraphSpec, path: Path, eval_feeds: dict, precision: str, rewrite: dict | None,
                    ort_level: str) -> dict:
    """A low-precision graph against the fp32 PyTorch module, on real pipeline inputs for decoders."""
    import onnxruntime as ort

    from haplo.engines.onnxruntime import session_options

    session = ort.InferenceSession(str(path), session_options(optimization=getattr(ort.GraphOptimizationLevel,
                                                                                   ort_level)),
                                   providers=["CPUExecutionProvider"])
    stage = {v: k for k, v in graphs.STAGE_GRAPHS.items()}.get(spec.name)
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


def _calibration_summary(ranges: dict | None) -> dict | None:
    if ranges is None:
        return None
    prompts, captions = quantize.calibration_prompts()
    return {"linear_layers": len(ranges), "understanding_prompts": len(prompts), "generation_prompts": len(captions),
            "method": "min/max of every nn.Linear input over the real pipeline (PyTorch, fp32)"}


def _requirements(entries: dict) -> dict:
    """What a server needs to load these graphs (also what TensorRT needs for plugins)."""
    ops = sorted({op for entry in entries.values() for op in entry["custom_ops"]})
    return {
        "onnx_opset": graphs.OPSET, "onnx_ir_version": graphs.IR_VERSION,
        "plugins": [{"name": f"{custom_ops.DOMAIN}::{op}", "namespace": custom_ops.DOMAIN, "version": "1"}
                    for op in ops],
        "notes": "ONNX Runtime runs haplo-domain nodes through their model-local functions; TensorRT binds them to "
                 "the plugins of haplo.engines.plugins (plugin_namespace 'haplo') at build time and embeds their "
                 "ahead-of-time compiled PTX in the engine, so running an engine needs no plugin library or Python.",
    }


def _understanding_sample(processor, config) -> dict:
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
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(tmp).as_posix()] = sha256_file(path)
    manifest["files"] = files
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place; the old one (if any) goes only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
