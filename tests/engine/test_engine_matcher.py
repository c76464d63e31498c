"""Matching on a captured tiny llama: DAG patterns, captures, scopes, and near-miss reasons."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hfrewrite.compiler.capture import CapturedModel
from hfrewrite.engine import RewriteContext, Rule, find_matches, load_rules, parse_rule_file
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.engine.scopes import base_prefix, normalise_module_path
from hfrewrite.parallel.layout import ParallelLayout

from .templates_for_tests import LIBRARY
from .graphs import capture_tiny

LAYERS = ("model.layers.0", "model.layers.1")


@pytest.fixture(scope="module")
def captured() -> CapturedModel:
    """One capture shared by these tests: matching never changes the graph."""
    return capture_tiny()


def context(captured: CapturedModel, tp: int = 1, model_class: str | None = None) -> RewriteContext:
    return rewrite_context(captured.graph_module, captured.config, ParallelLayout(tp=tp), model_class=model_class)


def rule(text: str) -> Rule:
    """One rule from inline YAML (name, doc and rewrite filled in)."""
    body = "\n".join(f"  {line}" for line in text.strip().splitlines())
    return parse_rule_file(f"- name: probe\n  doc: test rule\n  rewrite: {{template: t}}\n{body}\n", "inline.yaml")[0]


def test_mlp_dag_matches_each_layer_and_binds_shared_captures(captured: CapturedModel, fixtures_dir: Path) -> None:
    mlp = load_rules([fixtures_dir / "llama_mlp.yaml"], library=LIBRARY).get("mlp-silu-as-sigmoid")
    matches, misses = find_matches(captured.graph_module, mlp, context(captured))
    assert [m.module_path for m in matches] == [f"{layer}.mlp" for layer in LAYERS]
    assert misses == []
    first = matches[0]
    assert first.module_type == "LlamaMLP"
    assert [first.nodes[name].target for name in ("out", "act", "gate", "up")] == [
        torch.ops.aten.mul.Tensor, torch.ops.aten.silu.default, torch.ops.aten.linear.default,
        torch.ops.aten.linear.default]
    assert first.captures["w_gate"].target == "model.layers.0.mlp.gate_proj.weight"
    assert first.captures["w_up"].target == "model.layers.0.mlp.up_proj.weight"
    assert first.nodes["gate"].args[0] is first.nodes["up"].args[0] is first.captures["x"]
    assert first.captures["x"] not in first.owned()


def test_near_miss_scope(captured: CapturedModel) -> None:
    probe = rule('match: {op: hfrewrite.attention, scope: "model.layers.*.mlp"}')
    matches, misses = find_matches(captured.graph_module, probe, context(captured))
    assert matches == []
    assert [m.reason for m in misses] == [
        f"scope 'model.layers.*.mlp' does not match '{layer}.self_attn'" for layer in LAYERS]
    assert [m.module_path for m in misses] == [f"{layer}.self_attn" for layer in LAYERS]


def test_near_miss_module_type(captured: CapturedModel) -> None:
    probe = rule("match: {op: hfrewrite.attention, module_type: [LlamaMLP, GPT2Attention]}")
    _, misses = find_matches(captured.graph_module, probe, context(captured))
    assert {m.reason for m in misses} == {"module_type 'LlamaAttention' is not one of ['LlamaMLP', 'GPT2Attention']"}


def test_near_miss_config(captured: CapturedModel) -> None:
    probe = rule("match: {op: hfrewrite.attention, config: {model_type: gpt2}}")
    _, misses = find_matches(captured.graph_module, probe, context(captured))
    assert {m.reason for m in misses} == {"config model_type is 'llama', rule wants ['gpt2']"}
    probe = rule("match: {op: hfrewrite.attention, config: {num_key_value_heads: [1, 2], no_such: 3}}")
    _, misses = find_matches(captured.graph_module, probe, context(captured))
    assert {m.reason for m in misses} == {"config has no no_such, rule wants [3]"}


@pytest.mark.parametrize("check, tp, reason", [
    ("{divisible: [config.num_key_value_heads, tp]}", 4, "where divisible: 2 not divisible by 4 "
                                                         "(config.num_key_value_heads % tp)"),
    ("{divisible: [k.shape.1, ctx.tp]}", 4, "where divisible: 2 not divisible by 4 (k.shape.1 % ctx.tp)"),
    ("{equals: [q.dtype, bfloat16]}", 1, "where equals: 'float32' != 'bfloat16' (q.dtype vs bfloat16)"),
    ("{in: [config.hidden_act, [gelu, relu]]}", 1, "where in: 'silu' not in ['gelu', 'relu'] (config.hidden_act)"),
    ("{divisible: [q.shape.2, 2]}", 1, "where divisible: cannot evaluate: size s"),
    ("{equals: [scaling, 0.5]}", 1, "where equals: 0.25 != 0.5 (scaling vs 0.5)"),
    ("{equals: [q, 0.5]}", 1, "where equals: cannot evaluate: a tensor cannot be compared"),
])
def test_near_miss_where(captured: CapturedModel, check: str, tp: int, reason: str) -> None:
    probe = rule(f"match: {{op: hfrewrite.attention}}\nwhere: [{check}]")
    matches, misses = find_matches(captured.graph_module, probe, context(captured, tp=tp))
    assert matches == [] and len(misses) == 2
    assert all(m.reason.startswith(reason) for m in misses), misses[0].reason


def test_where_that_holds_matches(captured: CapturedModel) -> None:
    probe = rule("match: {op: hfrewrite.attention}\nwhere: [{divisible: [k.shape.1, tp]}, "
                 "{equals: [root.dtype, torch.float32]}, {in: [sliding_window, [0]]}]")
    matches, misses = find_matches(captured.graph_module, probe, context(captured, tp=2))
    assert len(matches) == 2 and misses == []
    assert matches[0].captures["scaling"] == 0.25


def test_interior_node_used_outside_the_match_is_a_near_miss(captured: CapturedModel) -> None:
    probe = rule("match:\n  pattern:\n    root: out\n    nodes:\n      out: {op: aten.linear, args: [h, w]}\n"
                 "      h: {op: aten.mul.Tensor, args: [a, b]}")
    matches, misses = find_matches(captured.graph_module, probe, context(captured))
    assert [m.module_path for m in matches] == [f"{layer}.mlp.down_proj" for layer in LAYERS]
    q_proj = next(m for m in misses if m.module_path == "model.layers.0.self_attn.q_proj")
    assert q_proj.reason.startswith("interior node 'h' (mul_4) used outside the match (by linear_1, linear_2")
    assert len(misses) == 10  # q, k, v, gate, up of both layers; o_proj and lm_head fail at the root's input


def test_capture_bound_twice_must_be_the_same_node(captured: CapturedModel) -> None:
    probe = rule("match:\n  pattern:\n    root: out\n    nodes:\n      out: {op: aten.mul.Tensor, args: [act, up]}\n"
                 "      act: {op: aten.silu, args: [gate]}\n      gate: {op: aten.linear, args: [x, w]}\n"
                 "      up: {op: aten.linear, args: [x, w]}")
    matches, misses = find_matches(captured.graph_module, probe, context(captured))
    assert matches == []
    assert [m.module_path for m in misses] == [f"{layer}.mlp" for layer in LAYERS]
    assert misses[0].reason.startswith("capture 'w' would be both get_attr (model_layers_0_mlp_gate_proj_weight)")


def test_structural_misses_are_not_reported_for_unrelated_nodes(captured: CapturedModel, fixtures_dir: Path) -> None:
    """The rotary muls share the MLP root op; they are not near misses of an unscoped MLP pattern."""
    text = (fixtures_dir / "llama_mlp.yaml").read_text()
    for line in ('    scope: "model.layers.*.mlp"\n', "    module_type: LlamaMLP\n"):
        text = text.replace(line, "")
    mlp = parse_rule_file(text, "unscoped.yaml")[0]
    matches, misses = find_matches(captured.graph_module, mlp, context(captured))
    assert len(matches) == 2 and misses == []


def test_tp_plan_scope(captured: CapturedModel) -> None:
    probe = rule('match: {op: aten.linear, scope: "{tp_plan:colwise}"}')
    matches, misses = find_matches(captured.graph_module, probe, context(captured))
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    assert [m.module_path for m in matches] == [f"{layer}.{p}" for layer in LAYERS for p in projections]
    reasons = {m.module_path: m.reason for m in misses}
    assert reasons["model.layers.0.self_attn.o_proj"].endswith("(tp_plan style 'rowwise')")
    assert reasons["lm_head"] == "scope '{tp_plan:colwise}' does not match 'lm_head' (tp_plan style " \
                                 "'colwise_gather_output')"
    assert context(captured).scope_sets == context(captured, model_class="LlamaForCausalLM").scope_sets
    _, misses = find_matches(captured.graph_module, probe, context(captured, model_class=""))
    assert [m.reason for m in misses if m.module_path == "lm_head"][0].endswith("(not in tp_plan)")
    any_style = rule('match: {op: aten.linear, scope: ["{tp_plan}"]}')
    assert len(find_matches(captured.graph_module, any_style, context(captured))[0]) == 15


def test_pp_plan_scope_and_globs(captured: CapturedModel) -> None:
    probe = rule('match: {op: aten.embedding, scope: "{pp_plan}"}')
    assert [m.module_path for m in find_matches(captured.graph_module, probe, context(captured))[0]] == [
        "model.embed_tokens"]
    probe = rule('match: {op: aten.linear, scope: ["lm_head", "model.layers.1.*.o_proj"]}')
    assert [m.module_path for m in find_matches(captured.graph_module, probe, context(captured))[0]] == [
        "model.layers.1.self_attn.o_proj", "lm_head"]


def test_literal_and_list_arguments(captured: CapturedModel) -> None:
    probe = rule("match: {op: aten.cat, args: [[a, b], -1]}\nwhere: [{equals: [a.ndim, 4]}]")
    matches, _ = find_matches(captured.graph_module, probe, context(captured))
    assert len(matches) == 4  # rotate_half of q and k in both layers
    probe = rule("match: {op: aten.cat, args: [[a, ...], 1]}")
    matches, misses = find_matches(captured.graph_module, probe, context(captured))
    assert matches == [] and misses == []


def test_matching_is_deterministic(captured: CapturedModel, fixtures_dir: Path) -> None:
    ruleset = load_rules([fixtures_dir], library=LIBRARY)
    first = [(m.root.name, m.module_path) for r in ruleset for m in find_matches(
        captured.graph_module, r, context(captured))[0]]
    second = [(m.root.name, m.module_path) for r in ruleset for m in find_matches(
        captured.graph_module, r, context(captured))[0]]
    assert first == second and first


@pytest.mark.parametrize("raw, path", [
    ("model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L__self__.model.layers.0", "model.layers.0"),
    ("L['self'].model._modules['layers'][3].mlp", "model.layers.3.mlp"),
    ("_empty_nn_module_stack_from_metadata_hook", ""),
])
def test_module_paths_are_normalised(raw: str, path: str) -> None:
    assert normalise_module_path(raw) == path


def test_base_prefix_is_found_from_the_graph() -> None:
    paths = ["", "lm_head", "model", "model.language_model", "model.language_model.layers.0.mlp.up_proj"]
    assert base_prefix(["layers.*.mlp.up_proj"], paths) == "model.language_model"
    assert base_prefix(["layers.*.mlp.up_proj"], ["model", "model.layers.0.mlp.up_proj"]) == "model"
