"""The shipped haplo-mini: the default of every command, within its size budget, and it answers
held-out questions about the synthetic world correctly."""

import json

import pytest

from haplo.bench.evaluation import EvalOptions, run_eval
from haplo.commands.common import apply_default_model
from haplo.commands.main import build_parser, main
from haplo.model.shipped import SHIPPED_DIR, shipped_checkpoint
from haplo.training.world import parse_caption, scenes


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_model_fits_its_budget_and_records_its_training():
    files = [p for p in shipped_checkpoint().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40_000_000
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {p.name for p in files}
    assert (SHIPPED_DIR / "vae" / "config.json").is_file()
    summary = json.loads((SHIPPED_DIR / "training.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["2.1", "2.2", "2.3", "3"]
    assert all(s["examples_per_s"] > 0 for s in summary["stages"]) and summary["vae"]["psnr_db"]["held_out"] > 20


def test_shipped_model_answers_and_generates_on_held_out_clips():
    options = EvalOptions(backends=["torch"], clips=12, prompts=4, seed=1)
    entry = run_eval(options, log=lambda _: None, progress=False)["variants"][0]
    understanding, generation = entry["understanding"], entry["generation"]
    assert understanding["n"] == 12 and understanding["all_correct"] >= 11 / 12, understanding["answers"]
    assert all(a["answer"].startswith("A ") and a["answer"].endswith(".") for a in understanding["answers"])
    assert generation["n"] == 4 and generation["both_correct"] >= 3 / 4, generation["results"]


@pytest.mark.parametrize(
    "argv",
    [
        ["build"],
        ["run", "understand"],
        ["run", "generate"],
        ["eval"],
        ["bench"],
        ["inspect"],
    ],
)
def test_every_command_defaults_to_the_shipped_model(argv):
    args = build_parser().parse_args(argv)
    apply_default_model(args)
    assert args.checkpoint == SHIPPED_DIR and args.preset is None
    named = build_parser().parse_args([*argv, "--preset", "tiny"])
    apply_default_model(named)
    assert named.checkpoint is None and named.preset == "tiny"


def test_demo_clip_is_a_held_out_scene_and_the_answer_names_it(capsys, tmp_path):
    clip = tmp_path / "clip.mp4"
    code, out, err = run_cli(capsys, "run", "understand", "--demo-clip", str(clip), "--seed", "5", "--json")
    result = json.loads(out)
    assert code == 0 and clip.stat().st_size > 0 and result["clip"] == str(clip)
    assert result["clip_shows"] == scenes("test", 96)[5].caption
    assert parse_caption(result["text"]) == parse_caption(result["clip_shows"]), result  # read back from the mp4
