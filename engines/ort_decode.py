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

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from haplo.bundle import STAGE_GRAPHS
from haplo.engines.ort_fusions import (
    MEMORY,
    MS_DOMAIN,
    RopeTable,
    fuse,
    fuse_skip_norms,
    graph_readers,
    int64_initializer,
    node_attrs,
    pack_projections,
    prune,
    rope_table,
)
from haplo.errors import HaploError
from haplo.model.config import STAGES
from haplo.model.ops import MASKED_START


class DecodeGraphError(HaploError, RuntimeError):
    """A decoder graph without the structure the rewrite expects (the padded path is used instead)."""


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _head_split_source(producers: dict, name: str) -> str | None:
    """y where `name` is Transpose_0213(Reshape(y)), the model's `.view(B, L, -1, D).transpose(1, 2)`:
    y is [B, L, H * D], GroupQueryAttention's layout already."""
    transpose = producers.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        return None
    view = producers.get(transpose.input[0])
    return view.input[0] if view is not None and view.op_type == "Reshape" else None


def _rope_rows(graph, nodes: list, producers: dict, rope, heads: int, head_dim: int) -> str | None:
    """A fused (4-D) RotaryEmbedding moved before the head split, so it reads and gives [B, L, H * D];
    a per-head LayerNormalization (qk-norm) in front of it moves along (it normalises the last axis)."""
    source = _head_split_source(producers, rope.input[0])
    norm = producers.get(rope.input[0])
    if source is None and norm is not None and norm.op_type == "LayerNormalization":
        if _head_split_source(producers, norm.input[0]) is None:
            return None
        split = producers[norm.input[0]].input[0]  # the view before the transpose: [B, L, H, D]
        normed, source = f"{rope.output[0]}/qk_norm", f"{rope.output[0]}/qk_norm_rows"
        nodes.append(helper.make_node("LayerNormalization", [split, *norm.input[1:]], [normed], **node_attrs(norm)))
        shape = int64_initializer(graph, f"{normed}/shape", [0, 0, heads * head_dim])
        nodes.append(helper.make_node("Reshape", [normed, shape], [source]))
    if source is None:
        return None
    out = f"{rope.output[0]}/rows"
    nodes.append(
        helper.make_node(
            "RotaryEmbedding",
            [source, *rope.input[1:]],
            [out],
            domain=MS_DOMAIN,
            interleaved=0,
            num_heads=heads,
            rotary_embedding_dim=head_dim,
        )
    )
    return out


def _to_rows(graph, nodes: list, producers: dict, name: str, heads: int, head_dim: int) -> str:
    """[B, H, 1, D] -> [B, 1, H * D], GroupQueryAttention's layout: the tensor before the model's
    head split where it can be found (with RoPE and qk-norm moved before the split), else a copy."""
    node = producers.get(name)
    if node is not None and node.op_type == "RotaryEmbedding":
        rows = _rope_rows(graph, nodes, producers, node, heads, head_dim)
        if rows is not None:
            return rows
    source = _head_split_source(producers, name)
    if source is not None:
        return source
    transposed, flat = f"{name}/gqa_bshd", f"{name}/gqa_flat"
    nodes.append(helper.make_node("Transpose", [name], [transposed], perm=[0, 2, 1, 3]))
    shape = int64_initializer(graph, f"{name}/gqa_shape", [0, 0, heads * head_dim])
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
        _to_rows(graph, nodes, producers, n, h, d)
        for n, h in ((query, hq), (concat_k.input[1], hkv), (concat_v.input[1], hkv))
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
    shape = int64_initializer(graph, f"{node.output[0]}/gqa_bshd_shape", [0, 0, hq, d])
    nodes.append(helper.make_node("Reshape", [flat_out, shape], [f"{flat_out}/bshd"]))
    nodes.append(helper.make_node("Transpose", [f"{flat_out}/bshd"], [node.output[0]], perm=[0, 2, 1, 3]))
    return nodes


