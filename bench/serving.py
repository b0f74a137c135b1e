"""The serving benchmark: `haplo-serve` under N concurrent streaming clients against one, in one run.

The server runs as its own process (the `haplo-serve` command, as a user starts it); the clients are
the official `openai` async client in this one. Every request is a greedy video question with a fixed
number of new tokens (`ignore_eos`), so runs compare like for like, and every answer under load must
equal the answer to the same request served alone. The questions reuse `prompts` clips, so past the
first round the server's media cache hands out decoded clips (`--media-cache-mib 0` decodes each
again) and its prefix cache the prompts' kept KV cache (`--prefix-cache-mib 0` prefills every prompt
whole); the results count the hits and the share of prompt tokens reused. Video jobs: K concurrent
jobs against one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from haplo.artifacts import check_output_dir, indexed_dir, write_atomic
from haplo.bench import sources
from haplo.bench.runner import machine_info

SCHEMA = "haplo-bench-serve/1"


@dataclass
class ServeBenchOptions:
    preset: str | None = None  # with no checkpoint or bundle either: the shipped model
    checkpoint: Path | None = None
    bundle: Path | None = None
    seed: int = 0
    backend: str = "onnxruntime"  # or "torch"
    precision: str = "fp32"
    threads: int | None = None
    media_cache_mib: int | None = None  # the server's decoded-media cache; None: its default
    prefix_cache_mib: int | None = None  # the server's kept prompt prefixes; None: its default
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])  # concurrency levels; 1 is the baseline
    requests_per_client: int = 2
    new_tokens: int = 32
    prompts: int = 16  # distinct questions (held-out clips)
    video_jobs: int = 4
    video_steps: int = 4
    out: Path = Path("bench/results/serve")
    work_dir: Path = Path(".cache/haplo-bench")
    command: str | None = None  # the command line that ran it, for the results


def check_output(out: Path) -> None:
    check_output_dir(
        out, lambda d: indexed_dir(d, "serving.json", "schema", SCHEMA, ("table.txt",)), "serving results directory"
    )


# -- the server process ------------------------------------------------------------------------


def _server_args(options: ServeBenchOptions, log: Callable[[str], None]) -> tuple[list[str], str]:
    """haplo-serve's model arguments for the benchmarked backend, and the model id it will serve."""
    if options.backend == "torch":
        if options.checkpoint or not options.preset:
            from haplo.model.shipped import shipped_checkpoint

            checkpoint = options.checkpoint or shipped_checkpoint()
            return ["--checkpoint", str(checkpoint)], Path(checkpoint).resolve().name
        return ["--preset", options.preset, "--seed", str(options.seed)], options.preset
    model, vae, tokenizer, name = sources.load_reference(options)
    bundle = sources.bundle_for(options.precision, options, model, vae, tokenizer, name, log)
    return ["--bundle", str(bundle.root), "--backend", "onnxruntime"], Path(bundle.root).resolve().name


class ServerProcess:
    """`haplo-serve` on a free local port, until the block ends."""

    def __init__(self, model_args: list[str], options: ServeBenchOptions) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.command = [sys.executable, "-m", "haplo.commands.serve", *model_args, "--port", str(self.port)]
        self.command += ["--max-batch", str(max(options.clients)), "--max-queue", str(4 * max(options.clients) + 8)]
        self.command += ["--max-video-batch", str(options.video_jobs), "--log-level", "warning"]
        if options.threads:
            self.command += ["--threads", str(options.threads)]
        if options.media_cache_mib is not None:
            self.command += ["--media-cache-mib", str(options.media_cache_mib)]
        if options.prefix_cache_mib is not None:
            self.command += ["--prefix-cache-mib", str(options.prefix_cache_mib)]

    def __enter__(self) -> ServerProcess:
        import httpx2 as httpx

        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        stderr = self.process.stderr.read() if self.process.poll() is not None and self.process.stderr else ""
        self.process.kill()
        raise RuntimeError(f"haplo-serve did not start: {stderr.strip()[-500:]}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


# -- chat load ---------------------------------------------------------------------------------


def questions(count: int) -> list[list[dict]]:
    """Chat messages: a held-out clip of the synthetic world (mp4 data URL) and a question about it."""
    import imageio.v3 as iio

    from haplo.training.world import QUESTIONS, scenes

    out = []
    for i, scene in enumerate(scenes("test", count)):
        mp4 = iio.imwrite("<bytes>", scene.video(9, 64, 64), extension=".mp4", plugin="FFMPEG", fps=8)
        url = f"data:video/mp4;base64,{base64.b64encode(mp4).decode()}"
        parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTIONS[i % 4]}]
        out.append([{"role": "user", "content": parts}])
    return out


