"""The fused-MoE op: Triton path (interpreter) vs reference vs a naive float64 loop, and vs transformers' modules.

On a CPU-only machine the repository's conftest.py sets TRITON_INTERPRET=1 (the Triton tests run interpreted on
CPU tensors); on a GPU it leaves it unset, and the GPU tests run the compiled kernels.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrewrite.kernels.moe.op import align_by_expert, experts_forward, fused_moe_triton, interpreting
from hfrewrite.kernels.moe.autotune import MoeConfig, TileConfig
from hfrewrite.kernels.moe.reference import ACTIVATIONS, Activation, ExpertsLayout, moe_reference

needs_interpreter = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not interpreting(),
                                       reason="needs triton with TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
Case = tuple[dict[str, torch.Tensor | None], ExpertsLayout, Activation, torch.dtype]


def naive_moe(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, layout: ExpertsLayout, act: Activation, gu_bias: torch.Tensor | None,
              d_bias: torch.Tensor | None) -> torch.Tensor:
    """One (token, k) pair at a time in float64, from the formulas in transformers' modeling files."""
    tokens, hid = hidden.shape
    out = torch.zeros(tokens, hid, dtype=torch.float64)
    for m in range(tokens):
        x = hidden[m].double()
        for k in range(ids.shape[1]):
            e = int(ids[m, k])
            w_gu, w_d = gate_up[e].double(), down[e].double()
            proj = x @ w_gu if layout.transposed else w_gu @ x
            if gu_bias is not None:
                proj = proj + gu_bias[e].double()
            inter = proj.numel() // 2
            gate, up = (proj[0::2], proj[1::2]) if layout.interleaved else (proj[:inter], proj[inter:])
            if act.kind == "silu":
                h = gate / (1 + torch.exp(-gate)) * up
            elif act.kind == "gelu":
                h = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
            elif act.kind == "gelu_tanh":
                h = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
            else:
                gate, up = torch.clamp(gate, max=act.limit), torch.clamp(up, -act.limit, act.limit)
                h = (up + 1) * gate / (1 + torch.exp(-act.alpha * gate))
            y = h @ w_d if layout.transposed else w_d @ h
            if d_bias is not None:
                y = y + d_bias[e].double()
            out[m] += float(weights[m, k]) * y
    return out


def make_case(seed: int, experts: int, top_k: int, tokens: int, hid: int, inter: int, dtype: torch.dtype,
              layout: ExpertsLayout, bias: bool, ties: bool) -> dict[str, torch.Tensor | None]:
    """Random inputs at unit scale; ids distinct per token; weights never zero (all equal when `ties`)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    gu_shape = (experts, hid, 2 * inter) if layout.transposed else (experts, 2 * inter, hid)
    d_shape = (experts, inter, hid) if layout.transposed else (experts, hid, inter)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.full((tokens, top_k), 1.0 / top_k) if ties else torch.rand(tokens, top_k, generator=gen) + 0.05
    return dict(hidden=rand(tokens, hid), topk_ids=ids, topk_weights=weights.to(dtype),
                gate_up=rand(*gu_shape, scale=1.5 / math.sqrt(hid)), down=rand(*d_shape, scale=1 / math.sqrt(inter)),
                gate_up_bias=rand(experts, 2 * inter, scale=0.5) if bias else None,
                down_bias=rand(experts, hid, scale=0.5) if bias else None)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Absolute tolerance relative to the output's magnitude (rows near zero must not fail on rtol alone)."""
    tol = TOLERANCE[dtype]
    scale = expected.double().abs().max().item() + 1e-6
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * scale, rtol=tol)


@st.composite
def moe_cases(draw: st.DrawFn) -> Case:
    experts = draw(st.integers(1, 8), label="experts")
    top_k = draw(st.integers(1, min(experts, 3)), label="top_k")
    tokens = draw(st.one_of(st.just(1), st.integers(1, max(1, experts - 1)), st.integers(1, 12)), label="tokens")
    hid = draw(st.sampled_from([16, 24, 32, 40, 64]), label="hidden")
    inter = draw(st.sampled_from([16, 24, 32, 48]), label="intermediate")
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
    layout = ExpertsLayout(draw(st.booleans(), label="transposed"), draw(st.booleans(), label="interleaved"))
    kind = draw(st.sampled_from(ACTIVATIONS), label="activation")
    act = Activation(kind, limit=draw(st.sampled_from([0.5, 1.5, 7.0]), label="limit"))
    case = make_case(draw(st.integers(0, 2**31 - 1), label="seed"), experts, top_k, tokens, hid, inter, dtype,
                     layout, draw(st.booleans(), label="bias"), draw(st.booleans(), label="ties"))
    return case, layout, act, dtype


