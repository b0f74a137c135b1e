"""Optimisation profiles: the CLI's shape ranges -> (min, opt, max) shapes for every graph input."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from haplo.bundle import GraphEntry
from haplo.engines.tensorrt.status import EngineError

Range = tuple[int, int, int]


@dataclass
class ShapeRanges:
    """(min, opt, max) of every dynamic dimension, from the CLI. TensorRT wants past >= 1."""

    batch: tuple[int, int, int] = (1, 1, 2)
    prompt: tuple[int, int, int] = (1, 128, 1024)  # new tokens in one prefill call
    past: tuple[int, int, int] = (1, 512, 4096)  # cached tokens (one dead slot included)
    visual_tokens: tuple[int, int, int] = (1, 48, 17550)
    latent_frames: tuple[int, int, int] = (1, 3, 13)
    latent_height: tuple[int, int, int] = (8, 8, 60)
    latent_width: tuple[int, int, int] = (8, 8, 90)
    image_tiles: tuple[int, int, int] = (1, 1, 10)

    @classmethod
    def for_config(cls, config) -> ShapeRanges:
        """The defaults, with the latent-token optimum at the model's own video size (what DDIM runs)."""
        gen = config.video_generation
        frames, _, height, width = gen.latent_shape(gen.num_frames, gen.height, gen.width)
        tokens = gen.latent_tokens(gen.num_frames, gen.height, gen.width)
        base = cls()

        def widen(current: Range, opt: int) -> Range:
            return (min(current[0], opt), opt, max(current[2], opt))

        return cls(
            visual_tokens=widen(base.visual_tokens, tokens),
            latent_frames=widen(base.latent_frames, frames),
            latent_height=widen(base.latent_height, height),
            latent_width=widen(base.latent_width, width),
        )

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in asdict(self).items():
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"shape range {name}={lo},{opt},{hi}: need 1 <= min <= opt <= max")


def profile_dims(ranges: ShapeRanges, kind: str) -> dict[str, Range]:
    """Dimension name -> (min, opt, max) for the "prefill", "decode" or "denoise" profile.

    denoise: the CFG pair of one prompt ([time token | latent tokens] after the cached text prefix),
    optimised at the latent-token count of the ranges, so tactics are timed at the shape DDIM runs."""
    past = ranges.past
    batch = ranges.batch
    if kind == "decode":
        sequence: Range = (1, 1, 1)
    elif kind == "denoise":
        visual = ranges.visual_tokens
        sequence = (2, visual[1] + 1, visual[2] + 1)
        past = (1, ranges.prompt[1] + 1, max(ranges.prompt[2] + 1, past[2]))  # the text prefix + the dead slot
        batch = (batch[0], min(2, batch[2]), batch[2])
    else:
        sequence = (1, ranges.prompt[1], max(ranges.prompt[2], ranges.visual_tokens[2] + 1))
    return {
        "batch": batch,
        "sequence": sequence,
        "past_sequence": past,
        "total_sequence": tuple(p + s for p, s in zip(past, sequence)),
        "visual_tokens": ranges.visual_tokens,
        "latent_frames": ranges.latent_frames,
        "latent_height": ranges.latent_height,
        "latent_width": ranges.latent_width,
        "num_tiles": ranges.image_tiles,
    }


def input_shape_range(shape: list, dims: dict[str, Range]) -> tuple[tuple[int, ...], ...]:
    """A manifest shape ([3, "batch", ...]) -> (min, opt, max) tuples of ints."""
    triples = []
    for d in shape:
        if isinstance(d, int):
            triples.append((d, d, d))
        elif d in dims:
            triples.append(dims[d])
        else:
            raise EngineError(f"no shape range for dynamic dimension {d!r}; add it to ShapeRanges")
    return tuple(tuple(t[i] for t in triples) for i in range(3))


def graph_profiles(entry: GraphEntry, ranges: ShapeRanges) -> dict[str, dict[str, tuple]]:
    """Decoders get prefill, decode and denoise profiles (index 0, 1, 2); every other graph one profile."""
    kinds = ("prefill", "decode", "denoise") if entry.layers else ("default",)
    return {
        kind: {i.name: input_shape_range(i.shape, profile_dims(ranges, kind)) for i in entry.inputs} for kind in kinds
    }


def choose_profile(profiles: dict[str, dict[str, list]], shapes: dict[str, tuple[int, ...]]) -> int:
    """The index of the profile that holds every input shape and whose optimum is nearest to them
    (what a call of those shapes runs best with); EngineError when none holds them."""
    best, best_distance = None, None
    for index, ranges in enumerate(profiles.values()):
        distance = 0
        for name, shape in shapes.items():
            lo, opt, hi = (tuple(r) for r in ranges[name])
            if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
                break
            distance += sum(abs(d - o) for d, o in zip(shape, opt))
        else:
            if best_distance is None or distance < best_distance:
                best, best_distance = index, distance
    if best is None:
        raise EngineError(
            f"the shapes {shapes} are outside every optimisation profile of the engine; rebuild the bundle's "
            "engines with shape ranges that hold them (ShapeRanges)"
        )
    return best
