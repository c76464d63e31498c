"""Applying rules to a captured tiny llama: numbers preserved, provenance, overlap, reports, explain."""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.capture import CapturedModel
from hfrewrite.engine import (RULE_META, RewriteReport, UnmatchedRuleWarning, apply_rules, explain,
                              load_rules)
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.layout import ParallelLayout

from .templates_for_tests import LIBRARY
from .graphs import capture_tiny, materialize, random_inputs, random_weights

WEIGHT_SEED = 1234


def rewrite(captured: CapturedModel, paths: list[Path], tp: int = 1) -> RewriteReport:
    ctx = rewrite_context(captured.graph_module, captured.config, ParallelLayout(tp=tp),
                          model_class=captured.model_class)
    return apply_rules(ctx, load_rules(paths, library=LIBRARY))


def mlp_rule_file(write_rules: Callable[..., Path], fixtures_dir: Path, variant: str) -> Path:
    text = (fixtures_dir / "llama_mlp.yaml").read_text()
    return write_rules(text.replace("template: engine_test_silu_as_sigmoid",
                                    f"template: engine_test_silu_as_sigmoid\n    args: {{variant: {variant}}}"))


@pytest.fixture(scope="module")
def reference() -> torch.fx.GraphModule:
    """The captured graph, unrewritten, on random CPU weights."""
    captured = capture_tiny()
    return materialize(captured, random_weights(captured, WEIGHT_SEED))


@pytest.fixture(scope="module")
def rewritten(fixtures_dir: Path) -> tuple[torch.fx.GraphModule, RewriteReport]:
    """The same model after the MLP and colwise-linear rules, on the same weights."""
    captured = capture_tiny()
    with pytest.warns(UnmatchedRuleWarning, match="rule mlp-silu-as-sigmoid matched nothing"):
        report = rewrite(captured, [fixtures_dir])
    return materialize(captured, random_weights(captured, WEIGHT_SEED)), report


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 24))
def test_rewritten_graph_computes_the_same_logits(reference: torch.fx.GraphModule,
                                                  rewritten: tuple[torch.fx.GraphModule, RewriteReport],
                                                  seed: int, tokens: int) -> None:
    graph_module, _ = rewritten
    input_ids, position_ids = random_inputs(seed, tokens)
    expected = reference(input_ids, position_ids)
    assert expected.shape == (1, tokens, 256) and expected.abs().max() > 0.1
    torch.testing.assert_close(graph_module(input_ids, position_ids), expected, rtol=1e-5, atol=1e-5)


