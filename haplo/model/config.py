"""HaploOmni configuration: reads and writes the official `config.json` layout.

The official file nests one config per stage (`pre_config`, `base_config`, `post_config`), one per
connector (`pre_connector`, `post_connector`), and repeats the base keys at top level. We keep that
layout byte-compatible on write and add one optional key of our own, `video_generation`, holding
the generation-head and scheduler settings (the official class hard-codes them).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from haplo.artifacts import write_atomic
from haplo.errors import HaploError

CONFIG_NAME = "config.json"
STAGES = ("pre", "base", "post")  # the decoder stack, in order; every backend runs it stage by stage


class ConfigError(HaploError, ValueError):
    """A config file or preset that cannot describe a HaploOmni model."""


@dataclass
class StageConfig:
    """One decoder stage (pre, base or post). Field names follow the official per-model config."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    norm_mode: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_rope: bool = False  # True: the stage builds its own RoPE table (own theta, head_dim)
    use_pe: bool = True  # False: no positional encoding in this stage
    use_qk_norm: bool = False
    # Shared vision / vocabulary keys: the official file repeats them in every stage.
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    patch_size: int = 14
    default_image_size: int = 56
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: list = field(default_factory=lambda: [[56, 56]])
    image_newline: bool = True
    image_token_index: int = 1000
    video_token_index: int = 1001
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    rope_scaling: Any = None
    sliding_window: int = 4096
    use_sliding_window: bool = False
    max_window_layers: int = 28
    use_cache: bool = True
    model_type: str = "HaploOmni"
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        """One layer's key (or value) cache: [B, kv heads, cached tokens, head dim]."""
        return batch, self.num_key_value_heads, length, self.head_dim

    def validate(self, name: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{name}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{name}: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.norm_mode not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"{name}: norm_mode must be 'rmsnorm' or 'layernorm', got {self.norm_mode!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "StageConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.extra = {k: v for k, v in data.items() if k not in known}
        return cfg

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return dict(sorted(data.items()))


@dataclass
class ConnectorConfig:
    use_pre_norm: bool = False
    use_affine_bias: bool = False
    model_type: str = "HaploOmni"

    @classmethod
    def from_dict(cls, data: dict) -> "ConnectorConfig":
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VideoGenerationConfig:
    """Generation heads, VAE geometry and scheduler defaults (CogVideoX-2B values)."""

    latent_channels: int = 16
    latent_patch_size: int = 2
    time_embed_dim: int = 512
    text_embed_dim: int = 4096  # width of the unused `patch_embed_cogvideo.text_proj` input
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    vae_spatial_compression: int = 8
    vae_temporal_compression: int = 4
    vae_scaling_factor: float = 1.15258426
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    num_inference_steps: int = 50
    guidance_scale: float = 6.5
    num_frames: int = 49
    height: int = 480
    width: int = 720
    fps: int = 8

    @classmethod
    def from_dict(cls, data: dict) -> "VideoGenerationConfig":
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def to_dict(self) -> dict:
        return asdict(self)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(latent frames, channels, latent height, latent width) for a video size.

        The CogVideoX VAE decodes latent frames two at a time after the first odd one: an odd count n
        gives t (n - 1) + 1 frames (t = temporal compression), an even count gives t n, so only
        frame counts 2tk + 1 (1, 9, 17, ..., 49 for t = 4) round-trip; others are refused.
        """
        step = self.vae_spatial_compression * self.latent_patch_size
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ConfigError(f"height and width must be positive multiples of {step}, got {height}x{width}")
        t = self.vae_temporal_compression
        if num_frames < 1 or (num_frames - 1) % (2 * t):
            valid = ", ".join(str(2 * t * k + 1) for k in range(4))
            below = max(0, (num_frames - 1) // (2 * t)) * 2 * t + 1
            near = f"{below} or {below + 2 * t}" if num_frames > 1 else "1"
            raise ConfigError(
                f"{num_frames} frames: the CogVideoX VAE decodes {2 * t}k + 1 frames ({valid}, ...); use {near}"
            )
        frames = (num_frames - 1) // t + 1
        return (
            frames,
            self.latent_channels,
            height // self.vae_spatial_compression,
            width // self.vae_spatial_compression,
        )

    def latent_tokens(self, num_frames: int, height: int, width: int) -> int:
        f, _, h, w = self.latent_shape(num_frames, height, width)
        return f * (h // self.latent_patch_size) * (w // self.latent_patch_size)


@dataclass
class HaploOmniConfig:
    """The whole model: three stages, two connectors, generation settings.

    `base` is also the top-level config, as in the official file. `official_mask_quirk` reproduces
    the official code's behaviour of dropping the block-bidirectional image mask for batches
    without padding (plain causal attention then); the default follows the paper.
    """

    pre: StageConfig
    base: StageConfig
    post: StageConfig
    pre_connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    post_connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    video_generation: VideoGenerationConfig = field(default_factory=VideoGenerationConfig)
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    official_mask_quirk: bool = False
    torch_dtype: str = "float32"
    top_level_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("pre", "base", "post"):
            getattr(self, name).validate(name)
        for name in ("pre", "post"):
            stage = getattr(self, name)
            if stage.use_pe and not stage.attention_rope and stage.head_dim != self.base.head_dim:
                raise ConfigError(
                    f"{name}: head_dim {stage.head_dim} differs from the base head_dim "
                    f"{self.base.head_dim}, so it cannot share the base RoPE table; set "
                    f"attention_rope=true (own RoPE) or use_pe=false"
                )

    # -- convenience views -------------------------------------------------------------------
    @property
    def stages(self) -> dict[str, StageConfig]:
        return {"pre": self.pre, "base": self.base, "post": self.post}

    def stage_layers(self, stage: str) -> range:
        """Global indices (into the model's layers and the KV cache) of one stage's layers."""
        n_pre, n_base = self.pre.num_hidden_layers, self.base.num_hidden_layers
        return {
            "pre": range(0, n_pre),
            "base": range(n_pre, n_pre + n_base),
            "post": range(n_pre + n_base, self.num_layers),
        }[stage]

    @property
    def num_layers(self) -> int:
        return sum(s.num_hidden_layers for s in self.stages.values())

    def stage_of_layer(self, index: int) -> str:
        if index < self.pre.num_hidden_layers:
            return "pre"
        if index < self.pre.num_hidden_layers + self.base.num_hidden_layers:
            return "base"
        return "post"

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def image_token_index(self) -> int:
        return self.base.image_token_index

    @property
    def video_token_index(self) -> int:
        return self.base.video_token_index

    @property
    def tokens_per_tile(self) -> int:
        return (self.base.default_image_size // self.base.patch_size) ** 2

    # -- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "HaploOmniConfig":
        data = copy.deepcopy(data)
        missing = [k for k in ("base_config", "pre_config", "post_config") if k not in data]
        if missing:
            raise ConfigError(f"config is not a HaploOmni config: missing {', '.join(missing)}")
        own = {
            "base_config",
            "pre_config",
            "post_config",
            "pre_connector",
            "post_connector",
            "video_generation",
            "tie_word_embeddings",
            "pad_token_id",
            "official_mask_quirk",
            "torch_dtype",
        }
        base_keys = set(data["base_config"])
        return cls(
            pre=StageConfig.from_dict(data["pre_config"]),
            base=StageConfig.from_dict(data["base_config"]),
            post=StageConfig.from_dict(data["post_config"]),
            pre_connector=ConnectorConfig.from_dict(data.get("pre_connector", {})),
            post_connector=ConnectorConfig.from_dict(data.get("post_connector", {})),
            video_generation=VideoGenerationConfig.from_dict(data.get("video_generation", {})),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            pad_token_id=int(data.get("pad_token_id") or 0),
            official_mask_quirk=bool(data.get("official_mask_quirk", False)),
            torch_dtype=str(data.get("torch_dtype", "float32")),
            top_level_extra={k: v for k, v in data.items() if k not in own and k not in base_keys},
        )

    def to_dict(self) -> dict:
        data: dict[str, Any] = dict(self.top_level_extra)
        data.setdefault("architectures", ["HaploOmniForConditionalGeneration"])
        data.update(self.base.to_dict())  # the official file repeats base keys at top level
        data.update(
            base_config=self.base.to_dict(),
            pre_config=self.pre.to_dict(),
            post_config=self.post.to_dict(),
            pre_connector=self.pre_connector.to_dict(),
            post_connector=self.post_connector.to_dict(),
            video_generation=self.video_generation.to_dict(),
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id,
            official_mask_quirk=self.official_mask_quirk,
            torch_dtype=self.torch_dtype,
        )
        return dict(sorted(data.items()))

    @classmethod
    def from_json_file(cls, path: str | Path) -> "HaploOmniConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a HaploOmni checkpoint directory?)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HaploOmniConfig":
        return cls.from_json_file(Path(directory) / CONFIG_NAME)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# -- presets -------------------------------------------------------------------------------------


def _stage(**kw: Any) -> StageConfig:
    return StageConfig(**kw)


def _tiny() -> HaploOmniConfig:
    # The shape of the official `tiny-a` fixture: 2+2+2 layers, pre/post 64 wide, base 96 wide.
    vision = dict(vocab_size=1024, patch_size=14, default_image_size=56, image_grid_pinpoints=[[56, 56]])
    return HaploOmniConfig(
        pre=_stage(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10000.0,
            attention_rope=True,
            **vision,
        ),
        base=_stage(
            hidden_size=96,
            intermediate_size=192,
            num_attention_heads=6,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            **vision,
        ),
        post=_stage(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10000.0,
            attention_rope=True,
            **vision,
        ),
        video_generation=VideoGenerationConfig(num_inference_steps=8, num_frames=9, height=64, width=64, fps=8),
    )


def _tiny_priors() -> HaploOmniConfig:
    # `tiny` with the priors' norms (CLIP and CogVideoX: LayerNorm; CogVideoX: q/k norms), so that
    # tiny random CLIP / Qwen2 / CogVideoX models convert into it: the training tests' model.
    config = _tiny()
    config.pre.norm_mode = config.post.norm_mode = "layernorm"
    config.pre.rms_norm_eps = config.post.rms_norm_eps = 1e-5
    config.post.use_qk_norm = True
    config.post.intermediate_size = 4 * config.post.hidden_size  # CogVideoX's feed-forward width
    return config


def _haplo_mini() -> HaploOmniConfig:
    # The shipped model's architecture (trained by `haplo-train recipe --config configs/haplo-mini.yaml`):
    # 2 + 4 + 2 layers, pre/post 128 wide, base 192 wide with grouped K/V, 56-pixel tiles of 16 patches,
    # byte-level vocabulary; 9-frame 64x64 videos in 8 guided DDIM steps.
    vision = dict(vocab_size=1024, patch_size=14, default_image_size=56, image_grid_pinpoints=[[56, 56]])
    side = dict(intermediate_size=384, num_attention_heads=4, num_key_value_heads=4, attention_rope=True)
    return HaploOmniConfig(
        pre=_stage(hidden_size=128, num_hidden_layers=2, rope_theta=10000.0, **side, **vision),
        base=_stage(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            **vision,
        ),
        post=_stage(hidden_size=128, num_hidden_layers=2, rope_theta=10000.0, **side, **vision),
        video_generation=VideoGenerationConfig(
            text_embed_dim=16, num_inference_steps=8, guidance_scale=4.0, num_frames=9, height=64, width=64, fps=8
        ),
    )


def _small() -> HaploOmniConfig:
    # About 100M parameters: big enough for CPU benchmarks to mean something, small enough to run.
    vision = dict(
        vocab_size=8192,
        patch_size=14,
        default_image_size=112,
        image_grid_pinpoints=[[112, 112]],
        image_token_index=8000,
        video_token_index=8001,
        max_position_embeddings=8192,
    )
    return HaploOmniConfig(
        pre=_stage(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=6,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            **vision,
        ),
        base=_stage(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=10,
            num_attention_heads=12,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            **vision,
        ),
        post=_stage(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            use_qk_norm=True,
            **vision,
        ),
        video_generation=VideoGenerationConfig(num_inference_steps=20, num_frames=9, height=128, width=128),
    )


def _haplo_omni_9b() -> HaploOmniConfig:
    # Paper sizes: CLIP-ViT-L/14-336 pre-decoder, Qwen2.5-7B base, CogVideoX-2B post-decoder.
    vision = dict(
        vocab_size=152064,
        patch_size=14,
        default_image_size=336,
        image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        image_token_index=151646,
        video_token_index=151647,
        max_position_embeddings=32768,
    )
    return HaploOmniConfig(
        pre=_stage(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            **vision,
        ),
        base=_stage(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1_000_000.0,
            **vision,
        ),
        post=_stage(
            hidden_size=1920,
            intermediate_size=5120,
            num_hidden_layers=30,
            num_attention_heads=30,
            num_key_value_heads=30,
            norm_mode="layernorm",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_rope=True,
            use_qk_norm=True,
            **vision,
        ),
        pad_token_id=151643,
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-priors": _tiny_priors,
    "haplo-mini": _haplo_mini,
    "small": _small,
    "haplo-omni-9b": _haplo_omni_9b,
}


def preset(name: str) -> HaploOmniConfig:
    """A named configuration: `tiny` (tests), `small` (~100M, CPU benchmarks), `haplo-omni-9b`."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def kv_cache_bytes_per_token(config: HaploOmniConfig, bytes_per_element: int = 2) -> int:
    """K and V for every layer of every stage, for one token."""
    return sum(
        2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * bytes_per_element for s in config.stages.values()
    )
