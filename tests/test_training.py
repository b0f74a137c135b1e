"""Every stage trains on the tiny preset: the probe loss falls, frozen parameters stay bit-identical,
resume continues the same curve, and the final checkpoint loads and exports."""

import pytest
import torch
from safetensors.torch import load_file

from haplo.model.config import preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.training.config import TrainConfig, TrainConfigError
from haplo.training.data import make_synthetic_dataset, read_jsonl
from haplo.training.priors import init_from_priors, random_priors
from haplo.training.stages import trainable_patterns
from haplo.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), count=2, frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = TrainConfig(
        stage=1,
        priors="random",
        data=str(data),
        output_dir=str(out),
        max_steps=4,
        batch_size=2,
        learning_rate=1e-3,
        post_learning_rate=1e-3,
    )
    return cfg, train(cfg, log=lambda _: None)


def _weights(checkpoint) -> dict:
    return load_file(f"{checkpoint}/model.safetensors")


def _split(model, stage, step, names):
    import re

    patterns = [p for group in trainable_patterns(model, stage, step).values() for p in group]
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    trained = {n for n in names if regex.match(n)}
    return trained, set(names) - trained


def test_synthetic_dataset_records(data):
    records = read_jsonl(data)
    assert {r["type"] for r in records} == {"understanding", "generation"}
    caption = next(r for r in records if r["type"] == "generation")["caption"]
    assert any(c in caption for c in ("red", "green", "blue", "yellow"))
    assert any(d in caption for d in ("left", "right", "up", "down"))


@pytest.mark.slow
def test_stage1_trains_only_pre_and_post_decoders(stage1):
    cfg, state = stage1
    assert state["probe_loss"]["after"] < state["probe_loss"]["before"]
    config = preset("tiny-priors")
    initial = HaploOmniForConditionalGeneration.from_config(config, seed=cfg.seed)
    init_from_priors(initial, *random_priors(config, cfg.seed), timestep=cfg.frozen_timestep)
    before = initial.state_dict()
    after = _weights(state["checkpoints"][-1])
    trained, frozen = _split(initial, 1, None, after)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert any(not torch.equal(after[n], before[n]) for n in trained)
    assert not any(".layers.2." in n for n in trained)  # base layers are frozen in stage 1


@pytest.mark.slow
@pytest.mark.parametrize("stage, step", [(2, 1), (2, 2), (2, 3), (3, None)])
def test_stage_trains_exactly_its_parameters(stage1, data, tmp_path, stage, step):
    _, state1 = stage1
    start = state1["checkpoints"][-1]
    cfg = TrainConfig(
        stage=stage,
        step=step,
        checkpoint=start,
        data=str(data),
        output_dir=str(tmp_path),
        max_steps=4,
        batch_size=2,
        learning_rate=2e-3,
    )
    state = train(cfg, log=lambda _: None)
    assert state["probe_loss"]["after"] < state["probe_loss"]["before"]
    before, after = _weights(start), _weights(state["checkpoints"][-1])
    model = HaploOmniForConditionalGeneration.from_pretrained(state["checkpoints"][-1])
    trained, frozen = _split(model, stage, step, after)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert any(not torch.equal(after[n], before[n]) for n in trained)


