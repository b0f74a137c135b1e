"""What every `haplo-export` subcommand shares: the one-line-error parser, range-checked number types,
the model source and run options, and loading a config, model, tokenizer or backend from them."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from haplo.errors import HaploError, UsageError
from haplo.model.config import PRESETS
from haplo.model.shipped import SHIPPED_NAME, shipped_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from haplo.model.config import HaploOmniConfig
    from haplo.model.modeling import HaploOmniForConditionalGeneration

DEFAULT_PRESET = "tiny"


class Parser(argparse.ArgumentParser):
    """argparse with one `error:` line (and exit code 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _number(
    kind: type, low: float | None = None, high: float | None = None, low_open: bool = False, what: str = ""
) -> Callable[[str], Any]:
    """An argparse type: `kind` within [low, high] (low excluded with `low_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what}")
        return value

    return parse


POSITIVE = _number(int, 1, what="must be >= 1")
NON_NEGATIVE = _number(int, 0, what="must be >= 0")
NON_NEGATIVE_FLOAT = _number(float, 0.0, what="must be >= 0")
FRACTION = _number(float, 0.0, 1.0, what="must be in [0, 1]")
TOP_P = _number(float, 0.0, 1.0, low_open=True, what="must be in (0, 1]; 1 = off")


def device_name(text: str) -> str:
    """An argparse type: `cpu`, `cuda` or `cuda:N` (checked against this machine when the model loads)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


DEVICE_HELP = "where PyTorch runs a --checkpoint or --preset: cpu (default), cuda or cuda:N"


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set torch's threads, fill in the default model, run `args.handler`: the exit code
    (2 with one `error:` line for a HaploError)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or one `error:` line from Parser
        return int(stop.code or 0)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        apply_default_model(args)
        args.handler(args)
    except HaploError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# -- shared options ------------------------------------------------------------------------------


def add_model_args(
    parser: argparse.ArgumentParser,
    bundle_help: str | None = None,
    seed_help: str = "seed of the random weights of a preset, and of sampling",
) -> None:
    """--checkpoint or --preset (or, with `bundle_help`, --bundle; exclusive), and --seed. With none
    of them the command runs the shipped model (`apply_default_model`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        type=Path,
        help=f"checkpoint directory (config.json + model.safetensors; default: the shipped {SHIPPED_NAME})",
    )
    source.add_argument("--preset", help=f"built-in configuration, random weights: {', '.join(PRESETS)}")
    if bundle_help:
        source.add_argument("--bundle", type=Path, help=bundle_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.set_defaults(model_default=True)


def apply_default_model(args: argparse.Namespace) -> None:
    """No --checkpoint, --preset or --bundle: the shipped, trained model."""
    if getattr(args, "model_default", False) and not (args.checkpoint or args.preset or getattr(args, "bundle", None)):
        args.checkpoint = shipped_checkpoint()


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The model source plus what running it needs: tokenizer, dtype, threads, --json."""
    add_model_args(parser)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="directory of Hugging Face tokenizer files (default: the checkpoint's, else built-in)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", type=device_name, default="cpu", help=DEVICE_HELP)
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def comma_list(text: str) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]."""
    return [v.strip() for v in text.split(",") if v.strip()]


def source_name(args: argparse.Namespace) -> str:
    """The checkpoint path, else the preset name (the default preset when none is given)."""
    return str(args.checkpoint) if args.checkpoint else (args.preset or DEFAULT_PRESET)


# -- model loading -------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> HaploOmniConfig:
    """The HaploOmniConfig of `--checkpoint`, else of `--preset`."""
    from haplo.model.config import HaploOmniConfig, preset

    if args.checkpoint is not None:
        from haplo.model.config import ConfigError
        from haplo.model.modeling import CheckpointError

        try:
            return HaploOmniConfig.from_pretrained(args.checkpoint)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    return preset(args.preset or DEFAULT_PRESET)


def torch_device(args: argparse.Namespace):
    """`--device` as a torch device, refused where this machine has no such device."""
    import torch

    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
        if (device.index or 0) >= count:
            raise UsageError(
                f"--device {args.device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return device


def load_model(args: argparse.Namespace) -> HaploOmniForConditionalGeneration:
    """The checkpoint's model, else the preset's with random weights from `--seed`, in `--dtype`, on
    `--device`."""
    import torch

    from haplo.model.modeling import HaploOmniForConditionalGeneration

    dtype, device = getattr(torch, getattr(args, "dtype", "float32")), torch_device(args)
    if args.checkpoint is not None:
        return HaploOmniForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).to(device)
    return HaploOmniForConditionalGeneration.from_config(load_config(args), seed=args.seed, dtype=dtype).to(device)


def load_tokenizer_for(args: argparse.Namespace, config: HaploOmniConfig) -> PreTrainedTokenizerBase:
    """`--tokenizer`, else the checkpoint's tokenizer files, else the built-in tokenizer for `config`."""
    from haplo.model.tokenizer import tokenizer_for

    return tokenizer_for(config, args.checkpoint, named=args.tokenizer)


