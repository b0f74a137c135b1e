"""Image tiles -> token layout, shared by the model (packing features) and the processor (counting them).

Both sides must agree exactly on how many placeholder ids an image takes, so the count is derived
from the same geometry the packing uses (the official processor counts with a hard-coded 9-tile
limit and a different rounding; we follow the model).

Modes (`image_aspect_ratio`):
- `pad`: one S x S tile per image (the first tile of its grid), P patch tokens + one newline token;
- `anyres` / `anyres_max_N`: the image is resized into the best-fitting pinpoint, cut into S x S tiles
  (no overview tile), the tile features are laid out as one spatial map, the padding around the
  original aspect ratio is removed, the map is bilinearly shrunk when it holds more than N tiles'
  worth of tokens, and a newline token ends every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import select_best_resolution

from haplo.model.config import StageConfig


def is_anyres(stage: StageConfig) -> bool:
    return stage.image_aspect_ratio.startswith("anyres")


def max_tiles(stage: StageConfig) -> int | None:
    """N of `anyres_max_N` (None: no downscaling)."""
    suffix = stage.image_aspect_ratio.removeprefix("anyres").removeprefix("_max_")
    return int(suffix) if suffix.isdigit() else None


def patches_per_side(stage: StageConfig) -> int:
    return stage.default_image_size // stage.patch_size


def select_grid(image_size: tuple[int, int], stage: StageConfig) -> tuple[int, int]:
    """(rows, cols) of S x S tiles for an image of (height, width): the best-fitting pinpoint."""
    height, width = select_best_resolution(tuple(image_size), stage.image_grid_pinpoints)
    return height // stage.default_image_size, width // stage.default_image_size


def num_image_tiles(image_size: tuple[int, int], stage: StageConfig) -> int:
    """Tiles the processor produces (and the model splits) for one image."""
    rows, cols = select_grid(image_size, stage)
    return rows * cols


def _unpadded_size(image_size: tuple[int, int], map_height: int, map_width: int) -> tuple[int, int]:
    """Feature-map rows/cols left after removing the letterbox padding around the image."""
    height, width = image_size
    if width / height > map_width / map_height:  # wider than the map: padding was top and bottom
        new_height = int(round(height * (map_width / width), 7))
        pad = (map_height - new_height) // 2
        return map_height - 2 * pad, map_width
    new_width = int(round(width * (map_height / height), 7))
    pad = (map_width - new_width) // 2
    return map_height, map_width - 2 * pad


def _downscaled_size(height: int, width: int, stage: StageConfig) -> tuple[int, int]:
    limit = max_tiles(stage)
    if limit is None:
        return height, width
    ratio = math.sqrt(height * width / (limit * patches_per_side(stage) ** 2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def anyres_map_size(image_size: tuple[int, int], stage: StageConfig) -> tuple[int, int]:
    """(rows, cols) of the packed feature map of an anyres image, before newline tokens."""
    rows, cols = select_grid(image_size, stage)
    p = patches_per_side(stage)
    height, width = _unpadded_size(image_size, rows * p, cols * p)
    return _downscaled_size(height, width, stage)


def image_token_count(image_size: tuple[int, int], stage: StageConfig) -> int:
    """Placeholder ids one image takes: equals `pack_image_embeds(...).shape[0]`."""
    newline = 1 if stage.image_newline else 0
    if not is_anyres(stage):
        return patches_per_side(stage) ** 2 + newline
    height, width = anyres_map_size(image_size, stage)
    return height * (width + newline)


def video_token_count(num_frames: int, stage: StageConfig) -> int:
    """Frames of P tokens each, then one newline token for the whole video."""
    return num_frames * patches_per_side(stage) ** 2 + 1


def pack_image_embeds(
    tile_embeds: torch.Tensor, image_size: tuple[int, int], newline: torch.Tensor | None, stage: StageConfig
) -> torch.Tensor:
    """[tiles, P, D] features of one image -> [tokens, D] in placeholder order."""
    if not is_anyres(stage):
        tokens = tile_embeds[0]
        return tokens if newline is None else torch.cat([tokens, newline[None].to(tokens)])
    rows, cols = select_grid(image_size, stage)
    p = patches_per_side(stage)
    dim = tile_embeds.shape[-1]
    # [rows, cols, p, p, D] -> one map [D, rows*p, cols*p]
    fmap = tile_embeds.reshape(rows, cols, p, p, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * p, cols * p)
    height, width = _unpadded_size(image_size, rows * p, cols * p)
    top, left = (rows * p - height) // 2, (cols * p - width) // 2
    fmap = fmap[:, top : top + height, left : left + width]
    target = _downscaled_size(height, width, stage)
    if target != (height, width):
        fmap = F.interpolate(fmap[None].float(), list(target), mode="bilinear")[0].to(tile_embeds.dtype)
    if newline is not None:
        fmap = torch.cat([fmap, newline[:, None, None].to(fmap).expand(dim, fmap.shape[1], 1)], dim=2)
    return fmap.flatten(1).transpose(0, 1)


@dataclass
class ImageTiles:
    """The real tiles of a batch of images, in order, and how they split back into images."""

    pixels: torch.Tensor  # [sum(tiles), 3, S, S]
    tiles: list[int]  # tiles per image
    sizes: list[tuple[int, int]]  # original (height, width) per image


def image_tiles(pixel_values: torch.Tensor, image_sizes: torch.Tensor, stage: StageConfig) -> ImageTiles:
    """Processor pixels, [N, 3, S, S] (one tile per image) or [N, T, 3, S, S] (padded tile lists),
    -> the tiles the patch embedding sees."""
    sizes = [(int(height), int(width)) for height, width in image_sizes]
    tiles = [num_image_tiles(s, stage) for s in sizes]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([px[:n] for px, n in zip(pixel_values, tiles)])
    elif pixel_values.dim() == 4:
        tiles = [1] * len(sizes)
    else:
        raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
    return ImageTiles(pixel_values, tiles, sizes)


def pack_images(
    features: torch.Tensor,  # [sum(tiles), P, D]: the patch features of `images.pixels`
    images: ImageTiles,
    newline: torch.Tensor | None,  # [D], or None when the stage has no newline token
    stage: StageConfig,
) -> list[torch.Tensor]:
    """Per image [tokens, D], in placeholder order (what the processor counted)."""
    per_image = torch.split(features, images.tiles)
    return [pack_image_embeds(f, size, newline, stage) for f, size in zip(per_image, images.sizes)]


def pack_videos(features: torch.Tensor, batch: int, newline: torch.Tensor) -> list[torch.Tensor]:
    """Patch features of every frame [B * F, P, D] -> per video [F * P + 1, D]: frames, then a newline."""
    features = features.reshape(batch, -1, features.shape[-1])
    return [torch.cat([f, newline[None].to(f)]) for f in features]
