"""Engine runner: one deserialised engine on one CUDA stream, with reused output arenas and CUDA graphs."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from haplo.engines.tensorrt.status import EngineError, require_tensorrt


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor dtype."""
    import tensorrt as trt

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
        trt.fp8: torch.float8_e4m3fn,
    }
    return table[trt_dtype]


MAX_GRAPHS = 8  # CUDA graphs (each with its own execution context) one runner keeps, least recently used out


@dataclass
class _Captured:
    """One call captured as a CUDA graph, on an execution context of its own.

    `stable` inputs are the caller's own tensors, bound directly (the same tensor came in at the
    first two calls: a kept text prefix, a cache reused by every DDIM step): replays read them in
    place. The other inputs are copied into `static` before each replay. `outputs` belong to the
    graph alone, so no later call or arena growth can move them."""

    context: object
    graph: object
    static: dict
    stable: set
    outputs: dict


class EngineRunner:
    """One engine on one CUDA stream: an execution context for eager calls, and CUDA graphs.

    Eager outputs are preallocated flat arenas that grow to the largest shape seen, so steady-state
    calls allocate nothing. Outputs of one call stay valid until the next call with the same `slot`:
    decoder stages alternate two slots, so this step's `present` never overwrites the `past` it
    reads. With `cuda_graphs`, a call whose shapes repeat (every DDIM step after the first) replays a
    captured CUDA graph instead of enqueueing again (at most MAX_GRAPHS kept). The host never waits
    for a call: the caller's stream waits for the engine's (`_ordered`), so the next stage is
    enqueued while this one runs.
    """

    device = "cuda"

    def __init__(self, plan_path: Path, stream=None, cuda_graphs: bool = False):
        trt = require_tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: cannot deserialize (corrupt file or other TensorRT version)")
        self.context = self.engine.create_execution_context()
        self.stream = stream or torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.arenas: dict[tuple[str, int], torch.Tensor] = {}
        self.profiles: dict[int, int] = {}  # id(context) -> its optimisation profile
        self.cuda_graphs = cuda_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        # key -> input addresses of its first call; shapes seen once (prefills) age out
        self.first_call: OrderedDict[tuple, dict[str, int]] = OrderedDict()

    def select_profile(self, index: int, context=None) -> None:
        context = context or self.context
        if self.profiles.get(id(context)) != index:
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profiles[id(context)] = index

    def _output(self, name: str, shape, slot: int) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        arena = self.arenas.get((name, slot))
        if arena is None or arena.numel() < numel:
            arena = torch.empty(max(numel, 1), dtype=self.dtypes[name], device=self.device)
            self.arenas[(name, slot)] = arena
        return arena[:numel].view(*shape)

    def _enqueue(self, context, feeds: dict, outputs: dict | None = None, slot: int = 0) -> dict:
        """Bind `feeds` and outputs (given, else this slot's arenas) on `context` and enqueue once."""
        for name in self.inputs:
            tensor = feeds[name]
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        if outputs is None:
            outputs = {n: self._output(n, tuple(context.get_tensor_shape(n)), slot) for n in self.outputs}
        for name in self.outputs:
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the log)")
        return outputs

    @contextmanager
    def _ordered(self):
        """Run on the engine's stream between the caller's work before and after, host not blocked.

        The feeds (casts, the zeroed dead KV slot, kept prefix caches) were written on the caller's
        stream, so the engine's stream waits for it; the caller's stream then waits for the engine,
        so whatever reads the outputs (the next stage, a sampled token's copy to the host) and any
        reuse of the feeds' memory comes after it."""
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def _run_eager(self, feeds: dict, slot: int, context=None) -> dict:
        with self._ordered():
            return self._enqueue(context or self.context, feeds, slot=slot)

    def _capture(self, feeds: dict, profile: int, stable: set) -> _Captured:
        """A new context and CUDA graph for this call: stable inputs bound in place, the rest copied."""
        context = self.engine.create_execution_context()
        self.select_profile(profile, context)
        static = {n: (t if n in stable else t.clone()) for n, t in feeds.items()}
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self._enqueue(context, static, slot=-1)  # warm-up outside capture: lazy allocations happen here
            outputs = {
                n: torch.empty(tuple(context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                for n in self.outputs
            }
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._enqueue(context, static, outputs)
        return _Captured(context, graph, static, stable, outputs)

    def _graph_for(self, key: tuple, feeds: dict, profile: int) -> _Captured | None:
        """The captured graph for this call, captured at the second call of a shape; None: run eagerly."""
        addresses = {n: t.data_ptr() for n, t in feeds.items()}
        if key not in self.graphs:
            first = self.first_call.setdefault(key, addresses)
            if first is addresses:
                while len(self.first_call) > 8 * MAX_GRAPHS:
                    self.first_call.popitem(last=False)
                return None  # a shape seen once (a prefill) is not worth a graph
            del self.first_call[key]
            self.graphs[key] = self._capture(feeds, profile, {n for n in feeds if first[n] == addresses[n]})
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        captured = self.graphs[key]
        self.graphs.move_to_end(key)
        moved = {n for n in captured.stable if addresses[n] != captured.static[n].data_ptr()}
        if moved:  # an input thought stable came in another tensor (its address had only been reused)
            captured = self.graphs[key] = self._capture(feeds, profile, captured.stable - moved)
        return captured

    def __call__(self, feeds: dict, profile: int = 0, slot: int = 0) -> dict:
        """feeds: input name -> CUDA tensor (dtype as the engine expects). Returns name -> CUDA tensor."""
        feeds = {n: feeds[n].to(device=self.device, dtype=self.dtypes[n]).contiguous() for n in self.inputs}
        key = (profile, slot, *(tuple(feeds[n].shape) for n in self.inputs))
        captured = self._graph_for(key, feeds, profile) if self.cuda_graphs else None
        if captured is None:
            self.select_profile(profile)
            return self._run_eager(feeds, slot)
        with self._ordered():
            for name, tensor in feeds.items():
                if name not in captured.stable:
                    captured.static[name].copy_(tensor)
            captured.graph.replay()
        return captured.outputs
