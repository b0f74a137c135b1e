"""The prepared GPU check: one command, one JSON, on a machine with an NVIDIA GPU (or `--dry-run` on CPU).

    scripts/gpu-check --out bench/results/gpu/check.json       (GPU: paper-scale shapes, < 8 minutes)
    scripts/gpu-check --dry-run --out /tmp/check.json          (CPU: Triton's interpreter, tiny shapes)

Sections, each recorded as ok / skipped (with why) / error (with the message), so one failure does
not hide the others:
- environment: GPU, driver, CUDA, torch, Triton, TensorRT and diffusers (with the pip line when absent);
- ptx: every plugin kernel variant of haplo-omni-9b compiled for this GPU at the driver's PTX ISA;
- kernels: both Triton kernels launched against the PyTorch reference, fp32 and bf16, at the 9B
  model's widths and head sizes (64 and 128), prefill over 17,551 tokens and decode over a long cache;
- attention_timing: the attention kernel against PyTorch SDPA with the equivalent dense mask;
- torch_end_to_end: the PyTorch backend on the GPU, `tiny` and haplo-omni-9b cut to 2 layers per
  stage in bf16: TTFT, TPOT and a guided DDIM step;
- tensorrt: only where TensorRT imports: a `tiny` bundle with engines, its greedy tokens against PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

DIFFUSERS = "diffusers==0.42.1"  # constraints.txt's; what a GPU machine without it installs for the DDIM step


def _section(results: dict, name: str, fn: Callable[[], dict], log: Callable[[str], None]) -> None:
    started = time.perf_counter()
    log(f"{name} ...")
    try:
        body = fn()
        status = body.pop("status", "ok")
    except Exception as err:  # the check reports every section, whatever one of them raises
        body, status = {"message": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}, "error"
    results[name] = {"status": status, "seconds": round(time.perf_counter() - started, 2), **body}
    log(f"{name}: {status}")


def environment() -> dict:
    import torch
    import triton

    from haplo.engines.plugins import aot
    from haplo.engines.tensorrt import tensorrt_status

    cuda = torch.cuda.is_available()
    usable, reason = tensorrt_status()
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = f"absent: pip install {DIFFUSERS}"
    driver = aot.driver_cuda_version()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability()) if cuda else None,
        "cuda_driver": None if driver is None else f"{driver[0]}.{driver[1]}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "tensorrt": "usable" if usable else reason,
        "diffusers": diffusers_version,
    }


def _arch() -> int:
    import torch

    if not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def ptx() -> dict:
    import tempfile

    from haplo.engines.plugins import aot
    from haplo.model.config import preset

    arch = _arch()
    version = aot.ptx_version_for(arch, aot.driver_cuda_version())
    with tempfile.TemporaryDirectory() as out:
        index = aot.compile_for_config(
            preset("haplo-omni-9b"), Path(out) / "k", arch, log=lambda _: None, ptx_version=version
        )
    kernels_ = index["kernels"].values()
    return {
        "arch": arch,
        "ptx_version": index["ptx_version"],
        "variants": len(index["kernels"]),
        "max_shared_bytes": max(k["shared_bytes"] for k in kernels_),
        "max_registers": max(k["registers"] for k in kernels_),
        "spill_bytes": sum(k["spill_bytes"] for k in kernels_),  # ptxas -v of every shipped PTX
        "param_counts": sorted({k["param_count"] for k in kernels_}),
    }


def _adaln_inputs(rows: int, hidden: int, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return (
        rand(rows, hidden),
        1 + rand(hidden, scale=0.1),
        rand(hidden, scale=0.1),
        rand(2, hidden, scale=0.1),
        rand(2, scale=0.1),
        rand(3, hidden, scale=0.1),
        rand(3, hidden, scale=0.1),
    )


def _error(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def kernel_shapes(dry_run: bool) -> dict:
    """What the kernels are checked at: the 9B model's widths and heads, or small ones on CPU."""
    from haplo.model.config import preset

    config = preset("haplo-omni-9b")
    if dry_run:
        return {
            "adaln": [(8, 64, "rmsnorm", 1e-6), (8, 48, "layernorm", 1e-5)],
            "attention": [(1, 4, 2, 40, 40, 16), (1, 4, 2, 1, 40, 64)],  # B, Hq, Hkv, Lq, Lk, D
            "dtypes": ["fp32"],
        }
    tokens = 17551  # 17,550 latent tokens of 49 x 480 x 720 and the time token
    adaln = [(256, s.hidden_size, s.norm_mode, s.rms_norm_eps) for s in config.stages.values()]
    attention = []
    for s in config.stages.values():
        attention.append((1, s.num_attention_heads, s.num_key_value_heads, tokens, tokens, s.head_dim))
        attention.append((2, s.num_attention_heads, s.num_key_value_heads, 1, tokens, s.head_dim))
    return {"adaln": adaln, "attention": attention, "dtypes": ["fp32", "bf16"]}


