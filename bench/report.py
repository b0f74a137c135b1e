"""Benchmark outputs: the JSON document (stable schema), a terminal table, PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from haplo.artifacts import write_atomic
from haplo.errors import HaploError

SCHEMA = "haplo-bench/1"

# Keys every result document has; `validate` checks them (tests and consumers rely on this).
TOP_LEVEL = ("schema", "created", "command", "machine", "versions", "settings", "backends", "sweeps")
BACKEND_KEYS = ("key", "backend", "precision", "status")
MEASURED_KEYS = ("cold_start", "understanding", "generation", "memory", "roofline", "ratio_to_torch")
COMPUTE_KEYS = ("step_gflop", "achieved_gflops", "peak", "peak_gflops", "percent_of_peak")  # when on a CPU


class SchemaError(HaploError, ValueError):
    pass


def validate(doc: dict) -> None:
    """Raise SchemaError naming the first missing or malformed field."""
    for key in TOP_LEVEL:
        if key not in doc:
            raise SchemaError(f"missing top-level key {key!r}")
    if doc["schema"] != SCHEMA:
        raise SchemaError(f"schema {doc['schema']!r} != {SCHEMA!r}")
    for entry in doc["backends"]:
        for key in BACKEND_KEYS:
            if key not in entry:
                raise SchemaError(f"backend entry misses {key!r}: {entry.get('key')}")
        if entry["status"] == "ok":
            for key in MEASURED_KEYS:
                if key not in entry:
                    raise SchemaError(f"{entry['key']}: missing {key!r}")
            for key in ("ttft_ms", "tpot_ms", "tokens_per_s", "prefill_stage_ms", "decode_step_stage_ms"):
                if key not in entry["understanding"]:
                    raise SchemaError(f"{entry['key']}: understanding misses {key!r}")
            for key in ("step_ms", "step_without_reuse_ms", "prefix_reuse_saving", "end_to_end_ms"):
                if key not in entry["generation"]:
                    raise SchemaError(f"{entry['key']}: generation misses {key!r}")
            for key in COMPUTE_KEYS if entry.get("compute") else ():
                if key not in entry["compute"]:
                    raise SchemaError(f"{entry['key']}: compute misses {key!r}")
        elif "reason" not in entry:
            raise SchemaError(f"{entry['key']}: status {entry['status']!r} without a reason")
    if "peer" in doc:
        _validate_peer(doc["peer"])


def _validate_peer(peer: dict) -> None:
    for key in ("name", "version", "model", "our_decode_weight_bytes", "results", "ratio_ours_to_peer"):
        if key not in peer:
            raise SchemaError(f"peer misses {key!r}")
    for result in peer["results"]:
        needed = ("ttft_ms", "tpot_ms", "tokens_per_s") if result.get("status") == "ok" else ("reason",)
        for key in ("precision", "status", *needed):
            if key not in result:
                raise SchemaError(f"peer {result.get('precision')}: missing {key!r}")


def write_json(doc: dict, path: Path) -> Path:
    validate(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(doc, indent=2) + "\n")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(doc: dict) -> str:
    """One row per backend/precision: the headline numbers and the ratio to torch eager."""
    header = [
        "backend",
        "prec",
        "TTFT p50",
        "TPOT p50",
        "tok/s",
        "DDIM step",
        "no reuse",
        "reuse saves",
        "VAE",
        "peak RSS",
        "roofline",
        "DDIM/peak",
        "TPOT x",
        "DDIM x",
    ]
    rows = [header]
    for entry in doc["backends"]:
        if entry["status"] != "ok":
            rows.append([entry["backend"], entry["precision"], f"{entry['status']}: {entry['reason']}"])
            continue
        und, gen, ratio = entry["understanding"], entry["generation"], entry["ratio_to_torch"]
        rows.append(
            [
                entry["backend"],
                entry["precision"],
                _fmt(und["ttft_ms"]["p50"]) + " ms",
                _fmt(und["tpot_ms"]["p50"]) + " ms",
                _fmt(und["tokens_per_s"], 1),
                _fmt(gen["step_ms"]["p50"]) + " ms",
                _fmt(gen["step_without_reuse_ms"]["p50"]) + " ms",
                f"{gen['prefix_reuse_saving']:.0%}",
                _fmt(gen.get("vae_ms", {}).get("p50")) + " ms",
                _fmt(entry["memory"]["peak_rss_mib"], 0) + " MiB",
                f"{entry['roofline']['percent_of_bound']:.0f}%",
                _share_of_peak(entry.get("compute")),
                _fmt(ratio.get("tpot"), 2) + "x",
                _fmt(ratio.get("ddim_step"), 2) + "x",
            ]
        )
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) == len(header)) for i in range(len(header))]
    lines = []
    for row in rows:
        if len(row) != len(header):
            lines.append("  ".join(row[:2]) + "  " + row[2])
        else:
            lines.append(
                "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            )
    lines.insert(1, "-" * len(lines[0]))
    settings, machine = doc["settings"], doc["machine"]
    lines += [
        "",
        f"model {settings['model']}, {settings['threads']} threads, prompt {settings['prompt_tokens']} "
        f"tokens + {settings['new_tokens']} new, latents {settings['latent_shape']} "
        f"({settings['latent_tokens']} tokens), {settings['repeats']} repeats after {settings['warmup']} warm-up",
        f"machine: {machine['cpu']}, {machine.get('isa', 'ISA not recorded')} "
        f"({machine['physical_cores']} cores), {machine['memory_gib']} GiB, "
        f"copy bandwidth {machine['memory_bandwidth']['copy_gbs']:.1f} GB/s"
        + (f"; torch on {settings['device']} ({machine.get('gpu')})" if settings.get("device", "cpu") != "cpu" else ""),
        *_gemm_lines(doc),
        "x = speed-up over torch eager (time of torch / time of the backend); roofline = weight-bandwidth bound "
        "/ achieved decode step; DDIM/peak = achieved DDIM-step FLOP/s / measured GEMM peak of its arithmetic",
    ]
    if "peer" in doc:
        lines += ["", *peer_lines(doc["peer"])]
    return "\n".join(lines)


def _share_of_peak(compute: dict | None) -> str:
    if not compute or compute.get("percent_of_peak") is None:
        return "-"
    return f"{compute['percent_of_peak']:.0f}% {compute['peak']}"


def _gemm_lines(doc: dict) -> list[str]:
    """The DDIM step's FLOPs and the GEMM peak it is held against (absent from older documents)."""
    peak, flops = doc["machine"].get("gemm_peak_gflops"), doc["settings"].get("ddim_step_flops")
    if not peak or not flops:
        return []
    m, k, n = peak["shape"]
    return [
        f"DDIM step {flops['step'] / 1e9:.1f} GFLOP ({flops['step_without_reuse'] / 1e9:.1f} without reuse); "
        f"GEMM peak at {m}x{k}x{n}, {peak['threads']} threads: fp32 {peak['fp32']:.0f} GFLOP/s (torch "
        f"{peak['fp32_torch']:.0f}, ONNX Runtime {peak['fp32_onnxruntime']:.0f}), int8 {peak['int8']:.0f} GFLOP/s "
        "(ONNX Runtime MatMulInteger)"
    ]


