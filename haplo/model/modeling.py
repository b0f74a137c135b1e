"""HaploOmni: one decoder stack (pre -> base -> post) for video understanding and generation.

State-dict compatible with the official checkpoint: every parameter name below is the official one.
The stack runs stage by stage (`stage_forward`) so the export can cut it into per-stage graphs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_3d_sincos_pos_embed
from diffusers.models.normalization import AdaLayerNorm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from haplo.artifacts import atomic_path
from haplo.errors import HaploError
from haplo.model import vision
from haplo.model.config import STAGES, ConfigError, HaploOmniConfig, StageConfig, preset
from haplo.model.layers import Connector, DecoderLayer, MultimodalNorm, rope_cos_sin
from haplo.model.sequence import (
    generation_sequence,
    scatter_visual_features,
    understanding_key_start,
    understanding_positions,
)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(HaploError, ValueError):
    """A checkpoint directory that cannot be loaded into HaploOmni, with the reason and the fix."""


@dataclass
class HaploOutput:
    logits: torch.Tensor | None = None  # [B, L, vocab]
    last_hidden_state: torch.Tensor | None = None  # [B, L, base width], the lm_head input
    last_decoder_hidden_state: torch.Tensor | None = None  # [B, L, post width]
    hidden_states: list = field(default_factory=list)  # inputs of every decoder layer, then last_hidden_state


class ImagePatchEmbed(nn.Module):
    """14x14 patches of a CLIP-normalised tile -> [N, P, pre width] (row-major)."""

    def __init__(self, config: StageConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class LatentPatchEmbed(nn.Module):
    """2x2 patches of 16-channel latents, plus CogVideoX's fixed 3-D sin-cos table.

    `text_proj` exists only because the official checkpoint stores it; it is never used.
    """

    def __init__(self, post_width: int, gen_cfg):
        super().__init__()
        p = gen_cfg.latent_patch_size
        self.patch_size = p
        self.spatial_scale = gen_cfg.spatial_interpolation_scale
        self.temporal_scale = gen_cfg.temporal_interpolation_scale
        self.proj = nn.Conv2d(gen_cfg.latent_channels, post_width, p, p)
        self.text_proj = nn.Linear(gen_cfg.text_embed_dim, post_width)

    def position_table(self, frames: int, height: int, width: int, device, dtype) -> torch.Tensor:
        """[frames * h * w, D] for latent frames and latent height/width (before patching)."""
        p = self.patch_size
        table = get_3d_sincos_pos_embed(
            self.proj.out_channels,
            (width // p, height // p),
            frames,
            self.spatial_scale,
            self.temporal_scale,
            device=device,
        )
        return table.flatten(0, 1).to(dtype)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, frames, channels, height, width = latents.shape  # [B, F, C, H, W]
        tokens = self.proj(latents.reshape(-1, channels, height, width))  # [B*F, D, H/p, W/p]
        tokens = tokens.flatten(2).transpose(1, 2).reshape(batch, -1, tokens.shape[1])  # [B, F*h*w, D]
        return tokens + self.position_table(frames, height, width, latents.device, tokens.dtype)


class HaploOmniModel(nn.Module):
    """The decoder stack and its input embeddings (checkpoint prefix `model.`)."""

    def __init__(self, config: HaploOmniConfig):
        super().__init__()
        self.config = config
        pre, base, post = config.pre, config.base, config.post
        self.embed_tokens = nn.Embedding(config.vocab_size, pre.hidden_size)
        self.patch_embed = ImagePatchEmbed(pre)
        self.pre_pos_embed = nn.Parameter(torch.zeros(1, config.tokens_per_tile, pre.hidden_size))
        self.image_newline = nn.Parameter(torch.zeros(pre.hidden_size))
        self.pre_norm = nn.LayerNorm(pre.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(stage) for stage in (pre, base, post) for _ in range(stage.num_hidden_layers)]
        )
        self.norm = MultimodalNorm(base.hidden_size, base.norm_mode, base.rms_norm_eps, modulated=False)
        self.pre_connector = Connector(pre.hidden_size, base.hidden_size, config.pre_connector)
        self.post_connector = Connector(base.hidden_size, post.hidden_size, config.post_connector)
        self.post_norm = nn.LayerNorm(post.hidden_size)
        self.post_linear = nn.Linear(post.hidden_size, base.hidden_size)
        self.post_scale = nn.Parameter(torch.ones(base.hidden_size))

    # -- layout ----------------------------------------------------------------------------------
    def stage_layers(self, stage: str) -> range:
        """Indices into `self.layers` (and into the KV cache) of one stage's layers."""
        return self.config.stage_layers(stage)

    def rope(self, stage: str, position_ids: torch.Tensor):
        """A stage's RoPE: its own table, the base table (shared), or none."""
        cfg = self.config.stages[stage]
        if not cfg.use_pe:
            return None
        table = cfg if cfg.attention_rope else self.config.base
        return rope_cos_sin(position_ids, table.head_dim, table.rope_theta)

    # -- embeddings ------------------------------------------------------------------------------
    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] tiles or frames -> [N, P, pre width] (what the `embed_vision` graph computes)."""
        return self.patch_embed(pixels.to(self.pre_pos_embed.dtype)) + self.pre_pos_embed

    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, 3, S, S] (one tile each) or [N, T, 3, S, S] -> per image [tokens, pre width]."""
        newline = self.image_newline if self.config.base.image_newline else None
        images = vision.image_tiles(pixel_values, image_sizes, self.config.base)
        return vision.pack_images(self.patch_features(images.pixels), images, newline, self.config.base)

    def embed_videos(self, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        """[B, F, 3, S, S] -> per video [F * P + 1, pre width] (frames, then one newline)."""
        features = self.patch_features(pixel_values_videos.flatten(0, 1))
        return vision.pack_videos(features, pixel_values_videos.shape[0], self.image_newline)

    def embed_inputs(self, input_ids, pixel_values=None, image_sizes=None, pixel_values_videos=None):
        """Text embeddings with image/video features scattered, in order, into the placeholder ids."""
        images = None if pixel_values is None else self.embed_images(pixel_values, image_sizes)
        videos = None if pixel_values_videos is None else self.embed_videos(pixel_values_videos)
        return scatter_visual_features(self.config, input_ids, self.embed_tokens(input_ids), images, videos)

    # -- the stack -------------------------------------------------------------------------------
    def stage_forward(
        self,
        stage: str,
        x: torch.Tensor,  # [B, L, stage input width]
        position_ids: torch.Tensor,  # [B, L]
        key_start: torch.Tensor,  # [B, Lpast + L]
        past: list | None = None,  # (k, v) per layer of this stage, or None
        hidden_states: list | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, list | None]:
        """One stage with its input/output transforms: pre = pre_norm, layers, pre_connector;
        base = layers, norm, post_connector; post = layers. Returns (output, this stage's K/V), or
        (output, None) with `use_cache=False`: each layer's keys and values are freed after the layer."""
        if stage == "pre":
            x = self.pre_norm(x)
        rope = self.rope(stage, position_ids)
        presents = []
        for n, index in enumerate(self.stage_layers(stage)):
            if hidden_states is not None:
                hidden_states.append(x)
            x, kv = self.layer_forward(index, x, rope, key_start, None if past is None else past[n])
            if use_cache:
                presents.append(kv)
        if stage == "pre":
            x = self.pre_connector(x)
        elif stage == "base":
            x = self.post_connector(self.norm(x))
        return x, (presents if use_cache else None)

    def layer_forward(self, index: int, x, rope, key_start, past=None):
        """One decoder layer; recomputed in backward when `gradient_checkpointing` is on (training)."""
        if getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled() and past is None:
            return torch.utils.checkpoint.checkpoint(self.layers[index], x, rope, key_start, None, use_reentrant=False)
        return self.layers[index](x, rope, key_start, past)

    def forward(self, inputs_embeds, position_ids, key_start, output_hidden_states: bool = False):
        """pre -> base -> post over a whole sequence. Returns (last_decoder_hidden_state, hidden_states)."""
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        x = inputs_embeds
        for stage in STAGES:
            x, _ = self.stage_forward(stage, x, position_ids, key_start, None, hidden_states, use_cache=False)
        return x, hidden_states

    def lm_hidden(self, last_decoder_hidden_state: torch.Tensor) -> torch.Tensor:
        """post width -> base width, the lm_head input."""
        return self.post_linear(self.post_norm(last_decoder_hidden_state)) * self.post_scale


class HaploOmniForConditionalGeneration(nn.Module):
    """HaploOmni with the LM head (understanding) and the latent heads (generation)."""

    def __init__(self, config: HaploOmniConfig):
        super().__init__()
        self.config = config
        gen = config.video_generation
        post_width, pre_width = config.post.hidden_size, config.pre.hidden_size
        self.model = HaploOmniModel(config)
        self.lm_head = nn.Linear(config.base.hidden_size, config.vocab_size, bias=False)
        self.time_proj = Timesteps(post_width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(post_width, gen.time_embed_dim)
        self.temb_token = nn.Linear(gen.time_embed_dim, post_width)
        self.v2t_projector = nn.Linear(post_width, pre_width)
        self.patch_embed_cogvideo = LatentPatchEmbed(post_width, gen)
        self.norm_final = nn.LayerNorm(post_width, eps=1e-5)
        # CogVideoX's output AdaLN: its projection splits into (shift, scale), in that order.
        self.norm_out = AdaLayerNorm(
            gen.time_embed_dim, output_dim=2 * post_width, norm_elementwise_affine=True, norm_eps=1e-5, chunk_dim=1
        )
        self.proj_out = nn.Linear(post_width, gen.latent_patch_size**2 * gen.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- understanding ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [B, L]
        attention_mask: torch.Tensor | None = None,  # [B, L], 1 = real token
        attention_start_ids: torch.Tensor | None = None,  # [B, L] block starts (processor); None = causal
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> HaploOutput:
        """Understanding forward over a whole sequence (decoding with a cache: `haplo.runtime.decoding`)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_inputs(input_ids, pixel_values, image_sizes, pixel_values_videos)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        key_start = understanding_key_start(self.config, attention_mask, attention_start_ids)
        position_ids = understanding_positions(attention_mask)
        last_decoder, hidden_states = self.model(inputs_embeds, position_ids, key_start, output_hidden_states)
        last_hidden = self.model.lm_hidden(last_decoder)
        if output_hidden_states:
            hidden_states.append(last_hidden)
        return HaploOutput(self.lm_head(last_hidden), last_hidden, last_decoder, hidden_states or [])

    # -- generation ------------------------------------------------------------------------------
    def time_embed(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Diffusion timestep(s) -> temb [B, time_embed_dim]."""
        timestep = torch.as_tensor(timestep, device=self.device).reshape(-1).expand(batch)
        return self.time_embedding(self.time_proj(timestep).to(self.dtype))

    def embed_generation_inputs(self, latents: torch.Tensor, temb: torch.Tensor):
        """latents [B, F, C, H, W] and temb -> time token [B, 1, pre] and latent tokens [B, V, pre]."""
        time_token = self.v2t_projector(self.temb_token(F.silu(temb)))[:, None]
        latent_tokens = self.v2t_projector(self.patch_embed_cogvideo(latents.to(self.dtype)))
        return time_token, latent_tokens

    def latent_head(self, hidden: torch.Tensor, temb: torch.Tensor, latent_shape) -> torch.Tensor:
        """Latent rows [B, V, post] -> v-prediction [B, F, C, H, W]."""
        batch, frames, channels, height, width = latent_shape
        p = self.config.video_generation.latent_patch_size
        out = self.proj_out(self.norm_out(self.norm_final(hidden), temb=temb))  # [B, V, C*p*p]
        out = out.reshape(batch, frames, height // p, width // p, channels, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, frames, channels, height, width)

    def generation_forward(self, latents, timestep, input_ids, attention_mask) -> torch.Tensor:
        """One denoiser call over the whole sequence: v-prediction [B, F, C, H, W]."""
        temb = self.time_embed(timestep, latents.shape[0])
        time_token, latent_tokens = self.embed_generation_inputs(latents, temb)
        text = self.model.embed_tokens(input_ids)
        sequence, key_start, position_ids = generation_sequence(text, time_token, latent_tokens, attention_mask)
        hidden, _ = self.model(sequence, position_ids, key_start)
        return self.latent_head(hidden[:, -latent_tokens.shape[1] :], temb, latents.shape)

    # -- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "HaploOmniForConditionalGeneration":
        """Deterministic random initialisation for presets (a trained checkpoint replaces it)."""
        gen = torch.Generator().manual_seed(seed)

        def normal(t: torch.Tensor) -> None:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                normal(module.weight)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, (nn.LayerNorm, MultimodalNorm)):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, MultimodalNorm) and module.modulated:
                    for table in (module.SSG_C, module.SSG_L):
                        table.zero_()
                        table[2] = 1.0  # gate rows: the residual branches start un-gated
            elif isinstance(module, Connector) and module.use_pre_norm:
                module.scale.fill_(1.0)
        normal(self.model.pre_pos_embed)
        normal(self.model.image_newline)
        self.model.post_scale.fill_(1.0)
        return self

    @classmethod
    def from_config(cls, config: HaploOmniConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
        return cls(config).init_weights(seed).to(dtype).eval()

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
        return cls.from_config(preset(name), seed, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
        """Load a checkpoint (config.json + model.safetensors[.index.json]) by parameter name."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"{directory}: not a directory; pass a checkpoint directory holding config.json and model.safetensors"
            )
        try:
            config = HaploOmniConfig.from_pretrained(directory)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        state = load_checkpoint_tensors(directory)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, directory)
        model.load_state_dict(state, strict=True, assign=True)
        dtype = dtype or getattr(torch, config.torch_dtype, torch.float32)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors, each written to a temporary name and renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.torch_dtype = str(self.dtype).removeprefix("torch.")
        with atomic_path(directory / WEIGHTS_NAME) as staged:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(staged), metadata={"format": "pt"})
        self.config.save_pretrained(directory)


def load_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    try:
        if single.exists():
            return load_file(str(single))
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(directory / shard)))
            return state
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(
            f"{directory}: weights cannot be read ({err}); the file is corrupt or incomplete, copy the checkpoint again"
        ) from None
    raise CheckpointError(
        f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; this is not a HaploOmni checkpoint directory"
    )


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Zero missing, zero unexpected, every shape equal; otherwise one clear error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        k, got, want = shapes[0]
        problems.append(f"{len(shapes)} with wrong shape (e.g. {k}: checkpoint {got}, config {want})")
    if problems:
        raise CheckpointError(
            f"{directory}: config.json does not match the weights: {'; '.join(problems)}. "
            f"Use the config.json saved with these weights"
        )
