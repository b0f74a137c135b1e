"""`haplo-train`: run a training stage, or make the synthetic dataset.

    haplo-train recipe --config configs/haplo-mini.yaml          (the whole recipe: data, VAE, stages, model)
    haplo-train synthetic --out data/synthetic --count 64
    haplo-train vae --data data/synthetic/data.jsonl --out runs/vae
    haplo-train --stage 1 --config configs/train-tiny.yaml
    haplo-train --stage 2 --step 1 --checkpoint runs/s1/checkpoint-50 --output-dir runs/s21
    haplo-train --stage 2 --step 1 ... --resume-from runs/s21/checkpoint-50   (continue an interrupted run)
    accelerate launch --num_processes 8 -m haplo.commands.train --stage 3 --config configs/train.yaml

Bad input ends with one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from haplo.commands.common import NON_NEGATIVE, POSITIVE, Parser, _number
from haplo.errors import HaploError


def synthetic_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-train synthetic", description="videos of moving coloured shapes with captions (JSONL + mp4)"
    )
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--count", type=POSITIVE, default=32, help="number of videos")
    parser.add_argument("--frames", type=POSITIVE, default=9)
    parser.add_argument("--height", type=_number(int, 16, what="must be >= 16"), default=64)
    parser.add_argument("--width", type=_number(int, 16, what="must be >= 16"), default=64)
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0, help="dataset seed: class order and clips")
    parser.add_argument(
        "--split",
        default="train",
        choices=["train", "validation", "test"],
        help="which split of the synthetic world; the splits never share a clip (default: %(default)s)",
    )
    parser.add_argument(
        "--media",
        default="files",
        choices=["files", "world"],
        help="files: write each clip (mp4) and still (png); world: refer to the scenes, rendered when "
        "read, for datasets of many thousand clips (default: %(default)s)",
    )
    return parser


def vae_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="haplo-train vae", description="train a small CogVideoX VAE on a dataset's clips")
    parser.add_argument("--data", required=True, help="dataset JSONL (its generation records' videos)")
    parser.add_argument(
        "--validation", help="dataset JSONL of held-out clips for the PSNR (default: the training clips)"
    )
    parser.add_argument("--out", type=Path, required=True, help="new directory for the VAE (diffusers layout)")
    parser.add_argument("--steps", type=POSITIVE, default=400)
    parser.add_argument("--batch-size", type=POSITIVE, default=8)
    parser.add_argument("--learning-rate", type=_number(float, 0, low_open=True, what="must be > 0"), default=3e-3)
    parser.add_argument(
        "--channels", type=comma_ints, default=(8, 16, 16, 16), help="block_out_channels (default: 8,16,16,16)"
    )
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0)
    return parser


def recipe_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-train recipe",
        description="the whole training recipe in one run: synthetic data, VAE, the stages in order, the model",
    )
    parser.add_argument(
        "--config", type=Path, default=Path("configs/haplo-mini.yaml"), help="recipe file (default: %(default)s)"
    )
    parser.add_argument("--output-dir", help="where the run goes (default: the recipe's output_dir)")
    return parser


def comma_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def train_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    parser.add_argument(
        "--step",
        type=int,
        choices=[1, 2, 3],
        help="stage 2: 1 pre-connector, 2 post-connector, 3 both connectors + post-decoder",
    )
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (paper defaults otherwise)")
    parser.add_argument("--data", help="JSONL dataset")
    parser.add_argument("--output-dir")
    parser.add_argument("--checkpoint", help="start from this checkpoint (e.g. the previous stage's)")
    parser.add_argument("--resume-from", help="continue an interrupted run from its checkpoint-N")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--batch-size", type=POSITIVE, help="examples per optimiser step")
    parser.add_argument("--micro-batch-size", type=POSITIVE, help="padded examples per forward pass (default 8)")
    parser.add_argument("--vae", help="a diffusers AutoencoderKLCogVideoX directory (default: the checkpoint's vae/)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument(
        "--priors",
        choices=["random"],
        help="stage 1 without prior checkpoints: seeded random CLIP/Qwen2/CogVideoX (demo, tests)",
    )
    parser.add_argument("--seed", type=int)
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    from haplo.training.data import make_synthetic_dataset

    path = make_synthetic_dataset(
        args.out, args.count, args.frames, args.height, args.width, args.seed, args.split, args.media
    )
    print(f"wrote {path} ({args.count} {args.split} videos and stills, {3 * args.count} records)")
    return 0


def _vae(args: argparse.Namespace) -> int:
    from haplo.training.vae import VaeTrainConfig, train_vae

    cfg = VaeTrainConfig(
        data=args.data,
        validation=args.validation,
        output_dir=str(args.out),
        block_out_channels=args.channels,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    report = train_vae(cfg)
    print(json.dumps({"out": str(args.out), "psnr_db": report["psnr_db"], "seconds": report["seconds"]}))
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from haplo.training.recipe import Recipe, run_recipe

    summary = run_recipe(Recipe.from_yaml(args.config, args.output_dir))
    print(json.dumps({"model": str(Path(summary["recipe"]["output_dir"]) / "model"), "seconds": summary["seconds"]}))
    return 0


SUBCOMMANDS = {
    "synthetic": (synthetic_parser, _synthetic),
    "vae": (vae_parser, _vae),
    "recipe": (recipe_parser, _recipe),
}


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `--config` (or the paper defaults) with the flags given on top."""
    from haplo.training.config import TrainConfig

    overrides = {
        "stage": args.stage,
        "step": args.step,
        "data": args.data,
        "output_dir": args.output_dir,
        "checkpoint": args.checkpoint,
        "resume_from": args.resume_from,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "vae": args.vae,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
        "priors": args.priors,
    }
    if args.config:
        return TrainConfig.from_yaml(args.config, **overrides)
    return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def _train(args: argparse.Namespace) -> int:
    from haplo.training.trainer import train

    state = train(_train_config(args))
    losses = state["losses"]
    summary = {
        "steps": state["step"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "checkpoints": state["checkpoints"][-1:],
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    make_parser, run = SUBCOMMANDS.get(argv[0], (None, None)) if argv else (None, None)
    try:
        args = make_parser().parse_args(argv[1:]) if make_parser else train_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or one `error:` line from Parser
        return int(stop.code or 0)
    try:
        return run(args) if run else _train(args)
    except HaploError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