def peer_lines(peer: dict) -> list[str]:
    """The peer's model, its times, and ours over its (above 1: ours is slower)."""
    m = peer["model"]
    lines = [
        f"peer {peer['name']} {peer['version']}: {m['architecture']} of {m['num_hidden_layers']} layers (hidden "
        f"{m['hidden_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, MLP "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}), decode-step weights "
        f"{m['decode_weight_bytes'] / 1e6:.1f} MB "
        f"(ours {peer['our_decode_weight_bytes'] / 1e6:.1f} MB)"
    ]
    for result in peer["results"]:
        if result["status"] != "ok":
            lines.append(f"  {result['precision']}: {result['status']}: {result['reason']}")
            continue
        lines.append(
            f"  {result['precision']}: TTFT p50 {_fmt(result['ttft_ms']['p50'])} ms, TPOT p50 "
            f"{_fmt(result['tpot_ms']['p50'])} ms, {_fmt(result['tokens_per_s'], 1)} tok/s"
        )
    for key, ratio in peer["ratio_ours_to_peer"].items():
        lines.append(f"  {key} / peer {ratio['peer_precision']}: TTFT {ratio['ttft']:.2f}x, TPOT {ratio['tpot']:.2f}x")
    return lines


def plots(doc: dict, out_dir: Path) -> list[Path]:
    """latency.png (headline bars), decode_vs_past.png, ddim_vs_latent_tokens.png, roofline.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [e for e in doc["backends"] if e["status"] == "ok"]
    written = []

    def save(fig, name):
        path = out_dir / name
        staged = out_dir / f".{name}.tmp.png"
        fig.tight_layout()
        fig.savefig(staged, dpi=110)
        plt.close(fig)
        os.replace(staged, path)
        written.append(path)

    if ok:
        metrics = [
            ("TTFT", lambda e: e["understanding"]["ttft_ms"]["p50"]),
            ("TPOT", lambda e: e["understanding"]["tpot_ms"]["p50"]),
            ("DDIM step", lambda e: e["generation"]["step_ms"]["p50"]),
            ("DDIM step, no reuse", lambda e: e["generation"]["step_without_reuse_ms"]["p50"]),
        ]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
        for ax, (title, get) in zip(axes, metrics):
            ax.bar([e["key"] for e in ok], [get(e) for e in ok], color="tab:blue")
            ax.set_title(f"{title} (p50)")
            ax.set_ylabel("ms")
            ax.tick_params(axis="x", rotation=30)
        save(fig, "latency.png")

        fig, ax = plt.subplots(figsize=(5, 3.6))
        keys = [e["key"] for e in ok]
        ax.bar(keys, [e["roofline"]["achieved_step_ms"] for e in ok], label="achieved decode step")
        ax.bar(keys, [e["roofline"]["bound_step_ms"] for e in ok], label="bandwidth bound", alpha=0.8)
        ax.set_ylabel("ms")
        ax.set_title("decode step vs memory-bandwidth bound")
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        save(fig, "roofline.png")

    for sweep, xkey, xlabel, name in (
        ("decode_vs_past", "past_tokens", "past tokens (KV cache length)", "decode_vs_past.png"),
        ("ddim_vs_latent_tokens", "latent_tokens", "latent tokens", "ddim_vs_latent_tokens.png"),
    ):
        series = doc["sweeps"].get(sweep) or {}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key, rows in series.items():
            ax.plot([r[xkey] for r in rows], [r["step_ms"]["p50"] for r in rows], marker="o", label=key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step p50 (ms)")
        ax.set_title("decode step vs cache length" if sweep == "decode_vs_past" else "guided DDIM step vs video size")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)
    return written
