"""Export or reuse: a graph whose content hash matches the previous bundle at the same path is copied.

The hash covers what shapes an exported graph: its weights, the model config, the export options,
the exporter and model code, and the versions of torch, onnx and onnxscript (`content_hash`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import torch

import haplo
from haplo.artifacts import sha256_file
from haplo.bundle import Bundle, BundleError, GraphEntry
from haplo.export import graphs
from haplo.export.graphs import GraphSpec

MODEL_CODE = ["ops.py", "layers.py", "modeling.py", "sequence.py"]  # haplo/model code a graph depends on
LIBRARIES = ["torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers", "numpy"]


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "haplo": haplo.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_digest() -> str:
    """sha256 of the export code (this package, quantization included) and the model code graphs trace."""
    digest = hashlib.sha256()
    export_code = sorted(Path(graphs.__file__).parent.rglob("*.py"))
    for path in export_code + [Path(haplo.__file__).parent / "model" / f for f in MODEL_CODE]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def content_hash(spec: GraphSpec, config_json: str, export: dict, code: str, versions: dict) -> str:
    """Changes when anything that shapes the exported graph changes. `export`: the export options
    and, for a low-precision graph, what its quantization depends on beyond the weights."""
    digest = hashlib.sha256()
    for part in (
        spec.name,
        config_json,
        json.dumps(export, sort_keys=True),
        str(graphs.OPSET),
        code,
        json.dumps({k: versions[k] for k in ("torch", "onnx", "onnxscript")}),
    ):
        digest.update(part.encode())
    for name, tensor in sorted(spec.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, sample in spec.inputs.items():
        digest.update(f"{name}{list(sample.shape)}{sample.dtype}".encode())
    return digest.hexdigest()


def previous_graphs(out: Path) -> dict[str, tuple[Bundle, GraphEntry]]:
    """The graphs of the bundle already at `out` (none if there is no readable bundle)."""
    try:
        previous = Bundle.open(out, verify=False)
    except BundleError:
        return {}
    return {name: (previous, entry) for name, entry in previous.graphs.items()}


def reuse(entry: GraphEntry, previous: Bundle, tmp: Path) -> bool:
    """Copy a previous graph's files into the staging directory if they are intact."""
    files = [entry.file] + ([entry.data] if entry.data else [])
    for rel in files:
        src = previous.path(rel)
        if not src.exists() or sha256_file(src) != previous.manifest.files.get(rel):
            return False
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(previous.path(rel), tmp / rel)
    return True
