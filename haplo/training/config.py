"""Training configuration: paper defaults per stage, overridable by a YAML file and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from haplo.errors import HaploError

# Appendix A.3. The batch size is the number of examples per optimiser step (accumulated over
# micro-batches of `micro_batch_size` padded examples); warmup is in optimiser steps.
PAPER_DEFAULTS = {
    (1, None): {"learning_rate": 1e-4, "post_learning_rate": 2e-4, "batch_size": 32, "warmup_steps": 0},
    (2, 1): {"learning_rate": 1e-5, "batch_size": 128, "warmup_steps": 2000},
    (2, 2): {"learning_rate": 1e-4, "batch_size": 128, "warmup_steps": 10000},
    (2, 3): {"learning_rate": 1e-4, "batch_size": 128, "warmup_steps": 0},
    (3, None): {"learning_rate": 2e-5, "batch_size": 32, "warmup_steps": 0},
}


class TrainConfigError(HaploError, ValueError):
    pass


@dataclass
class TrainConfig:
    stage: int = 1
    step: int | None = None  # stage 2 only: 1, 2 or 3
    # model: a checkpoint directory, or a preset (random weights, optionally initialised from priors)
    checkpoint: str | None = None
    preset: str | None = "tiny-priors"
    seed: int = 0
    # priors for stage 1 (and its teachers): "random" builds seeded random priors shaped for the preset
    # (tests, demos); otherwise directories of a CLIPVisionModel / Qwen2ForCausalLM / CogVideoX transformer.
    priors: str | None = None
    clip: str | None = None
    qwen2: str | None = None
    cogvideox: str | None = None
    frozen_timestep: float = 500.0  # where CogVideoX's AdaLN is evaluated for the state sets
    data: str = "data/synthetic/data.jsonl"
    vae: str | None = None  # a diffusers AutoencoderKLCogVideoX directory (else the checkpoint's vae/)
    output_dir: str = "runs/stage1"
    resume_from: str | None = None  # a checkpoint-N directory of an earlier run
    max_steps: int = 100
    learning_rate: float | None = None  # None: the paper's value for the stage
    post_learning_rate: float | None = None  # stage 1 post-decoder
    batch_size: int | None = None
    micro_batch_size: int = 8  # padded examples per forward pass (capped at batch_size)
    caption_dropout: float = 0.1  # generation captions replaced by the empty prompt (guidance's negative)
    understanding_ratio: int = 1  # stage 3: understanding micro-batches per generation micro-batch
    warmup_steps: int | None = None
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (to 10% at max_steps)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    log_every: int = 1
    video_frames: int = 8  # frames sampled for understanding
    pre_loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Table 10 best row
    post_loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Table 11 best row
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise TrainConfigError(f"stage {self.stage}: choose 1, 2 or 3")
        if self.stage == 2 and self.step not in (1, 2, 3):
            raise TrainConfigError("stage 2 needs --step 1, 2 or 3")
        if self.stage != 2:
            self.step = None
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainConfigError(f"mixed_precision {self.mixed_precision!r}: choose no, fp16 or bf16")
        for key, value in PAPER_DEFAULTS[(self.stage, self.step)].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainConfigError(f"lr_schedule {self.lr_schedule!r}: choose constant or cosine")
        if self.understanding_ratio < 1:
            raise TrainConfigError(f"understanding_ratio must be >= 1, got {self.understanding_ratio}")
        if self.micro_batch_size < 1 or not 0 <= self.caption_dropout < 1:
            raise TrainConfigError("micro_batch_size must be >= 1 and caption_dropout in [0, 1)")
        self.micro_batch_size = min(self.micro_batch_size, self.batch_size)
        self.adam_betas = tuple(self.adam_betas)
        self.pre_loss_weights, self.post_loss_weights = tuple(self.pre_loss_weights), tuple(self.post_loss_weights)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        data = read_yaml(path, TrainConfigError, "config file")
        check_keys(path, data, {f.name for f in fields(cls)} - {"extra"}, TrainConfigError)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        return out


def read_yaml(path: str | Path, error: type[Exception], what: str) -> dict:
    """A YAML mapping from a file, or `error` naming the missing file or the parse problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from None


def check_keys(path: str | Path, data: dict, known: set[str], error: type[Exception], prefix: str = "") -> None:
    """`error` naming every key of `data` that is not in `known`."""
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise error(f"{path}: unknown keys {names}; known: {', '.join(sorted(known))}")