@settings(max_examples=60, deadline=None)
@given(moe_cases())
def test_reference_matches_naive_loop(params: Case) -> None:
    case, layout, act, dtype = params
    ref = moe_reference(**case, layout=layout, act=act)
    assert ref.dtype == dtype and ref.shape == case["hidden"].shape
    assert_close(ref, naive_moe(case["hidden"], case["topk_ids"], case["topk_weights"], case["gate_up"],
                                case["down"], layout, act, case["gate_up_bias"], case["down_bias"]), dtype)


@needs_interpreter
@settings(max_examples=20, deadline=None)
@given(moe_cases())
def test_triton_matches_reference(params: Case) -> None:
    case, layout, act, dtype = params
    out = fused_moe_triton(**case, layout=layout, act=act)
    assert out.dtype == dtype and out.shape == case["hidden"].shape
    assert_close(out, moe_reference(**case, layout=layout, act=act), dtype)


@needs_interpreter
@settings(max_examples=40, deadline=None)
@given(experts=st.integers(1, 8), top_k=st.integers(1, 3), tokens=st.integers(1, 20),
       block_m=st.sampled_from([1, 2, 4, 16]), seed=st.integers(0, 2**31 - 1))
def test_align_by_expert_blocks(experts: int, top_k: int, tokens: int, block_m: int, seed: int) -> None:
    top_k = min(top_k, experts)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    sorted_slots, block_expert, total = align_by_expert(ids, experts, block_m)
    slots = tokens * top_k
    assert int(total) % block_m == 0 and sorted_slots.numel() >= int(total)
    real = sorted_slots[sorted_slots < slots].long()
    assert sorted(real.tolist()) == list(range(slots))  # every slot exactly once
    assert (sorted_slots[int(total):] == slots).all()
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_slots[b * block_m:(b + 1) * block_m].long()
        if b * block_m >= int(total):
            assert e == -1
        else:
            assert (flat[rows[rows < slots]] == e).all() and (rows < slots).any()


def expert_parallel_sum(case: dict[str, torch.Tensor | None], layout: ExpertsLayout, act: Activation, ranks: int,
                        run: Any) -> torch.Tensor:
    """Sum over `ranks` of the op on each rank's block of whole experts (what the all-reduce of --ep adds up)."""
    experts = case["gate_up"].shape[0]
    total = None
    for rank in range(ranks):
        start, stop = experts * rank // ranks, experts * (rank + 1) // ranks
        local = {name: (value[start:stop] if name in ("gate_up", "down", "gate_up_bias", "down_bias")
                        and value is not None else value) for name, value in case.items()}
        part = run(local, start).double()
        total = part if total is None else total + part
    return total


@settings(max_examples=30, deadline=None)
@given(moe_cases(), st.integers(2, 4))
def test_reference_expert_parallel_parts_sum_to_the_whole(params: Case, ranks: int) -> None:
    case, layout, act, dtype = params
    ranks = min(ranks, case["gate_up"].shape[0])
    whole = moe_reference(**case, layout=layout, act=act)
    parts = expert_parallel_sum(case, layout, act, ranks,
                                lambda local, start: moe_reference(**local, layout=layout, act=act,
                                                                   expert_offset=start))
    assert_close(parts, whole, dtype)


@needs_interpreter
@settings(max_examples=15, deadline=None)
@given(moe_cases(), st.integers(2, 4))
def test_triton_expert_parallel_skips_other_ranks_experts(params: Case, ranks: int) -> None:
    """Each rank's kernel call sees global ids but holds only its experts: the parts must add up to the whole,
    and a rank whose experts no token chose returns exact zeros."""
    case, layout, act, dtype = params
    ranks = min(ranks, case["gate_up"].shape[0])
    outputs: list[torch.Tensor] = []

    def run(local: dict[str, torch.Tensor | None], start: int) -> torch.Tensor:
        out = fused_moe_triton(**local, layout=layout, act=act, expert_offset=start, expert_parallel=True)
        outputs.append(out)
        return out

    parts = expert_parallel_sum(case, layout, act, ranks, run)
    assert_close(parts, moe_reference(**case, layout=layout, act=act), dtype)
    experts = case["gate_up"].shape[0]
    for rank, out in enumerate(outputs):
        start, stop = experts * rank // ranks, experts * (rank + 1) // ranks
        mine = (case["topk_ids"] >= start) & (case["topk_ids"] < stop)
        assert (out[~mine.any(dim=1)] == 0).all(), f"rank {rank} wrote tokens routed only elsewhere"


