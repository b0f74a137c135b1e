"""`haplo-export eval`: does a deployed HaploOmni still answer correctly? Task accuracy per backend.

The task is the synthetic world (`haplo.training.world`): held-out clips of one coloured shape
crossing a plain background. Understanding: every clip is asked one of the question forms; the
colour, shape and direction named in the greedy answer are compared with the clip's. Generation:
every held-out caption goes through guided DDIM and the VAE; the detector looks for the blob of the
prompted colour in the decoded frames and the direction its centroid travels. Every backend and
precision runs the same clips, prompts and seeds in one process, and each variant's answers are
compared with torch's, answer by answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from haplo.artifacts import check_output_dir, indexed_dir, write_atomic
from haplo.bench import sources
from haplo.bench.runner import machine_info
from haplo.errors import HaploError
from haplo.export.validate import ParityError
from haplo.model.processor import HaploOmniProcessor
from haplo.runtime.decoding import understand
from haplo.runtime.pipeline import TextToVideoPipeline
from haplo.training.world import (
    ATTRIBUTES,
    COLOURS,
    DIRECTIONS,
    QUESTIONS,
    SHAPES,
    Scene,
    detect_motion,
    parse_caption,
    question_for,
    scenes,
)
from haplo.video import evenly_spaced, to_uint8_frames

SCHEMA = "haplo-eval/1"
TASKS = ("understanding", "generation")


class EvalError(HaploError, ValueError):
    pass


@dataclass
class EvalOptions:
    preset: str | None = None  # with no checkpoint or bundle either: the shipped model
    checkpoint: Path | None = None
    bundle: Path | None = None
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    tasks: tuple[str, ...] = TASKS
    clips: int = 96  # held-out understanding clips (every class twice at 96)
    prompts: int = 48  # held-out generation captions (every class once at 48)
    clip_size: tuple[int, int, int] = (9, 64, 64)  # frames, height, width of the understanding clips
    video_frames: int = 8  # frames of a clip the model sees
    max_new_tokens: int = 48  # the longest caption ("A yellow triangle moves to the right.") is 37 bytes
    steps: int | None = None  # DDIM steps (default: the config's)
    guidance: float | None = None  # default: the config's
    threads: int | None = None
    int8_weights: str = "auto"  # INT8 weight range of the int8 bundles built: auto | full | reduced
    work_dir: Path = Path(".cache/haplo-eval")  # bundles built for --precisions (reused across runs)

    def check(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise EvalError(f"--tasks {','.join(self.tasks)}: choose from {', '.join(TASKS)}")


def check_output(out: Path) -> None:
    """Refuse a results directory this command did not write."""
    check_output_dir(
        out,
        lambda d: indexed_dir(d, "results.json", "schema", SCHEMA, ("table.txt",)),
        "directory of evaluation results",
    )


def run_eval(options: EvalOptions, log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Every variant on the same held-out clips and prompts; returns the result document."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    options.check()
    pairs = sources.variants(options.backends, options.precisions)
    model, vae, tokenizer, name = sources.load_reference(options)
    processor = HaploOmniProcessor(tokenizer, model.config)
    bundles: dict = {}
    entries = []
    for kind, precision in pairs:
        backend = _open(kind, precision, options, (model, vae, tokenizer, name), bundles, log)
        if isinstance(backend, dict):  # skipped
            entries.append({"backend": kind, "precision": precision, **backend})
            continue
        entries.append(_evaluate(kind, precision, backend, processor, options, progress, log))
    _agreement(entries)
    return _document(options, name, entries)


def _open(kind: str, precision: str, options: EvalOptions, reference: tuple, bundles: dict, log):
    """The variant's backend, or {"status": "skipped", "reason": ...} where this machine cannot run it,
    or {"status": "failed", ...} where its bundle does not pass the build's own checks."""
    model, vae, tokenizer, name = reference
    reason = sources.unavailable(kind)
    if reason:
        log(f"{kind}/{precision}: skipped ({reason})")
        return {"status": "skipped", "reason": reason}
    bundle = None
    if kind not in ("torch", "torch-compile"):
        if precision not in bundles:
            try:
                bundles[precision] = sources.bundle_for(precision, options, model, vae, tokenizer, name, log)
            except ParityError as err:  # the bundle `build` would refuse: reported, the others still run
                bundles[precision] = {"status": "failed", "reason": f"build refused the bundle: {err}"}
        bundle = bundles[precision]
        if isinstance(bundle, dict):
            log(f"{kind}/{precision}: {bundle['reason']}")
            return bundle
    return sources.make_backend(kind, model, vae, bundle, options.threads)


