"""Fusions of the one-token decode graph: ONNX Runtime's fused kernels in place of decompositions.

A decode step reads the weights once, so every node around the matmuls is overhead. Two patterns
of an exported stage graph are rewritten (in memory, for `haplo.engines.ort_decode` only; the
bundle's graphs keep their `haplo` nodes):

- `haplo.MultimodalAdaLN`, whose function body inlines to ~26 nodes, becomes ONNX Runtime's fused
  norm (`SimplifiedLayerNormalization` / `LayerNormalization`) and the switch. A softmax over two
  logits is a sigmoid of their difference, so the two (shift, scale, gate) sets fold into constants:
  with s = sigmoid(silu(u) . (w0 - w1) + b0 - b1) the switch's weight on the latent set,
  out = unit * (A_scale + s D_scale) + (A_shift + s D_shift), gate = A_gate + s D_gate, where A holds
  the condition set (with the norm's weight and bias folded in) and D the latent set's difference.
- The rotate-half RoPE (Split, Neg, Concat, two Mul, Add per tensor, and the cos/sin table built
  from position ids) becomes contrib `RotaryEmbedding` over a cos/sin cache made by the model's own
  `rope_cos_sin`, read at the graph's `position_ids`.

- The bias `Add` after a weight-only `MatMulNBits` becomes the operator's own bias input.

Two more run over the rewritten decode graph (`pack_projections`, `fuse_skip_norms`):

- Projections of one input (q, k, v; gate, up) become one matmul over their weights side by side and
  a `Split`: one GEMV (and, weight-only, one activation quantization) instead of two or three.
- A residual `Add` feeding a norm becomes `SkipSimplifiedLayerNormalization` /
  `SkipLayerNormalization`, whose fourth output is the sum.

A node whose parameters are not plain initializers (a cast or quantized graph) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from haplo.model.layers import rope_cos_sin

MS_DOMAIN = "com.microsoft"


def node_attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def int64_initializer(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    return name


def graph_readers(graph: onnx.GraphProto) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


@dataclass(frozen=True)
class RopeTable:
    """The RoPE a stage applies: head size, theta, and the positions its cache must cover."""

    head_dim: int
    theta: float
    positions: int

    def caches(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [positions, head_dim / 2], computed as the model computes them."""
        cos, sin = rope_cos_sin(torch.arange(self.positions)[None], self.head_dim, self.theta)
        half = self.head_dim // 2
        return cos[0, :, :half].numpy().copy(), sin[0, :, :half].numpy().copy()


def rope_table(config, stage: str) -> RopeTable | None:
    """The table `HaploOmniModel.rope` uses for `stage` (its own or the base's), or None without RoPE."""
    cfg = config.stages[stage]
    if not cfg.use_pe:
        return None
    table = cfg if cfg.attention_rope else config.base
    return RopeTable(table.head_dim, table.rope_theta, config.base.max_position_embeddings + 1)


