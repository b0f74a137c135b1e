"""The prepared GPU check runs its CPU parts (`--dry-run`) and writes one JSON of sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from haplo.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_checks_the_kernels_and_the_end_to_end_path_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its python
    command = [str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["format"] == "haplo-gpu-check/1" and report["dry_run"]
    sections = ("environment", "ptx", "kernels", "attention_timing", "torch_end_to_end", "tensorrt")
    assert {name: report[name]["status"] for name in sections} == {
        "environment": "ok",
        "ptx": "ok",
        "kernels": "ok",
        "attention_timing": "skipped",
        "torch_end_to_end": "ok",
        "tensorrt": "skipped",
    }
    assert report["ptx"]["max_shared_bytes"] <= 48 << 10 and report["ptx"]["param_counts"] == [9, 10]
    assert report["ptx"]["spill_bytes"] == 0 and report["ptx"]["max_registers"] <= 255
    assert all(c["max_abs_error"] < 1e-3 for c in report["kernels"]["checks"])
    assert report["torch_end_to_end"]["tiny_fp32"]["tpot_ms"] > 0
    assert report["torch_end_to_end"]["tiny_fp32"]["outputs_on"] == "cpu"  # the dry run's device


def test_the_gpu_run_checks_paper_scale_shapes():
    shapes = gpu_check.kernel_shapes(dry_run=False)
    assert {a[-1] for a in shapes["attention"]} == {64, 128} and shapes["dtypes"] == ["fp32", "bf16"]
    assert max(a[4] for a in shapes["attention"]) == 17551 and min(a[3] for a in shapes["attention"]) == 1
    assert {h for _, h, _, _ in shapes["adaln"]} == {1024, 3584, 1920}


def test_a_failing_section_is_recorded_and_the_others_still_run():
    results = {}
    gpu_check._section(results, "broken", lambda: 1 / 0, log=lambda _: None)
    gpu_check._section(results, "fine", lambda: {"value": 1}, log=lambda _: None)
    assert results["broken"]["status"] == "error" and "ZeroDivisionError" in results["broken"]["message"]
    assert results["fine"] == {"status": "ok", "seconds": results["fine"]["seconds"], "value": 1}