def _merge_heads_in_place(nodes: list, outputs: set[str]) -> None:
    """The model's `out.transpose(1, 2).reshape(B, L, -1)` after attention reads GroupQueryAttention's
    [B, L, Hq * D] output directly (the transposes back and forth become dead and are pruned)."""
    producers = {out: n for n in nodes for out in n.output}
    for node in nodes:
        transpose = producers.get(node.input[0]) if node.op_type == "Reshape" else None
        if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
            continue
        if transpose.input[0] in outputs:
            node.input[0] = f"{transpose.input[0]}/gqa_out"


def _rotary_in_attention(nodes: list) -> int:
    """GroupQueryAttention rotates q and k itself (`do_rotary`, at the graph's position ids) where both
    come from RotaryEmbeddings over the full head with one table: those become dead and are pruned."""
    producers = {out: n for n in nodes for out in n.output}
    done = 0
    for node in nodes:
        if node.op_type != "GroupQueryAttention" or len(node.input) > 7:
            continue
        ropes = [producers.get(name) for name in node.input[:2]]
        if any(r is None or r.op_type != "RotaryEmbedding" or node_attrs(r).get("interleaved", 0) for r in ropes):
            continue
        if ropes[0].input[1:] != ropes[1].input[1:] or node_attrs(ropes[0]).get("rotary_embedding_dim", 0) == 0:
            continue
        position_ids, cos, sin = ropes[0].input[1:4]
        node.input[:2] = [r.input[0] for r in ropes]
        node.input.extend([cos, sin, position_ids])
        node.attribute.extend([helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)])
        done += 1
    return done


def _packed_attention_input(graph: onnx.GraphProto) -> int:
    """GroupQueryAttention reads packed QKV where q, k and v are the three outputs of one Split (of a
    packed projection, `pack_projections`) that nothing else reads."""
    producers, readers = {out: n for n in graph.node for out in n.output}, graph_readers(graph)
    done = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        split = producers.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            continue
        if any(len(readers.get(name, [])) != 1 for name in split.output):
            continue
        node.input[:3] = [split.input[0], "", ""]
        done += 1
    return done


