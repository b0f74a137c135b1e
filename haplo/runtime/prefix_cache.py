"""Prompt prefixes whose KV cache is kept for the next request that begins with them.

A chat resends its whole history every turn, and many questions are asked about one image or video:
their prompts begin with the same tokens and the same media. After a prompt is prefilled, its cache
is kept at two cut points: after its last image or video block, and before its last token (the next
turn of a chat begins with the whole prompt). A later prompt that begins with a kept prefix (the same
token ids, equal media tensors, all of its media inside the prefix) is prefilled from that cache:
only its remaining tokens run through the stack, and its media is not encoded again.

A prefix's keys and values are those of the whole prompt's prefill cut at the prefix: a token never
attends to a later one (causal text; an image or video block is whole on one side of a cut, which
`cut_points` checks against the block starts), so a cut changes nothing but float rounding in the
matmuls of the remaining tokens. Entries leave least recently used first, within a byte budget.

    cache = PrefixCache(backend, 256 * 2**20)
    logits, state, reused = cache.prefill(inputs)     # in place of decoding.prefill for one prompt
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from haplo.model.sequence import visual_slots
from haplo.runtime.backend import Backend
from haplo.runtime.batching import kv_bytes_per_token, truncate
from haplo.runtime.decoding import DecodeState, forward_tokens, prefill

MEDIA_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos")


@dataclass
class Entry:
    tokens: torch.Tensor  # [prefix length] int64 ids on the host
    media: tuple[torch.Tensor | None, ...]  # the prompt's pixels, image sizes, videos (all inside the prefix)
    state: DecodeState  # the cache after the prefix, on the backend's device
    nbytes: int


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A request's own input on the host (the processor's tensors already are: no copy)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def media_of(inputs: dict) -> tuple[torch.Tensor | None, ...]:
    """A prompt's media inputs (pixels, image sizes, videos), None where it has none."""
    return tuple(v.detach() if isinstance(v := inputs.get(name), torch.Tensor) else None for name in MEDIA_INPUTS)


def same_media(a: tuple[torch.Tensor | None, ...], b: tuple[torch.Tensor | None, ...]) -> bool:
    """Equal pixels, sizes and videos (compared where they lie: no copy, no hash to collide)."""

    def equal(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is y or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))

    return all(equal(x, y) for x, y in zip(a, b))


def media_bytes(media: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in media if t is not None)


def media_end(backend: Backend, input_ids: torch.Tensor) -> int:
    """One past the last image or video placeholder of a [L] prompt (0 without media)."""
    slots = visual_slots(backend.config, input_ids).nonzero()
    return int(slots[-1]) + 1 if len(slots) else 0


def cut_points(backend: Backend, inputs: dict) -> list[int]:
    """Where a one-row, unpadded prompt's cache may be cut and kept: after its media, before its last
    token; a cut must not split a block of bidirectional attention (a key start before the cut at or
    after it)."""
    ids = _host(inputs["input_ids"][0])
    starts = inputs.get("attention_start_ids")
    cuts = sorted({c for c in (media_end(backend, ids), len(ids) - 1) if 0 < c < len(ids)})
    if starts is None:
        return cuts
    starts = _host(starts[0])
    return [c for c in cuts if bool((starts[c:] >= c).all())]


class PrefixCache:
    """Kept prompt prefixes of one backend, least recently used first out past `max_bytes`."""

    def __init__(self, backend: Backend, max_bytes: int) -> None:
        self.backend, self.max_bytes = backend, max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._keys = 0
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, inputs: dict) -> Entry | None:
        """The longest kept prefix that a one-row prompt begins with and that holds all its media."""
        ids, media = _host(inputs["input_ids"][0]), media_of(inputs)
        least, best = media_end(self.backend, ids), None
        for key, entry in self._entries.items():
            n = len(entry.tokens)
            if not (least <= n < len(ids)) or (best is not None and n <= len(best[1].tokens)):
                continue
            if torch.equal(ids[:n], entry.tokens) and same_media(entry.media, media):
                best = (key, entry)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return best[1]

    def keep(self, inputs: dict, state: DecodeState) -> None:
        """Keep the prompt's cache at its cut points (a prefilled one-row `state`) within the budget."""
        ids, media = _host(inputs["input_ids"][0]), media_of(inputs)
        for cut in cut_points(self.backend, inputs):
            nbytes = cut * kv_bytes_per_token(self.backend) + media_bytes(media)
            if nbytes > self.max_bytes or self._holds(ids[:cut], media):
                continue
            while self.bytes + nbytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1].nbytes
            self._keys += 1
            self._entries[self._keys] = Entry(ids[:cut].clone(), media, truncate(self.backend, state, cut), nbytes)
            self.bytes += nbytes

    def _holds(self, tokens: torch.Tensor, media: tuple) -> bool:
        return any(torch.equal(e.tokens, tokens) and same_media(e.media, media) for e in self._entries.values())

    def prefill(self, inputs: dict) -> tuple[torch.Tensor, DecodeState, int]:
        """`decoding.prefill` of one unpadded prompt through the longest kept prefix it begins with:
        (next-token logits [1, vocab], the state to decode from, prompt tokens reused)."""
        mask = inputs.get("attention_mask")
        if inputs["input_ids"].shape[0] != 1 or (mask is not None and not bool(mask.all())):
            logits, state = prefill(self.backend, inputs)
            return logits, state, 0
        entry = self.lookup(inputs)
        if entry is None:
            self.misses += 1
            logits, state = prefill(self.backend, inputs)
            self.keep(inputs, state)
            return logits, state, 0
        self.hits += 1
        n = len(entry.tokens)
        self.reused_tokens += n
        logits, state = self._resume(inputs, entry, n)
        self.keep(inputs, state)
        return logits, state, n

    def _resume(self, inputs: dict, entry: Entry, n: int) -> tuple[torch.Tensor, DecodeState]:
        """The prompt's tokens after the kept prefix (text only: the media is inside it)."""
        device = self.backend.device
        ids = inputs["input_ids"][:, n:].to(device)
        starts = inputs.get("attention_start_ids")
        starts = None if starts is None else starts[:, n:].to(device)
        embeds = self.backend.embed_text(ids)
        return forward_tokens(self.backend, embeds, torch.ones_like(ids), starts, entry.state)