def _evaluate(kind: str, precision: str, backend, processor, options: EvalOptions, progress: bool, log) -> dict:
    entry: dict = {"backend": kind, "precision": precision, "status": "ok"}
    label = f"{kind}/{precision}"
    if "understanding" in options.tasks:
        clips = scenes("test", options.clips, options.seed)
        entry["understanding"] = understanding(backend, processor, clips, options, progress, label)
        log(f"{label}: understanding {_percent(entry['understanding']['all_correct'])} all three correct")
    if "generation" in options.tasks:
        prompts = scenes("test", options.prompts, options.seed)
        entry["generation"] = generation(backend, processor, prompts, options, progress, label)
        log(f"{label}: generation {_percent(entry['generation']['both_correct'])} colour and direction right")
    return entry


# -- understanding ------------------------------------------------------------------------------------


def answer(backend, processor, scene: Scene, question: str, options: EvalOptions) -> str:
    """The greedy answer to `question` about the scene's clip."""
    frames = scene.video(*options.clip_size)
    picks = evenly_spaced(len(frames), min(options.video_frames, len(frames)))
    conversation = [{"role": "user", "content": f"<video>\n{question}"}]
    inputs = processor(conversations=[conversation], videos=[frames[picks]])
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out = understand(
        backend, **tensors, max_new_tokens=options.max_new_tokens, stop_token_ids=tuple(processor.stop_token_ids)
    )
    return processor.decode(out.new_tokens[0].tolist(), skip_special_tokens=True).strip()


def understanding(backend, processor, clips: list[Scene], options: EvalOptions, progress: bool, label: str) -> dict:
    rows = []
    for scene in tqdm(clips, desc=f"{label} understanding", disable=not progress, leave=False):
        question = question_for(scene, QUESTIONS)
        text = answer(backend, processor, scene, question, options)
        rows.append({"scene": asdict(scene), "question": question, "answer": text, **score_answer(scene, text)})
    return {**summarise(rows, ATTRIBUTES, "all_correct"), "answers": rows}


def score_answer(scene: Scene, text: str) -> dict:
    """Which attributes the answer names correctly (a missing one counts as wrong)."""
    named = parse_caption(text)
    correct = {kind: named[kind] == getattr(scene, kind) for kind in ATTRIBUTES}
    return {"parsed": named, "correct": correct, "all_correct": all(correct.values())}


# -- generation -----------------------------------------------------------------------------------------


def generation(backend, processor, prompts: list[Scene], options: EvalOptions, progress: bool, label: str) -> dict:
    pipe = TextToVideoPipeline(backend, processor)
    gen = backend.config.video_generation
    rows = []
    for i, scene in enumerate(tqdm(prompts, desc=f"{label} generation", disable=not progress, leave=False)):
        result = pipe(scene.caption, "", options.steps, options.guidance, seed=options.seed + i, progress=False)
        motion = detect_motion(to_uint8_frames(result.videos[0]), scene.colour)
        correct = {"colour": motion.found, "direction": motion.found and motion.direction == scene.direction}
        rows.append(
            {
                "scene": asdict(scene),
                "prompt": scene.caption,
                "detected": {"found": motion.found, "direction": motion.direction, "travel": round(motion.travel, 4)},
                "correct": correct,
                "both_correct": all(correct.values()),
            }
        )
    summary = summarise(rows, ("colour", "direction"), "both_correct")
    return {**summary, "video": [gen.num_frames, gen.height, gen.width], "results": rows}


def summarise(rows: list[dict], attributes: tuple[str, ...], overall: str) -> dict:
    """Fractions correct overall and per attribute, and the counts per class of each attribute."""
    n = len(rows)
    per_class: dict = {}
    for kind, values in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        per_class[kind] = {}
        for value in values:
            mine = [r for r in rows if r["scene"][kind] == value]
            counts = {"n": len(mine), overall: sum(r[overall] for r in mine)}
            counts.update({f"{a}_correct": sum(r["correct"][a] for r in mine) for a in attributes})
            per_class[kind][value] = counts
    return {
        "n": n,
        overall: sum(r[overall] for r in rows) / n if n else None,
        "per_attribute": {a: sum(r["correct"][a] for r in rows) / n if n else None for a in attributes},
        "per_class": per_class,
    }


