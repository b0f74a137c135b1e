"""Triton kernels for the two HaploOmni operators, and launchers with `haplo.model.ops` signatures.

Both kernels take their tensor inputs first, then int32 scalars, then their outputs: the argument
order TensorRT's AOT plugins launch with (inputs, extra scalar args, outputs), so the same kernel
serves the TensorRT plugin (PTX compiled ahead of time, engines/plugins/aot.py), a Python launch on
a GPU, and the Triton interpreter on CPU (`TRITON_INTERPRET=1`, set before triton is imported).
Tensors are contiguous (TensorRT's LINEAR format); offsets are computed from the shapes. All
arithmetic is fp32; outputs are stored in the input dtype.

multimodal_adaln_kernel: ROWS token rows [H] per program: norm, switch, modulation, in one pass
    over each row (the rows live in registers: BLOCK_H = next power of two >= H, H a compile-time
    constant, so row offsets are known multiples and the loads vectorise); the program reads the
    parameter vectors once for its ROWS rows. Small widths take several rows per program (`adaln_rows`).

hybrid_attention_kernel: flash attention with the block-start predicate evaluated per tile
    (key j visible to query row r iff key_start[b, j] <= Lk - Lq + r), never an Lq x Lk mask.
    GQA packing: one program serves the `groups` query heads that share a KV head, so K/V tiles are
    read once per KV head (the decode step with Lq = 1 reads the cache `groups` times less). In
    the [B, Hq, Lq, D] layout the rows of those heads are contiguous: packed row i is head
    kv_head * groups + i // Lq, position i % Lq. A row that sees no key outputs zeros. A program sweeps
    only the key tiles from the first to the last that one of its rows sees (`_seen_tiles`: a batch
    row's left padding and the keys after a causal query tile are not read), with no branch inside
    the sweep, so its K/V loads stay pipelined.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from haplo.model import ops

# Kernel globals must be constexpr.
MASKED_START = tl.constexpr(ops.MASKED_START)  # never visible
LOG2E = tl.constexpr(1.4426950408889634)

# Tile configurations of the attention kernel, by TensorRT tactic number (tactic 0 = default = 1).
# (BLOCK_M packed query rows, BLOCK_N keys, num_warps, num_stages)
ATTENTION_TILES = {
    1: (64, 64, 4, 2),  # prefill: many query rows
    2: (16, 128, 4, 2),  # decode: Lq * groups small, long key sweep
}


@triton.jit
def _row_vector(ptr, cols, valid):
    """[1, BLOCK_H] fp32: one parameter row, broadcast over the program's token rows."""
    return tl.load(ptr + cols, mask=valid, other=0.0).to(tl.float32)[None, :]


@triton.jit
def multimodal_adaln_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    indicator_weight_ptr,
    indicator_bias_ptr,
    ssg_l_ptr,
    ssg_c_ptr,
    rows,
    out_ptr,
    gate_ptr,
    EPS: tl.constexpr,
    LAYERNORM: tl.constexpr,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
):
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_H)
    valid = cols < HIDDEN
    mask = (row_ids < rows)[:, None] & valid[None, :]  # [ROWS, BLOCK_H]
    offsets = row_ids[:, None] * HIDDEN + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if LAYERNORM:
        centred = tl.where(mask, x - (tl.sum(x, axis=1) / HIDDEN)[:, None], 0.0)
    else:
        centred = x
    unit = centred * tl.rsqrt(tl.sum(centred * centred, axis=1) / HIDDEN + EPS)[:, None]
    if LAYERNORM:
        normed = unit * _row_vector(weight_ptr, cols, valid) + _row_vector(bias_ptr, cols, valid)
        switch_in = x  # layernorm mode: the switch reads the raw input
    else:
        normed = unit * _row_vector(weight_ptr, cols, valid)
        switch_in = unit  # rmsnorm mode: the normalised input without the weight

    act = switch_in * tl.sigmoid(switch_in)  # silu; padded columns are silu(0) = 0
    logit_latent = tl.sum(act * _row_vector(indicator_weight_ptr, cols, valid), axis=1)
    logit_condition = tl.sum(act * _row_vector(indicator_weight_ptr + HIDDEN, cols, valid), axis=1)
    logit_latent += tl.load(indicator_bias_ptr).to(tl.float32)
    logit_condition += tl.load(indicator_bias_ptr + 1).to(tl.float32)
    # softmax over two logits; each weight from its own sigmoid keeps a tiny weight exact
    p_latent = tl.sigmoid(logit_latent - logit_condition)[:, None]
    p_condition = tl.sigmoid(logit_condition - logit_latent)[:, None]

    # ssg_* rows: shift, scale, gate
    shift = p_latent * _row_vector(ssg_l_ptr, cols, valid) + p_condition * _row_vector(ssg_c_ptr, cols, valid)
    scale = p_latent * _row_vector(ssg_l_ptr + HIDDEN, cols, valid) + p_condition * _row_vector(
        ssg_c_ptr + HIDDEN, cols, valid
    )
    gate = p_latent * _row_vector(ssg_l_ptr + 2 * HIDDEN, cols, valid) + p_condition * _row_vector(
        ssg_c_ptr + 2 * HIDDEN, cols, valid
    )
    out = normed * (1.0 + scale) + shift
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(gate_ptr + offsets, gate.to(gate_ptr.dtype.element_ty), mask=mask)


