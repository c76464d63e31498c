"""Applying a RuleSet to a graph: priority order, overlap refusal, provenance, re-checked shapes.

Per priority level (highest first): find every rule's matches on the current graph, refuse any two
matches sharing a node (same rule or same priority: the result would depend on luck), then apply
each rule's template per match, stamp new nodes with the rule name and the root's module stack,
erase what the matches owned and no one uses, lint, recompile and re-propagate fake values.
`explain` does the same on a copy of the graph, so a rule that matches what an earlier one made
shows its sites. A rule whose `when:` is false (or whose plan styles are absent) does not run.
A template's own errors (HfRewriteError) come back naming the rule and site; anything else it raises
is a bug and propagates with its traceback and a note naming the rule.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.fx

from hfrewrite.errors import HfRewriteError, RewriteError
from hfrewrite.engine.conditions import check_rule_inputs, not_applicable
from hfrewrite.engine.context import RewriteContext, erase_dead
from hfrewrite.engine.fakeprop import propagate
from hfrewrite.engine.loader import check_template
from hfrewrite.engine.matcher import Match, NearMiss, find_matches
from hfrewrite.engine.origin import noted, reworded
from hfrewrite.engine.report import ExplainReport, RewriteReport, RuleExplanation, UnmatchedRuleWarning
from hfrewrite.engine.schema import Rule, RuleSet, op_name
from hfrewrite.engine.scopes import module_of, scope_failure
from hfrewrite.engine.templates import Template, TemplateLibrary, shipped_library

RULE_META = "hfrewrite.rule"


def _library(ruleset: RuleSet, library: TemplateLibrary | None) -> TemplateLibrary:
    """The library given, else the one the rules were loaded for, else the shipped templates."""
    if library is not None:
        return library
    return ruleset.library if ruleset.library is not None else shipped_library()


def apply_rules(ctx: RewriteContext, ruleset: RuleSet, library: TemplateLibrary | None = None) -> RewriteReport:
    """Rewrite `ctx.graph_module` in place with `ruleset` (templates from `library`); returns what was done."""
    library = _library(ruleset, library)
    report = RewriteReport()
    for rule in ruleset:
        check_rule_inputs(rule, ctx.options, ctx.scope_sets)
    active = []
    for rule in ruleset:
        if not rule.applies_to(ctx.model_type):
            report.skipped_rules.append(rule.name)
        elif not_applicable(rule, ctx) is not None:
            report.not_applicable.append(rule.name)
        else:
            check_template(rule, library)
            active.append(rule)
    for group in RuleSet(tuple(active)).priority_groups():
        found = [(rule, *find_matches(ctx.graph_module, rule, ctx, _guard(rule, library))) for rule in group]
        _refuse_overlaps(found)
        for rule, matches, misses in found:
            report.near_misses.extend(misses)
            if not matches and rule.optional:
                report.not_applicable.append(rule.name)
                continue
            if not matches:
                report.unmatched_rules.append(rule.name)
                warnings.warn(f"{rule.location}: rule {rule.name} matched nothing in this "
                              f"{ctx.model_type or 'model'} graph", UnmatchedRuleWarning, stacklevel=2)
                continue
            _apply_rule(ctx, rule, matches, library.get(rule.rewrite.template))
            report.applied[rule.name] = len(matches)
            report.sites[rule.name] = [match.module_path for match in matches]
        ctx.replaced.clear()
    report.applied = dict(sorted(report.applied.items()))
    report.sites = dict(sorted(report.sites.items()))
    report.remaining_ops = remaining_ops(ctx, active)
    return report


def explain(ctx: RewriteContext, ruleset: RuleSet, library: TemplateLibrary | None = None) -> ExplainReport:
    """Per rule: its sites and near misses, the rules applied in priority order on a copy of the graph
    (so a rule matching what an earlier one made shows its sites). `ctx` and its graph are not changed."""
    library = _library(ruleset, library)
    for rule in ruleset:
        check_rule_inputs(rule, ctx.options, ctx.scope_sets)
    work = dataclasses.replace(ctx, graph_module=copy.deepcopy(ctx.graph_module), state=copy.deepcopy(ctx.state),
                               replaced={})
    report = ExplainReport(ctx.model_type)
    entries: dict[str, RuleExplanation] = {}
    active = []
    for rule in ruleset:
        template = library.get(rule.rewrite.template) if rule.rewrite.template in library else None
        equation = template.equation if template is not None else \
            f"(cannot rewrite: unknown template {rule.rewrite.template!r})"
        entry = RuleExplanation(rule.name, str(rule.location), rule.rewrite.template, rule.priority, rule.doc,
                                equation=equation)
        entries[rule.name] = entry
        report.rules.append(entry)
        if not rule.applies_to(ctx.model_type):
            entry.skipped = f"model type {ctx.model_type!r} is not in models {list(rule.models or ())!r}"
        elif (reason := not_applicable(rule, work)) is not None:
            entry.not_applicable = reason
        else:
            active.append(rule)
    stopped = ""  # the first failure: later rules are matched on the graph as it was then, not applied
    for group in RuleSet(tuple(active)).priority_groups():
        found = [(rule, *find_matches(work.graph_module, rule, work, _guard(rule, library))) for rule in group]
        for rule, matches, misses in found:
            entries[rule.name].sites = [match.module_path for match in matches]
            entries[rule.name].near_misses = misses
            if stopped:
                entries[rule.name].failed = f"not applied: {stopped}"
        if stopped:
            continue
        try:
            _refuse_overlaps(found)
        except RewriteError as error:
            stopped = f"rule {group[0].name}'s priority level cannot be applied"
            for rule, _, _ in found:
                entries[rule.name].failed = str(error)
            continue
        for rule, matches, _ in found:
            if not matches:
                continue
            if rule.rewrite.template not in library:
                stopped = f"rule {rule.name} could not be applied"
                entries[rule.name].failed = f"cannot apply: unknown template {rule.rewrite.template!r}"
                break
            try:
                _apply_rule(work, rule, matches, library.get(rule.rewrite.template))
            except HfRewriteError as error:
                stopped = f"rule {rule.name} could not be applied"
                entries[rule.name].failed = f"cannot apply: {error}"
                break
        work.replaced.clear()
    return report


def _guard(rule: Rule, library: TemplateLibrary) -> Callable[[Match], str | None] | None:
    """The rule's template's guard with the rule's rewrite args bound (None: no guard, or no such template)."""
    if rule.rewrite.template not in library or library.get(rule.rewrite.template).guard is None:
        return None
    template = library.get(rule.rewrite.template)
    return lambda match: template.site_problem(match, rule.rewrite.args)