def test_rewrite_report_says_what_was_done(rewritten: tuple[torch.fx.GraphModule, RewriteReport]) -> None:
    graph_module, report = rewritten
    targets = [node.target for node in graph_module.graph.nodes]
    # colwise-as-matmul (priority 5) ran first and took the gate/up linears the MLP pattern needs.
    assert report.applied == {"colwise-as-matmul": 10}
    assert report.unmatched_rules == ["mlp-silu-as-sigmoid"]
    assert report.sites["colwise-as-matmul"][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert targets.count(torch.ops.aten.matmul.default) == 10
    # left unmatched: nodes a rule was meant for (root op inside its scope) that no rule rewrote;
    # the two MLP muls, not the linears outside the colwise plan nor the rotary muls
    assert report.remaining_ops == {"aten.mul.Tensor": 2}
    assert json.loads(json.dumps(report.to_dict()))["applied"] == {"colwise-as-matmul": 10}


def test_mlp_rewrite_preserves_logits_and_a_wrong_one_does_not(write_rules: Callable[..., Path],
                                                               fixtures_dir: Path) -> None:
    weights_of = {}
    outputs = {}
    input_ids, position_ids = random_inputs(7, 11)
    for variant in ("none", "exact", "wrong"):
        captured = capture_tiny()
        if variant != "none":
            report = rewrite(captured, [mlp_rule_file(write_rules, fixtures_dir, variant)])
            assert report.applied == {"mlp-silu-as-sigmoid": 2}
            assert report.remaining_ops == {}  # both MLP products in the rule's scope were rewritten
        weights_of[variant] = random_weights(captured, WEIGHT_SEED)
        outputs[variant] = materialize(captured, weights_of[variant])(input_ids, position_ids)
    targets = [node.target for node in captured.graph_module.graph.nodes]
    assert torch.ops.aten.silu.default not in targets and targets.count(torch.ops.aten.sigmoid.default) == 2
    torch.testing.assert_close(outputs["exact"], outputs["none"], rtol=1e-5, atol=1e-5)
    assert (outputs["wrong"] - outputs["none"]).abs().max() > 1e-2


def test_new_nodes_carry_provenance_and_fake_values(write_rules: Callable[..., Path], fixtures_dir: Path) -> None:
    captured = capture_tiny()
    before = set(captured.graph_module.graph.nodes)
    rewrite(captured, [mlp_rule_file(write_rules, fixtures_dir, "exact")])
    graph = captured.graph_module.graph
    new = [node for node in graph.nodes if node not in before]
    assert len(new) == 6 and all(node.meta[RULE_META] == "mlp-silu-as-sigmoid" for node in new)
    for node in new:
        path, module_type = list(node.meta["nn_module_stack"].values())[-1]
        assert path.endswith(".mlp") and module_type.endswith("LlamaMLP")
        assert node.meta["val"].shape[2] == 128 and str(node.meta["val"].shape[1]).startswith("s")
    assert not any(RULE_META in node.meta for node in before if node in set(graph.nodes))
    down = [node for node in graph.nodes if node.target == torch.ops.aten.linear.default and
            str(node.args[1]).endswith("down_proj_weight")]
    assert all(node.args[0] in new for node in down)


def test_overlapping_rules_at_one_priority_are_refused(write_rules: Callable[..., Path]) -> None:
    text = """\
- name: head-a
  doc: One rule for lm_head.
  match: {op: aten.linear, scope: lm_head}
  rewrite: {template: engine_test_linear_as_matmul}
- name: head-b
  doc: Another rule for lm_head.
  match: {op: aten.linear, scope: ["lm_head", "model.norm"]}
  rewrite: {template: engine_test_record_site}
"""
    captured = capture_tiny()
    code = captured.graph_module.code
    with pytest.raises(RewriteError) as caught:
        rewrite(captured, [write_rules(text)])
    message = str(caught.value)
    assert "overlapping matches at node linear_14" in message
    assert "rule head-a" in message and "rule head-b" in message and message.count("at lm_head") == 2
    assert captured.graph_module.code == code  # refused before anything was rewritten
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        report = rewrite(captured, [write_rules(text.replace("  rewrite: {template: engine_test_record", "  priority: -1\n"
                                                             "  rewrite: {template: engine_test_record"))])
    assert report.applied == {"head-a": 1} and report.unmatched_rules == ["head-b"]
    unmatched = [w for w in caught_warnings if issubclass(w.category, UnmatchedRuleWarning)]
    assert len(unmatched) == 1 and "rules.yaml:5: rule head-b matched nothing" in str(unmatched[0].message)


def test_rules_for_other_models_are_skipped_without_warning(write_rules: Callable[..., Path]) -> None:
    text = ("- name: gpt2-only\n  doc: Not for llama.\n  models: [gpt2]\n  match: {op: aten.linear}\n"
            "  rewrite: {template: engine_test_linear_as_matmul}\n")
    captured = capture_tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = rewrite(captured, [write_rules(text)])
    assert report.skipped_rules == ["gpt2-only"] and report.applied == {} and report.remaining_ops == {}


def test_explain_lists_sites_and_near_misses_without_changing_the_graph(fixtures_dir: Path,
                                                                        write_rules: Callable[..., Path]) -> None:
    captured = capture_tiny()
    code = captured.graph_module.code
    extra = write_rules("- name: kv-split\n  doc: Needs kv heads divisible by tp.\n  models: [llama]\n"
                        "  match: {op: hfrewrite.attention}\n  where: [{divisible: [k.shape.1, tp]}]\n"
                        "  rewrite: {template: engine_test_record_site}\n- name: other-model\n  doc: gpt2 only.\n"
                        "  models: gpt2\n  match: {op: aten.silu}\n  rewrite: {template: engine_test_record_site}\n")
    ctx = rewrite_context(captured.graph_module, captured.config, ParallelLayout(tp=4),
                          model_class=captured.model_class)
    report = explain(ctx, load_rules([fixtures_dir, extra], library=LIBRARY))
    assert captured.graph_module.code == code
    by_rule = {entry.rule: entry for entry in report.rules}
    # explain applies the rules in order on a copy, as compile does: colwise-as-matmul (priority 5) turned the
    # gate projections into matmuls first, so the MLP pattern finds none (compile warns it matched nothing)
    assert by_rule["mlp-silu-as-sigmoid"].sites == []
    assert all("wants aten.linear, found aten.matmul.default" in miss.reason
               for miss in by_rule["mlp-silu-as-sigmoid"].near_misses)
    assert len(by_rule["colwise-as-matmul"].sites) == 10  # 32 kv rows, 64 q rows, 128 mlp rows: all divide by 4
    assert len(by_rule["kv-split"].near_misses) == 2
    assert by_rule["other-model"].skipped.startswith("model type 'llama' is not in models ['gpt2']")
    text = report.to_text()
    assert "rule kv-split" in text and "where divisible: 2 not divisible by 4 (k.shape.1 % tp)" in text
    assert "claims: silu(g) * u == (g * sigmoid(g)) * u" in text and "skipped: model type" in text
    assert json.loads(json.dumps(report.to_dict()))["model_type"] == "llama"


def test_a_template_guard_turns_matches_into_near_misses(write_rules: Callable[..., Path]) -> None:
    """The guard runs while matching, with the rule's args: refused sites are near misses (compile and explain), so
    the template never sees them."""
    text = ("- name: guarded\n  doc: Layer 1 only.\n  match: {op: aten.silu}\n"
            "  rewrite: {template: engine_test_record_guarded, args: {layer: model.layers.1.}}\n")
    captured = capture_tiny()
    ctx = rewrite_context(captured.graph_module, captured.config, ParallelLayout(), model_class=captured.model_class)
    explained = {entry.rule: entry for entry in explain(ctx, load_rules([write_rules(text)], library=LIBRARY)).rules}
    assert explained["guarded"].sites == ["model.layers.1.mlp.act_fn"]
    assert [miss.reason for miss in explained["guarded"].near_misses] == [
        "guard: model.layers.0.mlp.act_fn is not in model.layers.1."]
    report = apply_rules(ctx, load_rules([write_rules(text)], library=LIBRARY))
    assert report.sites == {"guarded": ["model.layers.1.mlp.act_fn"]} and ctx.state["sites"] == report.sites["guarded"]
    assert [miss.module_path for miss in report.near_misses] == ["model.layers.0.mlp.act_fn"]


def test_a_rewrite_that_breaks_shapes_is_caught(write_rules: Callable[..., Path]) -> None:
    text = ("- name: breaks-gate\n  doc: Replaces gate_proj by its input (wrong width).\n"
            "  match: {op: aten.linear, scope: model.layers.0.mlp.gate_proj}\n"
            "  rewrite: {template: engine_test_replace_by_input}\n")
    with pytest.raises(RewriteError) as caught:
        rewrite(capture_tiny(), [write_rules(text)])
    message = str(caught.value)
    assert message.startswith("rule breaks-gate (") and "rules.yaml:1)" in message
    assert "node mul_13" in message and "no longer computes" in message and "model.layers.0.mlp" in message


def test_an_ill_typed_insert_is_refused_at_once(write_rules: Callable[..., Path]) -> None:
    text = ("- name: bad-insert\n  doc: Inserts mm on 3-d inputs.\n  match: {op: aten.linear, scope: lm_head}\n"
            "  rewrite: {template: engine_test_bad_insert}\n")
    with pytest.raises(RewriteError) as caught:
        rewrite(capture_tiny(), [write_rules(text)])
    message = str(caught.value)
    assert message.startswith("rule bad-insert (") and "at lm_head: new call aten.mm.default" in message


def test_new_parameters_enter_the_graph_with_static_fake_values(write_rules: Callable[..., Path]) -> None:
    text = ("- name: half-head\n  doc: Half the vocabulary rows.\n  match: {op: aten.linear, scope: lm_head}\n"
            "  rewrite: {template: engine_test_half_head}\n")
    captured = capture_tiny()
    rewrite(captured, [write_rules(text)])
    graph = captured.graph_module.graph
    shard = next(node for node in graph.nodes if node.op == "get_attr" and node.target == "engine_test.head_shard")
    assert shard.meta[RULE_META] == "half-head" and tuple(shard.meta["val"].shape) == (128, 64)
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    assert output.meta["val"].shape[2] == 128 and output.args[1] is shard
    assert "lm_head_weight" not in [node.name for node in graph.nodes]  # a dead captured weight is erased
    assert captured.parameter_specs()["engine_test.head_shard"] == ((128, 64), torch.float32)


def test_template_state_and_new_inputs_belong_to_the_context(write_rules: Callable[..., Path]) -> None:
    text = ("- name: record\n  doc: Records attention sites.\n  match: {op: hfrewrite.attention}\n"
            "  rewrite: {template: engine_test_record_site, args: {key: attention}}\n"
            "- name: scale-silu\n  doc: Scales every silu by one new graph input.\n  match: {op: aten.silu}\n"
            "  rewrite: {template: engine_test_scale_silu}\n")
    first, second = capture_tiny(), capture_tiny()
    contexts = [rewrite_context(c.graph_module, c.config) for c in (first, second)]
    apply_rules(contexts[0], load_rules([write_rules(text)], library=LIBRARY))
    assert contexts[0].state == {"attention": ["model.layers.0.self_attn", "model.layers.1.self_attn"]}
    assert contexts[1].state == {}
    placeholders = [node for node in first.graph_module.graph.nodes if node.op == "placeholder"]
    assert [node.target for node in placeholders] == ["input_ids", "position_ids", "engine_scale"]
    assert placeholders[2].meta[RULE_META] == "scale-silu" and tuple(placeholders[2].meta["val"].shape) == (1,)
    assert len(placeholders[2].users) == 2
    graph_module = materialize(first, random_weights(first, WEIGHT_SEED))
    input_ids, position_ids = random_inputs(3, 9)
    scaled = graph_module(input_ids, position_ids, torch.tensor([1.0]))
    halved = graph_module(input_ids, position_ids, torch.tensor([0.5]))
    reference = materialize(second, random_weights(second, WEIGHT_SEED))(input_ids, position_ids)
    torch.testing.assert_close(scaled, reference, rtol=1e-5, atol=1e-5)
    assert (halved - reference).abs().max() > 1e-2
