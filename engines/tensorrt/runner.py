"""Engine runner: one deserialised engine on one CUDA stream, with reused output arenas and CUDA graphs."""

from __future__ import annotations

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


class EngineRunner:
    """One engine, one execution context, on one CUDA stream.

    Output buffers are preallocated flat arenas that grow to the largest shape seen, so steady-state
    calls allocate nothing. Outputs of one call stay valid until the next call with the same `slot`:
    decoder stages alternate two slots, so this step's `present` never overwrites the `past` it
    reads. With `cuda_graphs`, a call whose shapes repeat (every DDIM step after the first) replays a
    captured CUDA graph instead of enqueueing again.
    """

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
        self.profile = -1
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}

    def select_profile(self, index: int) -> None:
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profile = index

    def _output(self, name: str, shape, slot: int) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        arena = self.arenas.get((name, slot))
        if arena is None or arena.numel() < numel:
            arena = torch.empty(max(numel, 1), dtype=self.dtypes[name], device="cuda")
            self.arenas[(name, slot)] = arena
        return arena[:numel].view(*shape)

    def _enqueue(self, feeds: dict, slot: int) -> dict:
        for name in self.inputs:
            tensor = feeds[name]
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = self._output(name, tuple(self.context.get_tensor_shape(name)), slot)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the log)")
        return outputs

    def _run_eager(self, feeds: dict, slot: int) -> dict:
        # The feeds (casts, the zeroed dead KV slot, kept prefix caches) were written on the caller's
        # stream: the engine's stream must not read them before that work is done.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = self._enqueue(feeds, slot)
        self.stream.synchronize()
        return out

    def _capture(self, feeds: dict, slot: int) -> tuple:
        """(graph, static inputs, outputs): one call captured as a CUDA graph over copies of `feeds`."""
        static = {n: t.clone() for n, t in feeds.items()}
        self._run_eager(static, slot)  # warm-up outside capture: lazy allocations happen here
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            outputs = self._enqueue(static, slot)
        return graph, static, outputs

    def __call__(self, feeds: dict, profile: int = 0, slot: int = 0) -> dict:
        """feeds: input name -> CUDA tensor (dtype as the engine expects). Returns name -> CUDA tensor."""
        feeds = {n: feeds[n].to(device="cuda", dtype=self.dtypes[n]).contiguous() for n in self.inputs}
        self.select_profile(profile)
        if not self.cuda_graphs:
            return self._run_eager(feeds, slot)
        key = (profile, slot, *(tuple(feeds[n].shape) for n in self.inputs))
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.graphs and self.seen[key] < 2:  # capture only shapes that repeat (DDIM steps)
            return self._run_eager(feeds, slot)
        if key not in self.graphs:
            self.graphs[key] = self._capture(feeds, slot)
        graph, static, outputs = self.graphs[key]
        for name, tensor in feeds.items():
            static[name].copy_(tensor)
        graph.replay()
        self.stream.synchronize()
        return outputs
