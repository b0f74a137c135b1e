"""Text + images + videos -> model inputs, as the official processor lays them out.

Output of `HaploOmniProcessor.__call__` (left padded batch):
    input_ids            [B, L]  placeholders expanded to one id per visual token
    attention_mask       [B, L]  1 = real token
    attention_start_ids  [B, L]  per key position, the first query position allowed to see it
    pixel_values         [num_images, max_tiles, 3, S, S]   CLIP-normalised tiles (if images)
    image_sizes          [num_images, 2]                    original (height, width)
    pixel_values_videos  [num_videos, F, 3, S, S]           (if videos)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import select_best_resolution

from haplo.errors import HaploError
from haplo.model import vision
from haplo.model.config import HaploOmniConfig
from haplo.model.sequence import visual_slots
from haplo.model.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class ProcessorError(HaploError, ValueError):
    pass


def load_image(image) -> Image.Image:
    """A PIL image, an HxWx3 uint8 array, or a path -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise ProcessorError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ProcessorError(f"{path}: cannot decode the image ({type(err).__name__}); use a PNG/JPEG file") from None


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32, rescaled to [0, 1] and CLIP-normalised."""
    scaled = (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return np.moveaxis(scaled, -1, -3)


class HaploOmniProcessor:
    def __init__(self, tokenizer, config: HaploOmniConfig):
        self.tokenizer, self.config, self.stage = tokenizer, config, config.base
        self.tile = config.base.default_image_size
        self.stop_token_ids = sorted(
            {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
        )

    # -- pixels -----------------------------------------------------------------------------------
    def image_tiles(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> ([tiles, 3, S, S], (height, width)).

        Resize (bicubic, aspect kept) into the best-fitting pinpoint, centre it on black, cut into
        S x S tiles row by row; `pad` mode reads only the first tile.
        """
        image = load_image(image)
        size = (image.height, image.width)
        target_h, target_w = select_best_resolution(size, self.stage.image_grid_pinpoints)
        scale = min(target_w / image.width, target_h / image.height)
        new_w = min(math.ceil(image.width * scale), target_w)
        new_h = min(math.ceil(image.height * scale), target_h)
        canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas[top : top + new_h, left : left + new_w] = np.asarray(resized)
        s = self.tile
        tiles = canvas.reshape(target_h // s, s, target_w // s, s, 3).swapaxes(1, 2).reshape(-1, s, s, 3)
        return normalize(tiles), size

    def video_frames(self, video) -> np.ndarray:
        """[F, H, W, 3] uint8 array or a list of frames -> [F, 3, S, S] (each frame resized to S x S)."""
        frames = [load_image(f).resize((self.tile, self.tile), Image.Resampling.BICUBIC) for f in video]
        if not frames:
            raise ProcessorError("a video has no frames")
        return normalize(np.stack([np.asarray(f) for f in frames]))

    # -- text -------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: list | None = None,
        videos: list | None = None,
        conversations: list | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, torch.Tensor]:
        """`text` (with `<image>` / `<video>` placeholders) or `conversations` (chat messages)."""
        if conversations is not None:
            texts = [
                self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                for c in conversations
            ]
        elif text is not None:
            texts = [text] if isinstance(text, str) else list(text)
        else:
            raise ProcessorError("give text or conversations")
        images, videos = list(images or []), list(videos or [])
        for token, items, kind in ((IMAGE_TOKEN, images, "image"), (VIDEO_TOKEN, videos, "video")):
            found = sum(t.count(token) for t in texts)
            if found != len(items):
                raise ProcessorError(f"the text has {found} {token} placeholders but {len(items)} {kind}s were given")

        out: dict[str, torch.Tensor] = {}
        image_counts, video_counts = [], []
        if images:
            tiles, sizes = zip(*(self.image_tiles(im) for im in images))
            most = max(t.shape[0] for t in tiles)
            batch = np.zeros((len(tiles), most, 3, self.tile, self.tile), dtype=np.float32)
            for i, t in enumerate(tiles):
                batch[i, : t.shape[0]] = t
            out["pixel_values"] = torch.from_numpy(batch)
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            image_counts = [vision.image_token_count(s, self.stage) for s in sizes]
        if videos:
            frames = [self.video_frames(v) for v in videos]
            if len({f.shape[0] for f in frames}) > 1:
                raise ProcessorError("all videos in a batch need the same number of frames")
            out["pixel_values_videos"] = torch.from_numpy(np.stack(frames))
            video_counts = [f.shape[0] for f in frames]

        expanded, blocks = [], []  # blocks: per row, list of block lengths per placeholder, in order
        image_iter, video_iter = iter(image_counts), iter(video_counts)
        for t in texts:
            pieces, row_blocks = [], []
            for part in _split_placeholders(t):
                if part == IMAGE_TOKEN:
                    count = next(image_iter)
                    pieces.append(IMAGE_TOKEN * count)
                    row_blocks.append([count])  # the whole image (and its newlines) is one block
                elif part == VIDEO_TOKEN:
                    num_frames = next(video_iter)
                    per_frame = vision.patches_per_side(self.stage) ** 2
                    pieces.append(VIDEO_TOKEN * vision.video_token_count(num_frames, self.stage))
                    row_blocks.append([per_frame] * num_frames + [1])  # one block per frame, newline alone
                else:
                    pieces.append(part)
            expanded.append("".join(pieces))
            blocks.append(row_blocks)

        encoded = self.tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        out["input_ids"], out["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        out["attention_start_ids"] = self.block_starts(out["input_ids"], blocks)
        return out

    def block_starts(self, input_ids: torch.Tensor, blocks: list[list[list[int]]]) -> torch.Tensor:
        """Own index for text; the first index of its block for every visual token."""
        starts = torch.arange(input_ids.shape[1]).repeat(input_ids.shape[0], 1)
        visual = visual_slots(self.config, input_ids)
        for row, row_blocks in enumerate(blocks):
            positions = visual[row].nonzero().flatten().tolist()
            cursor = 0
            for length in (n for placeholder in row_blocks for n in placeholder):
                block = positions[cursor : cursor + length]
                starts[row, block] = block[0]
                cursor += length
        return starts

    def process_prompt_for_generation(self, prompts: list[str], negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """The CFG batch for text-to-video: [negative prompt x P, prompts...], left padded.

        An empty negative prompt is a row of padding: its timestep token then attends only itself."""
        encoded = self.tokenizer(
            [negative_prompt] * len(prompts) + list(prompts),
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def _split_placeholders(text: str) -> list[str]:
    """'a <image> b' -> ['a ', '<image>', ' b'] (both placeholder kinds)."""
    parts, rest = [], text
    while rest:
        hits = [(rest.find(tok), tok) for tok in (IMAGE_TOKEN, VIDEO_TOKEN) if tok in rest]
        if not hits:
            parts.append(rest)
            break
        index, token = min(hits)
        if index:
            parts.append(rest[:index])
        parts.append(token)
        rest = rest[index + len(token) :]
    return parts
