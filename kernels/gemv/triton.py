"""A Triton kernel for linears over a few rows (decode steps of 1 to 8 sequences): y = x @ W^T (+ b).

At batch 1 a decode step is a chain of matrix-vector products that should stream every weight once at the
copy bandwidth. cuBLAS picks tiles for these shapes that leave much of it unused on the 8-30 MB weights of a
1B-parameter model (q/k/v and o projections at ~1.8 TB/s of the H200's ~4.3, measured). Here program p owns
BLOCK_N output features: it streams their weight rows [BLOCK_N, K] in BLOCK_K slices, once, and multiplies
each slice with all M (<= 8) input rows, accumulating in fp32. Small BLOCK_N gives enough programs to keep
every SM's memory pipeline full even for N = 2048; no split over K, so no second reduction kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from hfrewrite.kernels.attention import triton as triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

MAX_ROWS = 8


def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    m_ok = m < M
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    x_ptrs = x_ptr + m[:, None] * stride_xm + k[None, :]
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k) < K
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _jitted(interpret: bool) -> Any:
    del interpret  # only part of the cache key (triton decides interpreted-or-compiled at jit time)
    return triton.jit(_gemv_kernel)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def rows_padded(m: int) -> int:
    return max(2, triton.next_power_of_2(m))


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """Tiles from the H200 sweep (bench/bench_gemv.py): wide K slices, few output rows per program."""
    del n
    block_k = min(512, triton.next_power_of_2(k))
    block_n = 16 if rows_padded(m) <= 2 else 8
    return GemvConfig(block_n, block_k, 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, interpret: bool = False) -> torch.Tensor:
    """x [M, K] (M <= 8, unit stride in K) times weight [N, K] (contiguous) transposed, plus bias [N]."""
    m, k = x.shape
    n = weight.shape[0]
    config = config or default_config(m, n, k)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n),)
    _jitted(interpret)[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        M_PAD=rows_padded(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_BIAS=bias is not None,
        num_warps=config.num_warps)
    return out