def _block_key_start(batch: int, k_len: int, device):
    """Causal text then one bidirectional block of the last 3/4 of the keys (a generation layout)."""
    import torch

    start = torch.arange(k_len, device=device)
    block = k_len // 4
    start[block:] = block
    return start.expand(batch, k_len).contiguous()


def kernels(dry_run: bool) -> dict:
    import torch

    from haplo.engines.plugins import kernels as triton_kernels
    from haplo.model import ops

    device = "cpu" if dry_run else "cuda"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    shapes = kernel_shapes(dry_run)
    rows = []
    for name in shapes["dtypes"]:
        dtype = dtypes[name]
        for count, hidden, mode, eps in shapes["adaln"]:
            x, w, b, iw, ib, sl, sc = _adaln_inputs(count, hidden, dtype, device)
            got = triton_kernels.multimodal_adaln(x, w, b, iw, ib, sl, sc, eps, mode)
            ref = ops.reference_multimodal_adaln(
                x.float(), w.float(), b.float(), iw.float(), ib.float(), sl.float(), sc.float(), eps, mode
            )
            rows.append(
                {
                    "kernel": "adaln",
                    "dtype": name,
                    "hidden": hidden,
                    "mode": mode,
                    "max_abs_error": max(_error(got[0], ref[0]), _error(got[1], ref[1])),
                }
            )
        for batch, hq, hkv, lq, lk, d in shapes["attention"]:
            g = torch.Generator(device="cpu").manual_seed(1)
            q = torch.randn(batch, hq, lq, d, generator=g).to(device, dtype)
            k = torch.randn(batch, hkv, lk, d, generator=g).to(device, dtype)
            v = torch.randn(batch, hkv, lk, d, generator=g).to(device, dtype)
            key_start = _block_key_start(batch, lk, device)
            got = triton_kernels.hybrid_attention(q, k, v, key_start)
            ref = ops.reference_hybrid_attention(q.float(), k.float(), v.float(), key_start)
            rows.append(
                {
                    "kernel": "attention",
                    "dtype": name,
                    "shape": [batch, hq, hkv, lq, lk, d],
                    "max_abs_error": _error(got, ref),
                }
            )
            del q, k, v, got, ref
    limits = {"fp32": 1e-3, "bf16": 5e-2}
    bad = [r for r in rows if not r["max_abs_error"] <= limits[r["dtype"]]]
    return {"status": "error" if bad else "ok", "limits": limits, "checks": rows}


def attention_timing(dry_run: bool) -> dict:
    if dry_run:
        return {"status": "skipped", "why": "timing needs the GPU"}
    return {"bf16": [_time_attention(hq, hkv, d) for hq, hkv, d in ((28, 4, 128), (16, 16, 64))]}


def _time_attention(hq: int, hkv: int, d: int, tokens: int = 17551) -> dict:
    """Our attention kernel against SDPA with the dense block mask (and K/V repeated for GQA)."""
    import torch
    import torch.nn.functional as F

    from haplo.engines.plugins import kernels as triton_kernels
    from haplo.model import ops

    q = torch.randn(1, hq, tokens, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    key_start = _block_key_start(1, tokens, "cuda")
    mask = ops.block_mask(key_start, tokens)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    ours = _cuda_ms(lambda: triton_kernels.hybrid_attention(q, k, v, key_start))
    sdpa = _cuda_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask))
    return {
        "heads": [hq, hkv],
        "head_dim": d,
        "tokens": tokens,
        "triton_ms": ours,
        "sdpa_dense_mask_ms": sdpa,
        "speedup": round(sdpa / ours, 2),
    }


def _cuda_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 3)


def _cut(config, layers: int):
    stages = {s: dataclasses.replace(getattr(config, s), num_hidden_layers=layers) for s in ("pre", "base", "post")}
    return dataclasses.replace(config, **stages)


