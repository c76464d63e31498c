"""Applying a RuleSet to a graph: priority order, overlap refusal, provenance, re-checked shapes.

Per priority level (highest first): find every rule's matches on the current graph, refuse any two
matches sharing a node (same rule or same priority: the result would depend on luck), then apply
each rule's template per match, stamp new nodes with the rule name and the root's module stack,
erase what the matches owned and no one uses, lint, recompile and re-propagate fake values.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx

from hfrewrite.errors import HfRewriteError, RewriteError, RuleError
from hfrewrite.engine.context import RewriteContext, erase_dead
from hfrewrite.engine.fakeprop import propagate
from hfrewrite.engine.loader import check_template
from hfrewrite.engine.matcher import Match, NearMiss, find_matches
from hfrewrite.engine.report import ExplainReport, RewriteReport, RuleExplanation, UnmatchedRuleWarning
from hfrewrite.engine.schema import Rule, RuleSet, op_name
from hfrewrite.engine.scopes import module_of, scope_failure
from hfrewrite.engine.templates import get_template

RULE_META = "hfrewrite.rule"
# What a template bug raises; turned into a RewriteError naming the rule and the site.
TEMPLATE_ERRORS = (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError)


def apply_rules(ctx: RewriteContext, ruleset: RuleSet) -> RewriteReport:
    """Rewrite `ctx.graph_module` in place with `ruleset`; returns what was done."""
    report = RewriteReport()
    active = []
    for rule in ruleset:
        if rule.applies_to(ctx.model_type):
            check_template(rule)
            active.append(rule)
        else:
            report.skipped_rules.append(rule.name)
    for group in RuleSet(tuple(active)).priority_groups():
        found = [(rule, *find_matches(ctx.graph_module, rule, ctx)) for rule in group]
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
            _apply_rule(ctx, rule, matches)
            report.applied[rule.name] = len(matches)
            report.sites[rule.name] = [match.module_path for match in matches]
        ctx.replaced.clear()
    report.applied = dict(sorted(report.applied.items()))
    report.sites = dict(sorted(report.sites.items()))
    report.remaining_ops = remaining_ops(ctx, active)
    return report


def explain(ctx: RewriteContext, ruleset: RuleSet) -> ExplainReport:
    """Per rule: the sites it matches on the graph as it is, and its near misses. Changes nothing."""
    report = ExplainReport(ctx.model_type)
    for rule in ruleset:
        try:
            equation = get_template(rule.rewrite.template).equation
        except RuleError as error:
            equation = f"(cannot rewrite: {error})"
        entry = RuleExplanation(rule.name, str(rule.location), rule.rewrite.template, rule.priority, rule.doc,
                                equation=equation)
        if not rule.applies_to(ctx.model_type):
            entry.skipped = f"model type {ctx.model_type!r} is not in models {list(rule.models or ())!r}"
        else:
            matches, entry.near_misses = find_matches(ctx.graph_module, rule, ctx)
            entry.sites = [match.module_path for match in matches]
        report.rules.append(entry)
    return report


def _in_rule_reach(rule: Rule, node: torch.fx.Node, ctx: RewriteContext) -> bool:
    """The node has the rule's root op and sits in its scope and module type (what the rule is meant for)."""
    if not rule.match.pattern.root_op.matches(node.target):
        return False
    path, module_type = module_of(node)
    if rule.match.module_types and module_type not in rule.match.module_types:
        return False
    return scope_failure(rule.match.scope, rule.match.scope_text, path, ctx.tp_plan, ctx.pp_plan,
                         ctx.ep_plan) is None


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


def _apply_rule(ctx: RewriteContext, rule: Rule, matches: list[Match]) -> None:
    graph = ctx.graph
    template = get_template(rule.rewrite.template)
    what = f"rule {rule.name} ({rule.location})"
    for match in matches:
        alive = set(graph.nodes)
        gone = [node.name for node in match.nodes.values() if node not in alive]
        if gone:
            raise RewriteError(f"{what}: match at {match.module_path} lost nodes {', '.join(gone)} to an earlier "
                               f"rewrite of the same priority")
        match = dataclasses.replace(match, captures={name: ctx.resolve(value) for name, value in match.captures.items()})
        try:
            template(ctx, match, **rule.rewrite.args)
        except RewriteError as error:
            raise RewriteError(f"{what}: at {match.module_path or '<top level>'}: {error}") from error
        except HfRewriteError:
            raise
        except TEMPLATE_ERRORS as error:
            raise RewriteError(f"{what}: template {template.name} failed at {match.module_path or '<top level>'} "
                               f"(node {match.root.name}): {type(error).__name__}: {error}") from error
        _stamp(match, [node for node in graph.nodes if node not in alive], rule.name)
        # What the match owned, and weights it captured that the template stopped reading (get_attr).
        erase_dead(graph, list(match.nodes.values()) + [value for value in match.captures.values() if isinstance(
            value, torch.fx.Node) and value.op == "get_attr"])
    try:
        graph.lint()
    except RuntimeError as error:
        raise RewriteError(f"{what}: the rewritten graph is malformed: {error}") from error
    ctx.graph_module.recompile()
    propagate(ctx.graph_module, what)


def _stamp(match: Match, new_nodes: list[torch.fx.Node], rule_name: str) -> None:
    """Provenance: the rule that made each new node, and the module stack of what it replaces."""
    stack = match.root.meta.get("nn_module_stack")
    for node in new_nodes:
        node.meta[RULE_META] = rule_name
        if stack is not None and "nn_module_stack" not in node.meta and node.op not in ("placeholder", "get_attr"):
            node.meta["nn_module_stack"] = dict(stack)
