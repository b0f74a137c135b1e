"""The training loop, on Hugging Face accelerate: one CPU process here, `accelerate launch` on many GPUs.

Determinism: the example order is a seeded permutation per epoch and every example's noise comes
from a generator seeded by (seed, position), both functions of the optimiser step. A run resumed
from checkpoint-N therefore sees exactly the data and noise the uninterrupted run saw after step N.
Each optimiser step accumulates `batch_size` examples (per process) in micro-batches of
`micro_batch_size` padded examples of one kind (understanding or generation; stage 3 alternates).
"""

from __future__ import annotations

import json
import math
import os
import time
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
from haplo.training.data import encode_video_latents, load_frames, read_jsonl, understanding_batch

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
    """Dataset records -> padded model inputs for a micro-batch, with VAE latents cached per record."""

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

    def generation_batch(self, indices: list[int], generator: torch.Generator) -> dict:
        """Captions (left padded; each dropped to the empty prompt with `caption_dropout`, the
        unconditional branch of guidance), their latents [B, f, C, h, w] and, for stage 1, the
        first-frame tiles [B, 3, S, S]."""
        records = [self.records[i] for i in indices]
        dropped = torch.rand(len(records), generator=generator) < self.cfg.caption_dropout
        captions = ["" if drop else r["caption"] for r, drop in zip(records, dropped.tolist())]
        encoded = self.processor.tokenizer(captions, padding=True, return_tensors="pt", add_special_tokens=False)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if ids.shape[1] == 0:  # every caption dropped: one padding column
            ids, mask = torch.full((len(records), 1), self.config.pad_token_id), torch.zeros(len(records), 1).long()
        batch = {"input_ids": ids, "attention_mask": mask, "latents": torch.cat([self.latents(i) for i in indices])}
        if self.cfg.stage == 1:  # the pre-decoder's warm-up reads the first frame as a CLIP tile
            frames = [load_frames(r, _media(r))[0] for r in records]
            batch["tile"] = torch.from_numpy(np.stack([self.processor.video_frames([f])[0] for f in frames]))
        return batch

    def understanding_batch(self, indices: list[int]) -> dict:
        return understanding_batch(self.processor, [self.records[i] for i in indices], self.cfg.video_frames)


def _media(record: dict) -> str:
    """The key of a generation record's media: its video, else its image (a one-frame video)."""
    return "video" if record.get("video") else "image"


def example_at(position: int, pool: list[int], seed: int) -> int:
    """The pool entry at a global position: a seeded permutation per pass over the pool."""
    epoch, offset = divmod(position, len(pool))
    order = np.random.default_rng(seed * 7919 + epoch).permutation(len(pool))
    return pool[int(order[offset])]


def kind_and_rank(number: int, pattern: list[str]) -> tuple[str, int]:
    """Global micro-batch `number`'s kind (the pattern repeats) and its number among that kind's."""
    cycle, slot = divmod(number, len(pattern))
    kind = pattern[slot]
    return kind, cycle * pattern.count(kind) + pattern[:slot].count(kind)


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
    state.setdefault("examples", 0)
    state.setdefault("seconds", 0.0)
    for step in bar:
        started = time.perf_counter()
        total, seen = trainer.optimisation_step(step)
        elapsed = time.perf_counter() - started
        state["losses"].append(total)
        state["step"] = step + 1
        state["examples"] += seen
        state["seconds"] += elapsed
        bar.set_postfix(loss=f"{total:.4f}", ex_s=f"{seen / elapsed:.1f}")
        trainer.log_loss(step + 1, total, seen / elapsed)
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


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant or a cosine decay to 10% at `max_steps`."""
    warmup = max(cfg.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(cfg.max_steps - warmup, 1))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


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
        self.vae = vae_for_checkpoint(source, config, self.cfg.vae)
        self.scheduler = make_scheduler(config.video_generation)
        self.examples = Examples(cfg, processor, self.vae, config)
        kinds = self.examples.kinds_for(cfg.stage, cfg.step)
        self.pattern = kinds if len(kinds) == 1 else ["understanding"] * cfg.understanding_ratio + ["generation"]
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
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
        model.train()
        self.model, self.optimizer, self.lr_schedule = self.accelerator.prepare(model, optimizer, schedule)
        if cfg.resume_from:
            self.accelerator.load_state(str(Path(cfg.resume_from) / "state"))
        self.raw = self.accelerator.unwrap_model(self.model)

    def micro_batches(self) -> int:
        return -(-self.cfg.batch_size // self.cfg.micro_batch_size)

    def micro_loss(self, number: int) -> tuple[torch.Tensor, int]:
        """The stage loss of global micro-batch `number` (its examples and noise fixed by it) and
        its example count. Kinds take turns by micro-batch (`understanding_ratio` understanding ones
        per generation one); each kind walks its own seeded order."""
        cfg, examples, accelerator = self.cfg, self.examples, self.accelerator
        kind, rank = kind_and_rank(number, self.pattern)
        pool = examples.understanding if kind == "understanding" else examples.generation
        first = rank * cfg.micro_batch_size
        positions = range(first, first + cfg.micro_batch_size)
        indices = [
            example_at(p * accelerator.num_processes + accelerator.process_index, pool, cfg.seed) for p in positions
        ]
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + number) * 1009 + accelerator.process_index)
        if kind == "understanding":
            return stages.next_token_loss(self.model, examples.understanding_batch(indices)), len(indices)
        batch = examples.generation_batch(indices, generator)
        if cfg.stage == 1:
            pre = stages.pre_warmup_loss(self.raw, self.clip_teacher, batch, cfg.pre_loss_weights)
            weights = cfg.post_loss_weights
            post = stages.post_warmup_loss(self.raw, self.cog_teacher, self.scheduler, batch, generator, weights)
            return pre + post, len(indices)
        return stages.diffusion_loss(self.raw, self.scheduler, batch, generator), len(indices)

    def probe_loss(self) -> float:
        """The stage loss on a fixed probe (the first step's micro-batches and noise), without updates."""
        with torch.no_grad(), self.accelerator.autocast():
            return sum(float(self.micro_loss(m)[0]) for m in range(self.micro_batches())) / self.micro_batches()

    def optimisation_step(self, step: int) -> tuple[float, int]:
        """Accumulate the step's micro-batches, clip, step; returns the step's loss and example count."""
        cfg, accelerator, count = self.cfg, self.accelerator, self.micro_batches()
        total, seen = 0.0, 0
        for micro in range(count):
            with accelerator.autocast():
                loss, examples = self.micro_loss(step * count + micro)
                loss = loss / count
            accelerator.backward(loss)
            total, seen = total + float(loss.detach()), seen + examples * accelerator.num_processes
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_([p for g in self.groups.values() for p in g], cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, seen

    def log_loss(self, done: int, loss: float, examples_per_s: float) -> None:
        """Every `log_every` steps, a line of losses.jsonl (main process)."""
        if self.cfg.log_every and done % self.cfg.log_every == 0 and self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            line = {
                "step": done,
                "loss": loss,
                "lr": self.lr_schedule.get_last_lr()[0],
                "examples_per_s": examples_per_s,
            }
            with open(self.output / "losses.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

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
