"""Reading a bundle: the directory `haplo-export build` writes and servers embed.

bundle/
  manifest.json          format, model config, every graph (files, I/O names, dtypes, dims,
                         precision, layers), library versions, parity summary, sha256 of
                         every file; written last, inside a temporary directory that is
                         renamed into place, so a half-built bundle never has one
  graphs/NAME.onnx(.data)
  constants.safetensors  small tensors the runtime applies itself (image_newline)
  tokenizer/             Hugging Face tokenizer files
  parity.json, report.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from haplo.artifacts import foreign_files, sha256_file, write_atomic
from haplo.errors import HaploError
from haplo.model.config import HaploOmniConfig

MANIFEST = "manifest.json"
STAGE_GRAPHS = {"pre": "pre_decoder", "base": "base_decoder", "post": "post_decoder"}  # decoder stage -> graph
FORMAT = "haplo-bundle"
FORMAT_VERSION = 1


class BundleError(HaploError, ValueError):
    """A directory that is not a usable bundle, with the reason and the fix."""


__all__ = ["Bundle", "BundleError", "is_bundle", "sha256_file", "write_atomic"]


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
    manifest: dict

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
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(
                f"{path}: corrupt manifest ({err.msg} at line {err.lineno}); rebuild the bundle"
            ) from None
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: not a {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: bundle format {manifest.get('format_version')}, this tool reads "
                f"{FORMAT_VERSION}; rebuild it with this version"
            )
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for rel, expected in self.manifest["files"].items():
            file = self.root / rel
            if not file.exists():
                raise BundleError(f"{self.root}: {rel} is missing; rebuild the bundle")
            if sha256_file(file) != expected:
                raise BundleError(
                    f"{self.root}: {rel} fails its sha256 checksum (modified or corrupt); rebuild the bundle"
                )

    @property
    def config(self) -> HaploOmniConfig:
        return HaploOmniConfig.from_dict(self.manifest["model"])

    @property
    def graphs(self) -> dict[str, dict]:
        return self.manifest["graphs"]

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"{self.root}: the bundle has no {name!r} graph (has: {', '.join(self.graphs)})")
        return self.root / self.graphs[name]["file"]

    def path(self, rel: str) -> Path:
        return self.root / rel
