"""The MoE rule family: every routed-experts call becomes one hfrewrite::fused_moe node fed by the model's router.

Structure: the rule applies once per experts module of the HF model (dense first layers and shared
experts stay as they are), no experts marker or grouped_mm fallback is left, and the fused op's ids and
weights come from the captured top-k routing. Numbers: the compiled model equals HF eager (fp32, 1e-4 abs
on logits) on packed, chunked batches, over hypothesis-drawn tiny configs of Mixtral, Qwen3-MoE, Qwen2-MoE
(shared experts), DeepSeek-V3 (dense first layer, grouped top-k with score-correction bias) and GPT-OSS
(biases, sinks, clamped SwiGLU, transposed interleaved weights). Controls: rewrites with a wrong layout
or activation must fail verification, so the checks can fail.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PretrainedConfig
from transformers.integrations.moe import grouped_mm_experts_forward

from hfrewrite.runtime.model import CompiledModel
from hfrewrite.engine import Match, RewriteContext, shipped_library, template
from hfrewrite.engine.report import RewriteReport, UnmatchedRuleWarning
from hfrewrite.compiler.experts_marker import ExpertsFallbackWarning, ExpertsPlan, _hf_experts_function, experts_plan
from hfrewrite.kernels.moe import op as fused_moe_op  # noqa: F401  (registers hfrewrite::fused_moe)
from hfrewrite.compiler.build import CompileOptions, build_compiled
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.compiler.verify import verify
from tests.equivalence import compile_tiny, state_dict_weights

MOE_TYPES = ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
# Inductor compiles cost ~15 s each on 2 cores: one per distinct experts path (shared experts + softmax-topk;
# dense layer + grouped top-k; transposed interleaved biased clamped SwiGLU + topk-softmax). Mixtral and
# Qwen3-MoE share Qwen2-MoE's layout and gate and run under the eager backend above.
INDUCTOR_TYPES = ["qwen2_moe", "deepseek_v3", "gpt_oss"]
RULE = "fused-moe-experts"
ATOL = 1e-4
FUSED = torch.ops.hfrewrite.fused_moe.default
LEFTOVER_OPS = ("hfrewrite.experts.default", "transformers.grouped_mm_fallback.default")


@st.composite
def moe_sizes(draw: st.DrawFn, model_type: str) -> dict[str, Any]:
    """Tiny sizes plus the routing knobs each type has (names a type lacks are dropped by tiny_config)."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    experts = draw(st.sampled_from([4, 8]))
    sizes: dict[str, Any] = {
        "num_hidden_layers": draw(st.integers(2, 3)), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "hidden_size": heads * head_dim, "vocab_size": draw(st.sampled_from([97, 128])),
        "intermediate_size": draw(st.sampled_from([16, 48])), "moe_intermediate_size": draw(st.sampled_from([16, 24])),
        "num_local_experts": experts, "num_experts": experts, "n_routed_experts": experts,
        "norm_topk_prob": draw(st.booleans()),
    }
    top_k_bound = experts
    if model_type == "deepseek_v3":
        groups = draw(st.sampled_from([1, 2]))
        sizes.update(n_group=groups, topk_group=draw(st.integers(1, groups)), first_k_dense_replace=1,
                     routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
        top_k_bound = sizes["topk_group"] * experts // groups
    if model_type in ("qwen2_moe", "qwen3_moe"):
        sizes["mlp_only_layers"] = draw(st.sampled_from([[], [0]]))
        sizes["shared_expert_intermediate_size"] = draw(st.sampled_from([16, 32]))
    if model_type == "gpt_oss":
        sizes["swiglu_limit"] = draw(st.sampled_from([7.0, 0.5]))  # 0.5: the clamps bite on tiny activations
    sizes["num_experts_per_tok"] = draw(st.integers(1, min(3, top_k_bound)))
    return sizes


def experts_paths(reference: torch.nn.Module) -> list[str]:
    """Module paths of the HF model's routed-experts modules (3-D gate_up_proj): where the rule must apply."""
    return sorted(name for name, module in reference.named_modules()
                  if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and module.gate_up_proj.dim() == 3)


def upstream_ops(node: torch.fx.Node, hops: int) -> set[str]:
    """Op names of the nodes at most `hops` edges above `node`."""
    seen, frontier = set(), [node]
    for _ in range(hops):
        frontier = [parent for current in frontier for parent in current.all_input_nodes]
        seen.update(str(parent.target) for parent in frontier if parent.op == "call_function")
    return seen


def assert_fused_structure(model: CompiledModel, report: RewriteReport, reference: torch.nn.Module) -> None:
    """One fused op per experts module, fed by the captured top-k routing; no marker or grouped_mm left."""
    expected = experts_paths(reference)
    assert expected, "the tiny config has no MoE layer"
    assert report.applied.get(RULE) == len(expected), report.applied
    assert sorted(report.sites[RULE]) == expected
    assert not set(report.remaining_ops) & set(LEFTOVER_OPS), report.remaining_ops
    graph = model.graph_module.graph
    ops = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert not ops & set(LEFTOVER_OPS), ops & set(LEFTOVER_OPS)
    fused = [node for node in graph.nodes if node.target is FUSED]
    assert len(fused) == len(expected)
    for node in fused:
        assert node.meta.get("hfrewrite.rule") == RULE
        ids, weights = node.args[1], node.args[2]
        assert "aten.topk.default" in upstream_ops(ids, 3), f"{node.name}: ids not from the router's topk"
        assert "aten.topk.default" in upstream_ops(weights, 8), f"{node.name}: weights not from the routing"


def check_moe(config: PretrainedConfig, seed: int, backend: str | None) -> None:
    """Compile through every shipped rule, check the structure, verify against HF eager."""
    model, report, reference = compile_tiny(config, seed, backend)
    assert report.applied.get("paged-attention", 0) == len(model.kv_specs) > 0, report.applied
    assert_fused_structure(model, report, reference)
    for name, buffer in reference.named_buffers():  # DeepSeek-V3's router bias comes from the checkpoint
        if name.endswith("e_score_correction_bias"):
            assert buffer.unique().numel() > 1 and torch.equal(model.graph_module.get_buffer(name), buffer), name
    result = verify(model, reference, seed=seed, sequences=3, atol=ATOL)
    assert result.passed, (config.model_type, result)


@pytest.mark.parametrize("model_type", MOE_TYPES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fused_moe_model_equals_hf_eager(model_type: str, data: st.DataObject) -> None:
    sizes = data.draw(moe_sizes(model_type), label="sizes")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    check_moe(tiny_config(model_type, **sizes), seed, backend="eager")


@pytest.mark.parametrize("model_type", INDUCTOR_TYPES)
def test_inductor_fused_moe_model_equals_hf_eager(model_type: str) -> None:
    """The real compile at the default tiny sizes (DeepSeek-V3: one dense layer, then MoE)."""
    check_moe(tiny_config(model_type), seed=11, backend="inductor")


def test_two_moe_models_in_one_process() -> None:
    """Different layouts and activations side by side: built one after the other, then both verified."""
    built = []
    for model_type, seed in (("gpt_oss", 5), ("qwen3_moe", 6)):
        built.append((*compile_tiny(tiny_config(model_type), seed, "eager"), seed))
    activations = []
    for model, report, reference, seed in built:
        assert_fused_structure(model, report, reference)
        activations.append({node.args[7] for node in model.graph_module.graph.nodes if node.target is FUSED})
        assert verify(model, reference, seed=seed, sequences=2, atol=ATOL).passed
    assert activations == [{"gpt_oss"}, {"silu"}]


@template("moe_test_wrong_fused_moe", equation="(deliberately false) fused_moe with one flag flipped")
def wrong_fused_moe(ctx: RewriteContext, match: Match, flip: str) -> None:
    """A control: the fused op with the 2I axis read the other way, or GeGLU in place of the model's gate."""
    args = list(match.root.args)
    if flip == "interleaved":
        args[11] = not args[11]
    else:
        args[7] = "gelu" if args[7] != "gelu" else "silu"
    ctx.replace(match, ctx.insert_call(FUSED, tuple(args), like=match.root))


WRONG_LIBRARY = shipped_library().extended([wrong_fused_moe])  # the control lives in this test's library only


@pytest.mark.parametrize(("model_type", "flip"), [("gpt_oss", "interleaved"), ("qwen3_moe", "activation")])
def test_wrong_rewrite_fails_verification(model_type: str, flip: str, tmp_path: Path) -> None:
    rules = tmp_path / "wrong_moe.yaml"
    rules.write_text(f"- name: wrong-moe\n  doc: control\n  priority: 10\n  match: {{op: hfrewrite.experts.default}}\n"
                     f"  rewrite: {{template: moe_test_wrong_fused_moe, args: {{flip: {flip}}}}}\n")
    config = tiny_config(model_type)
    reference = tiny_model(config, 2)
    options = CompileOptions(rules=[rules], backend="eager", verify=False, progress=False, device="cpu",
                             templates=WRONG_LIBRARY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedRuleWarning)  # the shipped rule finds its sites taken
        model, report = build_compiled(config, state_dict_weights(reference), options, {})
    assert report.applied.get("wrong-moe") == len(experts_paths(reference)) and RULE in report.not_applicable
    result = verify(model, reference, seed=2, sequences=2, atol=ATOL)
    assert not result.passed and result.max_abs_err > 10 * ATOL, result


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_marker_plan_and_numbers_match_transformers(model_type: str) -> None:
    """Outside export, the experts implementation picks the module's layout and gate and computes HF's function."""
    reference = tiny_model(tiny_config(model_type, num_experts_per_tok=2), seed=3)
    generator = torch.Generator().manual_seed(3)
    for path in experts_paths(reference):
        module = reference.get_submodule(path)
        plan = experts_plan(module)
        assert isinstance(plan, ExpertsPlan), plan
        gpt_oss = model_type == "gpt_oss"
        assert (plan.activation.kind, plan.layout.transposed, plan.layout.interleaved, plan.has_bias) == \
            (("gpt_oss", True, True, True) if gpt_oss else ("silu", False, False, False))
        hidden = torch.randn(9, module.gate_up_proj.shape[1 if gpt_oss else 2], generator=generator)
        experts = module.gate_up_proj.shape[0]
        ids = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(9)])
        weights = torch.rand(9, 2, generator=generator) + 0.1
        with torch.no_grad():
            ours = _hf_experts_function(module, hidden, ids, weights)
            theirs = grouped_mm_experts_forward(module, hidden, ids, weights)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _clamped_silu(self: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """hy_v4 / glm5_next style: SiLU of a clamped gate times a clamped up (no alpha, no +1): not a kernel gate."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.clamp(max=self.limit)) * up.clamp(-self.limit, self.limit)


def _halves_clamped_swiglu(self: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """minimax_m3 / openai_privacy_filter style: GPT-OSS's clamped SwiGLU on concatenated halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(-self.swiglu_limit, self.swiglu_limit)
    return (up + 1.0) * (gate * torch.sigmoid(gate * self.swiglu_alpha))


_GATES = {"clamped_silu": _clamped_silu, "halves_clamped_swiglu": _halves_clamped_swiglu}


def _experts_with_gate(gate: str) -> torch.nn.Module:
    """A Mixtral experts module (random weights) of a subclass whose gate is `gate`."""
    module = tiny_model(tiny_config("mixtral"), seed=4).model.layers[0].mlp.experts
    base = type(module)
    module.__class__ = type(f"{base.__name__}With_{gate}", (base,), {"_apply_gate": _GATES[gate]})
    module.limit, module.swiglu_limit, module.swiglu_alpha = 1.0, 1.5, 1.702
    return module


def test_marker_recognises_a_clamped_swiglu_in_halves() -> None:
    module = _experts_with_gate("halves_clamped_swiglu")
    plan = experts_plan(module)
    assert isinstance(plan, ExpertsPlan), plan
    assert (plan.activation.kind, plan.activation.limit, plan.layout.interleaved) == ("gpt_oss", 1.5, False)


@pytest.mark.parametrize("variant", ["clamped_silu", "ungated"])
def test_marker_falls_back_to_a_grouped_graph(variant: str) -> None:
    """A gate the kernel lacks is not approximated: a warning, and a grouped-GEMM path calling the module's own
    gate (or activation, for ungated experts) that equals transformers' grouped_mm path."""
    module = _experts_with_gate("clamped_silu")
    if variant == "ungated":
        module.has_gate = False
        module.up_proj = torch.nn.Parameter(module.gate_up_proj.detach()[:, : module.gate_up_proj.shape[1] // 2])
    assert isinstance(experts_plan(module), str)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, module.gate_up_proj.shape[2], generator=generator) * 4.0
    ids = torch.stack([torch.randperm(module.gate_up_proj.shape[0], generator=generator)[:2] for _ in range(6)])
    weights = torch.rand(6, 2, generator=generator) + 0.1
    with pytest.warns(ExpertsFallbackWarning, match="grouped-GEMM graph"), torch.no_grad():
        ours = _hf_experts_function(module, hidden, ids, weights)
    with torch.no_grad():
        torch.testing.assert_close(ours, grouped_mm_experts_forward(module, hidden, ids, weights))


def test_unknown_gate_model_compiles_without_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a Mixtral whose experts gate the kernel lacks still captures, runs on this device and verifies;
    the rule reports it matched nothing."""
    experts_class = type(tiny_model(tiny_config("mixtral"), seed=0).model.layers[0].mlp.experts)
    monkeypatch.setattr(experts_class, "_apply_gate", _GATES["clamped_silu"])
    monkeypatch.setattr(experts_class, "limit", 0.5, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedRuleWarning)
        warnings.simplefilter("ignore", ExpertsFallbackWarning)
        model, report, reference = compile_tiny(tiny_config("mixtral"), 7, "eager")
    assert RULE in report.not_applicable and RULE not in report.applied
    targets = [str(node.target) for node in model.graph_module.graph.nodes]
    assert targets.count("transformers.grouped_mm_fallback.default") == 2 * len(experts_paths(reference))
    assert verify(model, reference, seed=7, sequences=2, atol=ATOL).passed
