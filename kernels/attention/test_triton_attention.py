"""The Triton paged-attention kernels against the plain-torch reference and a naive float64 loop.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1 and the kernels run interpreted (slow: shapes
stay small, few examples). GPU-only tests (head dims 64..256, bf16/fp16, long contexts, graph capture)
skip without an accelerator.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.attention import op
from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.kernels.attention.testing import RandomStep, expected_outputs, random_step, split_rows

ON_GPU = torch.accelerator.is_available() and not op.interpreting()
needs_interpreter = pytest.mark.skipif(not (triton_attention.available() and op.interpreting()),
                                       reason="needs triton with TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not (ON_GPU and triton_attention.available()), reason="needs a GPU, TRITON_INTERPRET=0")
# the property tests run the kernels wherever they can: compiled on an accelerator, else interpreted
needs_kernels = pytest.mark.skipif(not (triton_attention.available() and (ON_GPU or op.interpreting())),
                                   reason="needs triton on a GPU or with TRITON_INTERPRET=1")
DEVICE = torch.accelerator.current_accelerator() if ON_GPU else torch.device("cpu")
SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_triton(case: RandomStep, scaling: float, window: int, softcap: float, causal: bool,
               sinks: torch.Tensor | None, num_splits: int | None = None) -> torch.Tensor:
    md = case.step.metadata
    op.write_cache(case.k, case.v, case.k_cache, case.v_cache, md.slot_mapping)
    return triton_attention.paged_attention_triton(
        case.q, case.k_cache, case.v_cache, md.block_tables, md.seq_lens, md.query_start_loc, md.block_size, scaling,
        window, softcap, causal, sinks, num_splits=num_splits, interpret=case.q.device.type == "cpu")


def run_reference(case: RandomStep, scaling: float, window: int, softcap: float, causal: bool,
                  sinks: torch.Tensor | None) -> torch.Tensor:
    return op.paged_attention_reference(case.q, case.k, case.v, case.k_cache.clone(), case.v_cache.clone(),
                                        case.step.metadata, scaling, window, softcap, causal, sinks)


@st.composite
def spans(draw: st.DrawFn, decode: bool) -> list[tuple[int, int]]:
    """(cached context, queries) per sequence: decode tokens only, or a mix of prefill chunks and decode."""
    count = draw(st.integers(1, 3))
    contexts = draw(st.lists(st.integers(0, 40), min_size=count, max_size=count))
    if decode:
        return [(c, 1) for c in contexts]
    queries = draw(st.lists(st.integers(1, 12), min_size=count, max_size=count))
    return list(zip(contexts, queries))


def check(case: RandomStep, got: torch.Tensor, scaling: float, window: int, softcap: float, causal: bool,
          sinks: torch.Tensor | None, atol: float) -> None:
    """Triton == naive == reference on every real row, and the cache holds exactly the context."""
    want = expected_outputs(case, scaling, window, softcap, causal, sinks)
    reference = run_reference(case, scaling, window, softcap, causal, sinks)
    for row, (ours, theirs, oracle) in enumerate(zip(split_rows(got, case), split_rows(reference, case), want)):
        assert torch.isfinite(ours).all(), f"sequence {row}: non-finite output"
        assert (ours.double().cpu() - oracle).abs().max() <= atol, f"sequence {row}: triton vs naive"
        assert (theirs.double().cpu() - oracle).abs().max() <= atol, f"sequence {row}: reference vs naive"
    md = case.step.metadata
    block_size = int(md.block_size[0])
    for row, keys in enumerate(case.full_k):
        end = keys.shape[1]
        slots = [int(md.block_tables[row, p // block_size]) * block_size + p % block_size for p in range(end)]
        assert torch.equal(case.k_cache[slots].transpose(0, 1).cpu(), keys), f"sequence {row}: cache contents"


@needs_kernels
@SETTINGS
@given(data=st.data(), decode=st.booleans(), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([16, 24, 64]), block_size=st.sampled_from([4, 16]), window=st.sampled_from([0, 3, 9]),
       softcap=st.sampled_from([0.0, 2.5]), use_sinks=st.booleans(), padding=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference_and_naive(data, decode, kv_heads, group, head_dim, block_size, window, softcap,
                                            use_sinks, padding, seed) -> None:
    layout = data.draw(spans(decode), label="spans")
    causal = decode or data.draw(st.booleans(), label="causal")
    splits = data.draw(st.sampled_from([None, 1, 2, 5]), label="num_splits") if decode else None
    gen = torch.Generator().manual_seed(seed)
    case = random_step(gen, layout, kv_heads, group, head_dim, block_size, padding=padding if decode else 0,
                       extra_width=data.draw(st.integers(0, 2), label="extra_width"), device=DEVICE)
    sinks = torch.randn(kv_heads * group, generator=gen).to(DEVICE) if use_sinks else None
    scaling = data.draw(st.sampled_from([head_dim ** -0.5, 0.7]), label="scaling")
    got = run_triton(case, scaling, window, softcap, causal, sinks, splits)
    check(case, got, scaling, window, softcap, causal, sinks, atol=2e-5)


@needs_kernels
def test_mixed_batch_with_padding_rows_and_bidirectional_chunk() -> None:
    """A prefill chunk crossing several blocks, decode tokens, non-causal attention over the whole context."""
    for causal in (True, False):
        case = random_step(torch.Generator().manual_seed(3), [(5, 11), (30, 1), (0, 7), (17, 1)], kv_heads=2,
                           group=2, head_dim=24, block_size=4, extra_width=3, device=DEVICE)
        got = run_triton(case, 0.3, 0, 0.0, causal, None)
        check(case, got, 0.3, 0, 0.0, causal, None, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_decode_with_every_variant(num_splits: int) -> None:
    """Flash-decoding: pieces of the context merged by the reduce kernel (sinks added there), more pieces
    than blocks (empty pieces), a window that starts mid-block, padding rows on a scratch block."""
    case = random_step(torch.Generator().manual_seed(num_splits), [(37, 1), (0, 1), (20, 1)], kv_heads=2, group=2,
                       head_dim=24, block_size=4, padding=1, extra_width=2, device=DEVICE)
    sinks = (torch.randn(4, generator=torch.Generator().manual_seed(11)) * 2).to(DEVICE)
    got = run_triton(case, 0.4, 11, 2.5, True, sinks, num_splits=num_splits)
    check(case, got, 0.4, 11, 2.5, True, sinks, atol=2e-5)


@needs_interpreter
def test_op_dispatches_to_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """HFREWRITE_ATTENTION=triton routes the registered op to the kernels on the CPU (interpreter)."""
    calls = []
    real = triton_attention.paged_attention_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention_triton", spy)
    monkeypatch.setenv(op.BACKEND_VARIABLE, "triton")
    case = random_step(torch.Generator().manual_seed(5), [(6, 1), (13, 1)], 1, 2, 16, 4, padding=1)
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = torch.ops.hfrewrite.paged_attention(case.q, case.k, case.v, k_cache, v_cache,
                                              *case.step.metadata.as_tuple(), 0.25, 0, 0.0, True, None)
    assert calls == [1]
    monkeypatch.setenv(op.BACKEND_VARIABLE, "reference")
    reference = torch.ops.hfrewrite.paged_attention(case.q, case.k, case.v, case.k_cache, case.v_cache,
                                                    *case.step.metadata.as_tuple(), 0.25, 0, 0.0, True, None)
    assert calls == [1]
    assert torch.allclose(out[0, :2], reference[0, :2], atol=1e-5)
    assert torch.equal(k_cache, case.k_cache)


@needs_interpreter
@pytest.mark.parametrize("model_type", ["gemma2", "qwen3"])
def test_whole_model_through_the_triton_kernels(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model (GQA; gemma2: sliding window and attention softcap) run through the kernels equals HF eager."""
    from hfrewrite.compiler.build import CompileOptions, build_compiled
    from hfrewrite.compiler.tiny import tiny_config, tiny_model
    from hfrewrite.compiler.verify import verify

    config = tiny_config(model_type, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size=64, intermediate_size=32, vocab_size=97, sliding_window=5,
                         attn_logit_softcapping=20.0)
    reference = tiny_model(config, 1)
    state = reference.state_dict()

    def weights(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {name: state[name if name in state else tied[name]].to(device, dtype) for name in specs}

    model, _ = build_compiled(config, weights, CompileOptions(backend=None, verify=False, progress=False,
                                                              device="cpu"), {})
    calls = []
    real = triton_attention.paged_attention_triton
    monkeypatch.setattr(triton_attention, "paged_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(op.BACKEND_VARIABLE, "triton")
    result = verify(model, reference, seed=2, sequences=2, max_len=14, decode_steps=2, atol=1e-4)
    assert calls, "the op never reached the kernels"
    assert result.passed, result


def test_decode_splits_fill_the_device_from_shapes() -> None:
    assert triton_attention.decode_splits(1, 8, 256, 132) == 32       # batch 1, 4096 tokens in blocks of 16
    assert triton_attention.decode_splits(32, 8, 256, 132) == 3
    assert triton_attention.decode_splits(128, 8, 256, 132) == 1
    assert triton_attention.decode_splits(1, 8, 8, 132) == 1          # never pieces under 8 blocks
    assert triton_attention.decode_splits(1, 1, 100_000, 1024) == 64  # capped


# ------------------------------------------------------------------ GPU only

def gpu_case(seed: int, layout: list[tuple[int, int]], kv_heads: int, group: int, head_dim: int, block_size: int,
             dtype: torch.dtype, padding: int = 0) -> RandomStep:
    return random_step(torch.Generator().manual_seed(seed), layout, kv_heads, group, head_dim, block_size,
                       padding=padding, dtype=dtype, device=torch.accelerator.current_accelerator())


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_head_dims_and_dtypes(dtype: torch.dtype, head_dim: int, decode: bool) -> None:
    layout = [(700, 1), (33, 1), (2000, 1)] if decode else [(700, 37), (0, 129), (2000, 1), (5, 64)]
    case = gpu_case(head_dim, layout, 4, 4, head_dim, 16, dtype, padding=2 if decode else 0)
    sinks = torch.randn(16, device=case.q.device)
    atol = 2e-4 if dtype == torch.float32 else 2e-2
    for window, softcap, use_sinks in ((0, 0.0, False), (256, 30.0, True)):
        got = run_triton(case, head_dim ** -0.5, window, softcap, True, sinks if use_sinks else None)
        reference = op.paged_attention_reference(case.q.float(), case.k.float(), case.v.float(),
                                                 case.k_cache.float(), case.v_cache.float(), case.step.metadata,
                                                 head_dim ** -0.5, window, softcap, True,
                                                 sinks if use_sinks else None)
        real = sum(count for _, count in case.spans)
        error = (got[0, :real].float() - reference[0, :real]).abs().max().item()
        assert error <= atol, (window, softcap, use_sinks, error)


@needs_gpu
def test_gpu_decode_captures_in_a_graph_without_syncing() -> None:
    """The decode path launches from shapes only: it captures into a device graph and replays correctly."""
    device = torch.accelerator.current_accelerator()
    module = torch.get_device_module(device)
    if not hasattr(module, "CUDAGraph"):
        pytest.skip(f"{device.type} has no graph capture")
    case = gpu_case(1, [(100, 1), (3000, 1)], 8, 4, 128, 16, torch.bfloat16, padding=2)
    md = case.step.metadata
    stream = module.Stream()
    with module.stream(stream):
        run_triton(case, 0.088, 0, 0.0, True, None)  # warm-up: jit outside the capture
    module.synchronize()
    graph = module.CUDAGraph()
    with module.graph(graph):
        out = triton_attention.paged_attention_triton(case.q, case.k_cache, case.v_cache, md.block_tables,
                                                      md.seq_lens, md.query_start_loc, md.block_size, 0.088, 0, 0.0,
                                                      True, None)
    md.seq_lens[:2].sub_(7)  # new context lengths of the real rows, same shapes: the replay must follow them
    graph.replay()
    module.synchronize()
    want = run_triton(case, 0.088, 0, 0.0, True, None)
    assert torch.allclose(out[0, :2].float(), want[0, :2].float(), atol=1e-2)


@pytest.mark.skipif(not triton_attention.available(), reason="needs triton")
def test_kernels_compile_for_a_gpu_target() -> None:
    """Compile (no launch) for sm_90: code-generation errors the interpreter never sees show up on a CPU.

    In a fresh process: triton's interpreter mode, once on, cannot be switched off in this one.
    """
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = "from hfrewrite.kernels.attention.testing import compile_for_target; print(compile_for_target(90))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip(f"triton cannot assemble here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    shared = [int(n) for n in result.stdout.split()[-1].strip("[]").split(",")]
    assert max(shared) < 200_000, shared
