"""The training loop, on Hugging Face accelerate: one CPU process here, `accelerate launch` on many GPUs.

Determinism: the example order is a seeded permutation per epoch and every example's noise comes
from a generator seeded by (seed, position), both functions of the optimiser step. A run resumed
from checkpoint-N therefore sees exactly the data and noise the uninterrupted run saw after step N.
Each optimiser step accumulates `batch_size` micro-batches of one example (per process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from haplo.artifacts import STAGING_MARKER, discard_staging, swap_into_place
from haplo.errors import HaploError
from haplo.training import stages
from haplo.training.config import TrainConfig
from haplo.training.data import encode_video_latents, load_frames, read_jsonl, understanding_example

STATE_FILE = "trainer_state.json"


class TrainingError(HaploError, ValueError):
    pass


def _source(cfg: TrainConfig) -> str | None:
    """The checkpoint the run starts from: the one resumed, else the one given (None: a preset)."""
    return cfg.resume_from or cfg.checkpoint


def load_model(cfg: TrainConfig):
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    if _source(cfg):
        return HaploOmniForConditionalGeneration.from_pretrained(_source(cfg), dtype=torch.float32)
    return HaploOmniForConditionalGeneration.from_config(preset(cfg.preset or "tiny-priors"), seed=cfg.seed)


def load_priors(cfg: TrainConfig, config):
    """(clip, qwen2, cogvideox) from directories, seeded random ones, or Nones."""
    if cfg.priors == "random":
        from haplo.training.priors import random_priors

        return random_priors(config, cfg.seed)
    clip = qwen = cog = None
    if cfg.clip:
        from transformers import CLIPVisionModel

        clip = CLIPVisionModel.from_pretrained(cfg.clip, local_files_only=True).eval()
    if cfg.qwen2:
        from transformers import Qwen2ForCausalLM

        qwen = Qwen2ForCausalLM.from_pretrained(cfg.qwen2, local_files_only=True).eval()
    if cfg.cogvideox:
        from diffusers import CogVideoXTransformer3DModel

        cog = CogVideoXTransformer3DModel.from_pretrained(cfg.cogvideox, local_files_only=True).eval()
    return clip, qwen, cog


class Examples:
    """Dataset records -> model inputs, with VAE latents cached per record."""

    def __init__(self, cfg: TrainConfig, processor, vae, config):
        self.records = read_jsonl(cfg.data)
        self.processor, self.vae, self.config, self.cfg = processor, vae, config, cfg
        self.understanding = [i for i, r in enumerate(self.records) if r["type"] == "understanding"]
        self.generation = [i for i, r in enumerate(self.records) if r["type"] == "generation"]
        self._latents: dict[int, torch.Tensor] = {}

    def kinds_for(self, stage: int, step: int | None) -> list[str]:
        if stage == 1 or (stage == 2 and step in (2, 3)):
            needed = ["generation"]
        elif stage == 2:
            needed = ["understanding"]
        else:
            needed = [k for k in ("understanding", "generation") if getattr(self, k)]
        for kind in needed:
            if not getattr(self, kind):
                raise TrainingError(
                    f"{self.cfg.data}: stage {stage}{'' if step is None else f' step {step}'} needs "
                    f"{kind} records and the file has none"
                )
        return needed

    def latents(self, index: int) -> torch.Tensor:
        if index not in self._latents:
            gen = self.config.video_generation
            record = self.records[index]
            frames = load_frames(record, _media(record))
            count = gen.num_frames if record.get("video") else 1
            self._latents[index] = encode_video_latents(self.vae, frames, count, gen.height, gen.width)
        return self._latents[index]

    def generation_batch(self, index: int) -> dict:
        record = self.records[index]
        encoded = self.processor.tokenizer([record["caption"]], return_tensors="pt", add_special_tokens=False)
        batch = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "latents": self.latents(index),
        }
        frame = load_frames(record, _media(record))[0]
        batch["tile"] = torch.from_numpy(self.processor.video_frames([frame]))  # [1, 3, S, S]
        return batch

    def understanding_batch(self, index: int) -> dict:
        return understanding_example(self.processor, self.records[index], self.cfg.video_frames)


def _media(record: dict) -> str:
    """The key of a generation record's media: its video, else its image (a one-frame video)."""
    return "video" if record.get("video") else "image"


