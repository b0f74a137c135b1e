"""`haplo-export bench`: every requested backend and precision, on the same inputs, in one process.

Order of work: load the PyTorch reference (the baseline), build or open one bundle per precision,
then for each backend/precision: cold start (load + first token), understanding, generation, and
the scaling sweeps, under a resident-memory sampler. Ratios are against torch eager of the same run.
The decode step is held against the memory-bandwidth bound (`roofline`), the DDIM step against the
measured GEMM peak (`compute`).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from haplo.artifacts import check_output_dir, indexed_dir, write_atomic
from haplo.bench import compute, report, sources, workloads
from haplo.bench.roofline import bundle_decode_weight_bytes, memory_bandwidth_gbs, roofline, torch_decode_weight_bytes
from haplo.bench.timing import PeakRSS, TimedBackend, gpu_peak_memory_mib


@dataclass
class BenchOptions:
    preset: str | None = None  # with no checkpoint or bundle either: the shipped model
    checkpoint: Path | None = None
    bundle: Path | None = None  # benchmark this bundle (its precision) instead of building one
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    threads: int | None = None  # default: physical cores
    warmup: int = 1
    repeats: int = 3
    new_tokens: int = 32
    question: str = "What moves in the picture, and in which direction does it go?"
    ddim_steps: int = 4  # end-to-end run; per-step figures do not depend on it
    guidance: float = 6.5
    sweeps: bool = True
    past_lengths: list[int] = field(default_factory=lambda: [32, 128, 256, 512, 1024])
    sweep_steps: int = 6
    videos: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(9, 64, 64), (9, 128, 128), (17, 128, 128), (9, 192, 192)]
    )
    out: Path = Path("bench/results/latest")
    work_dir: Path = Path(".cache/haplo-bench")
    peer: str | None = None  # "onnxruntime-genai": time the peer of the language half too
    device: str = "cpu"  # where torch and torch-compile run (the GPU baseline on "cuda")


def check_output(out: Path) -> None:
    """Refuse a results directory this command did not write."""
    check_output_dir(
        out,
        lambda d: indexed_dir(d, "results.json", "schema", report.SCHEMA, ("table.txt",), ".png"),
        "benchmark results directory",
    )


def machine_info() -> dict:
    from haplo.cpuinfo import cpu_info

    cpu = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu.model,
        "isa": cpu.isa,
        "cpu_flags": list(cpu.flags),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "os": platform.platform(),
    }


def _understanding_inputs(processor, options: BenchOptions) -> dict:
    import numpy as np
    from PIL import Image

    pixels = np.zeros((96, 160, 3), dtype=np.uint8)
    pixels[20:60, 30:90] = (220, 40, 40)
    conversation = [{"role": "user", "content": "<image>\n" + options.question}]
    inputs = processor(conversations=[conversation], images=[Image.fromarray(pixels)])
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _ratios(entry: dict, base: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    und, gen, bund, bgen = entry["understanding"], entry["generation"], base["understanding"], base["generation"]
    return {
        "ttft": ratio(bund["ttft_ms"]["p50"], und["ttft_ms"]["p50"]),
        "tpot": ratio(bund["tpot_ms"]["p50"], und["tpot_ms"]["p50"]),
        "tokens_per_s": ratio(und["tokens_per_s"], bund["tokens_per_s"]),
        "ddim_step": ratio(bgen["step_ms"]["p50"], gen["step_ms"]["p50"]),
        "ddim_step_without_reuse": ratio(bgen["step_without_reuse_ms"]["p50"], gen["step_without_reuse_ms"]["p50"]),
        "vae": ratio(bgen.get("vae_ms", {}).get("p50"), gen.get("vae_ms", {}).get("p50")),
        "end_to_end": ratio(bgen["end_to_end_ms"]["p50"], gen["end_to_end_ms"]["p50"]),
    }


@dataclass
class _Run:
    """What every variant of one benchmark run shares: the reference, its inputs, the bundles built."""

    options: BenchOptions
    log: Callable[[str], None]
    threads: int
    bandwidth: dict  # memory_bandwidth_gbs()
    model: Any
    vae: Any
    tokenizer: Any
    name: str
    reference_load_s: float
    und_inputs: dict
    gen_prompt: dict
    latent_shape: tuple
    bundles: dict = field(default_factory=dict)  # precision -> Bundle
    on_device: tuple | None = None  # (model, vae) on options.device, copied once when it is not the CPU
    sweeps: dict = field(default_factory=lambda: {"decode_vs_past": {}, "ddim_vs_latent_tokens": {}})
    ddim_flops: dict = field(default_factory=dict)  # compute.ddim_step_flops()
    gemm_peak: dict = field(default_factory=dict)  # compute.gemm_peaks()

    @property
    def config(self):
        return self.model.config

    def reference(self) -> tuple:
        """(model, vae) where the torch backends run; bundles keep exporting from the CPU copy."""
        device = torch.device(self.options.device)
        if device.type == "cpu":
            return self.model, self.vae
        if self.on_device is None:
            vae = None if self.vae is None else copy.deepcopy(self.vae).to(device)
            self.on_device = (copy.deepcopy(self.model).to(device), vae)
        return self.on_device


def run_benchmark(options: BenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run everything; returns the result document (see `report.validate`)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    pairs = sources.variants(options.backends, options.precisions)
    run = _prepare(options, log)
    entries = [_run_variant(run, kind, precision) for kind, precision in pairs]
    _add_ratios(entries)
    doc = _document(run, entries)
    if options.peer:
        doc["peer"] = _peer(run, entries)
    return doc


def _peer(run: _Run, entries: list[dict]) -> dict:
    """ONNX Runtime GenAI on a Qwen2 of our decode-step bytes, fp32 (+ its weight-only int8 when int8 or
    int8-weight is asked for, int4 for int4), same threads, prompt length and new tokens; and our times
    over its."""
    from haplo.bench import peer

    version = peer.require()
    ours = torch_decode_weight_bytes(run.model)
    spec = peer.peer_spec(run.config, ours)
    wanted = {"fp32"} | {peer.PRECISIONS[p] for p in run.options.precisions if p in peer.PRECISIONS}
    results = {p: _peer_result(run, spec, p) for p in ("fp32", "int8", "int4") if p in wanted}
    return {
        "name": peer.NAME,
        "version": version,
        "model": {"architecture": "Qwen2", **asdict(spec), "decode_weight_bytes": spec.decode_weight_bytes},
        "our_decode_weight_bytes": ours,
        "results": list(results.values()),
        "ratio_ours_to_peer": peer.compare(entries, results),
    }


def _peer_result(run: _Run, spec, precision: str) -> dict:
    from haplo.bench import peer

    options, prompt = run.options, int(run.und_inputs["input_ids"].shape[1])
    try:
        path, build_s = peer.build(spec, precision, options.work_dir, run.threads, options.seed, run.log)
        run.log(f"peer {precision}: {options.repeats} x {options.new_tokens} tokens")
        measured = peer.measure(path, prompt, options.new_tokens, options.warmup, options.repeats, options.seed)
    except peer.PeerError as err:
        run.log(f"peer {precision}: error ({err})")
        return {"precision": precision, "status": "error", "reason": str(err)}
    return {"precision": precision, "status": "ok", "build_s": build_s, **measured}


def _prepare(options: BenchOptions, log: Callable[[str], None]) -> _Run:
    """Threads and seed, the machine's copy bandwidth, the PyTorch reference (timed) and the inputs."""
    threads = options.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(options.seed)
    log("measuring memory bandwidth")
    bandwidth = memory_bandwidth_gbs()
    started = time.perf_counter()
    model, vae, tokenizer, name = sources.load_reference(options)
    load_s = time.perf_counter() - started
    model.eval()
    inputs = _inputs(tokenizer, model.config, options)
    run = _Run(options, log, threads, bandwidth, model, vae, tokenizer, name, load_s, **inputs)
    _measure_compute(run)
    return run