async def _one(client, model: str, messages: list[dict], new_tokens: int) -> dict:
    """One streaming greedy request: its timings and text."""
    started, first, last, text, tokens, prompt, cached = time.perf_counter(), None, None, "", 0, 0, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=new_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:  # the server sends one chunk per token, after a first one with the role
        choice = chunk.choices[0] if chunk.choices else None
        if choice is not None and choice.delta.role is None and choice.finish_reason is None:
            last = time.perf_counter()
            first = first or last
            text += choice.delta.content or ""
        if chunk.usage:
            tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
    if first is None or last is None:
        raise RuntimeError("a request streamed no tokens")
    times = {"start": started, "first": first, "end": last}
    return times | {"tokens": tokens, "text": text, "prompt_tokens": prompt, "cached_tokens": cached}


async def _level(url: str, model: str, prompts: list, clients: int, per_client: int, new_tokens: int) -> list[dict]:
    """`clients` concurrent clients, each sending `per_client` requests one after another."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    async def worker(c: int) -> list[dict]:
        records = []
        for r in range(per_client):
            index = (c * per_client + r) % len(prompts)
            records.append({"prompt": index, **await _one(client, model, prompts[index], new_tokens)})
        return records

    try:
        return [rec for recs in await asyncio.gather(*(worker(c) for c in range(clients))) for rec in recs]
    finally:
        await client.close()


def _percentiles(values: list[float]) -> dict:
    return {f"p{q}": round(float(np.percentile(values, q)) * 1000, 3) for q in (50, 90, 99)}


def summarise(records: list[dict], clients: int) -> dict:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    tpot = [(r["end"] - r["first"]) / max(1, r["tokens"] - 1) for r in records]
    return {
        "clients": clients,
        "requests": len(records),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(records) / wall, 3),
        "ttft_ms": _percentiles([r["first"] - r["start"] for r in records]),
        "tpot_ms": _percentiles(tpot),
        "prompt_tokens_reused": _reused(records),
    }


def _reused(records: list[dict]) -> float:
    """The share of prompt tokens prefilled from the server's kept prefixes (usage.cached_tokens)."""
    prompt = sum(r["prompt_tokens"] for r in records)
    return round(sum(r["cached_tokens"] for r in records) / prompt, 3) if prompt else 0.0


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics page as {series: value} (series with their labels, as the page writes them)."""
    import httpx2 as httpx

    page = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    values = {}
    for line in page.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            values[name] = float(value)
    return values


def server_tpot(url: str) -> tuple[float, float]:
    """(sum, count) of the server's own TPOT histogram: the time between two tokens of a row as the
    scheduler hands them out, before any HTTP."""
    values = scrape(url)
    name = "haplo_time_per_output_token_seconds"
    return values.get(f"{name}_sum", 0.0), values.get(f"{name}_count", 0.0)


def media_lookups(url: str) -> dict[str, int]:
    """The server's decoded-media cache: hits and misses so far."""
    values = scrape(url)
    return {r: int(values.get(f'haplo_media_cache_lookups_total{{result="{r}"}}', 0)) for r in ("hit", "miss")}


# -- video load --------------------------------------------------------------------------------


def _video_jobs(url: str, model: str, count: int, steps: int) -> float:
    """Seconds from the first submit until all `count` jobs have completed."""
    import httpx2 as httpx

    prompts = [
        "A red circle moves up.",
        "A blue square moves down.",
        "A green triangle moves left.",
        "A yellow circle moves right.",
    ]
    with httpx.Client(timeout=600) as http:
        started = time.perf_counter()
        ids = []
        for i in range(count):
            body = {"model": model, "prompt": prompts[i % len(prompts)], "steps": steps, "seed": i}
            reply = http.post(url + "/videos", json=body)
            reply.raise_for_status()
            ids.append(reply.json()["id"])
        pending = set(ids)
        while pending:
            for video_id in list(pending):
                status = http.get(f"{url}/videos/{video_id}").json()["status"]
                if status == "failed":
                    raise RuntimeError(f"video job {video_id} failed")
                if status == "completed":
                    pending.discard(video_id)
            time.sleep(0.02)
        return time.perf_counter() - started


# -- the run -----------------------------------------------------------------------------------


