"""`haplo-export eval`: scoring, the result document, and one small run on torch and ONNX Runtime."""

from __future__ import annotations

import json

import pytest

from haplo.bench import evaluation
from haplo.bench.evaluation import EvalError, EvalOptions, run_eval, score_answer, summarise, table, validate
from haplo.commands.main import main
from haplo.training.world import Scene, scenes


def test_scoring_counts_each_attribute():
    scene = Scene("red", "circle", "up", seed=0)
    assert score_answer(scene, "A red circle moves up.")["all_correct"]
    wrong = score_answer(scene, "A red square moves to the left.")
    assert wrong["correct"] == {"colour": True, "shape": False, "direction": False} and not wrong["all_correct"]
    assert score_answer(scene, "")["correct"] == {"colour": False, "shape": False, "direction": False}


def test_summary_per_attribute_and_class():
    clips = scenes("test", 8)
    rows = [{"scene": vars(s), **score_answer(s, s.caption if i % 2 else "nothing")} for i, s in enumerate(clips)]
    summary = summarise(rows, ("colour", "shape", "direction"), "all_correct")
    assert summary["n"] == 8 and summary["all_correct"] == 0.5
    assert summary["per_attribute"] == {"colour": 0.5, "shape": 0.5, "direction": 0.5}
    colours = summary["per_class"]["colour"]
    assert sum(c["n"] for c in colours.values()) == 8
    assert sum(c["all_correct"] for c in colours.values()) == 4


def test_validate_refuses_a_broken_document():
    with pytest.raises(EvalError, match="not a haplo-eval/1 document"):
        validate({"schema": "other"})
    with pytest.raises(EvalError, match="lacks backend/precision/status"):
        validate({"schema": evaluation.SCHEMA, "machine": {}, "model": "m", "settings": {}, "variants": [{}]})
    with pytest.raises(EvalError, match="--tasks"):
        EvalOptions(tasks=("spelling",)).check()


@pytest.fixture(scope="module")
def small_eval(cli_bundle):
    options = EvalOptions(bundle=cli_bundle, backends=["torch", "onnxruntime"], clips=4, prompts=2, steps=2)
    return run_eval(options, log=lambda _: None, progress=False)


def test_torch_and_onnxruntime_give_the_same_answers(small_eval):
    validate(small_eval)
    torch_entry, ort_entry = small_eval["variants"]
    assert (torch_entry["backend"], ort_entry["backend"]) == ("torch", "onnxruntime")
    assert ort_entry["same_answers_as_torch"] == 1.0  # fp32 bundle: greedy answers identical
    und = ort_entry["understanding"]
    assert und["n"] == 4 and len(und["answers"]) == 4
    assert [a["question"] for a in und["answers"]][:2] != [None, None]
    gen = ort_entry["generation"]
    assert gen["n"] == 2 and {r["scene"]["colour"] for r in gen["results"]} <= {"red", "green", "blue", "yellow"}
    assert "understanding: all 3" in table(small_eval)


def test_cli_writes_results_and_table(cli_bundle, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--bundle", str(cli_bundle), "--backends", "onnxruntime", "--tasks", "understanding"]
    assert main([*argv, "--clips", "2", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.txt"]
    assert main([*argv, "--clips", "2", "--out", str(out)]) == 0  # its own results: replaced
    assert "onnxruntime/fp32" in capsys.readouterr().out