def _measure_compute(run: _Run) -> None:
    """The DDIM step's FLOPs (counted on the reference) and the GEMM peak at its shape."""
    run.log("counting the DDIM step's FLOPs and measuring the GEMM peak at its shape")
    run.ddim_flops = compute.ddim_step_flops(run.model, run.vae, run.gen_prompt, run.latent_shape)
    tokens, base = 2 * workloads.latent_tokens(run.config, run.latent_shape), run.config.base
    run.gemm_peak = compute.gemm_peaks(tokens, base.hidden_size, base.intermediate_size, run.threads)


def _inputs(tokenizer, config, options: BenchOptions) -> dict:
    """What every variant runs on: the image question, the generation prompt, the latent shape."""
    from haplo.model.processor import HaploOmniProcessor

    processor = HaploOmniProcessor(tokenizer, config)
    gen = config.video_generation
    return {
        "und_inputs": _understanding_inputs(processor, options),
        "gen_prompt": processor.process_prompt_for_generation(["a red square moves from left to right"], ""),
        "latent_shape": gen.latent_shape(gen.num_frames, gen.height, gen.width),
    }


def _run_variant(run: _Run, kind: str, precision: str) -> dict:
    """One backend/precision's entry: measured, skipped (TensorRT unusable) or the error that stopped it."""
    key = kind if kind.startswith("torch") else f"{kind}-{precision}"
    entry = {"key": key, "backend": kind, "precision": precision}
    reason = sources.unavailable(kind)
    if reason:
        entry.update(status="skipped", reason=reason)
        run.log(f"{key}: skipped ({reason})")
        return entry
    try:
        entry.update(status="ok", **_measure(run, kind, precision, key))
    except Exception as err:  # one failing backend must not lose the others' results
        if isinstance(err, sources.SourceError):  # the request itself is wrong: stop
            raise
        entry.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        run.log(f"{key}: error ({entry['reason']})")
    return entry


