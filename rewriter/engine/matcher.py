"""Finding a rule's matches in a graph, and the near misses that explain why a site did not match.

A candidate is every call node whose op is the pattern's root op, in graph order. Checks run in a
fixed order (structure, interior uses, scope, module type, config, where, the template's guard) and the
first failure is
the near-miss reason. Structural failures are reported only when they say something: the pattern
got past its root, or the root was in the rule's scope / module type anyway (otherwise every
`aten.mul` of the model would be a "near miss" of an MLP pattern).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from hfrewrite.engine.conditions import check_scope_sets
from hfrewrite.engine.expressions import EvalEnv, EvalError, normalise, walk_path
from hfrewrite.engine.schema import AnyArg, ArgPattern, ListArg, LiteralArg, NameArg, Pattern, RestArg, Rule, op_name
from hfrewrite.engine.scopes import module_of, scope_failure

if TYPE_CHECKING:
    from hfrewrite.engine.context import RewriteContext

ROOT_ALIAS = "root"


@dataclass
class Match:
    """One site a rule matched: its root node, the nodes it owns, and what the pattern captured."""

    rule: Rule
    root: torch.fx.Node
    nodes: dict[str, torch.fx.Node]  # pattern node name -> graph node (the root included)
    captures: dict[str, Any]  # capture name -> graph node or literal argument
    module_path: str
    module_type: str

    def __getitem__(self, name: str) -> Any:
        """A capture or pattern node by name ('root' is the root)."""
        if name in self.captures:
            return self.captures[name]
        if name == ROOT_ALIAS:
            return self.root
        return self.nodes[name]

    def owned(self) -> set[torch.fx.Node]:
        """The nodes this match rewrites away (captures are only read)."""
        return set(self.nodes.values())


@dataclass(frozen=True)
class NearMiss:
    """A node where a rule's root op matched but something else did not, and why."""

    rule: str
    node: str
    module_path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"rule": self.rule, "node": self.node, "module_path": self.module_path, "reason": self.reason}


def _show(value: Any) -> str:
    if isinstance(value, torch.fx.Node):
        return f"{op_name(value.target) if value.op == 'call_function' else value.op} ({value.name})"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return a is b
    return _literal(a) == _literal(b)


def _literal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_literal(item) for item in value)
    return value


class _Binder:
    """Binds one candidate root to the pattern, root-down; remembers how far it got."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.nodes: dict[str, torch.fx.Node] = {}
        self.captures: dict[str, Any] = {}
        self.progress = 0

    def node(self, name: str, value: Any) -> str | None:
        spec = self.pattern.nodes[name]
        if name in self.nodes:
            return None if self.nodes[name] is value else \
                f"pattern node {name!r} would be both {_show(self.nodes[name])} and {_show(value)}"
        if not isinstance(value, torch.fx.Node) or value.op != "call_function" or not spec.op.matches(value.target):
            return f"pattern node {name!r} wants {spec.op.text}, found {_show(value)}"
        if any(bound is value for bound in self.nodes.values()):
            return f"pattern node {name!r}: {_show(value)} is already matched by another pattern node"
        self.nodes[name] = value
        if name != self.pattern.root:
            self.progress += 1
        if spec.args is None:
            return None
        return self.args(spec.args, value.args, f"pattern node {name!r}")

    def args(self, specs: tuple[ArgPattern, ...], values: Any, where: str) -> str | None:
        rest = bool(specs) and isinstance(specs[-1], RestArg)
        fixed = specs[:-1] if rest else specs
        if len(values) < len(fixed) or (not rest and len(values) != len(fixed)):
            return f"{where} wants {len(fixed)}{' or more' if rest else ''} args, found {len(values)}"
        for index, (spec, value) in enumerate(zip(fixed, values)):
            reason = self.arg(spec, value, f"{where} arg {index}")
            if reason is not None:
                return reason
        return None

    def arg(self, spec: ArgPattern, value: Any, where: str) -> str | None:
        if isinstance(spec, AnyArg):
            return None
        if isinstance(spec, LiteralArg):
            return None if not isinstance(value, torch.fx.Node) and _same(spec.value, value) else \
                f"{where} wants {spec.value!r}, found {_show(value)}"
        if isinstance(spec, ListArg):
            if not isinstance(value, (list, tuple)):
                return f"{where} wants a list, found {_show(value)}"
            return self.args(spec.items, value, where)
        assert isinstance(spec, NameArg)
        if spec.name in self.pattern.nodes:
            return self.node(spec.name, value)
        if spec.name in self.captures:
            bound = self.captures[spec.name]
            return None if _same(bound, value) else \
                f"capture {spec.name!r} would be both {_show(bound)} and {_show(value)}"
        self.captures[spec.name] = value
        return None


def _schema_captures(node: torch.fx.Node) -> dict[str, Any]:
    """Schema argument name -> value for an op node (single-op rules capture these: 'weight', 'q')."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    values: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args) and not argument.kwarg_only:
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def _config_failure(rule: Rule, config: Any) -> str | None:
    for condition in rule.match.config:
        try:
            value = normalise(walk_path(config, tuple(condition.attribute.split(".")), "config"))
        except EvalError:
            return f"config has no {condition.attribute}, rule wants {list(condition.allowed)!r}"
        if not any(_same(value, allowed) for allowed in condition.allowed):
            return f"config {condition.attribute} is {value!r}, rule wants {list(condition.allowed)!r}"
    return None


