"""`haplo-serve`: the model behind an OpenAI-compatible HTTP API, with continuous batching.

    haplo-serve                                          (the shipped haplo-mini on PyTorch, port 8000)
    haplo-serve --bundle bundles/haplo-mini --port 8000  (ONNX Runtime, or TensorRT engines where they run)
    haplo-serve --preset tiny --max-batch 32 --max-kv-mib 512

Endpoints: POST /v1/chat/completions (streaming too), POST /v1/videos, GET /v1/videos/{id} and
/v1/videos/{id}/content, GET /v1/models, /health, /metrics. Bad input ends with one `error:` line and
exit code 2; a bad request gets an OpenAI-style 4xx and the server keeps serving.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from haplo.commands.common import (
    DEVICE_HELP,
    NON_NEGATIVE,
    POSITIVE,
    Parser,
    _number,
    add_model_args,
    device_name,
    load_backend,
    run_command,
    source_name,
)
from haplo.errors import UsageError

PORT = _number(int, 1, 65535, what="must be a TCP port, 1 to 65535")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="haplo-serve",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser, bundle_help="bundle directory from `haplo-export build` (ONNX Runtime / TensorRT)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"], help="for --bundle")
    parser.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer directory (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="PyTorch")
    parser.add_argument("--device", type=device_name, default="cpu", help=DEVICE_HELP)
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKLCogVideoX directory (default: checkpoint/vae)")
    parser.add_argument("--threads", type=POSITIVE, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=PORT, default=8000, help="(default: %(default)s)")
    parser.add_argument("--model-name", help="the model id clients ask for (default: the model's directory name)")
    parser.add_argument("--max-batch", type=POSITIVE, default=16, help="requests decoded together (default: 16)")
    parser.add_argument("--max-kv-mib", type=POSITIVE, help="cap on the decode batch's KV cache, MiB (default: none)")
    parser.add_argument("--max-queue", type=POSITIVE, default=64, help="waiting requests before 429 (default: 64)")
    parser.add_argument("--max-video-batch", type=POSITIVE, default=4, help="video jobs denoised together")
    parser.add_argument("--video-frames", type=POSITIVE, default=8, help="frames sampled from an input video")
    parser.add_argument(
        "--media-cache-mib",
        type=NON_NEGATIVE,
        default=256,
        help="decoded images and videos kept by content, so media sent again is not decoded again "
        "(MiB; 0 turns it off; default: 256)",
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=POSITIVE,
        default=1024,
        help="prompt tokens prefilled between two decode steps (bounds the running rows' stall; default: 1024)",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=NON_NEGATIVE,
        default=256,
        help="KV cache kept for prompt prefixes (chat history, media asked about again), so a prompt that "
        "begins with an earlier one prefills only its remaining tokens (MiB; 0 turns it off; default: 256)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=serve)
    return parser


def require_server_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsageError(f'haplo-serve needs {err.name}: pip install -e ".[serve]"') from None


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UsageError(
                f"--host {host} --port {port}: cannot listen there ({err.strerror}); pick another --port"
            ) from None


def model_name(args: argparse.Namespace) -> str:
    if args.model_name:
        return args.model_name
    source = args.bundle if getattr(args, "bundle", None) else args.checkpoint
    return source.resolve().name if source else source_name(args)


def serve(args: argparse.Namespace) -> None:
    require_server_stack()
    _check_port(args.host, args.port)
    import uvicorn

    from haplo.runtime.scheduler import Scheduler, SchedulerConfig
    from haplo.serving.app import ServerConfig, create_app
    from haplo.serving.metrics import Metrics

    backend, processor = load_backend(args)
    kv = None if args.max_kv_mib is None else args.max_kv_mib * 2**20
    metrics = Metrics()
    scheduler = Scheduler(
        backend,
        SchedulerConfig(
            args.max_batch,
            kv,
            args.max_queue,
            args.max_video_batch,
            args.max_prefill_tokens,
            prefix_cache_bytes=args.prefix_cache_mib * 2**20,
        ),
        metrics,
    )
    config = ServerConfig(model_name(args), args.video_frames, media_cache_bytes=args.media_cache_mib * 2**20)
    app = create_app(scheduler, processor, config, metrics)
    print(f"serving {config.model_name} ({backend.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