def _in_rule_reach(rule: Rule, node: torch.fx.Node, ctx: RewriteContext) -> bool:
    """The node has the rule's root op and sits in its scope and module type (what the rule is meant for)."""
    if not rule.match.pattern.root_op.matches(node.target):
        return False
    path, module_type = module_of(node)
    if rule.match.module_types and module_type not in rule.match.module_types:
        return False
    return scope_failure(rule.match.scope, rule.match.scope_text, path, ctx.scope_sets) is None


def remaining_ops(ctx: RewriteContext, rules: list[Rule]) -> dict[str, int]:
    """Ops of interest left unmatched: nodes a rule was meant for (root op, scope, module type) and not rewritten."""
    counts: dict[str, int] = {}
    for node in ctx.graph_module.graph.nodes:
        if node.op != "call_function" or RULE_META in node.meta:
            continue
        if any(_in_rule_reach(rule, node, ctx) for rule in rules):
            name = op_name(node.target)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _refuse_overlaps(found: list[tuple[Rule, list[Match], list[NearMiss]]]) -> None:
    owner: dict[torch.fx.Node, tuple[Rule, Match]] = {}
    for rule, matches, _ in found:
        for match in matches:
            for node in match.nodes.values():
                if node in owner:
                    other_rule, other = owner[node]
                    raise RewriteError(
                        f"overlapping matches at node {node.name}: rule {other_rule.name} ({other_rule.location}) "
                        f"at {other.module_path or '<top level>'} and rule {rule.name} ({rule.location}) at "
                        f"{match.module_path or '<top level>'} both own it; give the rules different priorities "
                        f"or narrow one of them")
                owner[node] = (rule, match)


def _apply_rule(ctx: RewriteContext, rule: Rule, matches: list[Match], template: Template) -> None:
    graph = ctx.graph
    what = f"rule {rule.name} ({rule.location})"
    for match in matches:
        alive = set(graph.nodes)
        gone = [node.name for node in match.nodes.values() if node not in alive]
        if gone:
            raise RewriteError(f"{what}: match at {match.module_path} lost nodes {', '.join(gone)} to an earlier "
                               f"rewrite of the same priority")
        match = dataclasses.replace(match, captures={name: ctx.resolve(value) for name, value in match.captures.items()})
        site = match.module_path or "<top level>"
        try:
            with noted(f"raised by template {template.name} ({template.origin}) applying {what} at {site} "
                       f"(node {match.root.name})"):
                template(ctx, match, **rule.rewrite.args)
        except HfRewriteError as error:
            raise reworded(error, f"{what}: at {site}") from error
        _stamp(match, [node for node in graph.nodes if node not in alive], rule.name)
        # What the match owned, and weights it captured that the template stopped reading (get_attr).
        erase_dead(graph, list(match.nodes.values()) + [value for value in match.captures.values() if isinstance(
            value, torch.fx.Node) and value.op == "get_attr"])
    try:
        graph.lint()
    except RuntimeError as error:
        raise RewriteError(f"{what}: the rewritten graph is malformed: {error}") from error
    ctx.graph_module.recompile()
    with noted(f"while re-checking the graph's shapes after {what}"):
        propagate(ctx.graph_module, what)


def _stamp(match: Match, new_nodes: list[torch.fx.Node], rule_name: str) -> None:
    """Provenance: the rule that made each new node, and the module stack of what it replaces."""
    stack = match.root.meta.get("nn_module_stack")
    for node in new_nodes:
        node.meta[RULE_META] = rule_name
        if stack is not None and "nn_module_stack" not in node.meta and node.op not in ("placeholder", "get_attr"):
            node.meta["nn_module_stack"] = dict(stack)
