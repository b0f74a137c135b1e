"""Multimodal AdaLN and hybrid-mask attention as custom ops: torch -> `haplo`-domain ONNX nodes.

Each op exists three ways, all computing `haplo.model.ops`:
- a torch custom op (`haplo::multimodal_adaln`, `haplo::hybrid_attention`) whose eager kernel is
  the reference; the model's calls are routed to it only while exporting (`routed_to_custom_ops`),
  so training keeps plain autograd;
- an ONNX node `haplo.MultimodalAdaLN` / `haplo.HybridAttention` emitted by the dynamo exporter
  through a translation table;
- a model-local ONNX function with the same name holding the standard-op decomposition, attached
  to every exported graph. ONNX Runtime runs the function; TensorRT's parser inlines it, or swaps
  in our plugin when the node names a `plugin_namespace` (haplo.engines.tensorrt.prepare adds it).
"""

from __future__ import annotations

import contextlib

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset20 as op

from haplo.model import ops

DOMAIN = "haplo"
DOMAIN_VERSION = 1
haplo_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


# -- torch custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("haplo::multimodal_adaln", mutates_args=())
def multimodal_adaln_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    indicator_weight: torch.Tensor,
    indicator_bias: torch.Tensor,
    ssg_l: torch.Tensor,
    ssg_c: torch.Tensor,
    eps: float,
    layernorm: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, gate = ops.reference_multimodal_adaln(
        x,
        weight,
        bias if layernorm else None,
        indicator_weight,
        indicator_bias,
        ssg_l,
        ssg_c,
        eps,
        "layernorm" if layernorm else "rmsnorm",
    )
    return out.contiguous(), gate.contiguous()


@multimodal_adaln_op.register_fake
def _(x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, eps, layernorm):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("haplo::hybrid_attention", mutates_args=())
def hybrid_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_start: torch.Tensor, scale: float
) -> torch.Tensor:
    return ops.reference_hybrid_attention(query, key, value, key_start, scale).contiguous()


@hybrid_attention_op.register_fake
def _(query, key, value, key_start, scale):
    return torch.empty_like(query)


def _adaln_via_op(x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, eps, mode="rmsnorm"):
    bias = torch.zeros_like(weight) if bias is None else bias
    return multimodal_adaln_op(
        x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, float(eps), int(mode == "layernorm")
    )


def _attention_via_op(query, key, value, key_start, scale=None):
    return hybrid_attention_op(query, key, value, key_start, float(query.shape[-1] ** -0.5 if scale is None else scale))


OPERATORS = "onnx-custom-ops"
ops.register(OPERATORS, ops.Operators(_adaln_via_op, _attention_via_op))


def routed_to_custom_ops(enabled: bool = True) -> contextlib.AbstractContextManager:
    """While active, the model's `haplo.model.ops` calls go through the custom ops (export time only)."""
    return ops.using(OPERATORS) if enabled else contextlib.nullcontext()


# -- ONNX: schemas (so onnxscript can emit the nodes) and translations -----------------------------

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(
    name: str,
    inputs: list[str],
    outputs: list[str],
    attributes: list[tuple[str, OpSchema.AttrType]],
    int_inputs: tuple[str, ...] = (),
) -> OpSchema:
    def param(n):
        return OpSchema.FormalParameter(n, "I" if n in int_inputs else "T")

    constraints = [("T", _FLOATS, "floating point")]
    if int_inputs:
        constraints.append(("I", ["tensor(int64)", "tensor(int32)"], "integer"))
    return OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[param(n) for n in inputs],
        outputs=[param(n) for n in outputs],
        type_constraints=constraints,
        attributes=[OpSchema.Attribute(a, t, "") for a, t in attributes],
    )


ADALN_INPUTS = ["x", "weight", "bias", "indicator_weight", "indicator_bias", "ssg_l", "ssg_c"]
ATTENTION_INPUTS = ["query", "key", "value", "key_start"]
SCHEMAS = [
    _schema(
        "MultimodalAdaLN",
        ADALN_INPUTS,
        ["out", "gate"],
        [("epsilon", OpSchema.AttrType.FLOAT), ("layernorm", OpSchema.AttrType.INT)],
    ),
    _schema(
        "HybridAttention", ATTENTION_INPUTS, ["out"], [("scale", OpSchema.AttrType.FLOAT)], int_inputs=("key_start",)
    ),
]
for _s in SCHEMAS:
    if not onnx.defs.has(_s.name, _s.domain):
        onnx.defs.register_schema(_s)


def _translate_adaln(x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, eps: float, layernorm: int):
    return haplo_opset.MultimodalAdaLN(
        x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, epsilon=eps, layernorm=layernorm
    )


def _translate_attention(query, key, value, key_start, scale: float):
    return haplo_opset.HybridAttention(query, key, value, key_start, scale=scale)


