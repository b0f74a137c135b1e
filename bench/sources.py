"""Where a benchmark or an evaluation gets its models: the PyTorch reference, bundles, backends.

`bench` and `eval` take the same sources (`--checkpoint`, `--preset`, or `--bundle`, whose manifest
names the weights it was built from), build one bundle per precision in a work directory (graphs
reused when unchanged), and open every backend the same way. `options` is any object with the
fields `preset`, `checkpoint`, `bundle`, `seed`, `work_dir` (`BenchOptions`, `EvalOptions`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from haplo.errors import HaploError
from haplo.model.config import STAGES

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int8-weight", "int4")


class SourceError(HaploError, ValueError):
    pass


def variants(backends: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs: torch runs the checkpoint's precision, the others each precision."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SourceError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise SourceError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    out = []
    for backend in backends:
        if backend in ("torch", "torch-compile"):
            out.append((backend, "fp32"))  # the reference runs in the checkpoint's precision
        else:
            out.extend((backend, p) for p in precisions)
    return out


class CompiledTorchBackend:
    """torch.compile (inductor, dynamic shapes) over the decoder stages and heads of the reference."""

    @staticmethod
    def wrap(model, vae):
        from haplo.runtime.torch_backend import TorchBackend

        backend = TorchBackend(model, vae)
        backend.name = "torch-compile"
        # Stages share stage_forward's code: each (stage, prefill/decode) is its own compiled entry.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = {
            stage: torch.compile(functools.partial(model.model.stage_forward, stage), dynamic=True) for stage in STAGES
        }
        head = torch.compile(lambda h: model.lm_head(model.model.lm_hidden(h)), dynamic=True)

        def run_stage(stage, hidden, position_ids, key_start, past=None, use_cache=True):
            with torch.no_grad():
                return compiled[stage](hidden, position_ids, key_start, past, use_cache=use_cache)

        def lm_head(hidden):
            with torch.no_grad():
                return head(hidden)

        backend.run_stage, backend.lm_head = run_stage, lm_head
        return backend


def unavailable(kind: str) -> str | None:
    """Why this machine cannot run backend `kind` (TensorRT without a GPU), or None."""
    if kind != "tensorrt":
        return None
    from haplo.engines.tensorrt import tensorrt_status

    usable, reason = tensorrt_status()
    return None if usable else f"TensorRT engines need an NVIDIA GPU with TensorRT ({reason})"


def load_reference(options):
    """(model, vae, tokenizer, name) from a checkpoint, a preset, or the source a bundle records;
    the shipped model when none is named."""
    from haplo.bundle import Bundle
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration
    from haplo.model.shipped import shipped_checkpoint
    from haplo.model.tokenizer import tokenizer_for
    from haplo.model.vae import vae_for_checkpoint

    checkpoint, preset_name, seed = options.checkpoint, options.preset, options.seed
    if options.bundle is not None:
        source = Bundle.open(options.bundle).manifest.source
        if source.get("checkpoint"):
            checkpoint = Path(source["checkpoint"])
            if not checkpoint.exists():
                raise SourceError(f"the bundle was built from {checkpoint}, which is gone; pass --checkpoint DIR")
        else:
            preset_name, seed = source.get("preset"), source.get("seed") or 0
    if checkpoint is None and preset_name is None:
        checkpoint = shipped_checkpoint()
    if checkpoint is not None:
        model = HaploOmniForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        name = str(checkpoint)
    else:
        model = HaploOmniForConditionalGeneration.from_config(preset(preset_name), seed=seed)
        name = preset_name
    return model, vae_for_checkpoint(checkpoint, model.config), tokenizer_for(model.config, checkpoint), name


def bundle_for(precision: str, options, model, vae, tokenizer, name: str, log):
    """`--bundle` when it has this precision, else a bundle built (or reused) in the work directory."""
    from haplo.bundle import Bundle
    from haplo.engines.bundle_engines import BundleEngines
    from haplo.export.build import BuildOptions, build_bundle, weights_source

    if options.bundle is not None:
        bundle = Bundle.open(options.bundle)
        built = bundle.manifest.precision
        if built != precision:
            raise SourceError(
                f"{options.bundle} is a {built} bundle; ask for --precisions {built} or leave --bundle out to build one"
            )
        return bundle
    weights = getattr(options, "int8_weights", "auto")  # eval's --int8-weights; bench builds with auto
    suffix = f"-{weights}" if precision == "int8" and weights != "auto" else ""
    out = options.work_dir / f"{Path(name).name}-seed{options.seed}-{precision}{suffix}"
    source = weights_source(options.checkpoint, name, options.seed, name)
    log(f"bundle {precision}{suffix}: {out} (graphs reused when unchanged)")
    build = BuildOptions(out=out, precision=precision, source=source, int8_weights=weights)
    build_bundle(model, vae, tokenizer, build, BundleEngines(), log=log)
    return Bundle.open(out)


def make_backend(kind: str, model, vae, bundle, threads: int | None):
    """A backend of `kind` over the reference (torch, torch-compile) or over `bundle`."""
    if kind == "torch":
        from haplo.runtime.torch_backend import TorchBackend

        return TorchBackend(model, vae)
    if kind == "torch-compile":
        return CompiledTorchBackend.wrap(model, vae)
    if kind == "onnxruntime":
        from haplo.engines.onnxruntime import OrtBackend

        return OrtBackend(bundle, intra_op_threads=threads)
    from haplo.engines.tensorrt import TensorRTBackend

    return TensorRTBackend.from_bundle(bundle)
