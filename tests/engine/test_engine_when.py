"""Which rules run (`when:` over the caller's options, scope sets the caller names), where templates come
from (TemplateLibrary objects), how template errors surface, and explain on chained rules."""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hfrewrite.compiler.capture import CapturedModel
from hfrewrite.engine import (Match, RewriteContext, ScopeSet, TemplateLibrary, apply_rules, explain, find_matches,
                              load_rules, shipped_library, template)
from hfrewrite.errors import RewriteError, RuleError
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.layout import ParallelLayout

from .graphs import capture_tiny
from .templates_for_tests import LIBRARY, linear_as_matmul, record_site

aten = torch.ops.aten
RECORD = "rewrite: {template: engine_test_record_site}"


@pytest.fixture(scope="module")
def captured() -> CapturedModel:
    """One capture: these tests rewrite copies (explain) or templates that change nothing."""
    return capture_tiny()


def context(captured: CapturedModel, device: str | None = None, **options: Any) -> RewriteContext:
    layout = ParallelLayout(device=torch.device(device) if device else None, **options)
    return rewrite_context(captured.graph_module, captured.config, layout, model_class=captured.model_class)


def head_rule(when: str, name: str = "head", rewrite: str = RECORD) -> str:
    return f"- name: {name}\n  doc: The LM head.\n  when: {when}\n  match: {{op: aten.linear, scope: lm_head}}\n" \
           f"  {rewrite}\n"


