"""The benchmark's result document: schema and backends (not timings)."""

import json

import pytest

from haplo.bench.report import SchemaError, validate
from haplo.commands.main import main


@pytest.mark.slow
def test_bench_writes_json_table_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(
        [
            "bench",
            "--preset",
            "tiny",
            "--backends",
            "torch,onnxruntime,tensorrt",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "3",
            "--ddim-steps",
            "1",
            "--past-lengths",
            "8",
            "--videos",
            "9x64x64",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    validate(doc)
    keys = {e["key"]: e for e in doc["backends"]}
    assert {"torch", "onnxruntime-fp32", "tensorrt-fp32"} <= set(keys)
    assert keys["torch"]["status"] == "ok" and keys["onnxruntime-fp32"]["status"] == "ok"
    assert keys["torch"]["ratio_to_torch"]["tpot"] == pytest.approx(1.0)
    assert set(keys["torch"]["understanding"]["decode_step_stage_ms"]) >= {"pre", "base", "post", "heads", "embed"}
    assert doc["sweeps"]["decode_vs_past"]["onnxruntime-fp32"][0]["past_tokens"] == 8
    assert (out / "table.txt").exists() and (out / "latency.png").stat().st_size > 0
    assert "onnxruntime" in capsys.readouterr().out
    doc["backends"][0].pop("understanding")
    with pytest.raises(SchemaError):
        validate(doc)


def test_bench_rejects_unknown_backend(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--backends", "tpu", "--out", str(tmp_path)]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_torch_backends_run_on_a_copy_on_the_device():
    """`--device`: the torch backends get the reference moved once to the device; the CPU copy the
    bundles export from stays where it is."""
    import torch

    from haplo.bench.runner import BenchOptions, _Run
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    model = HaploOmniForConditionalGeneration.from_config(preset("tiny"), seed=0)
    run = _Run(BenchOptions(device="meta"), print, 1, {}, model, None, None, "tiny", 0.0, {}, {}, ())
    moved, vae = run.reference()
    assert moved is not model and vae is None
    assert next(moved.parameters()).device.type == "meta"
    assert next(model.parameters()).device == torch.device("cpu")
    assert run.reference()[0] is moved  # copied once
    assert _Run(BenchOptions(), print, 1, {}, model, None, None, "tiny", 0.0, {}, {}, ()).reference()[0] is model


def test_the_table_names_the_device_torch_ran_on():
    from pathlib import Path

    from haplo.bench.report import table

    doc = json.loads((Path(__file__).parents[1] / "bench/results/peer-small/results.json").read_text())
    assert "torch on" not in table(doc)  # a CPU run says nothing more
    doc["settings"]["device"], doc["machine"]["gpu"] = "cuda:0", "NVIDIA H200"
    assert "torch on cuda:0 (NVIDIA H200)" in table(doc)
