"""paged_attention_alibi against a naive per-query loop with slope * (key - query) added to the scores;
each sequence is fed over several steps (prefill chunks then decode), so the cache carries between them.
Then the Triton kernels' ALiBi variant against the reference (interpreted on a CPU) and on a GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention import op
from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.kernels.attention.testing import RandomStep, random_step, split_rows
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


# ------------------------------------------------------------------ the Triton kernels' ALiBi variant
# Interpreted on a CPU (TRITON_INTERPRET=1, set by conftest.py): tiny shapes, few examples.

ON_GPU = torch.accelerator.is_available() and not op.interpreting()
needs_kernels = pytest.mark.skipif(not (triton_attention.available() and (ON_GPU or op.interpreting())),
                                   reason="needs triton on a GPU or with TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not (ON_GPU and triton_attention.available()), reason="needs a GPU, TRITON_INTERPRET=0")
DEVICE = torch.accelerator.current_accelerator() if ON_GPU else torch.device("cpu")


def naive_alibi_step(case: RandomStep, scaling: float, window: int, slopes: torch.Tensor) -> list[torch.Tensor]:
    """Per real sequence [count, H, Dv] float64: queries at positions context.., causal, slope * (key - query)."""
    outputs = []
    for (context, count), q, keys, values in zip(case.spans, case.full_q, case.full_k, case.full_v):
        heads, group = q.shape[0], q.shape[0] // keys.shape[0]
        out = torch.empty(count, heads, values.shape[-1], dtype=torch.float64)
        for h in range(heads):
            for i in range(count):
                pos = context + i
                js = [j for j in range(pos + 1) if not window or pos - j < window]
                scores = torch.stack([(q[h, i].double() @ keys[h // group, j].double()) * scaling
                                      + float(slopes[h]) * (j - pos) for j in js])
                probs = torch.softmax(scores, 0)
                out[i, h] = sum(p * values[h // group, j].double() for p, j in zip(probs, js))
        outputs.append(out)
    return outputs


def run_alibi_triton(case: RandomStep, scaling: float, window: int, slopes: torch.Tensor,
                     num_splits: int | None = None) -> torch.Tensor:
    md = case.step.metadata
    op.write_cache(case.k, case.v, case.k_cache, case.v_cache, md.slot_mapping)
    return triton_attention.paged_attention_triton(
        case.q, case.k_cache, case.v_cache, md.block_tables, md.seq_lens, md.query_start_loc, md.block_size, scaling,
        window, 0.0, True, None, num_splits=num_splits, interpret=case.q.device.type == "cpu",
        alibi_slopes=slopes.to(case.q.device))


def check_alibi(case: RandomStep, got: torch.Tensor, scaling: float, window: int, slopes: torch.Tensor,
                atol: float) -> None:
    """Triton == plain-torch reference (fp32 from the same inputs) == naive loop, on every real row."""
    reference = op.paged_attention_reference(case.q.float(), case.k.float(), case.v.float(), case.k_cache.float(),
                                             case.v_cache.float(), case.step.metadata, scaling, window, 0.0, True,
                                             None, alibi_slopes=slopes.to(case.q.device))
    want = naive_alibi_step(case, scaling, window, slopes)
    for row, (ours, theirs, oracle) in enumerate(zip(split_rows(got, case), split_rows(reference, case), want)):
        assert torch.isfinite(ours).all(), f"sequence {row}: non-finite output"
        error = (ours.double().cpu() - theirs.double().cpu()).abs().max().item()
        assert error <= atol, f"sequence {row}: triton vs reference {error}"
        assert (theirs.double().cpu() - oracle).abs().max() <= max(atol, 1e-5), f"sequence {row}: reference vs naive"


@st.composite
def alibi_spans(draw: st.DrawFn) -> tuple[bool, list[tuple[int, int]]]:
    """(decode?, (cached context, queries) per sequence): decode tokens only, or prefill chunks mixed with decode."""
    decode = draw(st.booleans(), label="decode")
    count = draw(st.integers(1, 3))
    contexts = draw(st.lists(st.integers(0, 13), min_size=count, max_size=count))
    queries = [1] * count if decode else draw(st.lists(st.integers(1, 6), min_size=count, max_size=count))
    if not decode and all(q == 1 for q in queries):
        queries[0] = 2  # T == S would be a decode step
    return decode, list(zip(contexts, queries))


@needs_kernels
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=alibi_spans(), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       block_size=st.sampled_from([2, 4, 8]), window=st.sampled_from([0, 5]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), splits=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_triton_alibi_matches_reference(layout, kv_heads: int, group: int, block_size: int, window: int,
                                        dtype: torch.dtype, splits: int | None, seed: int) -> None:
    """GQA ratios, block sizes, contexts crossing block boundaries, decode (split or not) and mixed prefill +
    decode batches, fp32 and bf16: the ALiBi kernels equal the reference."""
    decode, spans_ = layout
    gen = torch.Generator().manual_seed(seed)
    case = random_step(gen, spans_, kv_heads, group, 16, block_size, padding=1 if decode else 0, extra_width=1,
                       dtype=dtype, device=DEVICE)
    # bloom-like slopes (2^-8/H .. 2^-8) plus a negative one: the kernel must not assume a sign
    slopes = torch.rand(kv_heads * group, generator=gen) * 2 - 0.5
    got = run_alibi_triton(case, 16 ** -0.5, window, slopes, splits if decode else None)
    check_alibi(case, got, 16 ** -0.5, window, slopes, atol=2e-5 if dtype == torch.float32 else 3e-2)


@needs_kernels
def test_triton_alibi_long_mixed_batch() -> None:
    """A prefill chunk over several blocks after a cached context, decode rows, a fresh prompt."""
    case = random_step(torch.Generator().manual_seed(4), [(6, 9), (21, 1), (0, 5)], kv_heads=2, group=2,
                       head_dim=16, block_size=4, extra_width=2, device=DEVICE)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    check_alibi(case, run_alibi_triton(case, 0.25, 0, slopes), 0.25, 0, slopes, atol=2e-5)


@needs_kernels
def test_alibi_op_dispatches_to_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """HFREWRITE_ATTENTION=triton routes paged_attention_alibi to the kernels (ALiBi variant) and they agree
    with the reference route (decode and mixed steps), cache writes included."""
    calls: list[bool] = []
    real = triton_attention.paged_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs.get("alibi_slopes") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention_triton", spy)
    slopes = [0.5, -0.25, 0.125, 0.0625]
    for spans_ in ([(6, 1), (13, 1)], [(3, 4), (9, 1)]):
        case = random_step(torch.Generator().manual_seed(5), spans_, 2, 2, 16, 4, device=DEVICE)
        outputs, caches = [], []
        for backend in ("triton" if ON_GPU or op.interpreting() else "auto", "reference"):
            monkeypatch.setenv(op.BACKEND_VARIABLE, backend)
            k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
            outputs.append(torch.ops.hfrewrite.paged_attention_alibi(
                case.q, case.k, case.v, k_cache, v_cache, *case.step.metadata.as_tuple(), 0.25, 0, slopes))
            caches.append(k_cache)
        real_rows = sum(count for _, count in spans_)
        assert torch.allclose(outputs[0][0, :real_rows], outputs[1][0, :real_rows], atol=2e-5)
        assert torch.equal(caches[0], caches[1])
    assert calls == [True, True]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_alibi_head_dims_and_dtypes(dtype: torch.dtype, head_dim: int, decode: bool) -> None:
    """Compiled kernels, long contexts, bloom's real slopes (2^(-8 i / H)): equal the fp32 reference."""
    layout = [(700, 1), (33, 1), (2000, 1)] if decode else [(700, 37), (0, 129), (2000, 1), (5, 64)]
    case = random_step(torch.Generator().manual_seed(head_dim), layout, 4, 4, head_dim, 16, padding=2 if decode else 0,
                       dtype=dtype, device=DEVICE)
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / 16) for i in range(16)])
    atol = 2e-4 if dtype == torch.float32 else 2e-2
    for window in (0, 256):
        got = run_alibi_triton(case, head_dim ** -0.5, window, slopes)
        reference = op.paged_attention_reference(case.q.float(), case.k.float(), case.v.float(), case.k_cache.float(),
                                                 case.v_cache.float(), case.step.metadata, head_dim ** -0.5, window,
                                                 0.0, True, None, alibi_slopes=slopes.to(DEVICE))
        real = sum(count for _, count in case.spans)
        error = (got[0, :real].float() - reference[0, :real]).abs().max().item()
        assert error <= atol, (window, error)