@triton.jit
def hybrid_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_start_ptr,
    q_len,
    k_len,
    q_heads,
    kv_heads,
    out_ptr,
    SCALE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    batch_kv = tl.program_id(1)  # batch * kv_heads + kv_head
    batch = batch_kv // kv_heads
    groups = q_heads // kv_heads
    packed_rows = groups * q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head in group, position) rows
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < packed_rows
    dim_valid = dims < HEAD_DIM
    q_pos = k_len - q_len + rows % q_len  # absolute position of each query row

    # [B, Hq, Lq, D]: the group's rows start at head kv_head * groups, i.e. row batch_kv * groups * Lq
    q_offsets = (batch_kv.to(tl.int64) * packed_rows + rows)[:, None] * HEAD_DIM + dims[None, :]
    io_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + q_offsets, mask=io_mask, other=0.0)
    kv_base = batch_kv.to(tl.int64) * k_len * HEAD_DIM
    starts_base = batch.to(tl.int64) * k_len

    last_pos = tl.max(tl.where(row_valid, q_pos, -1), axis=0)  # the program's last query position
    first, end = _seen_tiles(key_start_ptr + starts_base, k_len, last_pos, BLOCK_N)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for first_key in range(first, end, BLOCK_N):
        keys = first_key + tl.arange(0, BLOCK_N)
        key_valid = keys < k_len
        starts = tl.load(key_start_ptr + starts_base + keys, mask=key_valid, other=MASKED_START)
        visible = starts[None, :] <= q_pos[:, None]  # [BLOCK_M, BLOCK_N]: the block-start predicate

        k = tl.load(
            k_ptr + kv_base + keys[None, :] * HEAD_DIM + dims[:, None],
            mask=key_valid[None, :] & dim_valid[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k) * (SCALE * LOG2E)  # base-2 logits
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # rows with nothing visible so far keep max -inf; subtract 0 there so exp2 gives 0, not NaN
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        v = tl.load(
            v_ptr + kv_base + keys[:, None] * HEAD_DIM + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        row_max = new_max

    out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]  # row_sum == 0: acc is 0 -> zeros
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _seen_tiles(starts_ptr, k_len, last_pos, BLOCK_N: tl.constexpr):
    """(first key, end) of the key tiles holding a key some query up to `last_pos` sees: the sweep
    leaves out a batch row's left padding and the keys after a causal query tile, reading only the
    block starts (8 bytes a key against the 2 x D elements of K and V)."""
    first = k_len
    end = 0
    for first_key in range(0, k_len, BLOCK_N):
        keys = first_key + tl.arange(0, BLOCK_N)
        starts = tl.load(starts_ptr + keys, mask=keys < k_len, other=MASKED_START)
        seen = tl.min(starts, axis=0) <= last_pos
        first = tl.where(seen & (first_key < first), first_key, first)
        end = tl.where(seen, first_key + BLOCK_N, end)
    return first, end


# -- launch helpers shared with the AOT step ---------------------------------------------------------


def adaln_block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


ADALN_TILE = 4096  # row elements one AdaLN program holds: several narrow rows, or one wide row


def adaln_rows(hidden: int) -> int:
    """Token rows per AdaLN program: as many as fill ADALN_TILE (16 at hidden <= 256, 1 from 4096)."""
    return max(1, min(16, ADALN_TILE // adaln_block(hidden)))


def adaln_warps(hidden: int) -> int:
    """Warps per program: about 8 fp32 values per thread (4 warps up to 1024 elements, 16 at 4096)."""
    return min(16, max(4, adaln_rows(hidden) * adaln_block(hidden) // 256))


def attention_block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16 on tensor cores


# Shared memory one block may use without the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize):
# TensorRT's KernelLaunchParams carries grid, block and shared_mem only, so AOT kernels stay within it.
SHARED_BUDGET = 48 << 10


def attention_tiles(tactic: int, fp32: bool, head_dim: int = 64, shrink: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a tactic for a head size. fp32 runs one pipeline
    stage; the tiles halve (the larger first) until the shared memory they need, estimated as
    (BLOCK_M + BLOCK_N + 40) rows of BLOCK_D elements, fits `SHARED_BUDGET` (fp32 at head size 128),
    then `shrink` times more (the AOT step's retry when the compiled kernel, its K/V loads pipelined
    over the stages, needs more than the estimate)."""
    block_m, block_n, warps, stages = ATTENTION_TILES[tactic]
    row_bytes = attention_block_d(head_dim) * (4 if fp32 else 2)
    while (block_m + block_n + 40) * row_bytes > SHARED_BUDGET and max(block_m, block_n) > 16:
        block_m, block_n = _halve(block_m, block_n)
    for _ in range(shrink):
        if max(block_m, block_n) > 16:
            block_m, block_n = _halve(block_m, block_n)
    return block_m, block_n, warps, 1 if fp32 else stages


def _halve(block_m: int, block_n: int) -> tuple[int, int]:
    return (block_m, block_n // 2) if block_n >= block_m else (block_m // 2, block_n)


def attention_tactic(query_rows: int) -> int:
    """The tile configuration a Python launch uses: decode tiles for a few packed rows."""
    return 2 if query_rows <= 16 else 1


# -- launchers (haplo.model.ops signatures) ------------------------------------------------------------------


def multimodal_adaln(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    bias: torch.Tensor | None,  # [H], layernorm mode only
    indicator_weight: torch.Tensor,  # [2, H]
    indicator_bias: torch.Tensor,  # [2]
    ssg_l: torch.Tensor,  # [3, H]
    ssg_c: torch.Tensor,  # [3, H]
    eps: float,
    mode: str = "rmsnorm",
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`haplo.model.ops.reference_multimodal_adaln` on the Triton kernel. Returns (modulated, gate), both like x.

    `outputs`: contiguous tensors like x to write into (a plugin's output buffers).
    """
    if mode not in ("rmsnorm", "layernorm"):
        raise ValueError(f"unknown norm mode {mode!r}")
    hidden = x.shape[-1]
    x = x.contiguous()
    bias = torch.zeros_like(weight) if bias is None else bias
    params = [p.to(x.dtype).contiguous() for p in (weight, bias, indicator_weight, indicator_bias, ssg_l, ssg_c)]
    out, gate = outputs if outputs is not None else (torch.empty_like(x), torch.empty_like(x))
    rows = x.numel() // hidden
    if rows:
        multimodal_adaln_kernel[(triton.cdiv(rows, adaln_rows(hidden)),)](
            x,
            *params,
            rows,
            out,
            gate,
            EPS=float(eps),
            LAYERNORM=mode == "layernorm",
            HIDDEN=hidden,
            BLOCK_H=adaln_block(hidden),
            ROWS=adaln_rows(hidden),
            num_warps=adaln_warps(hidden),
        )
    return out, gate


def hybrid_attention(
    query: torch.Tensor,  # [B, Hq, Lq, D]
    key: torch.Tensor,  # [B, Hkv, Lk, D]
    value: torch.Tensor,  # [B, Hkv, Lk, D]
    key_start: torch.Tensor,  # [B, Lk] integer
    scale: float | None = None,
    tactic: int | None = None,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """`haplo.model.ops.reference_hybrid_attention` on the Triton kernel. Returns [B, Hq, Lq, D].

    `tactic`: a key of ATTENTION_TILES (default: by the number of packed query rows); `output`: a
    contiguous tensor like query to write into.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot share {kv_heads} KV heads")
    if q_len > k_len:
        raise ValueError(f"query length {q_len} exceeds key length {k_len}: queries are the last keys")
    scale = head_dim**-0.5 if scale is None else float(scale)
    query, key, value, key_start = (t.contiguous() for t in (query, key, value, key_start))
    out = torch.empty_like(query) if output is None else output
    packed_rows = q_heads // kv_heads * q_len
    block_m, block_n, warps, stages = attention_tiles(
        tactic or attention_tactic(packed_rows), query.dtype == torch.float32, head_dim
    )
    grid = (triton.cdiv(packed_rows, block_m), batch * kv_heads)
    if out.numel():
        hybrid_attention_kernel[grid](
            query,
            key,
            value,
            key_start,
            q_len,
            k_len,
            q_heads,
            kv_heads,
            out,
            SCALE=scale,
            HEAD_DIM=head_dim,
            BLOCK_D=attention_block_d(head_dim),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
            num_stages=stages,
        )
    return out


OPERATORS = "triton"
ops.register(OPERATORS, ops.Operators(multimodal_adaln, hybrid_attention))


def routed_to_triton() -> contextlib.AbstractContextManager:
    """While active, the PyTorch model's operator calls run on these kernels (inference only)."""
    return ops.using(OPERATORS)
