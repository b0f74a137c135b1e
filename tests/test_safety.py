"""Nothing a user owns is deleted or replaced: output checks, staging, atomic swaps, checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from haplo.artifacts import (
    STAGING_MARKER,
    check_output_dir,
    clean_stale_staging,
    staging_dir,
    swap_into_place,
)
from haplo.bundle import is_bundle
from haplo.commands.main import main
from haplo.errors import OutputError


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["file", "dir", "cwd"])
def test_build_refuses_what_it_did_not_make_and_leaves_it_byte_identical(tmp_path, monkeypatch, capsys, target):
    (tmp_path / "report.pdf").write_bytes(b"%PDF user data")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "train.py").write_text("print('mine')\n")
    monkeypatch.chdir(tmp_path / "project" if target == "cwd" else tmp_path)
    out = {"file": str(tmp_path / "report.pdf"), "dir": str(tmp_path / "project"), "cwd": "."}[target]
    before = _tree(tmp_path)
    assert main(["build", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "report.pdf"]  # no staging left either


def test_bundle_with_a_users_file_inside_is_not_rebuilt_over(cli_bundle, tmp_path, capsys):
    out = tmp_path / "bundle"
    shutil.copytree(cli_bundle, out)
    assert is_bundle(out)
    (out / "my-notes.md").write_text("deployment notes")
    assert not is_bundle(out)
    assert main(["build", "--out", str(out), "--force"]) == 2
    assert "not a bundle made by this tool" in capsys.readouterr().err
    assert (out / "my-notes.md").read_text() == "deployment notes"


def test_check_output_dir_accepts_new_empty_and_owned(tmp_path):
    def never(_):
        return False

    check_output_dir(tmp_path / "new" / "deeper", never, "thing")  # absent, creatable
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", never, "thing")
    (tmp_path / "owned").mkdir()
    (tmp_path / "owned" / "index.json").write_text("{}")
    check_output_dir(tmp_path / "owned", lambda p: (p / "index.json").exists(), "thing")
    with pytest.raises(OutputError, match="not a thing made by this tool"):
        check_output_dir(tmp_path / "owned", never, "thing")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match="broken symbolic link"):
        check_output_dir(tmp_path / "link", never, "thing")


def test_swap_keeps_a_complete_directory_at_the_target(tmp_path):
    out = tmp_path / "out"
    first = staging_dir(out)
    (first / "a.txt").write_text("old")
    swap_into_place(first, out)
    second = staging_dir(out)
    (second / "a.txt").write_text("new")
    swap_into_place(second, out)
    assert (out / "a.txt").read_text() == "new" and not (out / STAGING_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one and the staging are gone


def test_only_stale_staging_of_this_tool_is_cleaned(tmp_path):
    out = tmp_path / "bundle"
    dead = tmp_path / ".bundle.tmp-dead0000"
    dead.mkdir()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (dead / STAGING_MARKER).write_text(json.dumps({"pid": int(child.stdout), "host": socket.gethostname()}))
    live = tmp_path / ".bundle.tmp-live0000"
    live.mkdir()
    (live / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    users = tmp_path / ".bundle.tmp-users"
    users.mkdir()
    (users / "keep.txt").write_text("not ours")
    assert clean_stale_staging(out) == [dead]
    assert live.exists() and (users / "keep.txt").exists()


def test_kernels_and_bench_refuse_foreign_directories(tmp_path, capsys):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "notes.txt").write_text("mine")
    assert main(["kernels", "--out", str(tmp_path / "k")]) == 2
    assert "not a kernels directory made by this tool" in capsys.readouterr().err
    (tmp_path / "k" / "notes.txt").unlink()
    (tmp_path / "k" / "kernels.json").write_text(json.dumps({"format": "haplo-kernels/1"}))
    (tmp_path / "k" / "old.ptx").write_text("// ptx")
    from haplo.engines.plugins import aot

    aot.check_output(tmp_path / "k")  # this command's own output: accepted
    from haplo.bench.runner import check_output

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps({"schema": "haplo-bench/1"}))
    (tmp_path / "r" / "latency.png").write_bytes(b"png")
    check_output(tmp_path / "r")
    (tmp_path / "r" / "paper.tex").write_text("mine")
    with pytest.raises(OutputError):
        check_output(tmp_path / "r")


class _OneProcess:
    """The few Accelerator members save_checkpoint uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "optimizer.bin").write_bytes(b"state")


def test_training_checkpoint_swap_is_atomic_and_refuses_foreign_dirs(tmp_path):
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration
    from haplo.model.tokenizer import build_tokenizer
    from haplo.model.vae import build_random_vae
    from haplo.training.config import TrainConfig
    from haplo.training.trainer import STATE_FILE, TrainingError, save_checkpoint

    config = preset("tiny")
    model = HaploOmniForConditionalGeneration.from_config(config, seed=0)
    parts = (
        _OneProcess(),
        model,
        build_tokenizer(config),
        build_random_vae(config),
        TrainConfig(stage=1, priors="random", data="x.jsonl", output_dir=str(tmp_path)),
    )
    path = save_checkpoint(*parts, {"step": 1}, tmp_path / "checkpoint-1")
    assert json.loads((path / STATE_FILE).read_text())["step"] == 1
    save_checkpoint(*parts, {"step": 2}, path)  # over its own checkpoint: replaced
    assert json.loads((path / STATE_FILE).read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    foreign = tmp_path / "checkpoint-5"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"a user's weights")
    with pytest.raises(TrainingError, match="not a checkpoint this trainer wrote"):
        save_checkpoint(*parts, {"step": 5}, foreign)
    assert (foreign / "weights.bin").read_bytes() == b"a user's weights"


def test_synthetic_dataset_is_not_written_over_a_users_data(tmp_path, capsys):
    from haplo.commands.train import main as train_main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.jsonl").write_text('{"mine": true}\n')
    (tmp_path / "data" / "README").write_text("my dataset")
    assert train_main(["synthetic", "--out", str(tmp_path / "data"), "--count", "1"]) == 2
    assert "not a synthetic dataset made by this tool" in capsys.readouterr().err
    assert (tmp_path / "data" / "data.jsonl").read_text() == '{"mine": true}\n'


@pytest.mark.slow
def test_a_file_put_in_the_target_during_the_build_is_kept(tmp_path):
    from haplo.engines.bundle_engines import BundleEngines
    from haplo.export.build import BuildOptions, build_bundle
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration
    from haplo.model.tokenizer import build_tokenizer

    config = preset("tiny")
    out = tmp_path / "bundle"

    def log(line):  # the user creates the directory while the graphs export
        if line.startswith("[3/"):
            out.mkdir()
            (out / "results.csv").write_text("mine")

    model = HaploOmniForConditionalGeneration.from_config(config, seed=0)
    with pytest.raises(OutputError, match="not a bundle made by this tool"):
        build_bundle(
            model, None, build_tokenizer(config), BuildOptions(out=out, check_steps=2), BundleEngines(), log=log
        )
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # staging discarded