def _measure(run: _Run, kind: str, precision: str, key: str) -> dict:
    """Cold start, understanding, generation and the sweeps under a resident-memory sampler."""
    options = run.options
    bundle = _variant_bundle(run, kind, precision)
    run.log(f"{key}: cold start")
    with PeakRSS() as memory:
        backend, load_s = _open_backend(run, kind, precision, bundle)
        first_s = workloads.first_token_seconds(backend, run.und_inputs)
        run.log(f"{key}: understanding ({options.repeats} x {options.new_tokens} tokens)")
        und = workloads.understanding(backend, run.und_inputs, options.new_tokens, options.warmup, options.repeats)
        generation = _generation(run, backend, key)
        if options.sweeps:
            _sweeps(run, backend, key)
    weight_bytes = torch_decode_weight_bytes(run.model) if bundle is None else bundle_decode_weight_bytes(bundle)
    return {
        "cold_start": {"load_ms": load_s * 1e3, "first_token_ms": first_s * 1e3, "total_ms": (load_s + first_s) * 1e3},
        "understanding": und,
        "generation": generation,
        "memory": {**memory.to_dict(), "gpu_peak_mib": gpu_peak_memory_mib()},
        "roofline": roofline(weight_bytes, run.bandwidth["copy_gbs"], und["tpot_ms"]["p50"]),
        "compute": _step_compute(run, kind, precision, generation),
    }


def _step_compute(run: _Run, kind: str, precision: str, generation: dict) -> dict | None:
    """The DDIM step's share of this CPU's GEMM peak; None where it ran elsewhere (TensorRT, torch on a GPU)."""
    on_cpu = kind == "onnxruntime" or (kind.startswith("torch") and torch.device(run.options.device).type == "cpu")
    if not on_cpu or not run.gemm_peak:
        return None
    arithmetic = "fp32" if kind.startswith("torch") else precision
    return compute.step_compute(run.ddim_flops["step"], generation["step_ms"]["p50"], run.gemm_peak, arithmetic)


