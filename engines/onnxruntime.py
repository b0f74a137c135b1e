"""ONNX Runtime backend: one session per graph of a bundle, KV cache kept as OrtValues.

Decoder stages run through IOBinding: this step's `present` OrtValues are bound as the next
step's `past` inputs directly, so the cache never goes through numpy between steps.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from haplo import vision
from haplo.backend import Backend
from haplo.engines.bundle import Bundle

STAGE_GRAPHS = {"pre": "pre_decoder", "base": "base_decoder", "post": "post_decoder"}
NUMPY_DTYPES = {"float": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def session_options(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    # Shapes change every decode step: pre-planned memory patterns would be rebuilt each time.
    options.enable_mem_pattern = False
    options.graph_optimization_level = optimization
    options.log_severity_level = 3
    return options


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle | str, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 providers: list[str] | None = None, optimization: ort.GraphOptimizationLevel | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.providers = providers or ["CPUExecutionProvider"]
        if optimization is None:  # quantized bundles record the level their Q/DQ graphs need
            name = self.bundle.manifest.get("onnxruntime_optimization", "ORT_ENABLE_ALL")
            optimization = getattr(ort.GraphOptimizationLevel, name)
        self.options = session_options(intra_op_threads, inter_op_threads, optimization)
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.constants = load_file(str(self.bundle.path(self.bundle.manifest["constants"])))

    def session(self, graph: str) -> ort.InferenceSession:
        """Created on first use, so a run pays only for the graphs it needs (cold start)."""
        if graph not in self.sessions:
            self.sessions[graph] = ort.InferenceSession(str(self.bundle.graph_path(graph)), self.options,
                                                        providers=self.providers)
        return self.sessions[graph]

    def run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
        return [torch.from_numpy(out) for out in self.session(graph).run(None, feeds)]

    def embed_text(self, input_ids):
        return self.run("embed_text", input_ids=input_ids.long())[0]

    def _patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.run("embed_vision", pixel_values=pixels.float())[0]

    def embed_images(self, pixel_values, image_sizes):
        stage = self.config.base
        sizes = [tuple(int(v) for v in s) for s in image_sizes]
        tiles = [vision.num_image_tiles(s, stage) for s in sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([px[:n] for px, n in zip(pixel_values, tiles)])
        else:
            tiles = [1] * len(sizes)
        features = self._patch_features(pixel_values)
        newline = self.constants["image_newline"] if stage.image_newline else None
        return [vision.pack_image_embeds(f, s, newline, stage) for f, s in zip(torch.split(features, tiles), sizes)]

    def embed_videos(self, pixel_values_videos):
        batch = pixel_values_videos.shape[0]
        features = self._patch_features(pixel_values_videos.flatten(0, 1))
        features = features.reshape(batch, -1, self.config.pre.hidden_size)
        return [torch.cat([f, self.constants["image_newline"][None]]) for f in features]

    def embed_generation(self, latents, timestep):
        return tuple(self.run("embed_generation", latents=latents.float(), timestep=timestep.long()))

    def run_stage(self, stage, hidden, position_ids, key_start, past=None):
        graph = STAGE_GRAPHS[stage]
        session = self.session(graph)
        binding = session.io_binding()
        binding.bind_cpu_input("hidden_states", np.ascontiguousarray(hidden.float().numpy()))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids.long().numpy()))
        binding.bind_cpu_input("key_start", np.ascontiguousarray(key_start.long().numpy()))
        layers = self.bundle.graphs[graph]["layers"]
        if past is None:  # prefill: empty caches [B, kv, 0, D]
            cfg = self.config.stages[stage]
            empty = np.zeros((hidden.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim), dtype=np.float32)
            past = [ort.OrtValue.ortvalue_from_numpy(empty)] * (2 * len(layers))
        for i, n in enumerate(layers):
            binding.bind_ortvalue_input(f"past_key_values.{n}.key", past[2 * i])
            binding.bind_ortvalue_input(f"past_key_values.{n}.value", past[2 * i + 1])
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()), list(outputs[1:])

    def lm_head(self, last_decoder_hidden_state):
        return self.run("lm_head", last_decoder_hidden_state=last_decoder_hidden_state.float())[0]

    def latent_head(self, hidden, temb, latent_shape):
        latents = torch.zeros(latent_shape)  # only its shape is read by the graph
        return self.run("latent_head", hidden_states=hidden.float(), temb=temb.float(), latents=latents)[0]

    def vae_decode(self, latents):
        if "vae_decoder" not in self.bundle.graphs:
            raise RuntimeError(f"{self.bundle.root}: the bundle has no VAE decoder graph")
        built = self.bundle.graphs["vae_decoder"]["inputs"][0]["shape"][1:]
        scaled = latents.permute(0, 2, 1, 3, 4).float() / self.bundle.manifest["vae"]["scaling_factor"]
        if list(scaled.shape[1:]) != built:
            raise ValueError(f"latents {list(scaled.shape[1:])} do not match the VAE graph built for {built}; "
                             "rebuild the bundle with --frames/--height/--width of this video")
        # The causal 3-D VAE is exported for one fixed latent size and batch 1: decode row by row.
        return torch.cat([self.run("vae_decoder", latents=row[None])[0] for row in scaled])