class _Graph:
    """Lookups over one graph while it is rewritten: producers, initializer values, new constants."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None):
        self.graph, self.base_dir = graph, base_dir
        self.producers = {out: n for n in graph.node for out in n.output}
        self.initializers = {i.name: i for i in graph.initializer}

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        if tensor is None:
            return None
        if external_data_helper.uses_external_data(tensor):
            if self.base_dir is None:
                return None
            tensor = TensorProto.FromString(tensor.SerializeToString())
            external_data_helper.load_external_data_for_tensor(tensor, str(self.base_dir))
        return numpy_helper.to_array(tensor)

    def constant(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def producer(self, name: str, op_type: str):
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None


def _attr(node, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _adaln_constants(g: _Graph, node) -> dict[str, np.ndarray] | None:
    """The folded constants of one MultimodalAdaLN (see the module docstring), or None."""
    arrays = [g.array(name) for name in node.input[1:]]
    if any(a is None for a in arrays):
        return None
    weight, bias, ind_w, ind_b, ssg_l, ssg_c = (a.astype(np.float64) for a in arrays)
    if not _attr(node, "layernorm", 0):
        bias = np.zeros_like(weight)
    (shift_l, scale_l, gate_l), (shift_c, scale_c, gate_c) = ssg_l, ssg_c
    base = [weight * (1 + scale_c), bias * (1 + scale_c) + shift_c, gate_c]
    delta = [weight * (scale_l - scale_c), bias * (scale_l - scale_c) + shift_l - shift_c, gate_l - gate_c]
    return {
        "switch_w": ind_w[0] - ind_w[1],  # [H]
        "switch_b": np.array([ind_b[0] - ind_b[1]]),
        "base": np.concatenate(base),  # [3H]: scale, shift, gate
        "delta": np.concatenate(delta),
        "ones": np.ones_like(weight),
        "zeros": np.zeros_like(weight),
    }


def _adaln_nodes(g: _Graph, node, index: int) -> list | None:
    """The nodes replacing one MultimodalAdaLN, or None where its parameters are not initializers."""
    consts = _adaln_constants(g, node)
    if consts is None:
        return None
    p = f"fused_adaln_{index}"
    c = {k: g.constant(f"{p}/{k}", v) for k, v in consts.items()}
    c["last_axis"] = int64_initializer(g.graph, f"{p}/last_axis", [-1])
    x, eps, layernorm = node.input[0], float(_attr(node, "epsilon")), bool(_attr(node, "layernorm", 0))
    if layernorm:  # the switch reads the raw input
        norm = helper.make_node("LayerNormalization", [x, c["ones"], c["zeros"]], [f"{p}/unit"], epsilon=eps, axis=-1)
    else:  # the switch reads the unit-RMS input, before the weight
        norm = helper.make_node("SimplifiedLayerNormalization", [x, c["ones"]], [f"{p}/unit"], epsilon=eps, axis=-1)
    switch_in = x if layernorm else f"{p}/unit"
    out, gate = node.output
    return [
        norm,
        helper.make_node("Sigmoid", [switch_in], [f"{p}/sig"]),
        helper.make_node("Mul", [switch_in, f"{p}/sig"], [f"{p}/silu"]),
        # a dot product, not a MatMul: an N=1 GEMM costs more than this multiply-and-sum
        helper.make_node("Mul", [f"{p}/silu", c["switch_w"]], [f"{p}/terms"]),
        helper.make_node("ReduceSum", [f"{p}/terms", c["last_axis"]], [f"{p}/logit"], keepdims=1),
        helper.make_node("Add", [f"{p}/logit", c["switch_b"]], [f"{p}/logit_b"]),
        helper.make_node("Sigmoid", [f"{p}/logit_b"], [f"{p}/s"]),  # [..., 1]: the latent set's weight
        helper.make_node("Mul", [f"{p}/s", c["delta"]], [f"{p}/s_delta"]),
        helper.make_node("Add", [f"{p}/s_delta", c["base"]], [f"{p}/mixed"]),
        helper.make_node("Split", [f"{p}/mixed"], [f"{p}/scale", f"{p}/shift", gate], axis=-1, num_outputs=3),
        helper.make_node("Mul", [f"{p}/unit", f"{p}/scale"], [f"{p}/scaled"]),
        helper.make_node("Add", [f"{p}/scaled", f"{p}/shift"], [out]),
    ]


def _rope_source(g: _Graph, node) -> tuple[str, str, str] | None:
    """(x, cos, sin) where `node` is Add(Mul(x, cos), Mul(Concat(Neg(x2), x1), sin)) with x1, x2 = Split(x)."""
    if node.op_type != "Add":
        return None
    muls = [g.producer(name, "Mul") for name in node.input]
    if any(m is None for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        for r_in, sin in (rotated.input, rotated.input[::-1]):
            concat = g.producer(r_in, "Concat")
            if concat is None or len(concat.input) != 2 or _attr(concat, "axis") not in (-1, 3):
                continue
            neg, split = g.producer(concat.input[0], "Neg"), g.producers.get(concat.input[1])
            if (
                neg is None
                or split is None
                or split.op_type != "Split"
                or list(split.output[:2])[::-1]
                != [
                    neg.input[0],
                    concat.input[1],
                ]
            ):
                continue
            x = split.input[0]
            if x in plain.input:
                return x, next(i for i in plain.input if i != x), sin
    return None


def _traces_to(g: _Graph, name: str, op_type: str, depth: int = 4) -> bool:
    """Whether `name` is (a few Unsqueeze/Transpose/Cast steps from) an `op_type` output."""
    node = g.producers.get(name)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == op_type:
            return True
        if node.op_type not in ("Unsqueeze", "Transpose", "Cast", "Reshape", "Expand"):
            return False
        node = g.producers.get(node.input[0])
    return False


def _float_bias(g: _Graph, readers: dict, output: str, width: int) -> onnx.NodeProto | None:
    """The Add of a 1-D fp32 initializer of `width` that alone reads `output`, or None."""
    add = readers.get(output, [])
    if len(add) != 1 or add[0].op_type != "Add" or list(add[0].input).count(output) != 1:
        return None
    tensor = g.initializers.get(next(i for i in add[0].input if i != output))
    if tensor is None or list(tensor.dims) != [width] or tensor.data_type != TensorProto.FLOAT:
        return None
    return add[0]


def _fold_biases(graph: onnx.GraphProto, g: _Graph) -> int:
    """MatMulNBits -> Add(1-D initializer bias) becomes MatMulNBits with its bias input (index 5)."""
    readers, outputs, folded = graph_readers(graph), {o.name for o in graph.output}, 0
    for node in graph.node:
        if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or len(node.input) > 5:
            continue
        add = _float_bias(g, readers, node.output[0], _attr(node, "N"))
        if add is None or node.output[0] in outputs:
            continue
        node.input.extend([""] * (5 - len(node.input)) + [next(i for i in add.input if i != node.output[0])])
        node.output[0] = add.output[0]
        add.output[0] = f"{add.output[0]}/folded"  # now read by nothing: pruned
        folded += 1
    return folded


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read (repeatedly), and initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = outputs | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    read = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fuse(model: onnx.ModelProto, base_dir: Path | None, rope: RopeTable | None) -> dict[str, int]:
    """Rewrite `model` in place (see the module docstring): how many of each pattern were fused."""
    g = _Graph(model.graph, base_dir)
    counts = {"adaln": 0, "rope": 0, "bias": 0}
    nodes = []
    cache = None
    for node in model.graph.node:
        if node.op_type == "MultimodalAdaLN" and (fused := _adaln_nodes(g, node, counts["adaln"])) is not None:
            nodes += fused
            counts["adaln"] += 1
            continue
        source = _rope_source(g, node) if rope is not None and node.op_type == "Add" else None
        if source is not None and _traces_to(g, source[1], "Cos") and _traces_to(g, source[2], "Sin"):
            if cache is None:
                cos, sin = rope.caches()
                cache = g.constant("fused_rope/cos_cache", cos), g.constant("fused_rope/sin_cache", sin)
            nodes.append(
                helper.make_node(
                    "RotaryEmbedding",
                    [source[0], "position_ids", *cache],
                    list(node.output),
                    domain=MS_DOMAIN,
                    interleaved=0,
                )
            )
            counts["rope"] += 1
            continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    counts["bias"] = _fold_biases(model.graph, g)
    prune(model.graph)
    if counts["rope"] and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


# Bytes of packed weights a graph may hold in its own initializers (a serialised model must stay
# under 2 GB); projections past it stay as they are. Weights kept in `memory` have no such limit.
PACK_BUDGET = 1 << 30
# The external-data location of a packed weight held in a `memory` dict (see `pack_projections`).
MEMORY = "memory:"


@dataclass
class _Projection:
    """One weight matmul of a shared input: MatMul(x, W) [+ bias] or MatMulNBits (bias folded in)."""

    matmul: onnx.NodeProto
    output: str
    width: int
    key: tuple  # what siblings share to be packed
    weights: list[str] = field(default_factory=list)  # weight input names, in packing order
    bias: str | None = None
    dropped: list = field(default_factory=list)  # the nodes packing removes


def _projection(g: _Graph, readers: dict, node) -> _Projection | None:
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = g.initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            return None
        width = int(weight.dims[1])
        proj = _Projection(node, node.output[0], width, ("MatMul", int(weight.dims[0])), [node.input[1]])
        add = _float_bias(g, readers, node.output[0], width)
        if add is not None:
            proj.bias = next(i for i in add.input if i != node.output[0])
            proj.output, proj.dropped = add.output[0], [add]
        return proj
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if inputs[4] or any(name and name not in g.initializers for name in inputs[1:]):
            return None
        attrs = tuple(_attr(node, a) for a in ("K", "bits", "block_size", "accuracy_level"))
        key = ("MatMulNBits", *attrs, bool(inputs[3]))
        weights = [n for n in inputs[1:4] if n]
        return _Projection(node, node.output[0], int(_attr(node, "N")), key, weights, inputs[5] or None)
    return None


def _sibling_groups(g: _Graph, graph: onnx.GraphProto) -> list[list[_Projection]]:
    """Projections that read the same input with the same kind of weights, two or more per group."""
    readers, outputs = graph_readers(graph), {o.name for o in graph.output}
    groups: dict[tuple, list[_Projection]] = {}
    for node in graph.node:
        proj = _projection(g, readers, node)
        if proj is not None and node.output[0] not in outputs:
            groups.setdefault((node.input[0], proj.key), []).append(proj)
    return [group for group in groups.values() if len(group) > 1]


def _packed_arrays(g: _Graph, group: list[_Projection]) -> list[np.ndarray] | None:
    """The group's weights side by side (MatMul: along N, the last axis; MatMulNBits: every input is
    N-major), then the bias (zeros for members without one), or None where one cannot be read."""
    axis = 1 if group[0].key[0] == "MatMul" else 0
    columns = [[g.array(name) for name in p.weights] for p in group]
    if any(a is None for arrays in columns for a in arrays):
        return None
    packed = [np.concatenate(parts, axis=axis) for parts in zip(*columns)]
    if any(p.bias for p in group):
        biases = [g.array(p.bias) if p.bias else np.zeros(p.width, np.float32) for p in group]
        if any(b is None for b in biases):
            return None
        packed.append(np.concatenate(biases).astype(np.float32))
    return packed


def _store(g: _Graph, name: str, array: np.ndarray, memory: dict[str, np.ndarray] | None) -> None:
    """An initializer holding `array`, or (with `memory`) one whose external data is `memory`'s entry:
    a session gets it through `SessionOptions.add_external_initializers`, not a serialised copy."""
    if memory is None:
        g.graph.initializer.append(numpy_helper.from_array(array, name))
        return
    key = f"{MEMORY}{len(memory)}"
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", key), ("offset", "0"), ("length", str(array.nbytes))):
        tensor.external_data.add(key=k, value=v)
    g.graph.initializer.append(tensor)
    memory[key] = array


def _packed_nodes(g: _Graph, group: list[_Projection], arrays: list[np.ndarray], index: int, memory) -> list:
    """One matmul over the packed weights, its bias, and a Split back to the members' outputs."""
    p, first = f"packed_proj_{index}", group[0].matmul
    names = [f"{p}/w{i}" for i in range(len(arrays))]
    for array, name in zip(arrays, names):
        _store(g, name, array, memory)
    has_bias = any(m.bias for m in group)
    widths = [m.width for m in group]
    if group[0].key[0] == "MatMul":
        nodes = [helper.make_node("MatMul", [first.input[0], names[0]], [f"{p}/mm"])]
        if has_bias:
            nodes.append(helper.make_node("Add", [f"{p}/mm", names[-1]], [f"{p}/out"]))
    else:
        attrs = node_attrs(first) | {"N": sum(widths)}
        zp = names[2] if group[0].key[-1] else ""
        inputs = [first.input[0], names[0], names[1], zp, "", names[-1] if has_bias else ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        nodes = [helper.make_node("MatMulNBits", inputs, [f"{p}/out"], domain=MS_DOMAIN, **attrs)]
    sizes = int64_initializer(g.graph, f"{p}/sizes", widths)
    nodes.append(helper.make_node("Split", [nodes[-1].output[0], sizes], [m.output for m in group], axis=-1))
    return nodes


def pack_projections(
    graph: onnx.GraphProto,
    base_dir: Path | None,
    memory: dict[str, np.ndarray] | None = None,
    budget: int = PACK_BUDGET,
) -> int:
    """Sibling projections to one matmul and a Split (see the module docstring): how many groups.
    With `memory`, the packed weights stay there (`MEMORY` locations) instead of in the graph."""
    g = _Graph(graph, base_dir)
    positions = {id(n): i for i, n in enumerate(graph.node)}
    at: dict[int, list] = {}  # node position -> the packed nodes placed there
    dropped: set[int] = set()
    for group in _sibling_groups(g, graph):
        arrays = _packed_arrays(g, group)
        if arrays is None:
            continue
        if memory is None:
            size = sum(a.nbytes for a in arrays)
            if size > budget:
                continue
            budget -= size
        position = min(positions[id(m.matmul)] for m in group)
        at[position] = _packed_nodes(g, group, arrays, len(at), memory)
        dropped |= {id(n) for m in group for n in (m.matmul, *m.dropped)}
    nodes = []
    for position, node in enumerate(graph.node):
        nodes += at.get(position, [])
        if id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(at)


def fuse_skip_norms(graph: onnx.GraphProto) -> int:
    """Add(a, b) -> norm over the last axis becomes the norm's Skip form in the Add's place (before
    every reader of the sum), the sum its fourth output."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    skips: dict[int, onnx.NodeProto] = {}  # id(Add) -> its replacement
    dropped: set[int] = set()
    for node in graph.node:
        simplified = node.op_type == "SimplifiedLayerNormalization"
        if (not simplified and node.op_type != "LayerNormalization") or len(node.output) > 1:
            continue
        add = producers.get(node.input[0])
        if add is None or add.op_type != "Add" or id(add) in skips or add.input[0] == add.input[1]:
            continue
        if _attr(node, "axis", -1) != -1 or set(add.input) & initializers or not set(node.input[1:]) <= initializers:
            continue
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        outputs = [node.output[0], "", "", add.output[0]]
        epsilon = _attr(node, "epsilon", 1e-5)
        skips[id(add)] = helper.make_node(op, [*add.input, *node.input[1:]], outputs, domain=MS_DOMAIN, epsilon=epsilon)
        dropped.add(id(node))
    nodes = [skips.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(skips)
