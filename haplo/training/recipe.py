"""The whole training recipe as one run: data, VAE, the stages in order, the final model.

A recipe file (`configs/haplo-mini.yaml`) names a preset, the synthetic splits to make, the VAE to
train and the stages to run, each starting from the checkpoint of the one before:

    OUT/data/train, OUT/data/validation   synthetic clips, stills and records (disjoint seeds)
    OUT/vae                               the trained CogVideoX VAE (+ vae_report.json with PSNR)
    OUT/stage-2.1, ...                    each stage's run (checkpoint-N, losses.jsonl)
    OUT/model                             the last checkpoint without optimiser state + training.json

Every step whose output is already complete is skipped, so a killed recipe continues where it
stopped. Everything derives from `seed`: rerunning the file gives the same model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from haplo.artifacts import check_output_dir, staging_dir, swap_into_place, write_atomic
from haplo.errors import HaploError
from haplo.training.config import TrainConfig, check_keys, read_yaml
from haplo.training.vae import REPORT, VaeTrainConfig

SUMMARY = "training.json"
MODEL_FILES = ("config.json", "model.safetensors", "vae")  # + the tokenizer's files


class RecipeError(HaploError, ValueError):
    pass


@dataclass
class DataSpec:
    train: int = 480  # clips (each: a video and a still question, and a generation record)
    validation: int = 48
    frames: int = 9
    height: int = 64
    width: int = 64
    media: str = "world"  # world: scenes rendered when read; files: mp4 + png on disk
    generation: int | None = None  # train clips that also get a generation record (default: all)

    def __post_init__(self) -> None:
        from haplo.training.data import MEDIA

        if self.media not in MEDIA:
            raise RecipeError(f"data.media must be {' or '.join(MEDIA)}, got {self.media!r}")


@dataclass
class Recipe:
    preset: str
    output_dir: str = "runs/haplo-mini"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    vae: dict = field(default_factory=dict)  # VaeTrainConfig fields
    stages: list[dict] = field(default_factory=list)  # TrainConfig fields per stage, in order

    @classmethod
    def from_yaml(cls, path: str | Path, output_dir: str | None = None) -> "Recipe":
        raw = read_yaml(path, RecipeError, "recipe file (e.g. configs/haplo-mini.yaml)")
        check_keys(path, raw, {f.name for f in fields(cls)}, RecipeError)
        check_keys(path, raw.get("data") or {}, {f.name for f in fields(DataSpec)}, RecipeError, "data.")
        if not raw.get("preset") or not raw.get("stages"):
            raise RecipeError(f"{path}: a recipe needs 'preset' and a list of 'stages'")
        raw["data"] = DataSpec(**(raw.get("data") or {}))
        if output_dir:
            raw["output_dir"] = output_dir
        recipe = cls(**raw)
        recipe.stage_configs()  # every stage validated before any work
        VaeTrainConfig(data="", output_dir="", **recipe.vae)
        return recipe

    def stage_configs(self) -> list[TrainConfig]:
        """Each stage's TrainConfig; the first starts from the preset, each next from the one before."""
        out, configs = Path(self.output_dir), []
        for i, spec in enumerate(self.stages):
            name = stage_name(spec)
            previous = None if i == 0 else _last_checkpoint(configs[-1])
            base = {
                "preset": self.preset,
                "seed": self.seed,
                "data": str(out / "data" / "train" / "data.jsonl"),
                "vae": str(out / "vae") if i == 0 else None,
                "checkpoint": str(previous) if previous else None,
                "output_dir": str(out / f"stage-{name}"),
            }
            try:
                configs.append(TrainConfig(**{**base, **spec}))
            except TypeError as err:
                raise RecipeError(f"stage {name}: {err}") from None
        return configs


def stage_name(spec: dict) -> str:
    return f"{spec.get('stage')}" + (f".{spec['step']}" if spec.get("step") else "")


