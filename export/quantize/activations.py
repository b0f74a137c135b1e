"""Low-precision activations for TensorRT: a decoder graph's fp32 tensors to bf16 (or fp16).

After the Q/DQ or cast rewrite (`rewrite.py`) only the matmuls of a low-precision graph are low
precision; everything between them is fp32. TensorRT runs what the graph says, so this pass makes
the activations between the matmuls, the `haplo` plugin nodes' inputs and outputs and the KV cache
the low dtype (Q/DQ over a bf16 / fp16 graph, as NVIDIA's FP8 recipes do). The rule is one pass in
graph order: a node with a low float input computes in the low dtype (its fp32 inputs cast, its
float initializers lowered); a node whose float inputs are all fp32 stays fp32. The low dtype enters
at the graph inputs, so what derives from integers alone (RoPE positions, cos/sin tables) is fp32 up
to where it meets an activation, and is cast there. Kept in fp32 as well: the nodes of the modules
in `policy.ALWAYS_FP32` (the per-token switch logits of decomposed graphs; inside `MultimodalAdaLN`
the plugin computes them in fp32 from the low-dtype inputs) and the hidden-state graph inputs and
outputs, each with one Cast at the boundary; the KV cache inputs and outputs are the low dtype. The
Cast pairs of the fp16 / bf16 rewrite become identities and go. Opset 19+ Q/DQ take a low-dtype
input and scale, and DequantizeLinear returns its scale's dtype, so the scales are lowered too.

The ONNX Runtime target never gets this pass: its CPU kernels have no bf16 matmul, add or softmax.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from haplo.export.quantize.policy import ALWAYS_FP32, QuantizationError
from haplo.export.quantize.rewrite import _module_of

FLOAT = TensorProto.FLOAT
FLOATS = (FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
LOW_DTYPES: dict[int, str] = {TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16"}
LOWERED_PRECISIONS = ("fp16", "bf16", "fp8", "int8")  # Q/DQ or cast graphs whose activations TensorRT lowers
KV_PREFIXES = ("past_key_values.", "present.")
_FP32_ONLY_INPUTS = {"Resize": (1, 2)}  # inputs whose type is fixed to float whatever the data's type


def activation_dtype(precision: str, target: str) -> int | None:
    """The activation dtype of a graph of `precision` for `target`: None keeps fp32 activations."""
    if target != "tensorrt" or precision not in LOWERED_PRECISIONS:
        return None
    return TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16


def dtype_name(dtype: int | None) -> str:
    """The numpy-style name of an activation dtype (None: float32), as the manifest records it."""
    return "float32" if dtype is None else LOW_DTYPES[dtype]


def is_kv_cache(name: str) -> bool:
    return name.startswith(KV_PREFIXES)


def lower_activations(model: onnx.ModelProto, dtype: int) -> dict:
    """Lower `model`'s activations to `dtype` (BFLOAT16 or FLOAT16) in place. Returns a summary."""
    if dtype not in LOW_DTYPES:
        raise QuantizationError(f"activations can be lowered to bfloat16 or float16, not {dtype}")
    if any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        raise QuantizationError("graphs with control flow (If / Loop) are not lowered")
    return _Lowering(model, dtype).run()