@pytest.mark.slow
def test_resume_continues_the_same_curve(stage1, data, tmp_path):
    _, state1 = stage1
    common = dict(
        stage=2,
        step=2,
        checkpoint=state1["checkpoints"][-1],
        data=str(data),
        max_steps=4,
        batch_size=2,
        learning_rate=1e-3,
        save_every=2,
    )
    full = train(TrainConfig(**common, output_dir=str(tmp_path / "full")), log=lambda _: None)
    resumed = train(
        TrainConfig(
            **common, output_dir=str(tmp_path / "resumed"), resume_from=str(tmp_path / "full" / "checkpoint-2")
        ),
        log=lambda _: None,
    )
    assert resumed["losses"][2:] == pytest.approx(full["losses"][2:], rel=1e-5, abs=1e-7)
    a, b = _weights(full["checkpoints"][-1]), _weights(resumed["checkpoints"][-1])
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.slow
def test_stage3_checkpoint_loads_and_builds(stage1, data, tmp_path):
    from haplo.engines.bundle_engines import BundleEngines
    from haplo.export.build import BuildOptions, build_bundle
    from haplo.model.tokenizer import load_tokenizer
    from haplo.model.vae import vae_for_checkpoint

    _, state1 = stage1
    cfg = TrainConfig(
        stage=3,
        checkpoint=state1["checkpoints"][-1],
        data=str(data),
        output_dir=str(tmp_path / "s3"),
        max_steps=1,
        batch_size=2,
    )
    checkpoint = train(cfg, log=lambda _: None)["checkpoints"][-1]
    model = HaploOmniForConditionalGeneration.from_pretrained(checkpoint)
    gen = model.config.video_generation
    manifest = build_bundle(
        model,
        vae_for_checkpoint(checkpoint, model.config),
        load_tokenizer(checkpoint),
        BuildOptions(
            out=tmp_path / "bundle", video=(gen.num_frames, gen.height, gen.width), check_steps=8, ddim_steps=2
        ),
        BundleEngines(),
        log=lambda _: None,
    )
    assert manifest.parity["ok"]