def task_check(clips: int, prompts: int, seed: int = 0, progress: bool = True) -> Callable:
    """What `build` calls on its staged bundle (`export.build.TaskCheck`): understanding accuracy on
    `clips` held-out clips and, with `prompts`, generation correctness; the summaries without rows."""

    def check(backend, processor, log: Callable[[str], None]) -> dict:
        options = EvalOptions(clips=clips, prompts=prompts, seed=seed)
        result: dict = {"clips": clips, "prompts": prompts, "seed": seed}
        if clips:
            found = understanding(backend, processor, scenes("test", clips, seed), options, progress, "task")
            result["understanding"] = {k: v for k, v in found.items() if k != "answers"}
            log(f"task: understanding {_percent(found['all_correct'])} all three correct on {clips} held-out clips")
        if prompts:
            made = generation(backend, processor, scenes("test", prompts, seed), options, progress, "task")
            result["generation"] = {k: v for k, v in made.items() if k != "results"}
            log(f"task: generation {_percent(made['both_correct'])} colour and direction right on {prompts} prompts")
        return result

    return check


# -- the document -----------------------------------------------------------------------------------------


def _agreement(entries: list[dict]) -> None:
    """Per variant, the fraction of clips whose answer is the same text as torch's."""
    base = next((e for e in entries if e["backend"] == "torch" and "understanding" in e), None)
    for entry in entries:
        if base is None or "understanding" not in entry:
            continue
        pairs = zip(entry["understanding"]["answers"], base["understanding"]["answers"])
        same = [a["answer"] == b["answer"] for a, b in pairs]
        entry["same_answers_as_torch"] = sum(same) / len(same) if same else None


def _document(options: EvalOptions, name: str, entries: list[dict]) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": name,
        "settings": settings,
        "variants": entries,
    }


def validate(doc: dict) -> None:
    """Raise EvalError unless `doc` has the shape of SCHEMA (what readers of results.json rely on)."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise EvalError(f"not a {SCHEMA} document")
    for key in ("machine", "model", "settings", "variants"):
        if key not in doc:
            raise EvalError(f"{SCHEMA}: missing {key!r}")
    for entry in doc["variants"]:
        if not {"backend", "precision", "status"} <= set(entry):
            raise EvalError(f"{SCHEMA}: a variant lacks backend/precision/status: {sorted(entry)}")
        for task, overall in (("understanding", "all_correct"), ("generation", "both_correct")):
            if task in entry and not {"n", overall, "per_attribute", "per_class"} <= set(entry[task]):
                raise EvalError(f"{SCHEMA}: {entry['backend']}/{entry['precision']} {task} lacks its summary")


def table(doc: dict) -> str:
    lines = [
        f"model {doc['model']}; {doc['machine']['cpu']} ({doc['machine']['isa']})",
        "",
        f"{'variant':<22}{'understanding: all 3':>22}{'colour':>9}{'shape':>9}{'direction':>11}"
        f"{'generation: both':>19}{'colour':>9}{'direction':>11}{'same as torch':>15}",
    ]
    for e in doc["variants"]:
        row = f"{e['backend'] + '/' + e['precision']:<22}"
        if e["status"] != "ok":
            lines.append(row + f"  {e['status']}: {e.get('reason', '')}")
            continue
        und, gen = e.get("understanding"), e.get("generation")
        row += _cells(und, "all_correct", ATTRIBUTES, (22, 9, 9, 11))
        row += _cells(gen, "both_correct", ("colour", "direction"), (19, 9, 11))
        lines.append(row + f"{_percent(e.get('same_answers_as_torch')):>15}")
    return "\n".join(lines)


def _cells(task: dict | None, overall: str, attributes: tuple[str, ...], widths: tuple[int, ...]) -> str:
    if task is None:
        return "".join(f"{'-':>{w}}" for w in widths)
    values = [f"{_percent(task[overall])} of {task['n']}"] + [_percent(task["per_attribute"][a]) for a in attributes]
    return "".join(f"{v:>{w}}" for v, w in zip(values, widths))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_outputs(doc: dict, out: Path) -> dict:
    """results.json and table.txt in `out`."""
    validate(doc)
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_atomic(out / "results.json", json.dumps(doc, indent=2) + "\n"),
        "table": write_atomic(out / "table.txt", table(doc) + "\n"),
    }
