"""paged_attention_key_limit (Gemma 3's image tokens see their whole image): the Triton prefill / mixed kernel's
USE_KEY_LIMIT variant and the plain-torch reference against a naive float64 loop written from HF's mask,
AND(sliding window counted back from the query, OR(causal, same image)).

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1 (the kernels run interpreted: small shapes, few examples).
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention import op
from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.kernels.attention.testing import RandomStep, naive_attention, random_step, split_rows

ON_GPU = torch.accelerator.is_available() and not op.interpreting()
needs_kernels = pytest.mark.skipif(not (triton_attention.available() and (ON_GPU or op.interpreting())),
                                   reason="needs triton on a GPU or with TRITON_INTERPRET=1")
DEVICE = torch.accelerator.current_accelerator() if ON_GPU else torch.device("cpu")


def limits_of(length: int, images: list[tuple[int, int]]) -> list[int]:
    """Each position's key end: its image's end inside an image [a, b), else position + 1."""
    limit = [p + 1 for p in range(length)]
    for a, b in images:
        for p in range(a, b):
            limit[p] = b
    return limit


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int, softcap: float,
          sinks: torch.Tensor | None, q_start: int, images: list[tuple[int, int]]) -> torch.Tensor:
    """HF's rule key by key: q [H, Q, D] at positions q_start.., k/v [Hkv, K, D] -> [Q, H, Dv] float64."""
    return naive_attention(q, k, v, scaling, window, softcap, True, sinks, q_start, images)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """(context, queries) per sequence and its images [a, b) inside [0, context + queries) (a chunk never ends
    inside an image, as the scheduler keeps it; an image may lie in the cached context or start before the
    chunk); some sequences are decode tokens."""
    count = draw(st.integers(1, 3))
    spans, images = [], []
    for _ in range(count):
        context = draw(st.integers(0, 20))
        queries = 1 if draw(st.booleans()) and count > 1 else draw(st.integers(2, 14))
        end = context + queries
        cuts = sorted(draw(st.lists(st.integers(0, end), min_size=0, max_size=6, unique=True)))
        own = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2) if cuts[i + 1] - cuts[i] > 1]
        spans.append((context, queries))
        images.append(own)
    return spans, images


def key_limit_of(case: RandomStep, images: list[list[tuple[int, int]]]) -> torch.Tensor:
    """The step's key_limit [T] int32: each query's limit, packed like the queries."""
    rows = []
    for (context, queries), own in zip(case.spans, images):
        rows += limits_of(context + queries, own)[context:]
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def run(case: RandomStep, limit: torch.Tensor, scaling: float, window: int, softcap: float,
        sinks: torch.Tensor | None, triton: bool) -> torch.Tensor:
    md = case.step.metadata
    if triton:
        op.write_cache(case.k, case.v, case.k_cache, case.v_cache, md.slot_mapping)
        return triton_attention.paged_attention_triton(
            case.q, case.k_cache, case.v_cache, md.block_tables, md.seq_lens, md.query_start_loc, md.block_size,
            scaling, window, softcap, True, sinks, interpret=case.q.device.type == "cpu", key_limit=limit)
    return op.paged_attention_reference(case.q, case.k, case.v, case.k_cache.clone(), case.v_cache.clone(), md,
                                        scaling, window, softcap, True, sinks, key_limit=limit)


def check(case: RandomStep, images: list[list[tuple[int, int]]], scaling: float, window: int, softcap: float,
          sinks: torch.Tensor | None, atol: float = 2e-5) -> None:
    limit = key_limit_of(case, images)
    reference = run(case, limit, scaling, window, softcap, sinks, triton=False)
    got = run(case, limit, scaling, window, softcap, sinks, triton=True) if triton_attention.available() else None
    for row, (context, _) in enumerate(case.spans):
        want = naive(case.full_q[row].float(), case.full_k[row].float(), case.full_v[row].float(), scaling, window,
                     softcap, None if sinks is None else sinks.float(), context, images[row])
        assert (split_rows(reference, case)[row].double().cpu() - want).abs().max() <= atol, f"{row}: reference"
        if got is not None:
            ours = split_rows(got, case)[row]
            assert torch.isfinite(ours).all(), f"sequence {row}: non-finite output"
            assert (ours.double().cpu() - want).abs().max() <= atol, f"sequence {row}: triton vs naive"


@needs_kernels
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2]), head_dim=st.sampled_from([16, 24]),
       block_size=st.sampled_from([4, 16]), window=st.sampled_from([0, 3, 7]), softcap=st.sampled_from([0.0, 2.5]),
       use_sinks=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_key_limit_matches_naive(layout, kv_heads, group, head_dim, block_size, window, softcap, use_sinks,
                                 seed) -> None:
    spans, images = layout
    gen = torch.Generator().manual_seed(seed)
    case = random_step(gen, spans, kv_heads, group, head_dim, block_size, extra_width=1, device=DEVICE)
    sinks = torch.randn(kv_heads * group, generator=gen).to(DEVICE) if use_sinks else None
    check(case, images, head_dim ** -0.5, window, softcap, sinks)


@needs_kernels
def test_image_wider_than_the_window_and_than_a_query_tile() -> None:
    """An image of 21 tokens (more than a 16-row interpreted tile) with a window of 5: its first token sees 20 keys
    ahead and none behind past the window; text before and after it; a decode token in the same step."""
    case = random_step(torch.Generator().manual_seed(7), [(3, 30), (12, 1)], kv_heads=1, group=2, head_dim=16,
                       block_size=4, extra_width=2, device=DEVICE)
    check(case, [[(6, 27)], []], 0.25, 5, 0.0, None)
    check(case, [[(6, 27)], []], 0.25, 0, 0.0, None)


def test_limit_of_position_plus_one_is_the_causal_op() -> None:
    """With every limit at position + 1 the op is exactly the causal paged op (the reference, both ways)."""
    case = random_step(torch.Generator().manual_seed(2), [(4, 9), (0, 6)], kv_heads=2, group=2, head_dim=16,
                       block_size=4, device=DEVICE)
    causal = op.paged_attention_reference(case.q, case.k, case.v, case.k_cache.clone(), case.v_cache.clone(),
                                          case.step.metadata, 0.3, 4, 0.0, True, None)
    limited = run(case, key_limit_of(case, [[], []]), 0.3, 4, 0.0, None, triton=False)
    assert torch.equal(causal, limited)


def test_registered_op_and_fake() -> None:
    """torch.ops.hfrewrite.paged_attention_key_limit runs (reference on the CPU unless forced) and traces under
    fake tensors with the output shape [1, T, H, Dv]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = random_step(torch.Generator().manual_seed(4), [(2, 7)], kv_heads=1, group=2, head_dim=16, block_size=4)
    md = case.step.metadata
    limit = key_limit_of(case, [[(3, 8)]]).cpu()
    args = (case.q, case.k, case.v, case.k_cache, case.v_cache, *md.as_tuple(), limit, 0.25, 0, 0.0, None)
    out = torch.ops.hfrewrite.paged_attention_key_limit(*args)
    want = naive(case.full_q[0], case.full_k[0], case.full_v[0], 0.25, 0, 0.0, None, 2, [(3, 8)])
    assert (out[0].double() - want).abs().max() <= 2e-5
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.ops.hfrewrite.paged_attention_key_limit(*fake).shape == out.shape