def _last_checkpoint(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / f"checkpoint-{cfg.max_steps}"


def _is_recipe_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def run_recipe(recipe: Recipe, log: Callable[[str], None] = print) -> dict:
    """data -> vae -> stages -> model; returns the training summary (also OUT/model/training.json)."""
    out = Path(recipe.output_dir)
    check_output_dir(out, _is_recipe_dir, "recipe run", flag="--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "recipe.yaml", yaml.safe_dump(_plain(recipe), sort_keys=False))
    make_data(recipe, log)
    vae = train_vae_step(recipe, log)
    stages = [train_stage(cfg, log) for cfg in recipe.stage_configs()]
    return write_model(recipe, vae, stages, log)


def _plain(recipe: Recipe) -> dict:
    return {**asdict(recipe), "data": asdict(recipe.data)}


def make_data(recipe: Recipe, log: Callable[[str], None]) -> None:
    from haplo.training.data import make_synthetic_dataset

    spec = recipe.data
    for split, count, generation in (("train", spec.train, spec.generation), ("validation", spec.validation, None)):
        root = Path(recipe.output_dir) / "data" / split
        if (root / "data.jsonl").is_file():
            continue
        make_synthetic_dataset(
            root, count, spec.frames, spec.height, spec.width, recipe.seed, split, spec.media, generation
        )
        log(f"data: {count} {split} clips in {root}")


def train_vae_step(recipe: Recipe, log: Callable[[str], None]) -> dict:
    from haplo.training.vae import train_vae

    out, data = Path(recipe.output_dir), Path(recipe.output_dir) / "data"
    if not (out / "vae" / REPORT).is_file():
        cfg = VaeTrainConfig(
            data=str(data / "train" / "data.jsonl"),
            validation=str(data / "validation" / "data.jsonl"),
            output_dir=str(out / "vae"),
            **{"seed": recipe.seed, **recipe.vae},
        )
        train_vae(cfg)
    report = json.loads((out / "vae" / REPORT).read_text())
    log(f"vae: PSNR {report['psnr_db']['held_out']:.2f} dB on held-out clips ({report['seconds']} s)")
    return report


def train_stage(cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """One stage, unless its last checkpoint is already there; its summary from the trainer state."""
    from haplo.training.trainer import STATE_FILE, train

    name = f"{cfg.stage}" + (f".{cfg.step}" if cfg.step else "")
    final = _last_checkpoint(cfg)
    state = json.loads((final / STATE_FILE).read_text()) if (final / STATE_FILE).is_file() else train(cfg, log)
    seconds = state.get("seconds", 0.0)
    summary = {
        "stage": name,
        "steps": state["step"],
        "examples": state.get("examples", 0),
        "seconds": round(seconds, 1),
        "examples_per_s": round(state.get("examples", 0) / seconds, 2) if seconds else None,
        "first_loss": state["losses"][0],
        "last_loss": state["losses"][-1],
        "probe_loss": state.get("probe_loss"),
    }
    rate, loss = summary["examples_per_s"], summary["last_loss"]
    log(f"stage {name}: {summary['steps']} steps, {rate} examples/s, loss {loss:.4f}")
    return summary


def write_model(recipe: Recipe, vae: dict, stages: list[dict], log: Callable[[str], None]) -> dict:
    """OUT/model: the last checkpoint's weights, config, tokenizer and VAE, plus training.json."""
    last = _last_checkpoint(recipe.stage_configs()[-1])
    target = Path(recipe.output_dir) / "model"
    tmp = staging_dir(target)
    for item in last.iterdir():
        if item.name in ("state", "trainer_state.json"):
            continue  # optimiser state: for resuming, not for deployment
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    missing = [name for name in MODEL_FILES if not (tmp / name).exists()]
    if missing:
        raise RecipeError(f"{last}: the checkpoint lacks {', '.join(missing)}")
    summary = {
        "recipe": _plain(recipe),
        "vae": {k: vae[k] for k in ("psnr_db", "seconds", "clips_per_s", "scaling_factor")},
        "stages": stages,
        "seconds": round(vae["seconds"] + sum(s["seconds"] for s in stages), 1),
    }
    write_atomic(tmp / SUMMARY, json.dumps(summary, indent=2) + "\n")
    swap_into_place(tmp, target)
    log(f"model: {target} (training {summary['seconds']:.0f} s)")
    return summary
