"""ONNX preparation: point the `haplo`-domain nodes at the TensorRT plugins registered in engines/plugins.

The parser inlines a node's model-local ONNX function unless the node names a plugin namespace, so
`prepare_onnx_for_tensorrt` adds `plugin_namespace` / `plugin_version` to every node with a plugin.
"""

from __future__ import annotations

import onnx

PLUGIN_NAMESPACE = "haplo"
PLUGIN_VERSION = "1"
# ONNX op_type in the `haplo` domain -> the TensorRT plugin name registered in engines/plugins.
PLUGIN_FOR_OP = {
    "MultimodalAdaLN": "MultimodalAdaLN",
    "HybridAttention": "HybridAttention",
}


def _bind_plugin(node: onnx.NodeProto, plugin: str) -> None:
    """Rename the node to its plugin and (re)set the plugin namespace and version attributes."""
    node.op_type = plugin
    kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(
        [
            onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
            onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION),
        ]
    )


def plugin_node_count(model: onnx.ModelProto) -> int:
    """How many nodes of the graph name a plugin (after `prepare_onnx_for_tensorrt`)."""
    return sum(
        1
        for n in model.graph.node
        if any(a.name == "plugin_namespace" for a in n.attribute) and n.domain == PLUGIN_NAMESPACE
    )


def prepare_onnx_for_tensorrt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Point every `haplo`-domain node at its plugin. Returns (model, plugin ids used).

    The node keeps its inputs/outputs; the plugin reads the same attributes. Nodes whose op has no
    plugin are left alone, so the parser inlines their function (standard ops).
    """
    used = set()
    for node in model.graph.node:
        if node.domain != PLUGIN_NAMESPACE:
            continue
        plugin = PLUGIN_FOR_OP.get(node.op_type)
        if plugin is None:
            continue
        _bind_plugin(node, plugin)
        used.add(f"{PLUGIN_NAMESPACE}::{plugin}")
    return model, sorted(used)