def _time_model(model, device: str) -> dict:
    """TTFT and TPOT of 8 greedy tokens after a 128-token prompt, and one guided DDIM step."""
    import torch

    from haplo.runtime.decoding import decode_step, prefill
    from haplo.runtime.torch_backend import TorchBackend

    backend = TorchBackend(model)
    high = min(model.config.vocab_size, model.config.image_token_index, model.config.video_token_index)
    ids = torch.randint(4, high, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    prefill(backend, inputs)
    sync()
    started = time.perf_counter()
    logits, state = prefill(backend, inputs)
    sync()
    result = {"ttft_ms": round((time.perf_counter() - started) * 1000, 2)}
    token, steps = logits.argmax(-1), []
    for _ in range(8):
        started = time.perf_counter()
        logits, state = decode_step(backend, token, state)
        sync()
        steps.append(time.perf_counter() - started)
        token = logits.argmax(-1)
    result["tpot_ms"] = round(sorted(steps)[len(steps) // 2] * 1000, 2)
    result["outputs_on"] = str(logits.device)  # the backend's results stay where they were computed
    result.update(_ddim_step(backend, ids, sync))
    return result


def _ddim_step(backend, ids, sync) -> dict:
    try:
        from haplo.runtime.ddim import encode_prompt, predict_v
    except ImportError:
        return {"ddim_step": f"skipped: pip install {DIFFUSERS}"}
    import torch

    gen = backend.config.video_generation
    shape = gen.latent_shape(gen.num_frames, gen.height, gen.width)
    pair = torch.cat([ids, ids])
    prefix = encode_prompt(backend, pair, torch.ones_like(pair))
    latents = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500, dtype=torch.long)
    predict_v(backend, latents, t, prefix=prefix)
    sync()
    started = time.perf_counter()
    predict_v(backend, latents, t, prefix=prefix)
    sync()
    return {
        "ddim_step_ms": round((time.perf_counter() - started) * 1000, 2),
        "latent_tokens": int(gen.latent_tokens(gen.num_frames, gen.height, gen.width)),
    }


def torch_end_to_end(dry_run: bool) -> dict:
    import torch

    from haplo.model.config import preset
    from haplo.model.modeling import HaploOmniForConditionalGeneration

    device = "cpu" if dry_run else "cuda"
    runs = {}
    tiny = HaploOmniForConditionalGeneration.from_config(preset("tiny")).to(device)
    runs["tiny_fp32"] = _time_model(tiny, device)
    if dry_run:
        return {**runs, "haplo_omni_9b_2_layers": "skipped: the GPU run only"}
    del tiny
    config = _cut(preset("haplo-omni-9b"), 2)
    with torch.device("cuda"):
        model = HaploOmniForConditionalGeneration(config).init_weights(0).to(torch.bfloat16).eval()
    runs["haplo_omni_9b_2_layers_bf16"] = _time_model(model, device)
    return runs


def tensorrt(dry_run: bool) -> dict:
    from haplo.engines.tensorrt import tensorrt_status

    usable, reason = tensorrt_status()
    if dry_run or not usable:
        return {"status": "skipped", "why": "dry run" if dry_run else reason}
    import subprocess
    import tempfile

    import torch

    from haplo.bundle import Bundle
    from haplo.engines.tensorrt import TensorRTBackend
    from haplo.model.modeling import HaploOmniForConditionalGeneration
    from haplo.runtime.decoding import understand
    from haplo.runtime.torch_backend import TorchBackend

    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "tiny"
        build = [sys.executable, "-m", "haplo.commands.main", "build", "--preset", "tiny", "--target", "tensorrt"]
        done = subprocess.run([*build, "--out", str(out)], capture_output=True, text=True)
        if done.returncode:
            return {"status": "error", "message": (done.stderr.strip().splitlines() or ["build failed"])[-1]}
        bundle = Bundle.open(out)
        ids = torch.randint(4, 200, (1, 24), generator=torch.Generator().manual_seed(0))
        model = HaploOmniForConditionalGeneration.from_preset("tiny")
        reference = understand(TorchBackend(model), ids, max_new_tokens=16)
        engines = understand(TensorRTBackend(bundle), ids, max_new_tokens=16)
        same = bool(torch.equal(reference.new_tokens, engines.new_tokens))
        return {
            "status": "ok" if same else "error",
            "greedy_tokens_equal": same,
            "engines": sorted(bundle.manifest.engines),
        }


def run(dry_run: bool, log: Callable[[str], None] = print) -> dict:
    results: dict = {"format": "haplo-gpu-check/1", "dry_run": dry_run, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    started = time.perf_counter()
    _section(results, "environment", environment, log)
    _section(results, "ptx", ptx, log)
    _section(results, "kernels", lambda: kernels(dry_run), log)
    _section(results, "attention_timing", lambda: attention_timing(dry_run), log)
    _section(results, "torch_end_to_end", lambda: torch_end_to_end(dry_run), log)
    _section(results, "tensorrt", lambda: tensorrt(dry_run), log)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only: Triton's interpreter, tiny shapes, no timing")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu/gpu-check.json"), help="the JSON to write")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    from haplo.artifacts import write_atomic

    results = run(args.dry_run, log=lambda m: print(m, file=sys.stderr))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(v.get("status") == "error" for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
