"""haplo-serve over ONNX Runtime, driven by the official `openai` client: chat, streaming, images and
videos, video jobs, concurrency, cancellation, metrics, and the bad-request table."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import imageio.v3 as iio
import numpy as np
import openai
import pytest
from PIL import Image

from haplo.bundle import Bundle
from haplo.engines.onnxruntime import OrtBackend
from haplo.model.processor import HaploOmniProcessor
from haplo.model.tokenizer import load_tokenizer
from haplo.runtime.decoding import understand
from haplo.runtime.sampling import SamplingParams
from haplo.runtime.scheduler import Scheduler, SchedulerConfig
from haplo.serving.app import BackgroundServer, ServerConfig, create_app
from haplo.serving.metrics import Metrics
from haplo.serving.text import TextAssembler
from haplo.training.world import IMAGE_QUESTIONS, QUESTIONS, scenes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the openai client marks videos.* so
MODEL = "haplo-mini"


@pytest.fixture(scope="module")
def ort(cli_bundle):
    bundle = Bundle.open(cli_bundle)
    backend = OrtBackend(bundle)
    return backend, HaploOmniProcessor(load_tokenizer(bundle.path(bundle.manifest.tokenizer)), backend.config)


@pytest.fixture(scope="module")
def server(ort):
    backend, processor = ort
    metrics = Metrics()
    scheduler = Scheduler(backend, SchedulerConfig(max_batch=16), metrics)
    with BackgroundServer(create_app(scheduler, processor, ServerConfig(MODEL), metrics)) as running:
        running.scheduler = scheduler
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def clip_url(index: int = 0) -> str:
    frames = scenes("test", 96)[index].video(9, 64, 64)
    return data_url("video/mp4", iio.imwrite("<bytes>", frames, extension=".mp4", plugin="FFMPEG", fps=8))


def png_url(index: int = 0) -> str:
    buffer = io.BytesIO()
    Image.fromarray(scenes("test", 96)[index].still(64, 64)).save(buffer, format="PNG")
    return data_url("image/png", buffer.getvalue())


def video_message(index: int = 0, question: str = QUESTIONS[0]) -> list[dict]:
    parts = [{"type": "video_url", "video_url": {"url": clip_url(index)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def ask(client, messages, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


def root(server) -> str:
    return server.url.removesuffix("/v1")


def test_chat_answers_a_video_as_the_runtime_does_alone(client, ort):
    backend, processor = ort
    reply = ask(client, video_message(0), max_tokens=48)
    scene = scenes("test", 96)[0]
    assert reply.choices[0].message.content == scene.caption and reply.choices[0].finish_reason == "stop"
    frames = iio.imread(base64.b64decode(clip_url(0).split(",")[1]), extension=".mp4", plugin="FFMPEG")
    inputs = processor(
        conversations=[[{"role": "user", "content": "<video>\n" + QUESTIONS[0]}]],
        videos=[frames[np.linspace(0, 8, 8).round().astype(int)]],
    )
    out = understand(backend, **inputs, max_new_tokens=48, stop_token_ids=tuple(processor.stop_token_ids))
    assert reply.choices[0].message.content == processor.decode(out.new_tokens[0], skip_special_tokens=True)
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1] and reply.usage.completion_tokens > 5


def test_streaming_gives_the_same_text_in_deltas_and_a_usage_chunk(client):
    whole = ask(client, video_message(1), max_tokens=48)
    chunks = list(ask(client, video_message(1), max_tokens=48, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_an_image_part_and_a_stop_string(client):
    scene = scenes("test", 96)[2]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_url(2)}},
                {"type": "text", "text": IMAGE_QUESTIONS[0]},
            ],
        }
    ]
    full = ask(client, messages, max_tokens=48).choices[0].message.content
    assert scene.colour in full
    word = full.split()[2]  # cut at the third word
    cut = ask(client, messages, max_tokens=48, stop=[" " + word])
    assert cut.choices[0].message.content == full[: full.index(" " + word)] and cut.choices[0].finish_reason == "stop"
    streamed = ask(client, messages, max_tokens=48, stop=" " + word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


def test_sixteen_concurrent_greedy_requests_answer_as_they_do_one_at_a_time(client, server):
    messages = [video_message(i, QUESTIONS[i % 4]) for i in range(16)]
    sequential = [ask(client, m, max_tokens=32).choices[0].message.content for m in messages]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda m: ask(client, m, max_tokens=32).choices[0].message.content, messages))
    assert concurrent == sequential
    assert "haplo_requests_total" in httpx.get(root(server) + "/metrics").text


def test_a_video_job_runs_to_completion_and_its_mp4_decodes(client, server):
    job = client.videos.create(model=MODEL, prompt="A red circle moves up.", size="64x64", extra_body={"steps": 3})
    assert job.status in ("queued", "in_progress") and job.size == "64x64"
    deadline = time.monotonic() + 120
    while (job := client.videos.retrieve(job.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.status == "completed" and job.progress == 100
    frames = iio.imread(client.videos.download_content(job.id).read(), extension=".mp4", plugin="FFMPEG")
    assert frames.shape == (9, 64, 64, 3)
    assert httpx.delete(f"{server.url}/videos/{job.id}").json()["deleted"] is True
    assert httpx.get(f"{server.url}/videos/{job.id}").status_code == 404


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, server):
    scheduler = server.scheduler
    body = {"model": MODEL, "messages": video_message(3), "max_tokens": 1500, "ignore_eos": True, "stream": True}
    background = client.chat.completions.create(
        model=MODEL, messages=video_message(4), max_tokens=1500, extra_body={"ignore_eos": True}, stream=True
    )
    next(iter(background))
    wait_for(lambda: scheduler.stats()["running_batch"] == 1)
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/chat/completions", json=body) as reply:
        lines = reply.iter_lines()
        for _ in range(6):
            next(lines)
        assert scheduler.stats()["running_batch"] == 2
    wait_for(lambda: scheduler.stats()["running_batch"] == 1)  # back to the size before
    background.close()
    wait_for(lambda: scheduler.stats()["running_batch"] == 0)
    assert 'haplo_requests_total{kind="chat",status="cancelled"}' in httpx.get(root(server) + "/metrics").text


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(root(server) + "/health").json()["status"] == "ok"
    page = httpx.get(root(server) + "/metrics").text
    for name in (
        "haplo_queue_depth",
        "haplo_running_batch",
        "haplo_kv_cache_bytes",
        "haplo_time_to_first_token_seconds",
        "haplo_time_per_output_token_seconds",
        "haplo_ddim_step_seconds",
        "haplo_media_cache_bytes",
        'haplo_media_cache_lookups_total{result="hit"}',
        "haplo_prefix_cache_bytes",
        'haplo_prefix_cache_lookups_total{result="miss"}',
        "haplo_prefix_cache_reused_tokens_total",
    ):
        assert name in page


def test_media_sent_again_is_decoded_once_and_answers_the_same(client, server):
    cache = server.app.state.server.media
    messages = video_message(40, QUESTIONS[2])  # a clip no other test sends
    hits, misses = cache.hits, cache.misses
    first = ask(client, messages, max_tokens=8)
    assert (cache.hits, cache.misses) == (hits, misses + 1)
    again = ask(client, messages, max_tokens=8)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert (cache.hits, cache.misses) == (hits + 1, misses + 1)
    # and the scheduler prefilled it from the first one's kept prefix: every prompt token but the last
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert 0 < cache.bytes <= cache.max_bytes


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Describe what you see."}], "max_tokens": 4}
BAD_GIF = data_url("image/gif", b"GIF89a-not-really")


def chat(**change) -> dict:
    return {**GOOD, **change}


def media_message(kind: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": "What?"}]}]


BAD_REQUESTS = [
    ("chat/completions", b"{not json", 400, "not valid JSON"),
    ("chat/completions", chat(model="gpt-4o"), 404, "does not exist"),
    ("chat/completions", {"model": MODEL}, 400, "messages"),
    ("chat/completions", chat(messages=[]), 400, "messages"),
    ("chat/completions", chat(messages=[{"role": "robot", "content": "hi"}]), 400, "role"),
    ("chat/completions", chat(messages=media_message("image_url", "data:image/png;base64,@@@")), 400, "invalid base64"),
    (
        "chat/completions",
        chat(messages=media_message("image_url", data_url("image/png", b"\x89PNG junk"))),
        400,
        "does not decode",
    ),
    ("chat/completions", chat(messages=media_message("image_url", "https://example.com/cat.png")), 400, "data: URLs"),
    (
        "chat/completions",
        chat(messages=media_message("video_url", data_url("video/mp4", b"not a video"))),
        400,
        "cannot decode the video",
    ),
    ("chat/completions", chat(messages=media_message("video_url", BAD_GIF)), 400, "video"),
    ("chat/completions", chat(messages=[{"role": "user", "content": "word " * 1000}]), 400, "positions"),
    ("chat/completions", chat(max_tokens=2000), 400, "positions"),
    ("chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("chat/completions", chat(temperature=2.5), 400, "temperature"),
    ("chat/completions", chat(top_p=0), 400, "top_p"),
    ("chat/completions", chat(top_k=-2), 400, "top_k"),
    ("chat/completions", chat(n=2), 400, "n"),
    ("chat/completions", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "image_url"),
    ("videos", {"prompt": "A red circle moves up.", "size": "32x32"}, 400, "decodes 9 frames of 64x64"),
    ("videos", {"prompt": "A red circle moves up.", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ("videos", {"prompt": "A red circle moves up.", "frames": 10}, 400, "frames"),
    ("videos", {"prompt": "A red circle moves up.", "steps": 0}, 400, "steps"),
    ("videos", {"prompt": ""}, 400, "prompt"),
    ("videos", {"prompt": "A red circle moves up.", "model": "sora-2"}, 404, "does not exist"),
    ("videos/video-0", None, 404, "no video job"),
    ("videos/video-0/content", None, 404, "no video job"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, message):
    url = f"{server.url}/{path}"
    if body is None:
        reply = httpx.get(url)
    elif isinstance(body, bytes):
        reply = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        reply = httpx.post(url, json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["type"]
    good = httpx.post(f"{server.url}/chat/completions", json=GOOD, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_a_full_queue_is_a_429_with_retry_after(ort):
    backend, processor = ort
    scheduler = Scheduler(backend, SchedulerConfig(max_queue=1), start=False)  # nothing drains the queue
    scheduler.submit(processor(text="hi"), SamplingParams(max_new_tokens=1))
    with BackgroundServer(create_app(scheduler, processor, ServerConfig(MODEL))) as server:
        reply = httpx.post(f"{server.url}/chat/completions", json=GOOD)
    assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["type"] == "rate_limit_error"


def test_text_assembler_holds_back_a_partial_stop_string():
    text = TextAssembler(lambda ids: "".join(chr(i) for i in ids), ["STOP"])
    pieces = [text.add(ord(c)) for c in "abcST"]
    assert "".join(pieces) == "ab"  # the last 3 characters could still begin "STOP"
    assert text.add(ord("O")) == "c" and text.add(ord("P")) == "" and text.stopped and text.text == "abc"
    plain = TextAssembler(lambda ids: "".join(chr(i) for i in ids), [])
    assert [plain.add(ord(c)) for c in "hi"] == ["h", "i"] and plain.finish() == ""


SERVE_BAD_INPUT = [
    (["--port", "0"], "--port: 0 is out of range"),
    (["--port", "http"], "--port: expected an integer"),
    (["--max-batch", "0"], "--max-batch: 0 is out of range"),
    (["--max-kv-mib", "-1"], "--max-kv-mib: -1 is out of range"),
    (["--max-queue", "0"], "--max-queue: 0 is out of range"),
    (["--video-frames", "0"], "--video-frames: 0 is out of range"),
    (["--bundle", "{DIR}"], "no manifest.json"),
    (["--bundle", "{BUNDLE}", "--backend", "tensorrt"], "has no TensorRT engines"),
    (["--bundle", "{BUNDLE}", "--preset", "tiny"], "not allowed with argument"),
    (["--port", "{BUSY}"], "cannot listen there"),
    (["--log-level", "loud"], "invalid choice: 'loud'"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens: 0 is out of range"),
    (["--media-cache-mib", "-1"], "--media-cache-mib: -1 is out of range"),
    (["--media-cache-mib", "lots"], "--media-cache-mib: expected an integer"),
    (["--prefix-cache-mib", "-1"], "--prefix-cache-mib: -1 is out of range"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--preset", "tiny", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["--bundle", "{BUNDLE}", "--device", "cuda"], "a bundle runs where its backend does"),
]


@pytest.mark.parametrize("argv, message", SERVE_BAD_INPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_haplo_serve_bad_input_is_one_clear_line(capsys, tmp_path, cli_bundle, argv, message):
    from haplo.commands.serve import main as serve_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        places = {"{DIR}": str(tmp_path), "{BUNDLE}": str(cli_bundle), "{BUSY}": str(busy.getsockname()[1])}
        code = serve_main([places.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err


def test_the_haplo_serve_command_serves_a_bundle(cli_bundle):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "haplo.commands.serve", "--bundle", str(cli_bundle), "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        wait_for(lambda: _up(port) or process.poll() is not None, 120)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert [m.id for m in client.models.list()] == [cli_bundle.name]
        reply = client.chat.completions.create(model=cli_bundle.name, messages=video_message(5), temperature=0)
        assert reply.choices[0].message.content == scenes("test", 96)[5].caption
    finally:
        process.terminate()
        process.wait(30)
    assert f"on http://127.0.0.1:{port}/v1" in (process.stderr.read() if process.stderr else "")


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_bench_serve_writes_its_results_and_checks_answers(cli_bundle, tmp_path, capsys):
    from haplo.bench.serving import SCHEMA
    from haplo.commands.main import main

    out = tmp_path / "serve"
    argv = ["bench-serve", "--bundle", str(cli_bundle), "--clients", "2", "--requests-per-client", "1"]
    argv += ["--prompts", "2", "--new-tokens", "4", "--video-jobs", "2", "--video-steps", "1", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "serving.json").read_text())
    assert doc["schema"] == SCHEMA and [lv["clients"] for lv in doc["chat"]] == [1, 2]
    for level in doc["chat"]:
        assert level["answers_identical_to_alone"] and level["generated_tokens"] == 4 * level["requests"]
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"] and level["tokens_per_s"] > 0
        assert level["scheduler_tpot_ms_mean"] > 0  # read off the server's /metrics around the level
        assert 0.9 < level["prompt_tokens_reused"] < 1  # the alone round kept every question's prefix
    assert doc["video"]["jobs"] == 2 and doc["video"]["concurrent_jobs_s"] > 0
    # 2 clips, each decoded once: the warm-up decodes clip 0, the alone round clip 1 and reuses clip 0,
    # then the levels of 1 and 2 clients reuse 1 + 2
    assert doc["media_cache"] == {"hit": 4, "miss": 2}
    assert "same text" in capsys.readouterr().out and (out / "table.txt").exists()
    assert main(argv) == 0  # its own results directory may be written again