TRANSLATIONS = {
    torch.ops.haplo.multimodal_adaln.default: _translate_adaln,
    torch.ops.haplo.hybrid_attention.default: _translate_attention,
}


# -- ONNX: the model-local functions (standard-op decomposition) -------------------------------------


@onnxscript.script(haplo_opset, default_opset=op)
def MultimodalAdaLN(x, weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c, epsilon: float, layernorm: int):
    # One body for both norm modes: layernorm centres x and the switch reads raw x; rmsnorm does
    # neither. `is_ln` is 0 or 1, so the unused branch contributes exact zeros.
    is_ln = op.CastLike(op.Constant(value_int=layernorm), x)
    eps = op.CastLike(op.Constant(value_float=epsilon), x)
    centred = x - op.ReduceMean(x, op.Constant(value_ints=[-1]), keepdims=1) * is_ln
    variance = op.ReduceMean(centred * centred, op.Constant(value_ints=[-1]), keepdims=1)
    unit = centred / op.Sqrt(variance + eps)
    normed = unit * weight + bias * is_ln  # rmsnorm has no bias
    switch_in = unit + is_ln * (x - unit)
    logits = op.MatMul(switch_in * op.Sigmoid(switch_in), op.Transpose(indicator_weight, perm=[1, 0])) + indicator_bias
    switch = op.Softmax(logits, axis=-1)  # [..., 2]: index 0 -> latent set, 1 -> condition set
    sets = op.Concat(
        op.Unsqueeze(ssg_l, op.Constant(value_ints=[0])), op.Unsqueeze(ssg_c, op.Constant(value_ints=[0])), axis=0
    )  # [2, 3, H]
    mixed = op.MatMul(switch, op.Reshape(sets, op.Concat(op.Constant(value_ints=[2, -1]), axis=0)))  # [..., 3H]
    shift, scale, gate = op.Split(mixed, num_outputs=3, axis=-1)
    out = normed * (op.CastLike(op.Constant(value_float=1.0), x) + scale) + shift
    return out, gate


@onnxscript.script(haplo_opset, default_opset=op)
def HybridAttention(query, key, value, key_start, scale: float):
    # key j is visible to query row r iff key_start[j] <= Lk - Lq + r; rows that see nothing -> 0.
    # GQA without copying K/V: kv head h // groups serves query head h, so the query heads of one kv
    # head are stacked as rows, [B, Hq, Lq, D] -> [B, Hkv, groups * Lq, D], and share its keys.
    b = op.Shape(query, start=0, end=1)
    q_heads = op.Shape(query, start=1, end=2)
    q_len = op.Shape(query, start=2, end=3)
    d = op.Shape(query, start=3, end=4)
    kv_heads = op.Shape(key, start=1, end=2)
    k_len = op.Shape(key, start=2, end=3)
    groups = op.Div(q_heads, kv_heads)
    one = op.Constant(value_ints=[1])
    q_pos = op.Range(op.Squeeze(k_len - q_len), op.Squeeze(k_len), op.Squeeze(one))  # [Lq]
    starts = op.Unsqueeze(op.Cast(key_start, to=7), op.Constant(value_ints=[1, 2]))  # [B, 1, 1, Lk]
    allowed = op.LessOrEqual(starts, op.Unsqueeze(q_pos, op.Constant(value_ints=[1])))  # [B, 1, Lq, Lk]
    rows = op.Tile(allowed, op.Concat(one, one, groups, one, axis=0))  # [B, 1, groups * Lq, Lk]
    stacked = op.Reshape(query, op.Concat(b, kv_heads, groups * q_len, d, axis=0))
    scores = op.MatMul(stacked, op.Transpose(key, perm=[0, 1, 3, 2])) * op.CastLike(
        op.Constant(value_float=scale), query
    )
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), scores)
    probs = op.Softmax(op.Where(rows, scores, neg_inf), axis=-1)
    out = op.Reshape(op.MatMul(probs, value), op.Concat(b, q_heads, q_len, d, axis=0))  # [B, Hq, Lq, D]
    any_visible = op.ReduceMax(op.Cast(allowed, to=1), op.Constant(value_ints=[-1]), keepdims=1)  # [B, 1, Lq, 1]
    zero = op.CastLike(op.Constant(value_float=0.0), out)
    return op.Where(op.Cast(any_visible, to=9), out, zero)


FUNCTIONS = [MultimodalAdaLN, HybridAttention]


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the local functions of the `haplo` ops the graph uses, and the domain import."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    present = {(f.domain, f.name) for f in model.functions}
    for fn in FUNCTIONS:
        proto = fn.to_function_proto()
        if proto.name in used and (proto.domain, proto.name) not in present:
            model.functions.append(proto)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