def example_at(position: int, pool: list[int], seed: int) -> int:
    """The pool entry at a global position: a seeded permutation per pass over the pool."""
    epoch, offset = divmod(position, len(pool))
    order = np.random.default_rng(seed * 7919 + epoch).permutation(len(pool))
    return pool[int(order[offset])]


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one stage (or stage-2 step). Returns the trainer state (losses per step, checkpoints)."""
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    log = log or (lambda line: accelerator.print(line))
    torch.manual_seed(cfg.seed)
    model = load_model(cfg)
    state = _initial_state(cfg)
    clip, cog = _stage1_priors(cfg, model, log)
    trainer = _Trainer(cfg, accelerator, model, clip, cog)
    state.setdefault("probe_loss", {})
    if not cfg.resume_from:
        state["probe_loss"]["before"] = trainer.probe_loss()
    bar = tqdm(
        range(state["step"], cfg.max_steps),
        desc=f"stage {cfg.stage}" + (f".{cfg.step}" if cfg.step else ""),
        disable=not accelerator.is_local_main_process,
        initial=state["step"],
        total=cfg.max_steps,
    )
    for step in bar:
        total = trainer.optimisation_step(step)
        state["losses"].append(total)
        state["step"] = step + 1
        bar.set_postfix(loss=f"{total:.4f}")
        trainer.log_loss(step + 1, total)
        if step + 1 == cfg.max_steps:
            state["probe_loss"]["after"] = trainer.probe_loss()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.max_steps:
            path = trainer.save(state, step + 1)
            state["checkpoints"].append(str(path))
            log(f"saved {path}")
    return state


def _initial_state(cfg: TrainConfig) -> dict:
    """A fresh trainer state, or the one of the checkpoint resumed (which must be of this stage)."""
    if not cfg.resume_from:
        return {"losses": [], "step": 0, "checkpoints": []}
    state = json.loads((Path(cfg.resume_from) / STATE_FILE).read_text())
    if state.get("stage") != cfg.stage or state.get("step_of_stage") != cfg.step:
        raise TrainingError(
            f"{cfg.resume_from} is a stage {state.get('stage')} checkpoint; resume it with the same --stage/--step"
        )
    return state


def _stage1_priors(cfg: TrainConfig, model, log: Callable[[str], None]) -> tuple:
    """Stage 1's teachers (clip, cogvideox), the model initialised from the priors when it starts
    fresh; (None, None) for the other stages."""
    if cfg.stage != 1:
        return None, None
    clip, qwen, cog = load_priors(cfg, model.config)
    if clip is None or cog is None:
        raise TrainingError(
            "stage 1 distils from CLIP-ViT and CogVideoX: set clip/cogvideox directories in "
            "the config, or priors: random for a demo"
        )
    if not cfg.resume_from and not cfg.checkpoint:
        from haplo.training.priors import init_from_priors

        report = init_from_priors(model, clip, qwen, cog, cfg.frozen_timestep)
        log(f"initialised {len(report.sources)} parameters from priors")
    return clip, cog


class _Trainer:
    """One stage's run: the data, the prepared model and optimiser, the teachers, and the step."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model, clip=None, cog=None):
        from haplo.model.processor import HaploOmniProcessor
        from haplo.model.tokenizer import tokenizer_for
        from haplo.model.vae import vae_for_checkpoint
        from haplo.runtime.ddim import make_scheduler

        self.cfg, self.accelerator, self.output = cfg, accelerator, Path(cfg.output_dir)
        source = _source(cfg)
        config = model.config
        self.tokenizer = tokenizer_for(config, source or None)
        processor = HaploOmniProcessor(self.tokenizer, config)
        self.vae = vae_for_checkpoint(source, config)
        self.scheduler = make_scheduler(config.video_generation)
        self.examples = Examples(cfg, processor, self.vae, config)
        self.kinds = self.examples.kinds_for(cfg.stage, cfg.step)
        self._prepare(model)
        self.clip_teacher = clip.eval().requires_grad_(False) if clip is not None else None
        self.cog_teacher = stages.CogVideoXTeacher(cog) if cog is not None else None

    def _prepare(self, model) -> None:
        """The stage's parameter groups, AdamW with linear warm-up, all through accelerate (and the
        optimiser state of the checkpoint resumed)."""
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            model.model.gradient_checkpointing = True
        self.groups = stages.select_parameters(model, cfg.stage, cfg.step)
        lrs = {"post": cfg.post_learning_rate}
        optimizer = torch.optim.AdamW(
            [
                {"params": ps, "lr": lrs.get(name) or cfg.learning_rate, "name": name}
                for name, ps in self.groups.items()
            ],
            betas=cfg.adam_betas,
            weight_decay=cfg.weight_decay,
        )
        warmup = max(cfg.warmup_steps, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        model.train()
        self.model, self.optimizer, self.lr_schedule = self.accelerator.prepare(model, optimizer, schedule)
        if cfg.resume_from:
            self.accelerator.load_state(str(Path(cfg.resume_from) / "state"))
        self.raw = self.accelerator.unwrap_model(self.model)

    def micro_loss(self, position: int) -> torch.Tensor:
        """The stage loss of the example (and noise) at a global position."""
        cfg, examples = self.cfg, self.examples
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + position)
        kind = self.kinds[position % len(self.kinds)]
        pool = examples.understanding if kind == "understanding" else examples.generation
        index = example_at(position // len(self.kinds), pool, cfg.seed)
        if kind == "understanding":
            return stages.next_token_loss(self.model, examples.understanding_batch(index))
        batch = examples.generation_batch(index)
        if cfg.stage == 1:
            pre = stages.pre_warmup_loss(self.raw, self.clip_teacher, batch, cfg.pre_loss_weights)
            weights = cfg.post_loss_weights
            return pre + stages.post_warmup_loss(self.raw, self.cog_teacher, self.scheduler, batch, generator, weights)
        return stages.diffusion_loss(self.raw, self.scheduler, batch, generator)

    def probe_loss(self) -> float:
        """The stage loss on a fixed probe (the first batch's examples and noise), without updates."""
        with torch.no_grad(), self.accelerator.autocast():
            return sum(float(self.micro_loss(p)) for p in range(self.cfg.batch_size)) / self.cfg.batch_size

    def optimisation_step(self, step: int) -> float:
        """Accumulate `batch_size` micro-batches, clip, step; returns the step's loss."""
        cfg, accelerator = self.cfg, self.accelerator
        total = 0.0
        for micro in range(cfg.batch_size):
            position = (step * cfg.batch_size + micro) * accelerator.num_processes + accelerator.process_index
            with accelerator.autocast():
                loss = self.micro_loss(position) / cfg.batch_size
            accelerator.backward(loss)
            total += float(loss.detach())
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_([p for g in self.groups.values() for p in g], cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def log_loss(self, done: int, loss: float) -> None:
        """Every `log_every` steps, a line of losses.jsonl (main process)."""
        if self.cfg.log_every and done % self.cfg.log_every == 0 and self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "loss": loss, "lr": self.lr_schedule.get_last_lr()[0]}) + "\n")

    def save(self, state: dict, done: int) -> Path:
        path = self.output / f"checkpoint-{done}"
        return save_checkpoint(self.accelerator, self.model, self.tokenizer, self.vae, self.cfg, state, path)