def _float_types(model: onnx.ModelProto) -> set[str]:
    """The names of every float tensor of the graph (shape inference over a weightless copy)."""
    skeleton = _without_initializers(model)
    graph = skeleton.graph
    graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    haplo = [o for n in graph.node if n.domain == "haplo" for o in n.output]  # typed like their input x
    graph.value_info.extend(helper.make_tensor_value_info(o, FLOAT, None) for o in haplo)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    values = list(inferred.input) + list(inferred.output) + list(inferred.value_info)
    return {v.name for v in values if v.type.tensor_type.elem_type in FLOATS}


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its initializers: the weights are never copied."""
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    skeleton = onnx.ModelProto()
    try:
        skeleton.CopyFrom(model)
    finally:
        model.graph.initializer.extend(inits)
    return skeleton


class _Lowering:
    """One pass over a graph in order; `low` / `fp32`: the float tensors computed in each dtype."""

    def __init__(self, model: onnx.ModelProto, dtype: int):
        self.model, self.dtype = model, dtype
        self.floats = _float_types(model)
        self.inits = {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}
        self.low: set[str] = set()
        self.fp32: set[str] = set()
        self.renamed: dict[str, str] = {}  # output of a removed identity Cast -> its input
        self.casts: dict[tuple[str, int], str] = {}  # (tensor, to) -> its cast, shared by consumers
        self.low_uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # initializer -> low consumers
        self.fp32_uses: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.outputs = {o.name for o in model.graph.output}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.counts = {"casts_removed": 0, "casts_added": 0, "nodes_fp32": 0}

    def run(self) -> dict:
        boundary_in = self._inputs()
        tail = self._boundary_outputs()
        for node in self.model.graph.node:
            node.input[:] = [self.renamed.get(i, i) for i in node.input]
            self._node(node)
        for node in tail:
            node.input[:] = [self.renamed.get(i, i) for i in node.input]
        self._kv_outputs()
        self.nodes += tail
        self._initializers()
        self._value_types()
        del self.model.graph.node[:]
        self.model.graph.node.extend(self.nodes)
        return self._summary(boundary_in, [n.output[0] for n in tail])

    # -- graph inputs and outputs ----------------------------------------------------------------

    def _inputs(self) -> list[str]:
        """KV cache inputs become the low dtype; other float inputs stay fp32 with one Cast each."""
        kept = []
        for value in self.model.graph.input:
            if value.name not in self.floats or value.name in self.inits:
                continue
            if is_kv_cache(value.name):
                value.type.tensor_type.elem_type = self.dtype
                self.low.add(value.name)
                continue
            kept.append(value.name)
            self.fp32.add(value.name)
            self.renamed[value.name] = self._cast_to(value.name, self.dtype)
        return kept

    def _boundary_outputs(self) -> list[onnx.NodeProto]:
        """Hidden-state outputs stay fp32: their producer writes NAME_low, one Cast gives NAME."""
        tail = []
        for value in self.model.graph.output:
            if value.name in self.floats and not is_kv_cache(value.name):
                inner = value.name + "_low"
                for node in self.model.graph.node:
                    node.output[:] = [inner if o == value.name else o for o in node.output]
                    node.input[:] = [inner if i == value.name else i for i in node.input]
                tail.append(helper.make_node("Cast", [inner], [value.name], name=value.name + "_Cast", to=FLOAT))
                self.outputs.add(inner)  # its producer's output is read by the boundary Cast
        return tail

    def _kv_outputs(self) -> None:
        """A present.* output computed in fp32 (none in the exported decoders) is cast to the low dtype."""
        for value in self.model.graph.output:
            if is_kv_cache(value.name):
                value.type.tensor_type.elem_type = self.dtype
                if value.name in self.fp32:
                    self._rename_output(value.name, value.name + "_fp32")
                    self.nodes.append(helper.make_node("Cast", [value.name + "_fp32"], [value.name], to=self.dtype))

    def _rename_output(self, old: str, new: str) -> None:
        for node in self.nodes:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]

    # -- nodes -------------------------------------------------------------------------------------

    def _node(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            self._cast_node(node)
        elif node.op_type == "CastLike":
            self._mark(node, node.input[1] in self.low)
            self.nodes.append(node)
        elif node.op_type == "DequantizeLinear":
            self._compute(node, low=True)
        elif node.op_type == "QuantizeLinear":
            self._compute(node, low=node.input[0] in self.low)
        elif node.domain == "haplo":
            self._compute(node, low=True)
            self.model.graph.value_info.extend(helper.make_tensor_value_info(o, self.dtype, None) for o in node.output)
        elif any(k in (_module_of(node) or "") for k in ALWAYS_FP32):
            self._compute(node, low=False)
        else:
            self._compute(node, low=any(i in self.low for i in node.input) and self._accepts(node))

    def _accepts(self, node: onnx.NodeProto) -> bool:
        """Whether the op's schema takes the low dtype where it takes float (Einsum has no bfloat16)."""
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except onnx.defs.SchemaError:
            return True
        wanted = f"tensor({LOW_DTYPES[self.dtype]})"
        floats = [c.allowed_type_strs for c in schema.type_constraints if "tensor(float)" in c.allowed_type_strs]
        return all(wanted in allowed for allowed in floats)

    def _cast_node(self, node: onnx.NodeProto) -> None:
        """A Cast to float of a low tensor is an identity now; a Cast from int (positions) stays fp32."""
        to = next(a.i for a in node.attribute if a.name == "to")
        source_low = node.input[0] in self.low
        if source_low and to in (FLOAT, self.dtype) and node.output[0] not in self.outputs:
            self.renamed[node.output[0]] = node.input[0]
            self.low.add(node.output[0])
            self.counts["casts_removed"] += 1
            return
        if source_low and to == FLOAT:
            node.attribute[:] = [helper.make_attribute("to", self.dtype)]
        final = self.dtype if source_low and to == FLOAT else to
        (self.low if final == self.dtype else self.fp32 if final == FLOAT else set()).add(node.output[0])
        self.nodes.append(node)

    def _compute(self, node: onnx.NodeProto, low: bool) -> None:
        """Every float input of `node` in one dtype (low or fp32), casting or lowering what differs."""
        fixed = _FP32_ONLY_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            if index in fixed or not name:
                continue
            if name in self.inits:
                self._use_initializer(node, index, low)
            elif low and name in self.fp32:
                node.input[index] = self._cast_to(name, self.dtype)
            elif not low and name in self.low:
                node.input[index] = self._cast_to(name, FLOAT)
        self._mark(node, low)
        self.counts["nodes_fp32"] += not low and any(o in self.floats for o in node.output)
        self.nodes.append(node)

    def _mark(self, node: onnx.NodeProto, low: bool) -> None:
        for out in node.output:
            if out in self.floats or node.op_type in ("DequantizeLinear", "Cast"):
                (self.low if low else self.fp32).add(out)

    def _use_initializer(self, node: onnx.NodeProto, index: int, low: bool) -> None:
        if low:
            self.low_uses.setdefault(node.input[index], []).append((node, index))
        else:
            self.fp32_uses.add(node.input[index])

    def _cast_to(self, name: str, to: int) -> str:
        """The tensor `name` cast to `to`, one Cast node shared by every consumer."""
        key = (name, to)
        if key not in self.casts:
            self.casts[key] = f"{name}_to_{'fp32' if to == FLOAT else 'low'}"
            self.nodes.append(helper.make_node("Cast", [name], [self.casts[key]], name=self.casts[key], to=to))
            (self.low if to == self.dtype else self.fp32).add(self.casts[key])
            self.counts["casts_added"] += 1
        return self.casts[key]

    # -- initializers and types --------------------------------------------------------------------

    def _initializers(self) -> None:
        """Initializers read in the low dtype are converted; one read both ways gets a low copy."""
        for name, uses in self.low_uses.items():
            tensor = self.inits[name]
            low = _to_low(numpy_helper.to_array(tensor), self.dtype, name)
            if name in self.fp32_uses:
                low.name = name + "_low"
                for node, index in uses:
                    node.input[index] = low.name
                self.model.graph.initializer.append(low)
            else:
                tensor.CopyFrom(low)

    def _value_types(self) -> None:
        kept = [v for v in self.model.graph.value_info if v.name not in self.renamed]
        for value in kept:
            if value.name in self.low and value.type.tensor_type.elem_type == FLOAT:
                value.type.tensor_type.elem_type = self.dtype
        del self.model.graph.value_info[:]
        self.model.graph.value_info.extend(kept)

    def _summary(self, boundary_in: list[str], boundary_out: list[str]) -> dict:
        kv = [v.name for v in list(self.model.graph.input) + list(self.model.graph.output) if is_kv_cache(v.name)]
        return {
            "dtype": LOW_DTYPES[self.dtype],
            "kv_cache_dtype": LOW_DTYPES[self.dtype] if kv else None,
            "tensors_lowered": len(self.low),
            "tensors_kept_fp32": len(self.fp32),
            "initializers_lowered": len(self.low_uses),
            "initializers_kept_fp32": len(set(self.inits) - set(self.low_uses)),
            "fp32_boundary": sorted(boundary_in + boundary_out),
            **self.counts,
        }


def _to_low(values: np.ndarray, dtype: int, name: str) -> TensorProto:
    if dtype == TensorProto.FLOAT16:
        return numpy_helper.from_array(values.astype(np.float16), name)
    raw = torch.from_numpy(np.array(values, dtype=np.float32)).to(torch.bfloat16)  # a writable copy
    tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    tensor.raw_data = raw.view(torch.int16).numpy().tobytes()
    return tensor
