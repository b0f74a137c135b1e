"""The ONNX Runtime decode path: one-token steps over KV caches updated in place.

A bundle's decoder graphs append the new key and value to the cache with a `Concat`, which copies
the whole cache every step, and attend through the `haplo` HybridAttention function. For a one-token
step the block-start mask reduces to "every real key of the row", so `decode_graph` rewrites each
stage graph (in memory, when the backend first needs it) to run ONNX Runtime's `GroupQueryAttention`
over a shared past/present buffer instead: the new key and value are written at each row's own
length and nothing else of the cache moves. `SlotBatch` keeps a running batch in such buffers:
row b's tokens fill slots [0, length_b) of [rows, Hkv, capacity, D], rows join by copying their
prefill cache in and leave by moving the last rows down.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from haplo.bundle import STAGE_GRAPHS
from haplo.errors import HaploError
from haplo.model.config import STAGES
from haplo.model.ops import MASKED_START

MS_DOMAIN = "com.microsoft"


class DecodeGraphError(HaploError, RuntimeError):
    """A decoder graph without the structure the rewrite expects (the padded path is used instead)."""


def _const(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    return name


def _to_rows(graph, nodes: list, name: str, heads: int, head_dim: int) -> str:
    """[B, H, 1, D] -> [B, 1, H * D], GroupQueryAttention's layout."""
    transposed, flat = f"{name}/gqa_bshd", f"{name}/gqa_flat"
    nodes.append(helper.make_node("Transpose", [name], [transposed], perm=[0, 2, 1, 3]))
    shape = _const(graph, f"{name}/gqa_shape", [0, 0, heads * head_dim])
    nodes.append(helper.make_node("Reshape", [transposed, shape], [flat]))
    return flat


def _attention(graph, node, producers: dict, stage_cfg) -> list:
    """The nodes replacing one HybridAttention and its two cache Concats."""
    query, key_all, value_all, _ = node.input
    concat_k, concat_v = producers.get(key_all), producers.get(value_all)
    if concat_k is None or concat_v is None or concat_k.op_type != "Concat" or concat_v.op_type != "Concat":
        raise DecodeGraphError(f"{node.name}: its keys and values do not come from the cache Concat")
    hq, hkv, d = stage_cfg.num_attention_heads, stage_cfg.num_key_value_heads, stage_cfg.head_dim
    scale = next(a.f for a in node.attribute if a.name == "scale")
    nodes: list = []
    q, k, v = (
        _to_rows(graph, nodes, n, h, d) for n, h in ((query, hq), (concat_k.input[1], hkv), (concat_v.input[1], hkv))
    )
    flat_out = f"{node.output[0]}/gqa_out"
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [q, k, v, concat_k.input[0], concat_v.input[0], "seqlens_k", "total_sequence_length"],
            [flat_out, key_all, value_all],  # present = the same buffer as past, bound by the caller
            domain=MS_DOMAIN,
            num_heads=hq,
            kv_num_heads=hkv,
            scale=scale,
        )
    )
    shape = _const(graph, f"{node.output[0]}/gqa_bshd_shape", [0, 0, hq, d])
    nodes.append(helper.make_node("Reshape", [flat_out, shape], [f"{flat_out}/bshd"]))
    nodes.append(helper.make_node("Transpose", [f"{flat_out}/bshd"], [node.output[0]], perm=[0, 2, 1, 3]))
    return nodes


