"""paged_attention_alibi against a naive per-query loop with slope * (key - query) added to the scores;
each sequence is fed over several steps (prefill chunks then decode), so the cache carries between them."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention.op import paged_attention  # noqa: F401  (registers the ops)
from hfrewrite.runtime.step import Chunk, pack


def naive_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int,
                slopes: list[float]) -> torch.Tensor:
    """q [H, N, D], k/v [Hkv, N, D] -> [N, H, D] in float64, one query at a time."""
    heads, tokens, _ = q.shape
    group = heads // k.shape[0]
    out = torch.empty(tokens, heads, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for i in range(tokens):
            keys = [j for j in range(i + 1) if not window or i - j < window]
            scores = torch.stack([(q[h, i].double() @ k[h // group, j].double()) * scaling + slopes[h] * (j - i)
                                  for j in keys])
            probs = torch.softmax(scores, 0)
            out[i, h] = sum(p * v[h // group, j].double() for p, j in zip(probs, keys))
    return out


@settings(max_examples=8, deadline=None)
@given(data=st.data(), kv_heads=st.integers(1, 2), group=st.integers(1, 2), block_size=st.sampled_from([1, 4]),
       window=st.sampled_from([0, 3]))
def test_paged_attention_alibi_matches_naive(data, kv_heads: int, group: int, block_size: int, window: int) -> None:
    heads, head_dim = kv_heads * group, 4
    lengths = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=3), label="lengths")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    slopes = [float(s) for s in torch.rand(heads, generator=gen)]
    seqs = [tuple(torch.randn(h, n, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads)) for n in lengths]
    blocks, start = [], 0
    for n in lengths:
        count = -(-n // block_size)
        blocks.append(list(range(start, start + count)))
        start += count
    k_cache = torch.randn(start * block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(start * block_size, kv_heads, head_dim, generator=gen)
    # a prefill chunk of up to half the sequence, then one token per step
    pieces = [[(0, max(1, n // 2))] + [(j, j + 1) for j in range(max(1, n // 2), n)] for n in lengths]
    outputs: list[list[torch.Tensor]] = [[] for _ in lengths]
    while any(pieces):
        active = [i for i in range(len(lengths)) if pieces[i]]
        spans = {i: pieces[i].pop(0) for i in active}
        step = pack([Chunk(list(range(spans[i][1] - spans[i][0])), spans[i][0], blocks[i]) for i in active],
                    block_size, torch.device("cpu"))
        q, k, v = (torch.cat([seqs[i][part][:, slice(*spans[i])] for i in active], dim=1)[None] for part in range(3))
        out = torch.ops.hfrewrite.paged_attention_alibi(q, k, v, k_cache, v_cache, *step.metadata.as_tuple(),
                                                        head_dim ** -0.5, window, slopes)[0]
        offset = 0
        for i in active:
            size = spans[i][1] - spans[i][0]
            outputs[i].append(out[offset:offset + size])
            offset += size
    for i, (q, k, v) in enumerate(seqs):
        expected = naive_alibi(q, k, v, head_dim ** -0.5, window, slopes)
        got = torch.cat(outputs[i]).double()
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_alibi_op_fake_and_mutation_schema() -> None:
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = torch.randn(32, 2, 8, generator=gen), torch.randn(32, 2, 8, generator=gen)
    step = pack([Chunk([1, 2, 3], 0, [0]), Chunk([4], 5, [1, 2])], 8, torch.device("cpu"))
    q, k, v = (torch.randn(1, heads, 4, 8, generator=gen) for heads in (4, 2, 2))
    args = (q, k, v, k_cache, v_cache, *step.metadata.as_tuple(), 0.3, 0, [0.5, 0.25, 0.125, 0.0625])
    torch.library.opcheck(torch.ops.hfrewrite.paged_attention_alibi.default, args,
                          test_utils=("test_schema", "test_faketensor"))
