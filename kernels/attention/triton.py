"""Triton paged attention: a decode kernel (split over the context, GQA groups share K/V loads) and a
variable-length prefill / mixed kernel, both reading the block-paged cache through block tables.

The metadata format is the one documented in op.py. Neither launcher syncs the device: every grid size
comes from tensor shapes (batch, tokens, block-table width), never from tensor values, so the calls can
be captured in CUDA graphs. Scores are kept in base 2 (exp2) with fp32 accumulation; padded head-dim
lanes and key rows are masked, so any head dim (80, 96, ...) works.

Decode (one query per sequence, T == S): program (sequence, kv head, split) loads each K/V tile once for
the `group` query heads of its KV head; with several splits each writes a partial (max, sum, acc) and a
second kernel merges them (flash-decoding), adding the attention sink to the denominator there.
Prefill / mixed: program (query tile, kv head), where a tile is BLOCK_Q tokens x group heads of one
sequence. Sequence s owns tiles [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1), an upper bound that
needs no host count; a program finds its sequence by binary search over query_start_loc and exits if its
tile lies past the sequence's queries.
ALiBi (bloom, mpt, falcon alibi=True) is a compile-time variant of both (USE_ALIBI): slope[h] * (key -
query position) added to the scaled scores, the slopes read from a per-head float32 vector.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the op keeps to the reference
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, block_size_ptr, sinks_ptr, alibi_ptr,
                   out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                   stride_qh, stride_qt, stride_kn, stride_kh, stride_vn, stride_vh, stride_bt, stride_ot, stride_oh,
                   scale, softcap, window, num_splits, num_heads, group, head_dim, value_dim,
                   G_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
                   USE_ALIBI: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    block_size = tl.load(block_size_ptr)
    lanes = tl.arange(0, G_PAD)
    heads = kv_head * group + lanes
    head_ok = lanes < group
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + heads[:, None] * stride_qh + seq * stride_qt + d[None, :],
                mask=head_ok[:, None] & (d[None, :] < head_dim), other=0.0)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    if USE_ALIBI:  # slope[h] * (key - query position); the query sits at seq_len - 1
        slope = tl.load(alibi_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(tables_ptr + seq * stride_bt + pos // block_size, mask=valid, other=0)
        slot = page.to(tl.int64) * block_size + pos % block_size
        k = tl.load(k_cache_ptr + slot[:, None] * stride_kn + kv_head * stride_kh + d[None, :],
                    mask=valid[:, None] & (d[None, :] < head_dim), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
        if USE_SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap * tanh(s / softcap)
        if USE_ALIBI:
            s = s + slope[:, None] * (pos - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] * stride_vn + kv_head * stride_vh + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < value_dim), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
    if SPLIT:
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + row, m, mask=head_ok)
        tl.store(part_l_ptr + row, total, mask=head_ok)
        tl.store(part_acc_ptr + row[:, None] * DV_PAD + dv[None, :], acc, mask=head_ok[:, None])
    else:
        if USE_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            top = tl.maximum(m, sink)
            total = total * tl.exp2(m - top) + tl.exp2(sink - top)
            acc = acc * tl.exp2(m - top)[:, None]
        out = acc / total[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=head_ok[:, None] & (dv[None, :] < value_dim))


def _reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, sinks_ptr, out_ptr, stride_ot, stride_oh, num_splits,
                   num_heads, value_dim, SPLITS_PAD: tl.constexpr, DV_PAD: tl.constexpr, USE_SINKS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    ok = splits < num_splits
    row = (seq * num_heads + head) * num_splits + splits
    m = tl.load(part_m_ptr + row, mask=ok, other=float("-inf"))
    part = tl.load(part_l_ptr + row, mask=ok, other=0.0)
    top = tl.max(m, 0)  # split 0 always holds keys, so top is finite
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(top, sink)
    weight = tl.exp2(m - top)
    total = tl.sum(part * weight, 0)
    if USE_SINKS:
        total += tl.exp2(sink - top)
    dv = tl.arange(0, DV_PAD)
    acc = tl.load(part_acc_ptr + row[:, None] * DV_PAD + dv[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < value_dim)


def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, block_size_ptr, sinks_ptr,
                    alibi_ptr, key_limit_ptr,
                    out_ptr, stride_qh, stride_qt, stride_kn, stride_kh, stride_vn, stride_vh, stride_bt, stride_ot,
                    stride_oh, scale, softcap, window, num_seqs, group, head_dim, value_dim,
                    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                    USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr, IEEE: tl.constexpr,
                    USE_KEY_LIMIT: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # the sequence owning this tile: the last s with qsl[s] // BLOCK_Q + s <= tile
    lo = tile * 0  # loop-carried values must start as tensors, not constants
    hi = lo + num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        below = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    seq = lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    block_size = tl.load(block_size_ptr)
    context = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    local = first + rows // group
    heads = kv_head * group + rows % group
    row_ok = (rows < BLOCK_Q * group) & (local < q_len)
    q_pos = context + local
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + heads[:, None] * stride_qh + (q_start + local)[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < head_dim), other=0.0)
    k_lo = 0
    if USE_WINDOW:
        k_lo = tl.maximum(context + first - window + 1, 0)
    k_hi = seq_len
    if CAUSAL:
        k_hi = tl.minimum(seq_len, context + tl.minimum(first + BLOCK_Q, q_len))
    if USE_KEY_LIMIT:  # each query's own key end (an image token: its image's end), never past the context
        limit = tl.load(key_limit_ptr + q_start + local, mask=row_ok, other=0)
        k_hi = tl.minimum(seq_len, tl.max(limit, 0))
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if USE_ALIBI:  # slope[h] * (key - query position)
        slope = tl.load(alibi_ptr + heads, mask=row_ok, other=0.0).to(tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < k_hi
        page = tl.load(tables_ptr + seq * stride_bt + pos // block_size, mask=valid, other=0)
        slot = page.to(tl.int64) * block_size + pos % block_size
        k = tl.load(k_cache_ptr + slot[:, None] * stride_kn + kv_head * stride_kh + d[None, :],
                    mask=valid[:, None] & (d[None, :] < head_dim), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
        if USE_SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap * tanh(s / softcap)
        if USE_ALIBI:
            s = s + slope[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
        keep = valid[None, :] & row_ok[:, None]
        if USE_KEY_LIMIT:  # in place of causal's k <= q; the window below still counts back from the query
            keep = keep & (pos[None, :] < limit[:, None])
        elif CAUSAL:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:  # HF: causal keeps q - k < window, bidirectional (masking_utils) |q - k| < window
            keep = keep & (q_pos[:, None] - pos[None, :] < window)
            if not CAUSAL:
                keep = keep & (pos[None, :] - q_pos[:, None] < window)
        s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] * stride_vn + kv_head * stride_vh + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < value_dim), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
    if USE_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(m, sink)
        total = total * tl.exp2(m - top) + tl.exp2(sink - top)
        acc = acc * tl.exp2(m - top)[:, None]
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + (q_start + local)[:, None] * stride_ot + heads[:, None] * stride_oh + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < value_dim))


@functools.cache
def _jitted(interpret: bool) -> tuple[Any, Any, Any]:
    """Jit on first use, keyed by the interpreter flag (triton decides interpreted-or-compiled at jit time)."""
    del interpret  # only part of the cache key
    return triton.jit(_decode_kernel), triton.jit(_reduce_kernel), triton.jit(_prefill_kernel)


@functools.cache
def _processor_count(device: torch.device) -> int:
    """Streaming multiprocessors (or the device's equivalent) of `device`; 4 where it has none (interpreter)."""
    if device.type == "cpu":
        return 4
    properties = torch.get_device_module(device).get_device_properties(device)
    return int(getattr(properties, "multi_processor_count", 0) or 4)


def decode_splits(sequences: int, kv_heads: int, table_width: int, processors: int, min_blocks: int = 8) -> int:
    """How many pieces to split each sequence's context into: enough programs to fill the device 4 times over,
    never pieces of fewer than `min_blocks` cache blocks (the block size lives on the device, the width of
    the block table is a shape). From shapes only, so a captured graph keeps one value; each piece's length
    is then computed on the device from the sequence's actual length."""
    programs = max(sequences * kv_heads, 1)
    wanted = -(-4 * processors // programs)
    return max(1, min(wanted, -(-table_width // min_blocks), 64))


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: torch.Tensor,
                           scaling: float, sliding_window: int, softcap: float, causal: bool,
                           sinks: torch.Tensor | None, num_splits: int | None = None,
                           interpret: bool = False, alibi_slopes: torch.Tensor | None = None,
                           key_limit: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [1, H, T, D] over the (already written) paged cache -> [1, T, H, Dv].

    `alibi_slopes` [H] (float32, on q's device) adds slopes[h] * (key - query position) to the scaled
    scores (ALiBi; not with softcap or sinks, like the reference). `num_splits` overrides the decode split
    heuristic (tests); it has no effect on prefill / mixed steps. `key_limit` [T] int32 (causal): query t sees
    keys before key_limit[t] (the prefill kernel's USE_KEY_LIMIT variant; a decode step's one query per
    sequence is text, its limit its length, so the decode kernel needs none).
    """
    if triton is None:
        raise RuntimeError("paged_attention_triton needs triton installed")
    decode_kernel, reduce_kernel, prefill_kernel = _jitted(interpret)
    heads, tokens, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_heads, value_dim = k_cache.shape[1], v_cache.shape[2]
    sequences = seq_lens.shape[0]
    group = heads // kv_heads
    out = q.new_empty(1, tokens, heads, value_dim)
    if tokens == 0:
        return out
    qt = q[0]  # [H, T, D]
    if qt.stride(2) != 1:
        qt = qt.contiguous()
    if interpret and qt.dtype == torch.bfloat16:
        # triton 3.9's interpreter computes tl.dot of bf16 operands wrongly (garbage of order 1e8): interpreted
        # runs take the dots in fp32 from the same bf16 values (caches and output stay bf16)
        qt = qt.float()
    d_pad, dv_pad = _pad(head_dim), _pad(value_dim)
    ieee = q.dtype == torch.float32
    if alibi_slopes is not None and (softcap != 0.0 or sinks is not None):
        raise NotImplementedError("ALiBi attention with a softcap or sinks")
    if alibi_slopes is not None and alibi_slopes.shape != (heads,):
        raise ValueError(f"{tuple(alibi_slopes.shape)} ALiBi slopes for {heads} heads")
    sinks_arg = sinks if sinks is not None else seq_lens  # never read without USE_SINKS
    alibi_arg = alibi_slopes if alibi_slopes is not None else seq_lens  # never read without USE_ALIBI
    flags = dict(USE_SOFTCAP=softcap != 0.0, USE_WINDOW=sliding_window > 0, USE_SINKS=sinks is not None,
                 USE_ALIBI=alibi_slopes is not None, IEEE=ieee)
    large = max(d_pad, dv_pad) > 128
    stages = 2 if large else 3  # head dim 256 tiles (fp32 above all) overflow shared memory at 3 stages
    common = (qt.stride(0), qt.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
              block_tables.stride(0), out.stride(1), out.stride(2))
    if tokens == sequences:  # one query per sequence: decode
        if num_splits is None:
            num_splits = decode_splits(sequences, kv_heads, block_tables.shape[1], _processor_count(q.device))
        split = num_splits > 1
        if split:
            part_m = torch.empty(sequences, heads, num_splits, dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty(sequences, heads, num_splits, dv_pad, dtype=torch.float32, device=q.device)
        else:
            part_m = part_l = part_acc = out
        g_pad = _pad(group)
        decode_kernel[(sequences, kv_heads, num_splits)](
            qt, k_cache, v_cache, block_tables, seq_lens, block_size, sinks_arg, alibi_arg, out, part_m, part_l,
            part_acc,
            *common, scaling, softcap, sliding_window, num_splits, heads, group, head_dim, value_dim,
            G_PAD=g_pad, D_PAD=d_pad, DV_PAD=dv_pad, BLOCK_N=32 if large else 64, SPLIT=split, **flags,
            num_warps=4, num_stages=stages)
        if split:
            reduce_kernel[(sequences, heads)](
                part_m, part_l, part_acc, sinks_arg, out, out.stride(1), out.stride(2), num_splits, heads, value_dim,
                SPLITS_PAD=triton.next_power_of_2(num_splits), DV_PAD=dv_pad, USE_SINKS=sinks is not None,
                num_warps=4)
        return out
    block_m = max(16 if interpret else 32 if large and q.element_size() == 4 else 64, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (tokens // block_q + sequences, kv_heads)
    prefill_kernel[grid](
        qt, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, sinks_arg, alibi_arg,
        key_limit if key_limit is not None else seq_lens, out, *common,
        scaling, softcap, sliding_window, sequences, group, head_dim, value_dim,
        BLOCK_Q=block_q, BLOCK_M=block_m, D_PAD=d_pad, DV_PAD=dv_pad, BLOCK_N=32 if large else 64, CAUSAL=causal,
        **flags, USE_KEY_LIMIT=key_limit is not None, num_warps=8 if large else 4, num_stages=stages)
    return out