def decode_graph(model: onnx.ModelProto, stage_cfg) -> onnx.ModelProto:
    """A one-token step of a decoder stage graph over in-place caches (see the module docstring).

    Inputs: hidden_states, position_ids, seqlens_k [batch] int32 (each row's cached length),
    total_sequence_length int32 (the longest row's length + 1), past_key_values.N.* [batch, Hkv,
    capacity, D]; bind each present.N.* output to its past's buffer."""
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    attentions = [n for n in graph.node if n.op_type == "HybridAttention"]
    if not attentions:
        raise DecodeGraphError(f"{graph.name}: no HybridAttention node to rewrite")
    replaced = {id(n): _attention(graph, n, producers, stage_cfg) for n in attentions}
    dropped = {id(producers[n.input[i]]) for n in attentions for i in (1, 2)}
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in dropped:
            nodes.append(node)
    if any("key_start" in n.input for n in nodes):
        raise DecodeGraphError(f"{graph.name}: key_start is read outside attention")
    del graph.node[:]
    graph.node.extend(nodes)
    inputs = [i for i in graph.input if i.name != "key_start"]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def decode_session(path, stage_cfg, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """The rewritten graph of the stage graph at `path`, its external weights read where they lie."""
    model = decode_graph(onnx.load(str(path), load_external_data=False), stage_cfg)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


class SlotBatch:
    """A running decode batch in per-layer buffers [rows, Hkv, capacity, D], updated in place.

    The scheduler's batch protocol: `add` a prefilled one-row state, `keep` rows, `step` one token per
    row (-> logits [rows, vocab]), `rows`, `length`, `cache_bytes`."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.lengths: list[int] = []
        self.positions: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    def cache_bytes(self) -> int:
        return sum(b.nbytes for buffers in list(self.buffers.values()) for b in buffers)  # read from other threads

    def _reserve(self, rows: int, length: int) -> None:
        """Buffers for at least `rows` rows of `length` slots (doubling, the filled part copied over)."""
        have_rows, have_len = (
            (self.buffers[STAGES[0]][0].shape[0], self.buffers[STAGES[0]][0].shape[2]) if self.buffers else (0, 0)
        )
        if rows <= have_rows and length <= have_len:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_len = have_len if length <= have_len else max(length, 2 * have_len, 64)
        for stage in STAGES:
            cfg = self.backend.config.stages[stage]
            count = 2 * len(self.backend.bundle.graphs[STAGE_GRAPHS[stage]].layers)
            fresh = [np.zeros(cfg.kv_shape(new_rows, new_len), dtype=np.float32) for _ in range(count)]
            for old, new in zip(self.buffers.get(stage, []), fresh):
                new[: self.rows, :, :have_len] = old[: self.rows]
            self.buffers[stage] = fresh

    def add(self, state) -> None:
        """Append the one-row state of a prefill (its cache has no padding: one request alone)."""
        if state.key_start.shape[0] != 1 or bool((state.key_start >= MASKED_START).any()):
            raise DecodeGraphError("a slot joins from one unpadded request's prefill")
        length = state.length
        self._reserve(self.rows + 1, length + 1)
        row = self.rows
        for stage in STAGES:
            for buffer, tensor in zip(self.buffers[stage], self.backend.cache_tensors(state.past[stage])):
                buffer[row, :, :length] = tensor[0].numpy()
        self.lengths.append(length)
        self.positions.append(int(state.next_position[0]))

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (ascending) stay, moved down to slots 0, 1, ..."""
        for target, source in enumerate(rows):
            if source != target:
                length = self.lengths[source]
                for buffers in self.buffers.values():
                    for buffer in buffers:
                        buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths = [self.lengths[r] for r in rows]
        self.positions = [self.positions[r] for r in rows]
        if not rows:
            self.buffers = {}  # an idle batch holds no memory

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through every stage: next-token logits [rows, vocab]."""
        self._reserve(self.rows, self.length + 1)
        hidden = self.backend.embed_text(tokens[:, None].long())
        positions = np.array(self.positions, dtype=np.int64)[:, None]
        seqlens = np.array(self.lengths, dtype=np.int32)
        total = np.array(self.length + 1, dtype=np.int32)
        for stage in STAGES:
            hidden = self._run_stage(stage, hidden, positions, seqlens, total)
        self.lengths = [n + 1 for n in self.lengths]
        self.positions = [p + 1 for p in self.positions]
        return self.backend.lm_head(hidden)[:, -1]

    def _run_stage(self, stage: str, hidden, positions, seqlens, total) -> torch.Tensor:
        session = self.backend.decode_session(stage)
        binding = session.io_binding()
        binding.bind_cpu_input("hidden_states", np.ascontiguousarray(hidden.float().numpy()))
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", total)
        binding.bind_output("hidden_states_out", "cpu")  # first: get_outputs() follows the binding order
        layers = self.backend.bundle.graphs[STAGE_GRAPHS[stage]].layers
        for i, n in enumerate(layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self.buffers[stage][2 * i + j][: self.rows])
                binding.bind_ortvalue_input(f"past_key_values.{n}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{n}.{kind}", value)
        session.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())
