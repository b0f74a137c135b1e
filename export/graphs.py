"""The model cut into ONNX graphs, one per piece the runtime drives (see `haplo.runtime.backend.Backend`).

    embed_text        input_ids                                  -> inputs_embeds
    embed_vision      pixel_values                               -> patch_features
    embed_generation  latents, timestep                          -> time_token, latent_tokens, temb
    pre_decoder       hidden_states, position_ids, key_start,    -> hidden_states_out,
    base_decoder        past_key_values.N.key/value (N: global       present.N.key/value
    post_decoder        layer index, this stage's layers)
    lm_head           last_decoder_hidden_state                  -> logits
    latent_head       hidden_states, temb, latents (shape only)  -> sample (v-prediction)
    vae_decoder       latents [B, C, F, h, w] (scaled)           -> video [B, 3, frames, H, W]

Dimension names are stable across graphs so a server can bind them: batch, sequence,
past_sequence, total_sequence (= past + sequence), num_tiles, visual_tokens, latent_frames,
latent_height, latent_width.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from haplo.artifacts import atomic_path
from haplo.bundle import STAGE_GRAPHS
from haplo.export.custom_ops import TRANSLATIONS, attach_functions, routed_to_custom_ops

# Opset 20: what the dynamo exporter targets natively (no version conversion pass), supported by
# ONNX Runtime >= 1.17 and by TensorRT 10/11's parser. Nothing we emit needs 21+ (int4 types,
# the opset-23 Attention/RMSNormalization ops): our own `haplo` ops cover attention and norms.
OPSET = 20
# IR 10 is read by every ONNX Runtime and TensorRT parser we support (onnx 1.23 would write 14).
IR_VERSION = 10


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # export sample, in call order
    outputs: list[str]
    dims: dict[str, list]  # tensor -> dimension names (str) or fixed sizes (int)
    check_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # other shapes, for validation
    layers: list[int] = field(default_factory=list)


# -- wrappers: one nn.Module per graph, positional tensors in, tuple out ---------------------------


class EmbedText(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class EmbedVision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.patch_embed, self.pre_pos_embed = model.model.patch_embed, model.model.pre_pos_embed

    def forward(self, pixel_values):
        return self.patch_embed(pixel_values) + self.pre_pos_embed


class EmbedGeneration(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, timestep):
        temb = self.model.time_embed(timestep, latents.shape[0])
        time_token, latent_tokens = self.model.embed_generation_inputs(latents, temb)
        return time_token, latent_tokens, temb


class DecoderStage(nn.Module):
    def __init__(self, model, stage: str):
        super().__init__()
        self.model, self.stage = model.model, stage
        self.num_layers = len(self.model.stage_layers(stage))

    def forward(self, hidden_states, position_ids, key_start, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        out, presents = self.model.stage_forward(self.stage, hidden_states, position_ids, key_start, pairs)
        return (out, *[t for kv in presents for t in kv])


class LMHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, last_decoder_hidden_state):
        return self.model.lm_head(self.model.model.lm_hidden(last_decoder_hidden_state))


class LatentHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, temb, latents):
        return self.model.latent_head(hidden_states, temb, latents.shape)


class VAEDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample.clamp(-1, 1)


# -- specs ------------------------------------------------------------------------------------------


def graph_specs(model, vae=None, latent_shape: tuple[int, int, int, int] | None = None) -> list[GraphSpec]:
    """Every graph of the model with its export sample and a second sample of other shapes.

    `latent_shape` (frames, C, h, w) fixes the VAE decoder's latent size (its causal 3-D convs
    unroll over frames); the other graphs are dynamic in every named dimension.
    """
    r = _Samples(model.config.vocab_size)
    specs = [_embed_text(model, r), _embed_vision(model, r), _embed_generation(model, r)]
    specs += [_decoder_stage(model, stage, name, r) for stage, name in STAGE_GRAPHS.items()]
    specs += [_lm_head(model, r), _latent_head(model, r)]
    if vae is not None and latent_shape is not None:
        specs.append(_vae_decoder(vae, latent_shape, model.config.video_generation, r))
    return specs


class _Samples:
    """Seeded sample tensors, drawn in the order the specs are made."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def ids(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, shape, generator=self.generator)