@needs_kernels
@pytest.mark.parametrize("model_type, overrides", [("bloom", {}), ("falcon", {"alibi": True, "multi_query": False})])
def test_alibi_model_through_the_triton_kernels(model_type: str, overrides: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny ALiBi model whose every layer runs the kernels' ALiBi variant equals HF eager (prefill chunks and
    decode steps through the paged cache)."""
    from hfrewrite.compiler.build import build_compiled
    from hfrewrite.compiler.options import CompileOptions
    from hfrewrite.compiler.tiny import tiny_config, tiny_model
    from hfrewrite.compiler.verify import verify
    from tests.equivalence import state_dict_weights

    config = tiny_config(model_type, **overrides)
    reference = tiny_model(config, 0).to(DEVICE)   # compiled kernels on the GPU, interpreted ones on the CPU
    options = CompileOptions(backend=None, verify=False, progress=False, device=DEVICE.type, dtype="float32")
    model, _ = build_compiled(config, state_dict_weights(reference), options, {})
    calls: list[bool] = []
    real = triton_attention.paged_attention_triton
    monkeypatch.setattr(triton_attention, "paged_attention_triton",
                        lambda *a, **k: calls.append(k.get("alibi_slopes") is not None) or real(*a, **k))
    monkeypatch.setenv(op.BACKEND_VARIABLE, "triton")
    result = verify(model, reference, seed=1, sequences=2, max_len=12, decode_steps=2, atol=1e-4)
    assert calls and all(calls), "the ALiBi op never reached the kernels"
    assert result.passed, result
