"""The HTTP API: OpenAI chat completions (streaming included), video jobs, models, health, metrics.

`create_app` takes a running `Scheduler` and the processor of its backend's model; `haplo-serve`
(`haplo/commands/serve.py`) builds both from a bundle, checkpoint or preset and runs uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from haplo.errors import HaploError
from haplo.runtime.pipeline import TextToVideoPipeline
from haplo.runtime.requests import TextStream, VideoJob
from haplo.runtime.sampling import SamplingParams
from haplo.runtime.scheduler import QueueFull, Scheduler
from haplo.serving import media
from haplo.serving.metrics import Metrics
from haplo.serving.protocol import ApiError, ChatRequest, Message, VideoCreate, parse
from haplo.serving.text import TextAssembler
from haplo.video import to_uint8_frames, video_bytes


@dataclass
class ServerConfig:
    model_name: str = "haplo-mini"
    video_frames: int = 8  # frames sampled from each input video
    default_max_tokens: int = 256  # when a request gives none (capped by the model's positions)
    kept_jobs: int = 256  # finished video jobs whose content stays downloadable
    media_cache_bytes: int = 256 * 2**20  # decoded images and videos kept by content (0: none)


class Server:
    """Routes' shared state: the scheduler, the processor, the video jobs, the metrics."""

    def __init__(self, scheduler: Scheduler, processor, config: ServerConfig, metrics: Metrics) -> None:
        self.scheduler, self.processor, self.config, self.metrics = scheduler, processor, config, metrics
        self.pipeline = TextToVideoPipeline(scheduler.backend, processor)
        self.jobs: OrderedDict[str, tuple[VideoJob, dict]] = OrderedDict()
        self.media = media.MediaCache(config.media_cache_bytes)
        # A fast tokenizer is one Rust object: encoding (which sets padding) and decoding from several
        # threads at once can collide ("Already borrowed"), so they take turns.
        self.tokenizer_lock = threading.Lock()
        self.created = int(time.time())

    # -- chat -------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                "model",
                "model_not_found",
            )

    def conversation(self, messages: list[Message]) -> tuple[list[dict], list, list]:
        """OpenAI messages -> the processor's conversation with placeholders, images, videos."""
        chat, images, videos = [], [], []
        for i, message in enumerate(messages):
            parts = message.content if isinstance(message.content, list) else None
            if parts is None:
                chat.append({"role": message.role, "content": message.content or ""})
                continue
            text = ""
            for j, part in enumerate(parts):
                where = f"messages.{i}.content.{j}"
                if part.type == "text":
                    text += part.text or ""
                elif part.type == "image_url" and part.image_url is not None:
                    images.append(media.decode_image(part.image_url.url, f"{where}.image_url", self.media))
                    text += "<image>\n"
                elif part.type == "video_url" and part.video_url is not None:
                    url, frames = part.video_url.url, self.config.video_frames
                    videos.append(media.decode_video(url, f"{where}.video_url", frames, self.media))
                    text += "<video>\n"
                else:
                    raise ApiError(400, f"{where}: a {part.type} part needs its {part.type} field", where)
            chat.append({"role": message.role, "content": text})
        return chat, images, videos

    def submit_chat(self, request: ChatRequest) -> TextStream:
        self.check_model(request.model)
        chat, images, videos = self.conversation(request.messages)
        if len({v.shape[0] for v in videos}) > 1:
            raise ApiError(400, "all videos of one request need the same number of frames", "messages")
        with self.tokenizer_lock:
            inputs = self.processor(conversations=[chat], images=images or None, videos=videos or None)
        limit = self.scheduler.backend.config.base.max_position_embeddings
        prompt = int(inputs["input_ids"].shape[1])
        new = request.new_tokens or max(1, min(self.config.default_max_tokens, limit - prompt))
        params = SamplingParams(
            max_new_tokens=new,
            do_sample=request.temperature > 0,
            temperature=request.temperature or 1.0,
            top_k=max(request.top_k, 0),
            top_p=request.top_p,
            stop_token_ids=() if request.ignore_eos else tuple(self.processor.stop_token_ids),
            seed=request.seed,
        )
        return self.scheduler.submit(inputs, params)

    # -- video ------------------------------------------------------------------------------------
    def submit_video(self, request: VideoCreate) -> dict:
        self.check_model(request.model)
        gen = self.scheduler.backend.config.video_generation
        width, height = request.dimensions()
        frames = request.frames
        if frames is None and request.seconds is not None:  # the nearest length the VAE decodes (2tk + 1)
            period = 2 * gen.vae_temporal_compression
            frames = period * max(0, round((request.seconds * gen.fps - 1) / period)) + 1
        size = {
            "frames": frames or gen.num_frames,
            "height": height or gen.height,
            "width": width or gen.width,
        }
        job = self.scheduler.submit_video(
            self._video_request(
                request.prompt,
                request.negative_prompt,
                request.steps,
                request.guidance_scale,
                size["frames"],
                size["height"],
                size["width"],
                request.seed,
            )
        )
        info = {"prompt": request.prompt, "created_at": int(time.time()), **size}
        self.jobs[job.id] = (job, info)
        self._forget_old_jobs()
        return self.describe(job, info)

    def _video_request(self, *args):
        with self.tokenizer_lock:
            return self.pipeline.request(*args)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.processor.decode(ids, skip_special_tokens=True)

    def _forget_old_jobs(self) -> None:
        finished = [key for key, (job, _) in self.jobs.items() if job.done]
        for key in finished[: max(0, len(finished) - self.config.kept_jobs)]:
            del self.jobs[key]

    def job(self, video_id: str) -> tuple[VideoJob, dict]:
        if video_id not in self.jobs:
            raise ApiError(404, f"no video job {video_id!r}", "video_id", "not_found")
        return self.jobs[video_id]

    def describe(self, job: VideoJob, info: dict) -> dict:
        fps = self.scheduler.backend.config.video_generation.fps
        status = {"queued": "queued", "running": "in_progress", "finished": "completed"}.get(job.status, "failed")
        if status == "completed" and "completed_at" not in info:
            info["completed_at"] = int(time.time())
        body = {
            "id": job.id,
            "object": "video",
            "model": self.config.model_name,
            "status": status,
            "progress": 100 if status == "completed" else int(100 * job.progress),
            "created_at": info["created_at"],
            "completed_at": info.get("completed_at"),
            "prompt": info["prompt"],
            "size": f"{info['width']}x{info['height']}",
            "seconds": f"{info['frames'] / fps:g}",
            "frames": info["frames"],
            "error": None,
        }
        if job.status in ("failed", "cancelled"):
            body["error"] = {"code": job.status, "message": str(job.error or "the job was cancelled")}
        return body

    def content(self, video_id: str) -> bytes:
        job, info = self.job(video_id)
        if job.status != "finished" or job.video is None:
            raise ApiError(
                409, f"video {video_id} is not ready (status {self.describe(job, info)['status']})", "video_id"
            )
        if "mp4" not in info:
            info["mp4"] = video_bytes(to_uint8_frames(job.video[0]), self.scheduler.backend.config.video_generation.fps)
        return info["mp4"]