def _embed_text(model, r: _Samples) -> GraphSpec:
    pre = model.config.pre.hidden_size
    dims = {"input_ids": ["batch", "sequence"], "inputs_embeds": ["batch", "sequence", pre]}
    return GraphSpec(
        "embed_text", EmbedText(model), {"input_ids": r.ids(2, 5)}, ["inputs_embeds"], dims, {"input_ids": r.ids(1, 9)}
    )


def _embed_vision(model, r: _Samples) -> GraphSpec:
    cfg = model.config
    s, pre = cfg.base.default_image_size, cfg.pre.hidden_size
    dims = {"pixel_values": ["num_tiles", 3, s, s], "patch_features": ["num_tiles", cfg.tokens_per_tile, pre]}
    sample, check = {"pixel_values": r.randn(2, 3, s, s)}, {"pixel_values": r.randn(3, 3, s, s)}
    return GraphSpec("embed_vision", EmbedVision(model), sample, ["patch_features"], dims, check)


def _embed_generation(model, r: _Samples) -> GraphSpec:
    pre, gen = model.config.pre.hidden_size, model.config.video_generation
    c, p = gen.latent_channels, gen.latent_patch_size
    dims = {
        "latents": ["batch", "latent_frames", c, "latent_height", "latent_width"],
        "timestep": ["batch"],
        "time_token": ["batch", 1, pre],
        "latent_tokens": ["batch", "visual_tokens", pre],
        "temb": ["batch", gen.time_embed_dim],
    }
    sample = {"latents": r.randn(2, 2, c, 2 * p, 3 * p), "timestep": torch.tensor([999, 500])}
    check = {"latents": r.randn(1, 3, c, 4 * p, 2 * p), "timestep": torch.tensor([250])}
    return GraphSpec(
        "embed_generation", EmbedGeneration(model), sample, ["time_token", "latent_tokens", "temb"], dims, check
    )


def _decoder_stage(model, stage: str, name: str, r: _Samples) -> GraphSpec:
    cfg = model.config
    widths = {"pre": cfg.pre.hidden_size, "base": cfg.base.hidden_size, "post": cfg.post.hidden_size}
    width_in, width_out = widths[stage], widths[{"pre": "base", "base": "post", "post": "post"}[stage]]
    layers = list(cfg.stage_layers(stage))
    kv, hd = cfg.stages[stage].num_key_value_heads, cfg.stages[stage].head_dim

    def inputs(batch: int, length: int, past: int) -> dict[str, torch.Tensor]:
        sample = {
            "hidden_states": r.randn(batch, length, width_in),
            "position_ids": torch.arange(past, past + length).expand(batch, length).contiguous(),
            "key_start": torch.arange(past + length).expand(batch, past + length).contiguous(),
        }
        for n in layers:
            sample[f"past_key_values.{n}.key"] = r.randn(batch, kv, past, hd)
            sample[f"past_key_values.{n}.value"] = r.randn(batch, kv, past, hd)
        return sample

    dims = {
        "hidden_states": ["batch", "sequence", width_in],
        "position_ids": ["batch", "sequence"],
        "key_start": ["batch", "total_sequence"],
        "hidden_states_out": ["batch", "sequence", width_out],
    }
    outputs = ["hidden_states_out"]
    for n in layers:
        for kind in ("key", "value"):
            dims[f"past_key_values.{n}.{kind}"] = ["batch", kv, "past_sequence", hd]
            dims[f"present.{n}.{kind}"] = ["batch", kv, "total_sequence", hd]
            outputs.append(f"present.{n}.{kind}")
    return GraphSpec(name, DecoderStage(model, stage), inputs(2, 5, 3), outputs, dims, inputs(1, 1, 7), layers)


def _lm_head(model, r: _Samples) -> GraphSpec:
    post, vocab = model.config.post.hidden_size, model.config.vocab_size
    dims = {"last_decoder_hidden_state": ["batch", "sequence", post], "logits": ["batch", "sequence", vocab]}
    sample, check = (
        {"last_decoder_hidden_state": r.randn(2, 5, post)},
        {"last_decoder_hidden_state": r.randn(1, 1, post)},
    )
    return GraphSpec("lm_head", LMHead(model), sample, ["logits"], dims, check)


