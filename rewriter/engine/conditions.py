"""Whether a rule runs at all: its `when:` checks over the caller's options, and its scope-set references.

`when:` uses the `where:` check language (`{gt: [tp, 1]}`, `[{equals: [ep, true]}]`); the first operand
of each check names an option (a bare word) or is any `where:` expression, the second is any
expression. The options are whatever the caller put in `ctx.options` (the compiler: its compile
options); an option no caller supplies is a RuleError naming the rule, before anything is rewritten.
A rule scoped only by `{SET:STYLE}` references whose styles the supplied scope sets do not use cannot
match anywhere: it is not applicable either (no "matched nothing" warning).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from hfrewrite.engine.expressions import Check, EvalEnv, Expr, parse_check
from hfrewrite.engine.schema import Rule
from hfrewrite.engine.scopes import ScopeSet, unknown_scope_sets
from hfrewrite.engine.yamlnodes import Field, kind_of, scalar
from hfrewrite.errors import RuleError


def parse_when(node: yaml.Node, at: Field) -> tuple[Check, ...]:
    """`when:` as one check mapping or a list of them; the first operand of each may name an option."""
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        at.fail(node, f"expected a check like {{gt: [tp, 1]}} or a list of them, found a {kind_of(node)}")
    checks = []
    for index, item in enumerate(items):
        where = at.child(index) if isinstance(node, yaml.SequenceNode) else at
        check = parse_check(item, where, frozenset(), False)
        first = item.value[0][1].value[0]  # parse_check validated the shape {KIND: [a, b]}
        word = scalar(first, where) if isinstance(first, yaml.ScalarNode) else None
        if isinstance(word, str) and word.isidentifier() and check.left.kind in ("literal", "ctx"):
            check = Check(check.kind, Expr("option", (word,), None, word), check.right, check.line)
        checks.append(check)
    return tuple(checks)


def _options_named(rule: Rule) -> list[str]:
    return [expr.path[0] for check in rule.when for expr in (check.left, check.right) if expr.kind == "option"]


def check_rule_inputs(rule: Rule, options: Mapping[str, Any], scope_sets: Mapping[str, ScopeSet]) -> None:
    """RuleError (at the rule's file:line) if its `when:` names an option, or its scope a set, not supplied."""
    missing = sorted(set(_options_named(rule)) - set(options))
    if missing:
        raise RuleError(f"{rule.location}: rule {rule.name}: field when: unknown option {missing[0]!r}; "
                        f"the options are: {', '.join(sorted(options)) or 'none'}")
    check_scope_sets(rule, scope_sets)


def check_scope_sets(rule: Rule, scope_sets: Mapping[str, ScopeSet]) -> None:
    """RuleError (at the rule's file:line) naming the first scope set the rule refers to that is not given."""
    unknown = unknown_scope_sets(rule.match.scope, scope_sets)
    if unknown:
        raise RuleError(f"{rule.location}: rule {rule.name}: field match.scope: unknown scope set {unknown[0]!r} "
                        f"in {rule.match.scope_text!r}; the scope sets given are: "
                        f"{', '.join(sorted(scope_sets)) or 'none'}")


def not_applicable(rule: Rule, ctx: Any) -> str | None:
    """Why the rule does not run in this context (its `when:` is false, or its plan styles are absent), or None."""
    env = EvalEnv(ctx.options, ctx.config, ctx)
    for check in rule.when:
        failure = check.failure(env)
        if failure is not None:
            detail = failure.removeprefix(f"where {check.kind}: ")
            return f"when {{{check.kind}: [{check.left.text}, {check.right.text}]}} is false: {detail}"
    terms = rule.match.scope
    if terms and all(term.kind == "set" and not ctx.scope_sets[term.set_name].has_style(term.value) for term in terms):
        return f"no module of the scope sets has the scope's styles ({rule.match.scope_text!r})"
    return None
