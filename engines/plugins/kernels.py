"""Triton kernels for the two HaploOmni operators, and launchers with `haplo.model.ops` signatures.

Both kernels take their tensor inputs first, then int32 scalars, then their outputs: the argument
order TensorRT's AOT plugins launch with (inputs, extra scalar args, outputs), so the same kernel
serves the TensorRT plugin (PTX compiled ahead of time, engines/plugins/aot.py), a Python launch on
a GPU, and the Triton interpreter on CPU (`TRITON_INTERPRET=1`, set before triton is imported).
Tensors are contiguous (TensorRT's LINEAR format); offsets are computed from the shapes. All
arithmetic is fp32; outputs are stored in the input dtype.

multimodal_adaln_kernel: one program per token row [H]: norm, switch, modulation, in one pass
    over the row (the row lives in registers: BLOCK_H = next power of two >= H).

hybrid_attention_kernel: flash attention with the block-start predicate evaluated per tile
    (key j visible to query row r iff key_start[b, j] <= Lk - Lq + r), never an Lq x Lk mask.
    GQA packing: one program serves the `groups` query heads that share a KV head, so K/V tiles are
    read once per KV head (the decode step with Lq = 1 reads the cache `groups` times less). In
    the [B, Hq, Lq, D] layout the rows of those heads are contiguous: packed row i is head
    kv_head * groups + i // Lq, position i % Lq. A row that sees no key outputs zeros.
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
def multimodal_adaln_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    indicator_weight_ptr,
    indicator_bias_ptr,
    ssg_l_ptr,
    ssg_c_ptr,
    hidden,
    out_ptr,
    gate_ptr,
    EPS: tl.constexpr,
    LAYERNORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    valid = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    if LAYERNORM:
        centred = tl.where(valid, x - tl.sum(x, axis=0) / hidden, 0.0)
    else:
        centred = x
    unit = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / hidden + EPS)
    if LAYERNORM:
        normed = unit * weight + tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        switch_in = x  # layernorm mode: the switch reads the raw input
    else:
        normed = unit * weight
        switch_in = unit  # rmsnorm mode: the normalised input without the weight

    act = switch_in * tl.sigmoid(switch_in)  # silu; padded columns are silu(0) = 0
    w_latent = tl.load(indicator_weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    w_condition = tl.load(indicator_weight_ptr + hidden + cols, mask=valid, other=0.0).to(tl.float32)
    logit_latent = tl.sum(act * w_latent, axis=0) + tl.load(indicator_bias_ptr).to(tl.float32)
    logit_condition = tl.sum(act * w_condition, axis=0) + tl.load(indicator_bias_ptr + 1).to(tl.float32)
    # softmax over two logits; each weight from its own sigmoid keeps a tiny weight exact
    p_latent = tl.sigmoid(logit_latent - logit_condition)
    p_condition = tl.sigmoid(logit_condition - logit_latent)

    # ssg_* rows: shift, scale, gate
    shift = p_latent * tl.load(ssg_l_ptr + cols, mask=valid, other=0.0).to(tl.float32) + p_condition * tl.load(
        ssg_c_ptr + cols, mask=valid, other=0.0
    ).to(tl.float32)
    scale = p_latent * tl.load(ssg_l_ptr + hidden + cols, mask=valid, other=0.0).to(tl.float32) + p_condition * tl.load(
        ssg_c_ptr + hidden + cols, mask=valid, other=0.0
    ).to(tl.float32)
    gate = p_latent * tl.load(ssg_l_ptr + 2 * hidden + cols, mask=valid, other=0.0).to(
        tl.float32
    ) + p_condition * tl.load(ssg_c_ptr + 2 * hidden + cols, mask=valid, other=0.0).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(gate_ptr + row * hidden + cols, gate.to(gate_ptr.dtype.element_ty), mask=valid)


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

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for first_key in range(0, k_len, BLOCK_N):
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


# -- launch helpers shared with the AOT step ---------------------------------------------------------


def adaln_block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


def adaln_warps(hidden: int) -> int:
    """Warps per row: about 8 fp32 values of the row per thread (4 warps up to 1024, 16 at 4096)."""
    return min(16, max(4, adaln_block(hidden) // 256))


def attention_block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16 on tensor cores


# Shared memory one block may use without the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize):
# TensorRT's KernelLaunchParams carries grid, block and shared_mem only, so AOT kernels stay within it.
SHARED_BUDGET = 48 << 10


def attention_tiles(tactic: int, fp32: bool, head_dim: int = 64) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a tactic for a head size. fp32 runs one pipeline
    stage; the tiles halve (the larger first) until the shared memory they need, estimated as
    (BLOCK_M + BLOCK_N + 40) rows of BLOCK_D elements, fits `SHARED_BUDGET` (fp32 at head size 128)."""
    block_m, block_n, warps, stages = ATTENTION_TILES[tactic]
    row_bytes = attention_block_d(head_dim) * (4 if fp32 else 2)
    while (block_m + block_n + 40) * row_bytes > SHARED_BUDGET and max(block_m, block_n) > 16:
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2
    return block_m, block_n, warps, 1 if fp32 else stages


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
        multimodal_adaln_kernel[(rows,)](
            x,
            *params,
            hidden,
            out,
            gate,
            EPS=float(eps),
            LAYERNORM=mode == "layernorm",
            BLOCK_H=adaln_block(hidden),
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
