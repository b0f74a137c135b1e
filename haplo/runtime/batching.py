"""Row operations on decode states, so requests of different lengths share one batch.

A running batch keeps one `DecodeState` whose caches are [B, Hkv, L, D] per layer and whose key starts
are [B, L] absolute slots. Rows of different lengths are aligned by left padding: the padding slots get
zero keys and values and `MASKED_START`, so nobody ever attends them, and every real key start moves
right by the padding. RoPE positions (`next_position`) count real tokens only, so they do not change.
Caches cross the backend's native form through `Backend.cache_tensors` / `cache_from_tensors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haplo.model.config import STAGES
from haplo.model.ops import MASKED_START
from haplo.runtime.backend import Backend
from haplo.runtime.decoding import DecodeState, decode_step


def _shift(key_start: torch.Tensor, by: int) -> torch.Tensor:
    """Real key starts moved by `by` slots; masked ones stay masked."""
    return torch.where(key_start < MASKED_START, key_start + by, key_start)


def pad_left(tensors: list[torch.Tensor], key_start: torch.Tensor, slots: int):
    """`slots` never-visible slots before every row: (caches, key_start)."""
    if slots == 0:
        return tensors, key_start
    padded = [F.pad(t, (0, 0, slots, 0)) for t in tensors]  # [B, Hkv, L, D] -> [B, Hkv, slots + L, D]
    masked = torch.full((key_start.shape[0], slots), MASKED_START, dtype=key_start.dtype, device=key_start.device)
    return padded, torch.cat([masked, _shift(key_start, slots)], dim=1)


def trim_left(tensors: list[torch.Tensor], key_start: torch.Tensor):
    """Drop the leading slots that are padding in every row: (caches, key_start)."""
    real = (key_start < MASKED_START).any(0).nonzero()
    slots = int(real[0]) if len(real) else key_start.shape[1]
    if slots == 0:
        return tensors, key_start
    return [t[:, :, slots:] for t in tensors], _shift(key_start[:, slots:], -slots)


def _unpack(backend: Backend, state: DecodeState) -> dict[str, list[torch.Tensor]]:
    return {stage: backend.cache_tensors(state.past[stage]) for stage in STAGES}


def _pack(backend: Backend, caches: dict, key_start: torch.Tensor, next_position: torch.Tensor) -> DecodeState:
    past = {stage: backend.cache_from_tensors(caches[stage]) for stage in STAGES}
    return DecodeState(past, key_start, next_position)


def merge(backend: Backend, states: list[DecodeState]) -> DecodeState:
    """One state holding every row of `states`, in order, aligned to the longest by left padding."""
    if len(states) == 1:
        return states[0]
    length = max(s.length for s in states)
    caches: dict[str, list[list[torch.Tensor]]] = {stage: [] for stage in STAGES}
    starts = []
    for state in states:
        unpacked = _unpack(backend, state)
        assert state.key_start is not None
        for stage in STAGES:
            padded, key_start = pad_left(unpacked[stage], state.key_start, length - state.length)
            caches[stage].append(padded)
        starts.append(key_start)
    joined = {stage: [torch.cat(parts) for parts in zip(*caches[stage])] for stage in STAGES}
    next_position = torch.cat([s.next_position for s in states if s.next_position is not None])
    return _pack(backend, joined, torch.cat(starts), next_position)


def select(backend: Backend, state: DecodeState, rows: list[int]) -> DecodeState:
    """Only `rows` of `state` (in that order), with the slots padding in all of them dropped."""
    assert state.key_start is not None and state.next_position is not None
    index = torch.tensor(rows, dtype=torch.long, device=state.key_start.device)
    key_start = state.key_start[index]
    caches = {}
    for stage, tensors in _unpack(backend, state).items():
        caches[stage], trimmed = trim_left([t[index.to(t.device)] for t in tensors], key_start)
    return _pack(backend, caches, trimmed, state.next_position[index])


def truncate(backend: Backend, state: DecodeState, length: int) -> DecodeState:
    """The first `length` slots of every row of `state`, in storage of their own (a kept prefix)."""
    assert state.key_start is not None and state.next_position is not None
    caches = {stage: [t[:, :, :length].clone() for t in ts] for stage, ts in _unpack(backend, state).items()}
    return _pack(backend, caches, state.key_start[:, :length].clone(), state.next_position - (state.length - length))


def cache_bytes(backend: Backend, state: DecodeState) -> int:
    """Bytes the state's KV cache holds."""
    rows = 0 if state.key_start is None else state.key_start.shape[0]
    return rows * state.length * kv_bytes_per_token(backend)


def kv_bytes_per_token(backend: Backend) -> int:
    """KV-cache bytes of one token of one row, over every layer of every stage."""
    total = 0
    for stage in STAGES:
        cfg = backend.config.stages[stage]
        total += 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * backend.cache_element_size
    return total


class PaddedBatch:
    """The running decode batch of any backend: one `DecodeState`, rows aligned by left padding.

    The scheduler's batch protocol (a backend may give its own through `Backend.decode_batch`):
    `add` a prefilled one-row state, `keep` rows, `step` one token per row (-> logits [rows, vocab]),
    `rows`, `length` (cache slots per row), `cache_bytes`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.state = DecodeState()

    @property
    def rows(self) -> int:
        return 0 if self.state.key_start is None else self.state.key_start.shape[0]

    @property
    def length(self) -> int:
        return self.state.length

    def cache_bytes(self) -> int:
        return cache_bytes(self.backend, self.state)

    def add(self, state: DecodeState) -> None:
        self.state = state if not self.rows else merge(self.backend, [self.state, state])

    def keep(self, rows: list[int]) -> None:
        self.state = select(self.backend, self.state, rows) if rows else DecodeState()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.state = decode_step(self.backend, tokens, self.state)
        return logits
