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
from haplo.engines.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, BundleError, sha256_file
from haplo.export import custom_ops, graphs
from haplo.export.graphs import GraphSpec, export_graph, graph_specs
from haplo.export.validate import ParityError, Tolerances, ddim_parity, token_agreement, validate_graph

CODE_FILES = ["ops.py", "layers.py", "modeling.py"]  # model code a graph depends on, besides export/
LIBRARIES = ["torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers", "numpy"]


@dataclass
class BuildOptions:
    out: Path
    decomposed: bool = False  # standard ops only, no `haplo` nodes
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


def content_hash(spec: GraphSpec, config_json: str, options: BuildOptions, code: str, versions: dict) -> str:
    """Changes when anything that shapes the exported graph changes."""
    digest = hashlib.sha256()
    for part in (spec.name, config_json, str(options.decomposed), str(graphs.OPSET), code,
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
    und, gen = parity["understanding"], parity["generation"]
    lines += ["", f"Understanding: teacher-forced greedy agreement {und['agreement']:.1%} over {und['steps']} "
              f"steps (torch vs ONNX Runtime).",
              f"Generation: latents after {gen['steps']} guided DDIM steps, max abs error "
              f"{gen['max_abs_error']:.3g}, cosine {gen['cosine']:.7f}.", "",
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
        entries, parity_graphs = {}, {}
        for i, spec in enumerate(specs, 1):
            rel = f"graphs/{spec.name}.onnx"
            digest = content_hash(spec, config_json, options, code, versions)
            prior = previous.get(spec.name)
            t0 = time.perf_counter()
            if prior and prior[1].get("content_hash") == digest and _reuse(spec.name, prior[1], prior[0], tmp):
                proto, action = onnx.load(str(tmp / rel), load_external_data=False), "reused"
            else:
                proto, action = export_graph(spec, tmp / rel, options.decomposed), "exported"
            result = validate_graph(spec, tmp / rel, options.tolerances)
            parity_graphs[spec.name] = result
            inputs, outputs = describe_io(proto)
            data = tmp / f"{rel}.data"
            entries[spec.name] = {
                "file": rel, "data": f"{rel}.data" if data.exists() else None, "inputs": inputs, "outputs": outputs,
                "precision": "fp32", "layers": spec.layers, "content_hash": digest,
                "custom_ops": sorted({n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}),
            }
            log(f"[{i}/{len(specs)}] {spec.name}: {action} in {time.perf_counter() - t0:.1f}s, "
                f"max abs error {result['max_abs_error']:.2g}, cosine {result['cosine']:.6f}"
                + ("" if result["ok"] else "  FAIL: " + "; ".join(result["problems"])))

        save_file({"image_newline": model.model.image_newline.detach().float().contiguous()},
                  str(tmp / "constants.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "precision": "fp32",
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
        processor = HaploOmniProcessor(tokenizer, config)
        inputs = _understanding_sample(processor, config)
        understanding = token_agreement(torch_backend, ort_backend, inputs, options.check_steps)
        prompt = processor.process_prompt_for_generation(["a red square moves from left to right"], "")
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(0))
        generation = ddim_parity(torch_backend, ort_backend, prompt["input_ids"], prompt["attention_mask"], noise,
                                 options.ddim_steps)
        parity = {"graphs": parity_graphs, "understanding": understanding, "generation": generation,
                  "tolerances": options.tolerances.to_dict()}
        failures = [f"{n}: {'; '.join(r['problems'])}" for n, r in parity_graphs.items() if not r["ok"]]
        if understanding["agreement"] < options.tolerances.min_token_agreement:
            failures.append(f"greedy token agreement {understanding['agreement']:.1%} < "
                            f"{options.tolerances.min_token_agreement:.1%}")
        if generation["max_abs_error"] > options.tolerances.ddim_atol:
            failures.append(f"DDIM latents max abs error {generation['max_abs_error']:.3g} > "
                            f"{options.tolerances.ddim_atol:g}")
        manifest["parity"] = {
            "ok": not failures,
            "max_abs_error": {n: r["max_abs_error"] for n, r in parity_graphs.items()},
            "cosine": {n: r["cosine"] for n, r in parity_graphs.items()},
            "token_agreement": understanding["agreement"], "ddim_max_abs_error": generation["max_abs_error"],
        }
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        _write_report(tmp, manifest, parity)
        if failures:
            raise ParityError("parity check failed: " + " | ".join(failures) +
                              " (loosen with --atol/--min-cosine/--min-token-agreement only if this is expected)")
        _write_manifest(tmp, manifest)
        _replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    staged = tmp / f".{MANIFEST}.tmp"
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staged, tmp / MANIFEST)


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place; the old one (if any) goes only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
