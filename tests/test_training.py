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