def save_checkpoint(accelerator, model, tokenizer, vae, cfg: TrainConfig, state: dict, path: Path) -> Path:
    """Hugging Face layout (config.json, model.safetensors, tokenizer, vae/) + optimiser state, staged
    beside `path` and swapped in atomically; a `path` this trainer did not write is refused."""
    accelerator.wait_for_everyone()
    tmp = path.with_name(f".{path.name}.tmp")  # one name every process agrees on
    if accelerator.is_main_process:
        if path.exists() and not (path / STATE_FILE).is_file():
            raise TrainingError(
                f"{path} exists and is not a checkpoint this trainer wrote; choose another "
                "--output-dir (nothing was replaced)"
            )
        if tmp.exists() and not (tmp / STAGING_MARKER).exists():
            raise TrainingError(
                f"{tmp} exists and was not made by this trainer; remove it or choose another --output-dir"
            )
        discard_staging(tmp)  # a killed run's
        tmp.mkdir(parents=True)
        (tmp / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid()}))
        accelerator.unwrap_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        vae.save_pretrained(str(tmp / "vae"))
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "stage": cfg.stage, "step_of_stage": cfg.step, "config": cfg.to_dict()}, indent=2)
            + "\n"
        )
        swap_into_place(tmp, path)
    accelerator.wait_for_everyone()
    return path