def _variant_bundle(run: _Run, kind: str, precision: str):
    """The bundle an engine backend runs (built or opened once per precision); None for torch."""
    if kind not in ("onnxruntime", "tensorrt"):
        return None
    if precision not in run.bundles:
        run.bundles[precision] = sources.bundle_for(
            precision, run.options, run.model, run.vae, run.tokenizer, run.name, run.log
        )
    return run.bundles[precision]


def _open_backend(run: _Run, kind: str, precision: str, bundle) -> tuple[TimedBackend, float]:
    """(the timed backend, its load seconds); torch's include loading the reference."""
    started = time.perf_counter()
    model, vae = run.reference() if kind.startswith("torch") else (run.model, run.vae)
    backend = TimedBackend(sources.make_backend(kind, model, vae, bundle, run.threads))
    load_s = time.perf_counter() - started
    if kind.startswith("torch"):
        load_s += run.reference_load_s
    return backend, load_s


def _generation(run: _Run, backend: TimedBackend, key: str) -> dict:
    """One guided DDIM step with and without prefix reuse, the VAE, end to end."""
    options = run.options
    run.log(f"{key}: generation (guided DDIM step with and without prefix reuse, VAE, end to end)")
    return workloads.generation(
        backend,
        run.gen_prompt,
        run.latent_shape,
        options.ddim_steps,
        options.guidance,
        options.warmup,
        options.repeats,
        options.seed,
    )


def _sweeps(run: _Run, backend: TimedBackend, key: str) -> None:
    """Decode step vs cache length (lengths that fit the positions) and DDIM step vs latent tokens."""
    options, config = run.options, run.config
    run.log(f"{key}: sweeps (decode step vs cache length, DDIM step vs latent tokens)")
    limit = config.base.max_position_embeddings
    past_lengths = [p for p in options.past_lengths if p + options.sweep_steps < limit]
    run.sweeps["decode_vs_past"][key] = workloads.decode_vs_past(
        backend, config, past_lengths, options.sweep_steps, options.seed
    )
    run.sweeps["ddim_vs_latent_tokens"][key] = workloads.ddim_vs_latent_tokens(
        backend, config, options.videos, run.gen_prompt, max(2, options.repeats), options.seed
    )


def _add_ratios(entries: list[dict]) -> None:
    """Every measured entry's speed-ups over torch eager of the same run ({} without one)."""
    baseline = next((e for e in entries if e["key"] == "torch" and e["status"] == "ok"), None)
    for entry in entries:
        if entry["status"] == "ok":
            entry["ratio_to_torch"] = _ratios(entry, baseline) if baseline else {}


def _document(run: _Run, entries: list[dict]) -> dict:
    """The result document `report.validate` checks."""
    settings, versions = _settings(run), _versions()
    return {
        "schema": report.SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "haplo-export " + " ".join(sys.argv[1:]) if sys.argv and "haplo-export" in sys.argv[0] else None,
        "machine": {**machine_info(), "memory_bandwidth": run.bandwidth, "gemm_peak_gflops": run.gemm_peak},
        "versions": versions,
        "settings": settings,
        "backends": entries,
        "sweeps": run.sweeps,
    }


def _settings(run: _Run) -> dict:
    """The options as given, and what they came to (model, threads, token counts, latent shape)."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(run.options).items()}
    settings.update(
        model=run.name,
        threads=run.threads,
        prompt_tokens=int(run.und_inputs["input_ids"].shape[1]),
        latent_shape=list(run.latent_shape),
        latent_tokens=workloads.latent_tokens(run.config, run.latent_shape),
        generation_text_tokens=int(run.gen_prompt["input_ids"].shape[1]),
        ddim_step_flops=run.ddim_flops,
    )
    return settings


def _versions() -> dict:
    """The libraries' versions and ONNX Runtime's execution providers."""
    from haplo.export.cache import library_versions

    versions = library_versions()
    try:
        import onnxruntime

        versions["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return versions


def write_outputs(doc: dict, out: Path) -> dict:
    """results.json, table.txt and the plots in `out`."""
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(doc, out / "results.json")}
    text = report.table(doc)
    paths["table"] = write_atomic(out / "table.txt", text + "\n")
    paths["plots"] = report.plots(doc, out)
    return paths