def decode_graph(
    model: onnx.ModelProto,
    stage_cfg,
    base_dir: Path | None = None,
    rope: RopeTable | None = None,
    fused: bool = True,
    memory: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A one-token step of a decoder stage graph over in-place caches (see the module docstring),
    with the fusions of `haplo.engines.ort_fusions` (AdaLN where its parameters can be read from
    `base_dir`, RoPE where `rope` gives the stage's table, rotated inside GroupQueryAttention; packed
    projections, packed QKV, skip norms; none with `fused=False`). With `memory`, packed weights are
    held there instead of in the graph (`in_memory_initializers`).

    Inputs: hidden_states, position_ids, seqlens_k [batch] int32 (each row's cached length),
    total_sequence_length int32 (the longest row's length + 1), past_key_values.N.* [batch, Hkv,
    capacity, D]; bind each present.N.* output to its past's buffer."""
    graph = model.graph
    if fused:
        fuse(model, base_dir, rope)
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
    _merge_heads_in_place(nodes, {n.output[0] for n in attentions})
    if any("key_start" in n.input for n in nodes):
        raise DecodeGraphError(f"{graph.name}: key_start is read outside attention")
    if fused:
        _rotary_in_attention(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    if fused:
        prune(graph)  # the dead RoPE and head-split nodes: their readers no longer hold projections back
        pack_projections(graph, base_dir, memory)
        _packed_attention_input(graph)
        fuse_skip_norms(graph)
    inputs = [i for i in graph.input if i.name != "key_start"]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    prune(graph)
    return model


def _renamed(name: str, prefix: str, links: dict[str, str], shared) -> str:
    if not name or shared(name):
        return name
    return links.get(name, f"{prefix}/{name}")


def _add_part(stack: onnx.GraphProto, part: onnx.ModelProto, prefix: str, links: dict[str, str], shared) -> None:
    """Append `part`'s nodes and initializers to `stack`, its own names under `prefix`, `links` renamed."""
    for index, node in enumerate(part.graph.node):
        node.input[:] = [_renamed(n, prefix, links, shared) for n in node.input]
        node.output[:] = [_renamed(n, prefix, links, shared) for n in node.output]
        node.name = f"{prefix}/{index}/{node.name}"
        stack.node.append(node)
    for tensor in part.graph.initializer:
        tensor.name = _renamed(tensor.name, prefix, links, shared)
        stack.initializer.append(tensor)


def _is_shared(name: str) -> bool:
    """Names every part of the stack means the same by: the step's inputs and the caches."""
    return name in ("position_ids", "seqlens_k", "total_sequence_length") or name.startswith(
        ("past_key_values.", "present.")
    )


def stack_graph(embed: onnx.ModelProto, stages: list[onnx.ModelProto], head: onnx.ModelProto) -> onnx.ModelProto:
    """One graph for the whole decode step, input_ids -> logits: the embedding, the rewritten stage
    graphs (`decode_graph`) in order and the LM head, each under its own name prefix, linked by
    name. One session run per token, and no host round trip between stages."""
    stack = helper.make_graph([], "decode_step", [], [])
    hidden = "input_ids"
    parts = [("embed_text", embed, {"input_ids": "input_ids"}, "inputs_embeds")]
    parts += [(STAGES[i], m, {"hidden_states": None}, "hidden_states_out") for i, m in enumerate(stages)]
    parts.append(("lm_head", head, {"last_decoder_hidden_state": None}, "logits"))
    for prefix, model, links, out in parts:
        links = {name: hidden if link is None else link for name, link in links.items()}
        hidden = "logits" if out == "logits" else f"{prefix}/{out}"
        links[out] = hidden
        _add_part(stack, model, prefix, links, _is_shared)
    inputs = {i.name: i for m in (embed, *stages) for i in m.graph.input if i.name == "input_ids" or _is_shared(i.name)}
    outputs = [o for m in stages for o in m.graph.output if o.name.startswith("present.")]
    stack.input.extend(inputs.values())
    stack.output.extend([o for o in head.graph.output if o.name == "logits"] + outputs)
    versions: dict[str, int] = {}
    for m in (embed, *stages, head):
        for o in m.opset_import:
            versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    model = helper.make_model(stack, opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()])
    model.ir_version = embed.ir_version
    functions = {(f.domain, f.name): f for m in stages for f in m.functions}
    model.functions.extend(functions.values())
    return model


def decode_stack_session(
    paths: dict[str, Path], config, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """The session of `stack_graph` over a bundle's graphs (`paths`: graph name -> file), external
    weights read where they lie (every graph of a bundle is in one folder)."""
    load = lambda name: onnx.load(str(paths[name]), load_external_data=False)  # noqa: E731
    stages, memory = [], {}
    for stage in STAGES:
        path = paths[STAGE_GRAPHS[stage]]
        cfg, rope = config.stages[stage], rope_table(config, stage)
        stages.append(decode_graph(load(STAGE_GRAPHS[stage]), cfg, path.parent, rope, memory=memory))
    model = stack_graph(load("embed_text"), stages, load("lm_head"))
    folder = paths["embed_text"].parent
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    values = in_memory_initializers(model, memory, options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    session.haplo_initializers = values  # ONNX Runtime reads these buffers: they live as the session does
    return session


def in_memory_initializers(model: onnx.ModelProto, memory: dict[str, np.ndarray], options) -> list:
    """Give `options` the initializers whose external data is a `memory` entry; their OrtValues."""
    names, values = [], []
    for tensor in model.graph.initializer:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location.startswith(MEMORY):
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(memory[location]))
    if names:
        options.add_external_initializers(names, values)
    return values


class SlotBatch:
    """A running decode batch in per-layer buffers [rows, Hkv, capacity, D], updated in place.

    The scheduler's batch protocol: `add` a prefilled one-row state, `keep` rows, `step` one token per
    row (-> logits [rows, vocab]), `rows`, `length`, `cache_bytes`. The session's IOBinding stays bound
    to the buffers and to the step inputs (written in place) until the rows or the buffers change."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.lengths: list[int] = []
        self.positions: list[int] = []
        self._binding = None  # (IOBinding, step inputs it reads) while rows and buffers stay
        self.bindings_made = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    def cache_bytes(self) -> int:
        return sum(b.nbytes for buffers in list(self.buffers.values()) for b in buffers)  # read from other threads

    def _reserve(self, rows: int, length: int) -> None:
        """Buffers for at least `rows` rows of `length` slots (doubling, the filled part copied over).
        A first reservation leaves half its length again for the tokens to come, so the rows of one
        prompt length do not copy the whole cache over at their first step."""
        have_rows, have_len = (
            (self.buffers[STAGES[0]][0].shape[0], self.buffers[STAGES[0]][0].shape[2]) if self.buffers else (0, 0)
        )
        if rows <= have_rows and length <= have_len:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_len = have_len if length <= have_len else max(length + length // 2, 2 * have_len, 64)
        for stage in STAGES:
            cfg = self.backend.config.stages[stage]
            count = 2 * len(self.backend.bundle.graphs[STAGE_GRAPHS[stage]].layers)
            fresh = [np.zeros(cfg.kv_shape(new_rows, new_len), dtype=np.float32) for _ in range(count)]
            for old, new in zip(self.buffers.get(stage, []), fresh):
                new[: self.rows, :, :have_len] = old[: self.rows]
            self.buffers[stage] = fresh
        self._binding = None

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
        self._binding = None

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
        self._binding = None
        if not rows:
            self.buffers = {}  # an idle batch holds no memory

    def _bind(self):
        """(IOBinding, step inputs): the caches of the current rows bound as past and present in place,
        the step inputs as arrays the binding reads where they lie."""
        if self._binding is None:
            binding = self.backend.decode_session().io_binding()
            rows = self.rows
            inputs = {
                "input_ids": np.zeros((rows, 1), dtype=np.int64),
                "position_ids": np.zeros((rows, 1), dtype=np.int64),
                "seqlens_k": np.zeros(rows, dtype=np.int32),
                "total_sequence_length": np.zeros((), dtype=np.int32),
            }
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in inputs.values()]
            for name, value in zip(inputs, values):
                binding.bind_ortvalue_input(name, value)
            # the step writes its logits here: no output allocated and no OrtValue list made per step
            inputs["logits"] = np.zeros((rows, 1, self.backend.config.vocab_size), dtype=np.float32)
            values.append(ort.OrtValue.ortvalue_from_numpy(inputs["logits"]))
            binding.bind_ortvalue_output("logits", values[-1])
            for stage in STAGES:
                for i, n in enumerate(self.backend.bundle.graphs[STAGE_GRAPHS[stage]].layers):
                    for j, kind in enumerate(("key", "value")):
                        value = ort.OrtValue.ortvalue_from_numpy(self.buffers[stage][2 * i + j][:rows])
                        binding.bind_ortvalue_input(f"past_key_values.{n}.{kind}", value)
                        binding.bind_ortvalue_output(f"present.{n}.{kind}", value)
            self._binding = (binding, inputs, values)
            self.bindings_made += 1
        return self._binding[:2]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through the whole stack in one session run: next-token logits [rows, vocab]."""
        self._reserve(self.rows, self.length + 1)
        binding, inputs = self._bind()
        inputs["input_ids"][:, 0] = tokens.numpy()
        inputs["position_ids"][:, 0] = self.positions
        inputs["seqlens_k"][:] = self.lengths
        inputs["total_sequence_length"][...] = self.length + 1
        self.backend.decode_session().run_with_iobinding(binding)
        self.lengths = [n + 1 for n in self.lengths]
        self.positions = [p + 1 for p in self.positions]
        return torch.from_numpy(inputs["logits"][:, -1].copy())  # the buffer is the next step's
