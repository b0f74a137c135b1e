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

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in asdict(self).items():
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"shape range {name}={lo},{opt},{hi}: need 1 <= min <= opt <= max")


def profile_dims(ranges: ShapeRanges, decode: bool) -> dict[str, Range]:
    """Dimension name -> (min, opt, max) for the prefill or the decode profile."""
    sequence = (1, 1, 1) if decode else (1, ranges.prompt[1], max(ranges.prompt[2], ranges.visual_tokens[2] + 1))
    past = ranges.past
    return {
        "batch": ranges.batch,
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
    """Decoders get a prefill and a decode profile (index 0 and 1); every other graph one profile."""
    kinds = {"prefill": False, "decode": True} if entry.layers else {"default": False}
    return {
        name: {i.name: input_shape_range(i.shape, profile_dims(ranges, decode)) for i in entry.inputs}
        for name, decode in kinds.items()
    }
