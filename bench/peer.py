"""The speed peer of the language half: ONNX Runtime GenAI on a Qwen2 of equal decode-step weight bytes.

A CPU user who wants fast autoregressive decoding reaches for ONNX Runtime GenAI and its model
builder (GroupQueryAttention over a shared past/present buffer, MatMulNBits, fused norms). `bench
--peer onnxruntime-genai` builds, in the same run and on the same threads, a seeded random Qwen2 with
the base stage's widths and heads and as many layers as make its decode-step weights as large as
ours, then times it on a prompt of the same length for the same number of new tokens:

    ttft  = append_tokens(prompt) + the first generate_next_token (prefill, then the first pick)
    tpot  = each further generate_next_token (one decode step over the cache, then a pick)

The built peer is kept in the work directory, keyed by its shape and precision.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from haplo.artifacts import check_output_dir, staging_dir, swap_into_place, write_atomic
from haplo.bench.timing import stats
from haplo.errors import HaploError

NAME = "onnxruntime-genai"
# our precision -> the builder's (its int8 and int4 are weight-only, MatMulNBits)
PRECISIONS = {"fp32": "fp32", "int8": "int8", "int8-weight": "int8", "int4": "int4"}
MARKER = "peer.json"


class PeerError(HaploError, RuntimeError):
    pass


def require() -> str:
    """The installed ONNX Runtime GenAI version, or a PeerError that says how to install it."""
    try:
        import onnx_ir  # noqa: F401  (the model builder needs it)
        import onnxruntime_genai
    except ImportError as err:
        raise PeerError(
            f"--peer {NAME} needs ONNX Runtime GenAI and onnx-ir ({err.name} is missing): "
            "pip install -c constraints.txt -e '.[peer]'"
        ) from None
    return onnxruntime_genai.__version__


@dataclass(frozen=True)
class PeerSpec:
    """A Qwen2 shaped like the base stage, with the layer count that matches our decode-step bytes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def decode_weight_bytes(self) -> int:
        """fp32 bytes one decode step reads: every layer, the final norm and the LM head."""
        return 4 * (self.num_hidden_layers * _layer_elements(self) + self.hidden_size * (self.vocab_size + 1))


def _layer_elements(spec: PeerSpec) -> int:
    h, kv = spec.hidden_size, spec.hidden_size // spec.num_attention_heads * spec.num_key_value_heads
    attention = h * (h + 2 * kv) + (h + 2 * kv) + h * h  # q/k/v with biases, o
    return attention + 3 * h * spec.intermediate_size + 2 * h  # + gate/up/down, two norms


def peer_spec(config, weight_bytes: int) -> PeerSpec:
    """The base stage's shape; layers chosen so the fp32 decode-step bytes are nearest `weight_bytes`."""
    base = config.base
    shape = dict(
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        vocab_size=config.vocab_size,
    )
    head = PeerSpec(num_hidden_layers=0, **shape).decode_weight_bytes
    layers = max(1, round((weight_bytes - head) / (4 * _layer_elements(PeerSpec(num_hidden_layers=1, **shape)))))
    return PeerSpec(num_hidden_layers=layers, **shape)


def build(spec: PeerSpec, precision: str, work_dir: Path, threads: int, seed: int, log=print) -> tuple[Path, float]:
    """The peer's GenAI model directory (built once per shape and precision) and its build seconds."""
    key = hashlib.sha256(json.dumps([asdict(spec), precision, seed]).encode()).hexdigest()[:16]
    target = Path(work_dir) / "peer" / f"qwen2-{precision}-{key}"
    if (target / MARKER).is_file():
        _set_threads(target, threads)
        return target, json.loads((target / MARKER).read_text())["build_s"]
    check_output_dir(target, lambda d: (d / MARKER).is_file(), "peer model directory", flag="--work-dir")
    log(f"peer: building a {spec.num_hidden_layers}-layer Qwen2 ({precision}) with ONNX Runtime GenAI's builder")
    tmp = staging_dir(target)
    started = time.perf_counter()
    _random_qwen2(spec, seed).save_pretrained(tmp / "hf")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp / "hf")]
    command += ["-o", str(tmp / "model"), "-p", PRECISIONS[precision], "-e", "cpu", "-c", str(tmp / "cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerError(f"ONNX Runtime GenAI's builder failed: {(done.stderr or done.stdout).strip()[-500:]}")
    build_s = time.perf_counter() - started
    for scratch in ("hf", "cache"):  # the random checkpoint and the builder's scratch: not needed to run
        shutil.rmtree(tmp / scratch, ignore_errors=True)
    write_atomic(tmp / MARKER, json.dumps({"spec": asdict(spec), "precision": precision, "build_s": build_s}) + "\n")
    swap_into_place(tmp, target)
    _set_threads(target, threads)
    return target, build_s


def _random_qwen2(spec: PeerSpec, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**asdict(spec), max_position_embeddings=4096, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def _set_threads(target: Path, threads: int) -> None:
    """The peer runs on as many intra-op threads as our backends (GenAI reads them from its config)."""
    path = target / "model" / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        write_atomic(path, json.dumps(config, indent=2) + "\n")


def measure(model_dir: Path, prompt_tokens: int, new_tokens: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """TTFT and TPOT of greedy decoding, `new_tokens` per run, the same count every run."""
    import onnxruntime_genai as og

    vocab = json.loads((Path(model_dir) / MARKER).read_text())["spec"]["vocab_size"]
    model = og.Model(og.Config(str(Path(model_dir) / "model")))
    prompt = torch.randint(4, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    ttft, tpot = [], []
    for run in range(warmup + repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, min_length=prompt_tokens + new_tokens)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens([prompt])
        generator.generate_next_token()
        first, steps = time.perf_counter() - started, []
        for _ in range(new_tokens - 1):
            started = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - started)
        if run >= warmup:
            ttft.append(first)
            tpot += steps
    tpot_ms = stats(tpot)
    return {"ttft_ms": stats(ttft), "tpot_ms": tpot_ms, "tokens_per_s": 1e3 / tpot_ms["p50"] if tpot else None}


def compare(entries: list[dict], results: dict[str, dict]) -> dict:
    """Our TTFT and TPOT over the peer's at the matching precision (torch: fp32), per measured entry:
    a ratio above 1 means ours is slower."""
    ratios = {}
    for entry in entries:
        peer = results.get("fp32" if entry["backend"].startswith("torch") else PRECISIONS.get(entry["precision"], ""))
        if entry["status"] != "ok" or not peer or peer.get("status") != "ok":
            continue
        ours, theirs = entry["understanding"], peer
        ratios[entry["key"]] = {
            "peer_precision": peer["precision"],
            "ttft": ours["ttft_ms"]["p50"] / theirs["ttft_ms"]["p50"],
            "tpot": ours["tpot_ms"]["p50"] / theirs["tpot_ms"]["p50"],
        }
    return ratios
