"""The rule data model: what a validated YAML rule becomes.

Everything here is immutable and carries the file:line it came from, so the matcher and the
rewriter can blame a rule precisely without going back to the YAML.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hfrewrite.engine.expressions import Check
from hfrewrite.engine.templates import TemplateLibrary

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){1,2}$")


@dataclass(frozen=True)
class SourceLine:
    """Where a rule (or one of its fields) was written."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def op_name(target: Any) -> str:
    """The dotted name rules use for a call target: 'aten.linear.default', '_operator.getitem'."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    try:
        return torch.fx.node._get_qualified_name(target)
    except (AttributeError, TypeError, RuntimeError):
        return str(target)


@dataclass(frozen=True)
class OpSpec:
    """An op as written in a rule: 'ns.name' matches every overload, 'ns.name.overload' only that one."""

    text: str

    def matches(self, target: Any) -> bool:
        """Whether a call_function node's target is this op."""
        name = op_name(target)
        if name == self.text:
            return True
        return isinstance(target, torch._ops.OpOverload) and name.rsplit(".", 1)[0] == self.text

    def schema_argument_names(self) -> tuple[str, ...] | None:
        """Argument names of the op's schema(s), or None when the op is not registered (yet)."""
        parts = self.text.split(".")
        try:
            packet = getattr(getattr(torch.ops, parts[0]), parts[1])
        except (AttributeError, RuntimeError):
            return None
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            return None
        overloads = [parts[2]] if len(parts) == 3 else packet.overloads()
        names: list[str] = []
        for overload in overloads:
            for argument in getattr(packet, overload)._schema.arguments:
                if argument.name not in names:
                    names.append(argument.name)
        return tuple(names)


# Argument patterns of a pattern node: a name (pattern node or capture), "_" (anything), "..." (any
# remaining arguments), a literal, or a list of argument patterns (for list arguments like cat's).
@dataclass(frozen=True)
class NameArg:
    """A pattern node name or a capture name."""

    name: str


@dataclass(frozen=True)
class AnyArg:
    """'_': matches any value, binds nothing."""


@dataclass(frozen=True)
class RestArg:
    """'...' as the last argument: any number of further arguments."""


@dataclass(frozen=True)
class LiteralArg:
    """A number, bool, null or {value: X}: must equal the argument."""

    value: Any


@dataclass(frozen=True)
class ListArg:
    """A list/tuple argument matched element by element."""

    items: tuple[ArgPattern, ...]


ArgPattern = NameArg | AnyArg | RestArg | LiteralArg | ListArg


@dataclass(frozen=True)
class PatternNode:
    """One op of a pattern DAG; args None means 'any arguments'."""

    name: str
    op: OpSpec
    args: tuple[ArgPattern, ...] | None
    line: int


@dataclass(frozen=True)
class Pattern:
    """A small op DAG with a root; names not defined as nodes are captures."""

    root: str
    nodes: dict[str, PatternNode]
    captures: tuple[str, ...]
    single_op: bool = False

    @property
    def root_op(self) -> OpSpec:
        """The op every match is rooted at (what near misses and remaining_ops are about)."""
        return self.nodes[self.root].op


@dataclass(frozen=True)
class ScopeTerm:
    """One scope entry: a glob over module paths, or `{SET}` / `{SET:STYLE}`, a named scope set the caller supplies."""

    kind: str  # "glob" | "set"
    value: str  # the glob, or the style ("" = any style)
    set_name: str = ""  # for kind "set": the scope set's name

    @property
    def text(self) -> str:
        """How the rule wrote it."""
        if self.kind == "glob":
            return self.value
        return f"{{{self.set_name}:{self.value}}}" if self.value else f"{{{self.set_name}}}"


@dataclass(frozen=True)
class ConfigCondition:
    """config.<attribute> must be one of `allowed`."""

    attribute: str
    allowed: tuple[Any, ...]


@dataclass(frozen=True)
class MatchSpec:
    """Everything that narrows where a rule applies."""

    pattern: Pattern
    scope: tuple[ScopeTerm, ...] = ()
    scope_text: Any = None  # as written, for messages
    module_types: tuple[str, ...] = ()
    config: tuple[ConfigCondition, ...] = ()


@dataclass(frozen=True)
class RewriteSpec:
    """The template that rewrites each match, and its keyword arguments."""

    template: str
    args: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class Rule:
    """One validated rule."""

    name: str
    doc: str
    match: MatchSpec
    rewrite: RewriteSpec
    location: SourceLine
    priority: int = 0
    models: tuple[str, ...] | None = None
    where: tuple[Check, ...] = ()
    when: tuple[Check, ...] = ()  # over the caller's options (ctx.options): all must hold for the rule to run
    file_index: int = 0
    optional: bool = False  # may match nothing in some models (MoE experts in a dense model): no warning then

    def applies_to(self, model_type: str) -> bool:
        """False when the rule is for other model types (`models:`)."""
        return self.models is None or model_type in self.models


@dataclass(frozen=True)
class RuleSet:
    """Validated rules in application order: priority (high first), then file order, then name."""

    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()
    library: TemplateLibrary | None = None  # the templates the loader checked the rules against

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def names(self) -> list[str]:
        """Rule names in application order."""
        return [rule.name for rule in self.rules]

    def get(self, name: str) -> Rule:
        """The rule called `name` (KeyError if absent)."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def priority_groups(self) -> list[list[Rule]]:
        """Rules grouped by priority, highest first: rules of one group must not overlap."""
        groups: list[list[Rule]] = []
        for rule in self.rules:
            if groups and groups[-1][0].priority == rule.priority:
                groups[-1].append(rule)
            else:
                groups.append([rule])
        return groups


def order_key(rule: Rule) -> tuple[int, int, str]:
    """Application order: priority descending, then file order, then name."""
    return (-rule.priority, rule.file_index, rule.name)