def _bundle_backend(args: argparse.Namespace):
    """TensorRT over the bundle's engines when `--backend` allows and the machine can, else ONNX Runtime."""
    from haplo.bundle import Bundle
    from haplo.engines.onnxruntime import OrtBackend

    bundle = Bundle.open(args.bundle)
    backend = None
    if args.backend != "onnxruntime" and bundle.manifest.engines:
        from haplo.engines.tensorrt import TensorRTBackend, tensorrt_status

        usable, reason = tensorrt_status()
        if usable:
            backend = TensorRTBackend(bundle)
        elif args.backend == "tensorrt":
            raise UsageError(f"--backend tensorrt: {reason}")
    elif args.backend == "tensorrt":
        raise UsageError(
            f"{args.bundle} has no TensorRT engines; rebuild it with --target tensorrt on a "
            "machine with an NVIDIA GPU, or use --backend onnxruntime"
        )
    return backend or OrtBackend(bundle, intra_op_threads=args.threads), bundle


def load_backend(args: argparse.Namespace, need_vae: bool = True) -> tuple[Any, Any]:
    """(backend, processor): ONNX Runtime over a bundle, or PyTorch over a checkpoint / preset."""
    from haplo.model.processor import HaploOmniProcessor

    if getattr(args, "bundle", None) is not None:
        from haplo.model.tokenizer import load_tokenizer

        if getattr(args, "device", "cpu") != "cpu":
            raise UsageError(
                f"--device {args.device} is for PyTorch (--checkpoint, --preset); a bundle runs where its "
                "backend does: --backend tensorrt for the GPU"
            )
        backend, bundle = _bundle_backend(args)
        tokenizer = load_tokenizer(args.tokenizer or bundle.path(bundle.manifest.tokenizer))
        return backend, HaploOmniProcessor(tokenizer, backend.config)
    from haplo.model.vae import vae_for_checkpoint
    from haplo.runtime.torch_backend import TorchBackend

    model = load_model(args)
    vae = vae_for_checkpoint(args.checkpoint, model.config, getattr(args, "vae", None)) if need_vae else None
    vae = None if vae is None else vae.to(model.device)
    return TorchBackend(model, vae), HaploOmniProcessor(load_tokenizer_for(args, model.config), model.config)


def note_random_weights(args: argparse.Namespace) -> None:
    """A stderr note when the output came from a preset's random weights."""
    if args.checkpoint is None and getattr(args, "bundle", None) is None:
        print(
            f"note: preset {args.preset or DEFAULT_PRESET!r} has random weights (seed {args.seed}): the output "
            "shows the pipeline works, not what a trained model says; pass --checkpoint DIR",
            file=sys.stderr,
        )