@pytest.mark.parametrize("when, tp, ep, runs", [
    ("{gt: [tp, 1]}", 1, False, False),
    ("{gt: [tp, 1]}", 2, False, True),
    ("[{gt: [tp, 1]}, {equals: [ep, true]}]", 2, False, False),
    ("[{gt: [tp, 1]}, {equals: [ep, true]}]", 2, True, True),
    ("{in: [dtype, [float32, torch.bfloat16]]}", 1, False, True),
    ("{equals: [device, cuda]}", 1, False, False),
])
def test_when_decides_whether_a_rule_runs(captured: CapturedModel, write_rules: Callable[..., Path], when: str,
                                          tp: int, ep: bool, runs: bool) -> None:
    ctx = context(captured, tp=tp, ep=ep, device="cpu")
    ruleset = load_rules([write_rules(head_rule(when))], library=LIBRARY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rule that does not apply is not "matched nothing"
        report = apply_rules(ctx, ruleset)
    assert (report.applied == {"head": 1}) is runs
    assert (report.not_applicable == ["head"]) is not runs
    assert ctx.state == ({"sites": ["lm_head"]} if runs else {})
    entry = explain(ctx, ruleset).rules[0]
    assert (entry.sites == ["lm_head"]) is runs
    assert bool(entry.not_applicable) is not runs and entry.not_applicable.startswith("" if runs else "when {")


def test_explain_says_why_a_rule_is_not_applicable(captured: CapturedModel, write_rules: Callable[..., Path]) -> None:
    ruleset = load_rules([write_rules(head_rule("[{gt: [tp, 1]}, {equals: [ep, false]}]"))], library=LIBRARY)
    text = explain(context(captured, tp=2, ep=True), ruleset).to_text()
    assert "  not applicable: when {equals: [ep, False]} is false: True != False (ep vs False)" in text
    assert "matched" not in text


def test_a_when_naming_an_unknown_option_is_a_rule_error(captured: CapturedModel,
                                                        write_rules: Callable[..., Path]) -> None:
    path = write_rules(head_rule("{gt: [tpp, 1]}"))
    with pytest.raises(RuleError) as caught:
        apply_rules(context(captured), load_rules([path], library=LIBRARY))
    assert str(caught.value) == (f"{path}:1: rule head: field when: unknown option 'tpp'; the options are: device, "
                                 f"dtype, ep, logits, pp, rank, tp")


def test_an_unknown_scope_set_is_named(captured: CapturedModel, write_rules: Callable[..., Path]) -> None:
    path = write_rules("- name: typo\n  doc: A misspelt plan.\n  match: {op: aten.linear, scope: '{tp_plann:colwise}'}\n"
                       f"  {RECORD}\n")
    ruleset = load_rules([path], library=LIBRARY)
    for run in (apply_rules, explain, lambda ctx, rules: find_matches(ctx.graph_module, rules.rules[0], ctx)):
        with pytest.raises(RuleError) as caught:
            run(context(captured), ruleset)
        assert str(caught.value) == (f"{path}:1: rule typo: field match.scope: unknown scope set 'tp_plann' in "
                                     f"'{{tp_plann:colwise}}'; the scope sets given are: ep_plan, pp_plan, tp_plan")


def test_scope_sets_are_whatever_the_caller_supplies(captured: CapturedModel, write_rules: Callable[..., Path]) -> None:
    text = "- name: mine\n  doc: A caller's own set.\n  match: {op: aten.linear, scope: '{heads:out}'}\n" \
           f"  {RECORD}\n"
    ctx = RewriteContext(captured.graph_module, captured.config, scope_sets={"heads": ScopeSet({"lm_head": "out"})})
    assert apply_rules(ctx, load_rules([write_rules(text)], library=LIBRARY)).applied == {"mine": 1}
    ctx = RewriteContext(captured.graph_module, captured.config, scope_sets={"heads": ScopeSet({"lm_head": "in"})})
    report = apply_rules(ctx, load_rules([write_rules(text)], library=LIBRARY))
    assert report.applied == {} and report.not_applicable == ["mine"]  # no module has the style: cannot match


def test_explain_applies_rules_in_order_so_chained_rules_show_their_sites(captured: CapturedModel,
                                                                          write_rules: Callable[..., Path]) -> None:
    text = ("- name: head-as-matmul\n  doc: lm_head as a matmul.\n  priority: 5\n"
            "  match: {op: aten.linear, scope: lm_head}\n  rewrite: {template: engine_test_linear_as_matmul}\n"
            "- name: after\n  doc: Finds what head-as-matmul made.\n  match: {op: aten.matmul, scope: lm_head}\n"
            f"  {RECORD}\n")
    ctx = context(captured)
    code = captured.graph_module.code
    report = explain(ctx, load_rules([write_rules(text)], library=LIBRARY))
    assert {entry.rule: entry.sites for entry in report.rules} == {"head-as-matmul": ["lm_head"], "after": ["lm_head"]}
    assert captured.graph_module.code == code and ctx.state == {}  # the copy was rewritten, not the graph


@template("bug", equation="(a bug) raises KeyError")
def buggy(ctx: RewriteContext, match: Match) -> None:
    """A template with a bug in it: looks up a capture the rule never binds."""
    {"weight": match.root}["wieght"]


@template("refuses", equation="(refuses) raises RewriteError")
def refuses(ctx: RewriteContext, match: Match) -> None:
    """A template refusing a site the way shipped ones do: our own error, for the user to read."""
    raise RewriteError("the vocabulary of 256 rows cannot be split that way")


ERRORS = TemplateLibrary([buggy, refuses])


def test_a_template_bug_keeps_its_traceback_with_the_rule_in_a_note(write_rules: Callable[..., Path]) -> None:
    path = write_rules(head_rule("{equals: [tp, 1]}", "buggy-head", "rewrite: {template: bug}"))
    with pytest.raises(KeyError) as caught:
        apply_rules(context(capture_tiny()), load_rules([path], library=ERRORS))
    assert [frame.name for frame in caught.traceback][-1] == "buggy"  # raised where the bug is
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("raised by template bug (") and \
        f"applying rule buggy-head ({path}:1) at lm_head (node linear_14)" in notes[0]
    assert notes[0] in "".join(traceback.format_exception(caught.value))


def test_our_own_error_stays_one_paragraph_with_the_rule_named(write_rules: Callable[..., Path]) -> None:
    path = write_rules(head_rule("{equals: [tp, 1]}", "refusing-head", "rewrite: {template: refuses}"))
    with pytest.raises(RewriteError) as caught:
        apply_rules(context(capture_tiny()), load_rules([path], library=ERRORS))
    assert str(caught.value) == (f"rule refusing-head ({path}:1): at lm_head: the vocabulary of 256 rows cannot be "
                                 f"split that way")
    assert not getattr(caught.value, "__notes__", None)


def test_two_template_libraries_in_one_process(captured: CapturedModel, write_rules: Callable[..., Path]) -> None:
    @template("engine_test_record_site")
    def record_elsewhere(ctx: RewriteContext, match: Match) -> None:
        ctx.state["elsewhere"] = match.module_path

    path = write_rules(head_rule("{equals: [tp, 1]}"))
    other = TemplateLibrary([record_elsewhere, linear_as_matmul])
    first, second = context(captured), context(captured)
    apply_rules(first, load_rules([path], library=LIBRARY))
    apply_rules(second, load_rules([path], library=other))
    assert first.state == {"sites": ["lm_head"]} and second.state == {"elsewhere": "lm_head"}
    assert "engine_test_record_site" not in shipped_library() and "paged_attention" in shipped_library()
    with pytest.raises(RuleError, match="template 'engine_test_record_site' defined twice"):
        LIBRARY.extended([record_elsewhere])
    assert LIBRARY.get("engine_test_record_site") is record_site  # extending made a new library
    with pytest.raises(RuleError, match="unknown template 'engine_test_record_site'; known templates: bug, refuses"):
        load_rules([path], library=ERRORS)
