"""The one-launch cache write equals the plain-torch write (op.write_cache) for HF's strided K/V layout, any head
dims, a cache dtype other than the inputs', and slots anywhere in the cache; other slots stay untouched."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention import op
from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.kernels.attention.cache_write import write_cache_triton

ON_GPU = torch.accelerator.is_available() and not op.interpreting()
needs_kernels = pytest.mark.skipif(not (triton_attention.available() and (ON_GPU or op.interpreting())),
                                   reason="needs a GPU or TRITON_INTERPRET=1")


@needs_kernels
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(1, 9), kv_heads=st.integers(1, 3),
       dims=st.sampled_from([(16, 16), (64, 64), (80, 48)]),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                               (torch.bfloat16, torch.bfloat16)]))
def test_cache_write_equals_the_torch_write(seed: int, tokens: int, kv_heads: int, dims: tuple[int, int],
                                           dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    device = torch.accelerator.current_accelerator() if ON_GPU else torch.device("cpu")
    head_dim, value_dim = dims
    source, stored = dtypes
    generator = torch.Generator().manual_seed(seed)
    # HF's layout: [1, T, Hkv, D] transposed to [1, Hkv, T, D] (not contiguous)
    k = torch.randn(1, tokens, kv_heads, head_dim, generator=generator).to(source).transpose(1, 2).to(device)
    v = torch.randn(1, tokens, kv_heads, value_dim, generator=generator).to(source).transpose(1, 2).to(device)
    slots = torch.randperm(40, generator=generator)[:tokens].to(device)
    k_cache = torch.randn(40, kv_heads, head_dim, generator=generator).to(stored).to(device)
    v_cache = torch.randn(40, kv_heads, value_dim, generator=generator).to(stored).to(device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    op.write_cache(k, v, want_k, want_v, slots)
    write_cache_triton(k, v, k_cache, v_cache, slots, interpret=device.type == "cpu")
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