def _interior_failure(binder: _Binder) -> str | None:
    owned = set(binder.nodes.values())
    for name, node in binder.nodes.items():
        if name == binder.pattern.root:
            continue
        outside = [user.name for user in node.users if user not in owned]
        if outside:
            return f"interior node {name!r} ({node.name}) used outside the match (by {', '.join(outside)})"
    return None


def find_matches(graph_module: torch.fx.GraphModule, rule: Rule, ctx: RewriteContext,
                 guard: Callable[[Match], str | None] | None = None) -> tuple[list[Match], list[NearMiss]]:
    """All matches of `rule` in graph order, and the near misses (root op matched, rest did not); `guard` (the
    rule's template's, with its args bound) refuses a match by returning the reason."""
    check_scope_sets(rule, ctx.scope_sets)
    pattern = rule.match.pattern
    matches: list[Match] = []
    misses: list[NearMiss] = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or not pattern.root_op.matches(node.target):
            continue
        path, module_type = module_of(node)
        binder = _Binder(pattern)
        structure = binder.node(pattern.root, node)
        scope = scope_failure(rule.match.scope, rule.match.scope_text, path, ctx.scope_sets)
        type_failure = None
        if rule.match.module_types and module_type not in rule.match.module_types:
            type_failure = f"module_type {module_type!r} is not one of {list(rule.match.module_types)!r}"
        if structure is not None:
            filtered = bool(rule.match.scope or rule.match.module_types)
            if binder.progress > 0 or (filtered and scope is None and type_failure is None):
                misses.append(NearMiss(rule.name, node.name, path, structure))
            continue
        if pattern.single_op:
            for name, value in _schema_captures(node).items():
                binder.captures.setdefault(name, value)
        reason = _interior_failure(binder) or scope or type_failure or _config_failure(rule, ctx.config)
        if reason is None:
            names = {**binder.nodes, **binder.captures, ROOT_ALIAS: node}
            env = EvalEnv(names, ctx.config, ctx)
            reason = next((failure for check in rule.where if (failure := check.failure(env)) is not None), None)
        match = Match(rule, node, dict(binder.nodes), dict(binder.captures), path, module_type)
        if reason is None and guard is not None:
            reason = guard(match)
        if reason is not None:
            misses.append(NearMiss(rule.name, node.name, path, reason))
            continue
        matches.append(match)
    return matches, misses