def run_serving_benchmark(options: ServeBenchOptions, log: Callable[[str], None] = print) -> dict:
    model_args, model = _server_args(options, log)
    prompts = questions(options.prompts)
    levels, answers = [], {}
    log(f"starting haplo-serve ({options.backend} {options.precision})")
    with ServerProcess(model_args, options) as server:
        asyncio.run(_level(server.url, model, prompts[:1], 1, 1, options.new_tokens))  # warm-up
        log("alone: every question once, one at a time")
        for record in asyncio.run(_level(server.url, model, prompts, 1, len(prompts), options.new_tokens)):
            answers[record["prompt"]] = record["text"]
        for clients in options.clients:
            log(f"{clients} concurrent client(s) x {options.requests_per_client} requests")
            before = server_tpot(server.url)
            records = asyncio.run(
                _level(server.url, model, prompts, clients, options.requests_per_client, options.new_tokens)
            )
            after = server_tpot(server.url)
            level = summarise(records, clients)
            count = after[1] - before[1]
            level["scheduler_tpot_ms_mean"] = round(1000 * (after[0] - before[0]) / count, 3) if count else None
            level["answers_identical_to_alone"] = all(r["text"] == answers[r["prompt"]] for r in records)
            levels.append(level)
        media = media_lookups(server.url)
        log(f"video: 1 job, then {options.video_jobs} concurrent jobs of {options.video_steps} steps")
        _video_jobs(server.url, model, 1, options.video_steps)  # warm-up
        one = _video_jobs(server.url, model, 1, options.video_steps)
        many = _video_jobs(server.url, model, options.video_jobs, options.video_steps)
    return _document(options, model, levels, one, many) | {"media_cache": media}


def _document(options: ServeBenchOptions, model: str, levels: list[dict], one: float, many: float) -> dict:
    base = next((lv for lv in levels if lv["clients"] == 1), levels[0])
    for level in levels:
        level["tokens_per_s_vs_one_client"] = round(level["tokens_per_s"] / base["tokens_per_s"], 2)
        level["p99_tpot_vs_one_client"] = round(level["tpot_ms"]["p99"] / base["tpot_ms"]["p99"], 2)
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": options.command,
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()} | {"model": model},
        "chat": levels,
        "video": {
            "jobs": options.video_jobs,
            "steps": options.video_steps,
            "one_job_s": round(one, 3),
            "concurrent_jobs_s": round(many, 3),
            "concurrent_vs_one": round(many / one, 2),
        },
    }


def table(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [
        f"haplo-serve, {s['model']} on {s['backend']} {s['precision']}: {m['cpu']} ({m['isa']}), "
        f"{m['logical_cores']} logical cores; {s['new_tokens']} new tokens per request",
        "",
        f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'x one':>6} {'req/s':>7} "
        f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p90/p99 ms':>22} {'p99 TPOT x':>10} {'same text':>9} "
        f"{'sched TPOT':>10} {'reused':>6}",
    ]
    for lv in doc["chat"]:
        ttft = "/".join(f"{lv['ttft_ms'][p]:.0f}" for p in ("p50", "p90", "p99"))
        tpot = "/".join(f"{lv['tpot_ms'][p]:.1f}" for p in ("p50", "p90", "p99"))
        lines.append(
            f"{lv['clients']:>7} {lv['requests']:>8} {lv['tokens_per_s']:>8.1f} "
            f"{lv['tokens_per_s_vs_one_client']:>6.2f} "
            f"{lv['requests_per_s']:>7.2f} {ttft:>22} {tpot:>22} {lv['p99_tpot_vs_one_client']:>10.2f} "
            f"{'yes' if lv['answers_identical_to_alone'] else 'NO':>9} "
            f"{_ms(lv.get('scheduler_tpot_ms_mean')):>10} {_share(lv.get('prompt_tokens_reused')):>6}"
        )
    v = doc["video"]
    lines += [
        "sched TPOT: the server's own mean time between two tokens of a row (scheduler, before HTTP)",
        "reused: the share of prompt tokens prefilled from the server's kept prefixes (usage.cached_tokens)",
        _media_line(doc.get("media_cache")),
        "",
        f"video: 1 job of {v['steps']} DDIM steps {v['one_job_s']:.2f} s; {v['jobs']} concurrent jobs "
        f"{v['concurrent_jobs_s']:.2f} s ({v['concurrent_vs_one']:.2f}x one job)",
    ]
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _media_line(lookups: dict | None) -> str:
    if not lookups:
        return "media cache: -"
    return f"media cache: {lookups['hit']} clips reused decoded, {lookups['miss']} decoded"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def write_outputs(doc: dict, out: Path) -> dict[str, Path]:
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_atomic(out / "serving.json", json.dumps(doc, indent=2) + "\n"),
        "table": write_atomic(out / "table.txt", table(doc) + "\n"),
    }