def _latent_head(model, r: _Samples) -> GraphSpec:
    post, gen = model.config.post.hidden_size, model.config.video_generation
    c, p = gen.latent_channels, gen.latent_patch_size
    latents = ["batch", "latent_frames", c, "latent_height", "latent_width"]
    dims = {
        "hidden_states": ["batch", "visual_tokens", post],
        "temb": ["batch", gen.time_embed_dim],
        "latents": latents,
        "sample": latents,
    }
    sample = {
        "hidden_states": r.randn(2, 2 * 1 * 3, post),
        "temb": r.randn(2, gen.time_embed_dim),
        "latents": r.randn(2, 2, c, p, 3 * p),
    }
    check = {
        "hidden_states": r.randn(1, 3 * 2 * 1, post),
        "temb": r.randn(1, gen.time_embed_dim),
        "latents": r.randn(1, 3, c, 2 * p, p),
    }
    return GraphSpec("latent_head", LatentHead(model), sample, ["sample"], dims, check)


def _vae_decoder(vae, latent_shape: tuple[int, int, int, int], gen, r: _Samples) -> GraphSpec:
    """Static: the causal 3-D convolutions unroll over frames; the backend decodes row by row. One
    sample only: the graph is static, and at 480 x 720 x 49 each check takes a minute."""
    frames, channels, h, w = latent_shape
    comp, tcomp = gen.vae_spatial_compression, gen.vae_temporal_compression
    video = [1, 3, (frames - 1) * tcomp + 1, h * comp, w * comp]
    dims = {"latents": [1, channels, frames, h, w], "video": video}
    return GraphSpec(
        "vae_decoder", VAEDecoder(vae), {"latents": r.randn(1, channels, frames, h, w)}, ["video"], dims, {}
    )


# -- export -----------------------------------------------------------------------------------------


def _dynamic_shapes(spec: GraphSpec):
    """torch.export AUTO dims wherever the spec names a dimension: relations (total = past +
    sequence) are inferred instead of declared."""
    auto = torch.export.Dim.AUTO
    shapes = []
    for name in spec.inputs:
        shapes.append({i: auto for i, d in enumerate(spec.dims[name]) if isinstance(d, str)})
    if isinstance(spec.module, DecoderStage):  # *past arrives as one varargs tuple
        return (*shapes[:3], tuple(shapes[3:]))
    return tuple(shapes)


def name_dimensions(model: onnx.ModelProto, dims: dict[str, list]) -> None:
    """Give graph inputs/outputs our stable dimension names (the exporter writes s0, s1 + s2, ...)."""
    for value in list(model.graph.input) + list(model.graph.output):
        wanted = dims.get(value.name)
        if wanted is None:
            continue
        shape = value.type.tensor_type.shape
        for dim, name in zip(shape.dim, wanted):
            if isinstance(name, str):
                dim.Clear()
                dim.dim_param = name
            else:
                dim.Clear()
                dim.dim_value = name
    del model.graph.value_info[:]  # intermediate shapes used the exporter's symbols


def export_graph(spec: GraphSpec, path: Path, decomposed: bool = False) -> onnx.ModelProto:
    """Export one graph to `path` (+ `path.data` external weights). Returns the model without weights."""
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed", once per graph
    try:
        with routed_to_custom_ops(not decomposed), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                spec.module,
                tuple(spec.inputs.values()),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(spec),
                input_names=list(spec.inputs),
                output_names=spec.outputs,
                opset_version=OPSET,
                custom_translation_table=TRANSLATIONS,
                optimize=True,
                verbose=False,
                report=False,
            )
    finally:
        registration_log.setLevel(level)
    model = program.model_proto
    model.ir_version = IR_VERSION
    name_dimensions(model, spec.dims)
    attach_functions(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, path)
    return onnx.load(str(path), load_external_data=False)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """The graph with its weights in one external file beside it (NAME.onnx.data); the graph file is
    renamed into place last, so a graph file never names weights that are not written yet."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # save appends to an existing external-data file
    with atomic_path(path) as staged:
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
