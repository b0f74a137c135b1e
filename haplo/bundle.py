"""The bundle format: what `haplo-export build` writes and servers embed, read and written here only.

bundle/
  manifest.json          a `Manifest`: format, model config, every graph (files, I/O names, dtypes,
                         dims, precision, layers), quantization, parity summary, library versions,
                         sha256 of every file; written last, inside a staging directory that is
                         swapped into place, so a half-built bundle never has one
  graphs/NAME.onnx(.data)
  engines/NAME.plan(.json) TensorRT engines and their sidecars (bundles built with --target tensorrt)
  constants.safetensors  small tensors the runtime applies itself (image_newline)
  tokenizer/             Hugging Face tokenizer files
  parity.json, report.md
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haplo.artifacts import STAGING_MARKER, foreign_files, sha256_file, write_atomic
from haplo.errors import HaploError
from haplo.model.config import HaploOmniConfig

MANIFEST = "manifest.json"
STAGE_GRAPHS = {"pre": "pre_decoder", "base": "base_decoder", "post": "post_decoder"}  # decoder stage -> graph
FORMAT = "haplo-bundle"
FORMAT_VERSION = 2  # 2: the typed manifest below (every field present; `engines` always a mapping)


class BundleError(HaploError, ValueError):
    """A directory that is not a usable bundle, with the reason and the fix."""


@dataclass
class TensorSpec:
    """One graph input or output: name, numpy dtype name, dims (ints, or the names of dynamic dims)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphEntry:
    file: str  # graphs/NAME.onnx, relative to the bundle
    data: str | None  # its external weights file, if any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str  # fp32 | fp16 | bf16 | int8 | fp8
    layers: list[int]  # global decoder layer indices (decoder stages), else []
    content_hash: str  # what shaped the graph; equal hash = the graph can be reused
    custom_ops: list[str]  # haplo-domain op types in the graph
    export_check: dict[str, Any]  # the fp32 check of the exported graph against PyTorch
    quantization: dict[str, Any] | None = None  # the Q/DQ or cast rewrite of a low-precision graph
    # dtype of the activations between the matmuls, the plugin nodes' I/O and the KV cache
    # (past_key_values.* / present.*): "float32", or "bfloat16" / "float16" (TensorRT, low precision)
    activations: str = "float32"


@dataclass
class VaeEntry:
    latent_shape: list[int]  # (frames, C, h, w) the VAE graph decodes
    video: list[int]  # (frames, height, width) it writes
    scaling_factor: float


@dataclass
class Manifest:
    precision: str
    target: str  # onnxruntime | tensorrt: who the graphs were prepared for
    onnxruntime_optimization: str  # the ONNX Runtime level the graphs need (Q/DQ semantics)
    quantization: dict[str, Any]  # policy, flavour, INT8 weight range, calibration, accuracy
    requirements: dict[str, Any]  # opset, IR version, plugins a server needs
    build_machine: dict[str, Any]
    source: dict[str, Any]  # checkpoint or preset the weights came from
    model: dict[str, Any]  # HaploOmniConfig.to_dict()
    opset: int
    custom_ops: dict[str, Any]  # domain, version, decomposed
    graphs: dict[str, GraphEntry]
    constants: str
    tokenizer: str
    vae: VaeEntry | None  # None: built without the VAE decoder graph
    versions: dict[str, Any]  # library versions of the build
    parity: dict[str, Any] = field(default_factory=dict)  # summary; the full record is parity.json
    task: dict[str, Any] = field(default_factory=dict)  # task accuracy on held-out clips (build's task check)
    build_seconds: float | None = None
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # graph -> TensorRT engine entry
    files: dict[str, str] = field(default_factory=dict)  # every file but the manifest -> sha256
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def config(self) -> HaploOmniConfig:
        return HaploOmniConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> Manifest:
        """A manifest of this format version, or BundleError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{where}: not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format {data.get('format_version')}, this tool reads "
                f"{FORMAT_VERSION}; rebuild it with this version (`haplo-export build`)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            missing, extra = sorted(names - set(data)), sorted(set(data) - names)
            raise BundleError(f"{where}: manifest fields differ (missing {missing}, unknown {extra}); rebuild it")
        try:
            graphs = {name: _graph_entry(entry) for name, entry in data["graphs"].items()}
            vae = None if data["vae"] is None else VaeEntry(**data["vae"])
        except (TypeError, AttributeError) as err:
            raise BundleError(f"{where}: a malformed graph or VAE entry ({err}); rebuild the bundle") from None
        return cls(**{**data, "graphs": graphs, "vae": vae})

    def write(self, root: Path) -> None:
        """Hash every file under `root` into `files`, then write the manifest atomically (last)."""
        files = {}
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and path.name not in (MANIFEST, STAGING_MARKER):
                files[path.relative_to(root).as_posix()] = sha256_file(path)
        self.files = files
        self.save(root)

    def save(self, root: Path) -> None:
        """Write the manifest as it is, atomically (`write` hashes the files first)."""
        write_atomic(Path(root) / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")


def _graph_entry(entry: dict[str, Any]) -> GraphEntry:
    io = {key: [TensorSpec(**t) for t in entry[key]] for key in ("inputs", "outputs")}
    return GraphEntry(**{**entry, **io})


def is_bundle(root: Path) -> bool:
    """A directory this tool wrote: a bundle manifest, and no file the manifest does not list."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return False
    return not foreign_files(Path(root), set(manifest.get("files", {})) | {MANIFEST})


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Open and (by default) checksum a bundle; refuse anything incomplete or modified."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory; build a bundle with `haplo-export build --out {root}`")
        if not path.exists():
            raise BundleError(
                f"{root}: no {MANIFEST}, so not a complete bundle (an interrupted build leaves "
                "none); rebuild it with `haplo-export build`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(
                f"{path}: corrupt manifest ({err.msg} at line {err.lineno}); rebuild the bundle"
            ) from None
        manifest = Manifest.from_dict(data, path)
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for rel, expected in self.manifest.files.items():
            file = self.root / rel
            if not file.exists():
                raise BundleError(f"{self.root}: {rel} is missing; rebuild the bundle")
            if sha256_file(file) != expected:
                raise BundleError(
                    f"{self.root}: {rel} fails its sha256 checksum (modified or corrupt); rebuild the bundle"
                )

    def resign(self, *rels: str) -> None:
        """Record new checksums of files this tool rewrote in place (an engine rebuilt for this GPU)
        and rewrite the manifest atomically; no other file's checksum changes."""
        for rel in rels:
            self.manifest.files[rel] = sha256_file(self.root / rel)
        self.manifest.save(self.root)

    @property
    def config(self) -> HaploOmniConfig:
        return self.manifest.config

    @property
    def graphs(self) -> dict[str, GraphEntry]:
        return self.manifest.graphs

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"{self.root}: the bundle has no {name!r} graph (has: {', '.join(self.graphs)})")
        return self.root / self.graphs[name].file

    def path(self, rel: str) -> Path:
        return self.root / rel
