"""report.md: the build's parity and accuracy tables, for people (parity.json is for programs)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from haplo.artifacts import write_atomic
from haplo.bundle import Manifest

TITLE = "# Bundle report"


def write_report(root: Path, manifest: Manifest, parity: dict) -> None:
    lines = _graph_table(manifest, parity) + _accuracy_table(manifest) + _end_to_end(parity)
    (root / "report.md").write_text("\n".join(lines))


def append_task_report(root: Path, task: dict) -> None:
    """The task accuracy of the staged bundle, after the per-graph figures of report.md."""
    lines = ["", f"## Task accuracy on held-out clips of the synthetic world (seed {task['seed']})", ""]
    lines += ["| task | n | overall | colour | shape | direction |", "|---|---|---|---|---|---|"]
    for kind, key in (("understanding", "all_correct"), ("generation", "both_correct")):
        if kind in task:
            r, cells = task[kind], task[kind]["per_attribute"]
            per = [f"{cells[a]:.1%}" if a in cells else "-" for a in ("colour", "shape", "direction")]
            lines.append(f"| {kind} ({key.replace('_', ' ')}) | {r['n']} | {r[key]:.1%} | " + " | ".join(per) + " |")
    with open(root / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def append_activations_report(root: Path, lowered: dict) -> None:
    """The decoders whose activations and KV cache were lowered for TensorRT, and their checks."""
    lines = ["", "## Activations for TensorRT (lowered after the checks above, which ran on ONNX Runtime)", ""]
    lines += [
        "| graph | dtype | tensors lowered | kept fp32 | fp32 matmuls | fp16 pass vs PyTorch: cosine | max abs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in lowered.items():
        check = r["fp16_check"]
        lines.append(
            f"| {name} | {r['dtype']} | {r['tensors_lowered']} | {r['tensors_kept_fp32']} | "
            f"{len(r['structure']['fp32_matmuls'])} | {check['cosine']:.7f} | {check['max_abs_error']:.3g} |"
        )
    with open(root / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def _graph_table(manifest: Manifest, parity: dict) -> list[str]:
    lines = [
        f"{TITLE}: {manifest.source.get('name', '')}",
        "",
        f"precision {manifest.precision}, opset {manifest.opset}, "
        f"custom ops {'off (decomposed)' if manifest.custom_ops['decomposed'] else 'on'}",
        "",
        "| graph | max abs error | cosine | finite | status |",
        "|---|---|---|---|---|",
    ]
    for name, result in parity["graphs"].items():
        status = "ok" if result["ok"] else "FAIL: " + "; ".join(result["problems"])
        lines.append(
            f"| {name} | {result['max_abs_error']:.3g} | {result['cosine']:.7f} | {result['finite']} | {status} |"
        )
    return lines


def _accuracy_table(manifest: Manifest) -> list[str]:
    quant = manifest.quantization
    if not quant["accuracy"]:
        return []
    lines = [
        "",
        f"## {manifest.precision} accuracy (against fp32 PyTorch)",
        "",
        f"policy {json.dumps(quant['policy'])}, INT8 activations for {quant['flavor']}, "
        f"kept in fp32 by pattern: {quant['exclude'] or 'none'}",
        "",
        "| graph | precision | matmuls | weight rel. error (max) | max abs error | cosine | inputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in quant["accuracy"].items():
        werr = r.get("weight_relative_error_max")
        lines.append(
            f"| {name} | {r['precision']} | {r.get('matmuls', '-')} | "
            f"{'-' if werr is None else f'{werr:.3g}'} | {r['max_abs_error']:.3g} | {r['cosine']:.6f} | "
            f"{r['inputs']} |"
        )
    return lines


def _end_to_end(parity: dict) -> list[str]:
    und, gen = parity["understanding"], parity["generation"]
    return [
        "",
        f"Understanding: teacher-forced greedy agreement {und['agreement']:.1%} over {und['steps']} "
        f"steps (torch vs ONNX Runtime).",
        f"Generation: latents after {gen['steps']} guided DDIM steps, max abs error "
        f"{gen['max_abs_error']:.3g}, cosine {gen['cosine']:.7f}"
        + (f", decoded video PSNR {gen['video_psnr_db']:.1f} dB." if gen.get("video_psnr_db") else "."),
        "",
        f"Tolerances: {json.dumps(parity['tolerances'])}",
        "",
    ]


def keep_failed_report(root: Path, out: Path) -> Path:
    """The report of a failed build, beside the target; never over a file this tool did not write."""
    report = out.with_name(out.name + ".failed-report.md")
    if report.exists() and not report.read_text(errors="replace").startswith(TITLE):
        report = out.with_name(f"{out.name}.failed-report-{uuid.uuid4().hex[:8]}.md")
    write_atomic(report, (root / "report.md").read_bytes())
    return report