# -- responses ---------------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def as_api_error(err: HaploError) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, QueueFull):
        api = ApiError(429, str(err), code="queue_full")
        api.headers["Retry-After"] = str(err.retry_after)
        return api
    return ApiError(400, str(err))


def usage(stream: TextStream) -> dict:
    n = len(stream.tokens)
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": stream.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": stream.reused_tokens},  # prefilled from a kept prefix
    }


def chunk(completion_id: str, model: str, created: int, delta: dict | None, finish: str | None = None, **extra) -> str:
    """One SSE event of a chat.completion.chunk: a delta (None: no choices, as the usage chunk has)."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return f"data: {json.dumps({**body, **extra})}\n\n"


def finish_reason(stream: TextStream, text: TextAssembler) -> str:
    return "stop" if text.stopped or stream.finish_reason == "stop" else "length"


async def collect(stream: TextStream, text: TextAssembler) -> str:
    """Every token of the stream through the assembler (cancelling at a stop string): the text."""
    try:
        async for token in stream:
            text.add(token)
            if text.stopped:
                stream.cancel()
                break
    finally:
        stream.cancel()  # a no-op once finished; frees the row if the client went away
    return text.text if text.stopped else text.text + text.finish()


async def sse(server: Server, stream: TextStream, text: TextAssembler, include_usage: bool) -> AsyncIterator[str]:
    completion_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), server.config.model_name
    try:
        yield chunk(completion_id, model, created, {"role": "assistant", "content": ""})
        async for token in stream:  # one chunk per token (empty while text is held back), as clients time them
            piece = text.add(token)
            if text.stopped and not piece:
                break
            yield chunk(completion_id, model, created, {"content": piece})
            if text.stopped:
                break
        if not text.stopped and (rest := text.finish()):
            yield chunk(completion_id, model, created, {"content": rest})
        yield chunk(completion_id, model, created, {}, finish_reason(stream, text))
        if include_usage:
            yield chunk(completion_id, model, created, None, usage=usage(stream))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # the client disconnected, or a stop string ended it: free the batch row


async def body_of(request: Request) -> object:
    """The JSON body, or a multipart / urlencoded form (the openai client sends videos.create as a form)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        return {key: value for key, value in form.items() if isinstance(value, str)}
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


# -- the app -----------------------------------------------------------------------------------


def create_app(scheduler: Scheduler, processor, config: ServerConfig | None = None, metrics: Metrics | None = None):
    """A FastAPI app serving `scheduler` (whose observer should be `metrics`); closes it on shutdown."""
    config = config or ServerConfig()
    metrics = metrics or Metrics()
    metrics.watch(scheduler)
    server = Server(scheduler, processor, config, metrics)
    metrics.watch_media(server.media)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="haplo-serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(HaploError)
    async def _haplo_error(request: Request, err: HaploError):
        api = as_api_error(err)
        metrics.finished("http", f"rejected_{api.status}")
        return error_response(api)

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.page(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        model = {"id": config.model_name, "object": "model", "created": server.created, "owned_by": "haplo"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse(ChatRequest, await body_of(request))
        assert isinstance(chat, ChatRequest)
        stream = await asyncio.to_thread(server.submit_chat, chat)  # media decoding stays off the event loop
        text = TextAssembler(server.decode, chat.stop)
        if chat.stream:
            include = chat.stream_options is None or chat.stream_options.include_usage
            return StreamingResponse(sse(server, stream, text, include), media_type="text/event-stream")
        content = await collect(stream, text)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason(stream, text),
                    "logprobs": None,
                }
            ],
            "usage": usage(stream),
        }

    @app.post("/v1/videos")
    async def create_video(request: Request):
        video = parse(VideoCreate, await body_of(request))
        assert isinstance(video, VideoCreate)
        return server.submit_video(video)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        return server.describe(*server.job(video_id))

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        job, info = server.job(video_id)
        job.cancel()
        del server.jobs[video_id]
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str):
        return Response(server.content(video_id), media_type="video/mp4")

    return app


class BackgroundServer:
    """uvicorn serving `app` on a free port of 127.0.0.1 in a thread: for tests, benchmarks and embedding.

    with BackgroundServer(app) as server: openai.OpenAI(base_url=server.url, api_key="-")"""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        import socket
        import threading

        import uvicorn

        self._socket = socket.socket()
        self._socket.bind((host, 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()
