"""One Triton kernel that stores a step's keys and values at their cache slots.

The plain-torch write (op.write_cache) is two index_copy_ calls on transposed views: two kernels per layer
of ~2.3 us each in a batch-1 decode step on an H200, latency, not bandwidth. Program (token, kv head)
copies that token's key row and value row into slot slot_mapping[token]; strides come from the tensors,
so HF's [1, Hkv, T, D] layout needs no transpose copy.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from hfrewrite.kernels.attention import triton as triton_attention

triton, tl = triton_attention.triton, triton_attention.tl


def _write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kh, stride_kt, stride_vh, stride_vt,
                  stride_kn, stride_kch, stride_vn, stride_vch, head_dim, value_dim,
                  D_PAD: tl.constexpr, DV_PAD: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    d = tl.arange(0, D_PAD)
    key = tl.load(k_ptr + head * stride_kh + token * stride_kt + d, mask=d < head_dim)
    tl.store(k_cache_ptr + slot * stride_kn + head * stride_kch + d, key, mask=d < head_dim)
    dv = tl.arange(0, DV_PAD)
    value = tl.load(v_ptr + head * stride_vh + token * stride_vt + dv, mask=dv < value_dim)
    tl.store(v_cache_ptr + slot * stride_vn + head * stride_vch + dv, value, mask=dv < value_dim)


@functools.cache
def _jitted(interpret: bool) -> Any:
    del interpret  # only part of the cache key (triton decides interpreted-or-compiled at jit time)
    return triton.jit(_write_kernel)


def write_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, interpret: bool = False) -> None:
    """Store k, v [1, Hkv, T, D] at slots [T] of caches [N, Hkv, D] (one launch for both)."""
    # a dtype change goes through torch (its rounding, exactly the plain write's); the kernel only copies
    kt, vt = k[0].to(k_cache.dtype), v[0].to(v_cache.dtype)   # [Hkv, T, D]
    if kt.stride(2) != 1:
        kt = kt.contiguous()
    if vt.stride(2) != 1:
        vt = vt.contiguous()
    kv_heads, tokens, head_dim = kt.shape
    if tokens == 0:
        return
    value_dim = vt.shape[2]
    _jitted(interpret)[(tokens, kv_heads)](
        kt, vt, k_cache, v_cache, slot_mapping, kt.stride(0), kt.stride(1), vt.stride(0), vt.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), head_dim, value_dim,
        D_PAD=triton.next_power_of_2(head_dim), DV_PAD=triton.next_power_of_2(value_dim), num_warps=1)
