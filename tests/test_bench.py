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
    flops = doc["settings"]["ddim_step_flops"]
    assert 0 < flops["step"] < flops["step_without_reuse"]
    for key in ("torch", "onnxruntime-fp32"):
        assert keys[key]["compute"]["peak"] == "fp32" and keys[key]["compute"]["percent_of_peak"] > 0
    assert doc["machine"]["gemm_peak_gflops"]["int8"] > 0
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


def test_cpu_attention_flops_are_counted():
    """torch's counter knows only the CUDA attention kernels; the CPU one is two matmuls."""
    import torch

    from haplo.bench.compute import counted_flops

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8)
    mask = torch.ones(2, 1, 6, 10, dtype=torch.bool)
    attention = counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    assert attention == 2 * (2 * 2 * 4 * 6 * 10 * 8)
    assert counted_flops(lambda: torch.randn(3, 5) @ torch.randn(5, 7)) == 2 * 3 * 5 * 7


def test_the_ddim_step_counts_at_least_every_decoder_weight_per_latent_token():
    """Both guidance rows' latent tokens pass through every decoder linear: a lower bound the count
    must reach; without prefix reuse the text prefix runs too."""
    import torch

    from haplo.bench.compute import ddim_step_flops
    from haplo.bench.workloads import latent_tokens, random_prompt
    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    model = HaploOmniForConditionalGeneration.from_config(preset("tiny"), seed=0).eval()
    config = model.config
    gen = config.video_generation
    shape = gen.latent_shape(gen.num_frames, gen.height, gen.width)
    flops = ddim_step_flops(model, None, random_prompt(config, 12, batch=2), shape)
    linear = sum(
        m.weight.numel()
        for name, m in model.model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    )
    assert flops["step"] >= 2 * 2 * latent_tokens(config, shape) * linear
    assert flops["step_without_reuse"] > flops["step"]


def test_step_compute_holds_each_precision_against_its_arithmetic():
    from haplo.bench.compute import gemm_peaks, step_compute

    peaks = gemm_peaks(32, 64, 48, threads=1)
    assert peaks["fp32"] == max(peaks["fp32_torch"], peaks["fp32_onnxruntime"]) > 0 and peaks["int8"] > 0
    fixed = {"fp32": 200.0, "int8": 800.0}
    fp32 = step_compute(10**11, 1000.0, fixed, "fp32")
    assert fp32["achieved_gflops"] == 100.0 and fp32["percent_of_peak"] == 50.0
    assert step_compute(10**11, 1000.0, fixed, "int8-weight")["percent_of_peak"] == 12.5
    assert step_compute(10**11, 1000.0, fixed, "fp16")["percent_of_peak"] is None


def test_the_table_shows_the_ddim_share_of_the_gemm_peak():
    from pathlib import Path

    from haplo.bench.report import table

    doc = json.loads((Path(__file__).parents[1] / "bench/results/peer-small/results.json").read_text())
    for entry in doc["backends"]:
        entry.pop("compute", None)
    doc["machine"].pop("gemm_peak_gflops", None)
    assert "GEMM peak at" not in table(doc)  # older documents still print
    doc["machine"]["gemm_peak_gflops"] = {
        "shape": [384, 768, 2048],
        "threads": 2,
        "fp32": 228.0,
        "fp32_torch": 190.0,
        "fp32_onnxruntime": 228.0,
        "int8": 890.0,
        "int8_onnxruntime": 890.0,
    }
    doc["settings"]["ddim_step_flops"] = {"step": 62e9, "step_without_reuse": 74e9}
    doc["backends"][1]["compute"] = {
        "step_gflop": 62.0,
        "achieved_gflops": 155.0,
        "peak": "fp32",
        "peak_gflops": 228.0,
        "percent_of_peak": 68.0,
    }
    text = table(doc)
    assert "GEMM peak at 384x768x2048, 2 threads: fp32 228 GFLOP/s" in text and "68% fp32" in text
    validate(doc)
    del doc["backends"][1]["compute"]["peak"]
    with pytest.raises(SchemaError):
        validate(doc)
