"""The paged-attention op against a naive per-query loop, over random shapes, chunkings and variants."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention.op import paged_attention  # noqa: F401  (registers the op)
from hfrewrite.runtime.step import Chunk, pack


def naive_attention(q, k, v, scaling, window, softcap, causal, sinks):
    """One query at a time, written from the definitions: q [H, T, D], k/v [Hkv, T, D] -> [T, H, Dv]."""
    heads, tokens, _ = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(tokens, heads, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for i in range(tokens):
            # HF's windows: causal keeps i - j < window; bidirectional (masking_utils) keeps |i - j| < window
            keys = [j for j in range(tokens) if (not causal or j <= i) and (window == 0 or abs(i - j) < window)]
            scores = [float(q[h, i] @ k[h // group, j]) * scaling for j in keys]
            if softcap:
                scores = [softcap * math.tanh(s / softcap) for s in scores]
            extra = [float(sinks[h])] if sinks is not None else []
            top = max(scores + extra)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights) + sum(math.exp(e - top) for e in extra)
            for w, j in zip(weights, keys):
                out[i, h] += (w / total) * v[h // group, j].double()
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data(), kv_heads=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.sampled_from([4, 8]),
       block_size=st.sampled_from([1, 2, 4]), window=st.sampled_from([0, 2, 5]), softcap=st.sampled_from([0.0, 3.0]),
       use_sinks=st.booleans(), causal=st.booleans())
def test_paged_attention_matches_naive(data, kv_heads, group, head_dim, block_size, window, softcap, use_sinks, causal):
    heads = kv_heads * group
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), label="lengths")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    seqs = [(torch.randn(heads, n, head_dim, generator=gen), torch.randn(kv_heads, n, head_dim, generator=gen),
             torch.randn(kv_heads, n, head_dim, generator=gen)) for n in lengths]
    sinks = torch.randn(heads, generator=gen) if use_sinks else None
    scaling = head_dim ** -0.5
    # cache blocks handed out in a shuffled order, so sequences interleave in the cache
    need = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(need) + 1, generator=gen).tolist()
    blocks, cursor = [], 0
    for count in need:
        blocks.append(order[cursor:cursor + count])
        cursor += count
    capacity = (sum(need) + 1) * block_size
    k_cache = torch.randn(capacity, kv_heads, head_dim, generator=gen)  # stale garbage must not leak in
    v_cache = torch.randn(capacity, kv_heads, head_dim, generator=gen)
    # split every sequence into random pieces; each step takes the next piece of each unfinished one
    # (bidirectional attention needs the whole sequence in one piece: later keys do not exist yet)
    pieces = []
    for n in lengths:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=3 if causal else 0),
                                    label="cuts")) - {n})
        bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
        pieces.append(list(zip(bounds[:-1], bounds[1:])))
    outputs = [[] for _ in lengths]
    while any(pieces):
        active = [i for i in range(len(lengths)) if pieces[i]]
        spans = {i: pieces[i].pop(0) for i in active}
        chunks = [Chunk(list(range(spans[i][1] - spans[i][0])), spans[i][0], blocks[i]) for i in active]
        step = pack(chunks, block_size, torch.device("cpu"))
        q = torch.cat([seqs[i][0][:, slice(*spans[i])] for i in active], dim=1)[None]
        k = torch.cat([seqs[i][1][:, slice(*spans[i])] for i in active], dim=1)[None]
        v = torch.cat([seqs[i][2][:, slice(*spans[i])] for i in active], dim=1)[None]
        out = torch.ops.hfrewrite.paged_attention(q, k, v, k_cache, v_cache, *step.metadata.as_tuple(), scaling,
                                                  window, softcap, causal, sinks)[0]
        offset = 0
        for i in active:
            size = spans[i][1] - spans[i][0]
            outputs[i].append(out[offset:offset + size])
            offset += size
    for i, (q, k, v) in enumerate(seqs):
        expected = naive_attention(q, k, v, scaling, window, softcap, causal, sinks)
        got = torch.cat(outputs[i]).double()
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_op_registration_fake_and_mutation_schema() -> None:
    """opcheck: the fake agrees with the real op, the schema declares exactly the caches as mutated."""
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = torch.randn(32, 2, 8, generator=gen), torch.randn(32, 2, 8, generator=gen)
    step = pack([Chunk([1, 2, 3], 0, [0]), Chunk([4], 5, [1, 2])], 8, torch.device("cpu"))
    q, k, v = (torch.randn(1, heads, 4, 8, generator=gen) for heads in (4, 2, 2))
    args = (q, k, v, k_cache, v_cache, *step.metadata.as_tuple(), 0.3, 0, 0.0, True, None)
    torch.library.opcheck(torch.ops.hfrewrite.paged_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