def tiny_experts(model_type: str) -> torch.nn.Module:
    """One layer's `mlp.experts` of a 1-layer transformers model built from a tiny config, weights random."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, MixtralConfig
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=48, num_experts_per_tok=2)
    configs = {
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, num_experts=6, moe_intermediate_size=24, head_dim=16),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, num_experts=6, moe_intermediate_size=24,
                                            shared_expert_intermediate_size=32),
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, head_dim=16),
        "deepseek_v3": lambda: DeepseekV3Config(**common, n_routed_experts=8, moe_intermediate_size=24, n_group=2,
                                                topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                                                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "gpt_oss": lambda: GptOssConfig(**common, num_local_experts=4, head_dim=16, swiglu_limit=1.0),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[model_type]())
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_reference_matches_transformers_experts(model_type: str) -> None:
    experts = tiny_experts(model_type)
    gen = torch.Generator().manual_seed(1)
    tokens, num = 5, experts.gate_up_proj.shape[0]
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[1 if experts.is_transposed else 2], generator=gen)
    ids = torch.stack([torch.randperm(num, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), -1)
    layout, act = ExpertsLayout.from_module(experts), Activation.from_module(experts)
    bias = (experts.gate_up_proj_bias, experts.down_proj_bias) if experts.has_bias else (None, None)
    with torch.no_grad():
        ours = moe_reference(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, layout, act, *bias)
        for impl in ("eager", "batched_mm", "grouped_mm"):
            experts.config._experts_implementation = impl
            torch.testing.assert_close(ours, experts(hidden, ids, weights), atol=1e-5, rtol=1e-5, msg=impl)
        if interpreting():
            torch.testing.assert_close(experts_forward(experts, hidden, ids, weights, force_triton=True), ours,
                                       atol=1e-5, rtol=1e-5)


def test_custom_op_fake_and_schema() -> None:
    case = make_case(3, 4, 2, 3, 16, 16, torch.float32, ExpertsLayout(), True, False)
    args = (*case.values(), "gpt_oss", 1.702, 1.0, False, True)
    torch.library.opcheck(torch.ops.hfrewrite.fused_moe.default, args)
    layout, act = ExpertsLayout(False, True), Activation("gpt_oss", limit=1.0)
    torch.testing.assert_close(torch.ops.hfrewrite.fused_moe(*args), moe_reference(**case, layout=layout, act=act))


GPU_CONFIGS = [MoeConfig(16, TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 3)),
               MoeConfig(64, TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3))]


@pytest.mark.skipif(not torch.accelerator.is_available() or interpreting(), reason="needs a GPU, TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_triton_on_gpu_matches_reference(dtype: torch.dtype, tokens: int) -> None:
    """Compiled kernels, fixed configs (autotuning every variant would compile for minutes)."""
    cases = [(ExpertsLayout(), "silu", False), (ExpertsLayout(), "gelu", False),
             (ExpertsLayout(True, True), "gpt_oss", True), (ExpertsLayout(True, False), "gelu_tanh", True)]
    for seed, (layout, kind, bias) in enumerate(cases):
        case = make_case(seed, 8, 2, tokens, 136, 80, dtype, layout, bias, False)
        device = torch.accelerator.current_accelerator()
        case = {k: v.to(device) if v is not None else None for k, v in case.items()}
        act = Activation(kind, limit=1.5)
        expected = moe_reference(**case, layout=layout, act=act)
        for config in GPU_CONFIGS:
            assert_close(fused_moe_triton(**case, layout=layout, act=act, config=config), expected, dtype)


@pytest.mark.skipif(not torch.accelerator.is_available() or interpreting(), reason="needs a GPU, TRITON_INTERPRET=0")
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_triton_expert_parallel_on_gpu_sums_to_the_whole(tokens: int) -> None:
    """--ep on compiled kernels: two ranks' parts (global ids, local experts) add up to the whole layer."""
    device = torch.accelerator.current_accelerator()
    for seed, (layout, kind, bias) in enumerate([(ExpertsLayout(), "silu", False),
                                                 (ExpertsLayout(True, True), "gpt_oss", True)]):
        case = make_case(seed, 8, 2, tokens, 136, 80, torch.bfloat16, layout, bias, False)
        case = {k: v.to(device) if v is not None else None for k, v in case.items()}
        act = Activation(kind, limit=1.5)
        parts = expert_parallel_sum(case, layout, act, 2, lambda local, start: fused_moe_triton(
            **local, layout=layout, act=act, config=GPU_CONFIGS[0], expert_offset=start, expert_parallel=True))
        assert_close(parts, moe_reference(**case, layout=layout, act=act), torch.bfloat16)