def test_config_errors(tmp_path):
    with pytest.raises(TrainConfigError, match="step"):
        TrainConfig(stage=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\nlerning_rate: 0.1\n")
    with pytest.raises(TrainConfigError, match="lerning_rate"):
        TrainConfig.from_yaml(bad)
    good = tmp_path / "good.yaml"
    good.write_text("stage: 2\nstep: 1\n")
    cfg = TrainConfig.from_yaml(good)
    assert (cfg.learning_rate, cfg.batch_size, cfg.warmup_steps, cfg.adam_betas) == (1e-5, 128, 2000, (0.9, 0.999))


def test_understanding_batch_pads_left_and_labels_only_each_answer(data):
    from haplo.model.processor import HaploOmniProcessor
    from haplo.model.tokenizer import build_tokenizer
    from haplo.training.data import understanding_batch

    config = preset("tiny")
    processor = HaploOmniProcessor(build_tokenizer(config), config)
    records = [r for r in read_jsonl(data) if r["type"] == "understanding"]
    assert {"video", "images"} <= {k for r in records for k in r}  # videos and stills in one batch
    batch = understanding_batch(processor, records, video_frames=8)
    assert batch["input_ids"].shape[0] == len(records) and "pixel_values" in batch and "pixel_values_videos" in batch
    for row, record in enumerate(records):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        answer = processor.decode(labelled.tolist(), skip_special_tokens=True).strip()
        assert answer == record["conversations"][1]["content"]
        assert batch["attention_mask"][row, -1] == 1  # left padding: every row ends with its answer
    out = HaploOmniForConditionalGeneration.from_config(config, seed=0)(
        **{k: v for k, v in batch.items() if k != "labels"}
    )
    assert torch.isfinite(out.logits).all()


def test_micro_batches_see_the_examples_of_the_seeded_order(data, tmp_path):
    from haplo.training.trainer import example_at

    pool = list(range(7))
    first_pass = [example_at(p, pool, seed=3) for p in range(7)]
    assert sorted(first_pass) == pool and first_pass != pool  # a permutation, then the next
    assert [example_at(p, pool, seed=3) for p in range(7, 14)] != first_pass
    cfg = TrainConfig(stage=3, data=str(data), output_dir=str(tmp_path), max_steps=2, batch_size=4, preset="tiny")
    assert cfg.micro_batch_size == 4  # capped at the batch
    state = train(cfg, log=lambda _: None)
    assert state["examples"] == 8 and state["seconds"] > 0
    lines = (tmp_path / "losses.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("examples_per_s" in line for line in lines)


def test_understanding_ratio_interleaves_kinds_and_keeps_each_order_contiguous():
    from haplo.training.trainer import kind_and_rank

    pattern = ["understanding", "understanding", "generation"]
    got = [kind_and_rank(n, pattern) for n in range(9)]
    assert [k[0] for k in got[:3]] == pattern and got[3] == ("understanding", 2) and got[5] == ("generation", 1)
    for kind in ("understanding", "generation"):
        assert [rank for k, rank in got if k == kind] == list(range(sum(k == kind for k, _ in got)))
    assert [kind_and_rank(n, ["understanding", "generation"])[1] for n in range(4)] == [0, 0, 1, 1]  # ratio 1
    with pytest.raises(TrainConfigError, match="understanding_ratio"):
        TrainConfig(stage=3, understanding_ratio=0)


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from haplo.training.trainer import lr_factor

    cfg = TrainConfig(stage=3, max_steps=110, warmup_steps=10, lr_schedule="cosine")
    factors = [lr_factor(cfg, s) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(TrainConfig(stage=3, warmup_steps=0), 50) == 1.0
    with pytest.raises(TrainConfigError, match="lr_schedule"):
        TrainConfig(stage=3, lr_schedule="linear")


RECIPE = """
preset: tiny
output_dir: {out}
data: {{train: 4, validation: 2}}
vae: {{block_out_channels: [4, 4, 4, 4], steps: 2, batch_size: 2}}
stages:
  - {{stage: 2, step: 1, max_steps: 1, batch_size: 2}}
  - {{stage: 3, max_steps: 1, batch_size: 4, micro_batch_size: 2}}
"""


def test_recipe_first_steps_give_a_model_that_loads_and_evaluates(tmp_path):
    import json

    from haplo.bench.evaluation import EvalOptions, run_eval
    from haplo.training.recipe import Recipe, run_recipe

    (tmp_path / "recipe.yaml").write_text(RECIPE.format(out=tmp_path / "run"))
    summary = run_recipe(Recipe.from_yaml(tmp_path / "recipe.yaml"), log=lambda _: None)
    model_dir = tmp_path / "run" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json", "vae"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not (model_dir / "state").exists()
    assert [s["stage"] for s in summary["stages"]] == ["2.1", "3"] and summary["vae"]["psnr_db"]["held_out"] > 0
    assert json.loads((model_dir / "training.json").read_text())["stages"][1]["examples"] == 4
    doc = run_eval(EvalOptions(checkpoint=model_dir, backends=["torch"], clips=2, prompts=1, steps=1), progress=False)
    assert doc["variants"][0]["understanding"]["n"] == 2 and doc["variants"][0]["generation"]["n"] == 1
    again = run_recipe(Recipe.from_yaml(tmp_path / "recipe.yaml"), log=lambda _: None)  # every step is done: reused
    assert again["stages"] == summary["stages"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("preset: tiny\n", "needs 'preset' and a list of 'stages'"),
        ("preset: tiny\nstages: [{stage: 3}]\nepochs: 3\n", "unknown keys epochs"),
        ("preset: tiny\nstages: [{stage: 3}]\ndata: {clips: 3}\n", "unknown keys data.clips"),
        ("preset: tiny\nstages: [{stage: 3, speed: 2}]\n", "stage 3: "),
        ("preset: tiny\nstages: [{stage: 2}]\n", "stage 2 needs --step"),
        ("preset: tiny\nstages: [{stage: 3}]\nvae: {steps: 0}\n", "steps and batch_size must be >= 1"),
        ("[unclosed\n", "not valid YAML"),
        ("preset: tiny\nstages: [{stage: 3}]\ndata: {media: disk}\n", "data.media must be files or world, got 'disk'"),
    ],
)
def test_recipe_errors_are_named_before_any_work(tmp_path, text, message):
    from haplo.errors import HaploError
    from haplo.training.recipe import Recipe

    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(HaploError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Recipe.from_yaml(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
