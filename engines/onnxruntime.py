"""ONNX Runtime backend: one session per graph of a bundle, KV cache kept as OrtValues.

Decoder stages run through IOBinding: this step's `present` OrtValues are bound as the next
step's `past` inputs directly, so the cache never goes through numpy between steps.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from haplo.bundle import STAGE_GRAPHS, Bundle, BundleError
from haplo.cpuinfo import cpu_info
from haplo.engines.graph_backend import GraphBackend
from haplo.errors import HaploError

NUMPY_DTYPES = {"float": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


# When idle intra-op threads spin: never, only within a run, or also between runs (ONNX Runtime's own).
SPINNING = ("off", "run", "on")


def session_options(
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    spinning: str = "run",
):
    if spinning not in SPINNING:
        raise HaploError(f"spinning={spinning!r}: choose one of {', '.join(SPINNING)}")
    options = ort.SessionOptions()
    if spinning == "off":  # idle intra-op threads sleep at once: other work shares the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "run":  # they spin between the nodes of a run and stop when it ends
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    # Shapes change every decode step: pre-planned memory patterns would be rebuilt each time.
    options.enable_mem_pattern = False
    options.graph_optimization_level = optimization
    options.log_severity_level = 3
    return options


def check_int8_cpu(bundle: Bundle, optimization: ort.GraphOptimizationLevel) -> None:
    """Refuse a full-range INT8 bundle where this CPU's integer kernels would saturate it."""
    quant = bundle.manifest.quantization
    if "int8" not in quant["policy"].values() or quant["flavor"] == "tensorrt":
        return
    weights = quant["int8_weights"]
    if weights["range"] != "full" or int(optimization) <= int(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        return  # reduced weights are exact everywhere; at the basic level Q/DQ run in float
    cpu = cpu_info()
    if not cpu.int8_dot_int32:
        raise BundleError(
            f"{bundle.root}: its INT8 weights use the full 8-bit range (built on "
            f"{weights['build_cpu']}), which this CPU ({cpu.describe()}) adds in saturating int16; "
            "rebuild it here with `haplo-export build --precision int8` (or anywhere with --int8-weights reduced)"
        )


def check_float32_activations(bundle: Bundle) -> None:
    """Refuse a bundle whose decoders carry bf16 / fp16 activations and KV cache (lowered for TensorRT)."""
    lowered = {g: e.activations for g, e in bundle.graphs.items() if e.activations != "float32"}
    if lowered:
        graph, dtype = next(iter(lowered.items()))
        raise BundleError(
            f"{bundle.root}: built for TensorRT with {dtype} activations and KV cache ({graph} and "
            f"{len(lowered) - 1} more), which this runtime does not run on ONNX Runtime; run it with "
            "--backend tensorrt on an NVIDIA GPU, or build it with --target onnxruntime"
        )


class OrtBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle | str,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        providers: list[str] | None = None,
        optimization: ort.GraphOptimizationLevel | None = None,
        spinning: str = "run",
    ):
        """`spinning`: when idle intra-op threads spin (`SPINNING`). "run", the default, spins between
        the nodes of a run, where a sleeping thread would be woken hundreds of times per decode step,
        and stops at its end: the runtime's own tensor work (PyTorch's threads), a server's event loop
        and its clients share the cores between runs. On a 2-core AMD EPYC (AVX-512) spinning between
        runs too ("on") made haplo-mini's decode step 3.7x and its prefill 3.4x slower, and halved a
        server's batched throughput."""
        super().__init__(bundle)
        check_float32_activations(self.bundle)
        self.providers = providers or ["CPUExecutionProvider"]
        if optimization is None:  # quantized bundles record the level their Q/DQ graphs need
            name = self.bundle.manifest.onnxruntime_optimization
            optimization = getattr(ort.GraphOptimizationLevel, name)
        if "CPUExecutionProvider" in self.providers[:1]:
            check_int8_cpu(self.bundle, optimization)
        self.options = session_options(intra_op_threads, inter_op_threads, optimization, spinning)
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._decode_session: ort.InferenceSession | None = None
        self.optimization, self.spinning = optimization, spinning
        self.intra_op_threads, self.inter_op_threads = intra_op_threads, inter_op_threads

    def session(self, graph: str) -> ort.InferenceSession:
        """Created on first use, so a run pays only for the graphs it needs (cold start)."""
        if graph not in self.sessions:
            self.sessions[graph] = ort.InferenceSession(
                str(self.bundle.graph_path(graph)), self.options, providers=self.providers
            )
        return self.sessions[graph]

    def decode_session(self) -> ort.InferenceSession:
        """The one-token step over in-place caches, embedding to logits in one graph
        (`haplo.engines.ort_decode.stack_graph`), made on first use."""
        if self._decode_session is None:
            from haplo.engines.ort_decode import decode_stack_session

            options = session_options(self.intra_op_threads, self.inter_op_threads, self.optimization, self.spinning)
            paths = {name: self.bundle.graph_path(name) for name in ("embed_text", "lm_head", *STAGE_GRAPHS.values())}
            self._decode_session = decode_stack_session(paths, self.config, options, self.providers)
        return self._decode_session

    def decode_batch(self):
        """A `SlotBatch` (caches updated in place) where every stage graph can be rewritten for it,
        else None (the scheduler then pads rows through `run_stage`)."""
        from haplo.engines.ort_decode import DecodeGraphError, SlotBatch

        try:  # the slot buffers are fp32, as every cache is here (`check_float32_activations`)
            self.decode_session()
        except DecodeGraphError:
            return None
        return SlotBatch(self)

    def run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
        return [torch.from_numpy(out) for out in self.session(graph).run(None, feeds)]

    def run_stage(self, stage, hidden, position_ids, key_start, past=None, use_cache=True):
        graph = STAGE_GRAPHS[stage]
        session = self.session(graph)
        binding = session.io_binding()
        feeds = {"hidden_states": hidden.float(), "position_ids": position_ids.long(), "key_start": key_start.long()}
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value.detach().cpu().numpy()))
        layers = self.bundle.graphs[graph].layers
        if past is None:  # prefill: empty caches [B, kv, 0, D]
            cfg = self.config.stages[stage]
            empty = np.zeros(cfg.kv_shape(hidden.shape[0], 0), dtype=np.float32)
            past = [ort.OrtValue.ortvalue_from_numpy(empty)] * (2 * len(layers))
        for i, n in enumerate(layers):
            binding.bind_ortvalue_input(f"past_key_values.{n}.key", past[2 * i])
            binding.bind_ortvalue_input(f"past_key_values.{n}.value", past[2 * i + 1])
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # the presents are the concatenations attention read anyway
        return torch.from_numpy(outputs[0].numpy()), (list(outputs[1:]) if use_cache else None)

    def cache_tensors(self, past: list[ort.OrtValue]) -> list[torch.Tensor]:
        return [torch.from_numpy(value.numpy()) for value in past]

    def cache_from_tensors(self, tensors: list[torch.Tensor]) -> list[ort.OrtValue]:
        # the OrtValue keeps the numpy array it wraps alive
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.float().numpy())) for t in tensors]
