"""YAML read as located nodes, so every value a rule author wrote can be blamed on its file and line.

`yaml.compose` keeps `start_mark` on every node; we validate the node tree directly instead of the
plain Python objects `safe_load` would give, and convert only leaves (and small literal subtrees)
to Python values. Every failure, including the ones PyYAML raises as ValueError while constructing
odd scalars (`2001-13-45`, `0x_`), becomes a `RuleError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor

from hfrewrite.errors import RuleError

_MAX_VALUES = 100_000  # guards against alias bombs: a rule file is small


def line_of(node: yaml.Node) -> int:
    """1-based line where `node` starts."""
    return node.start_mark.line + 1


def compose(text: str, file: str) -> yaml.Node | None:
    """Parse one YAML document into a node tree; malformed YAML -> RuleError at the error's line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = " ".join(part for part in (error.context, error.problem) if part)
        raise RuleError(f"{file}:{line}: malformed YAML: {detail or error}") from error
    except yaml.YAMLError as error:  # ReaderError: bad characters; it carries a character position
        position = getattr(error, "position", 0) or 0
        line = text.count("\n", 0, position) + 1
        raise RuleError(f"{file}:{line}: malformed YAML: {error}") from error
    except RecursionError as error:
        raise RuleError(f"{file}:1: malformed YAML: nested too deeply") from error


@dataclass(frozen=True)
class Field:
    """Blame context for one value: the file, the rule it belongs to and its dotted field path."""

    file: str
    rule: str
    path: str

    def child(self, name: str | int) -> Field:
        """The field one level down (`match.scope`, `where[1]`)."""
        if isinstance(name, int):
            return Field(self.file, self.rule, f"{self.path}[{name}]")
        return Field(self.file, self.rule, f"{self.path}.{name}" if self.path else name)

    def fail(self, node: yaml.Node, message: str) -> NoReturn:
        """Raise the RuleError for this field at `node`'s line."""
        where = f"{self.file}:{line_of(node)}"
        if self.rule:
            where += f": rule {self.rule}"
        if self.path:
            where += f": field {self.path}"
        raise RuleError(f"{where}: {message}")


def scalar(node: yaml.Node, at: Field) -> Any:
    """The Python value of a scalar node (str, int, float, bool, None, ...)."""
    if not isinstance(node, yaml.ScalarNode):
        at.fail(node, f"expected a single value, found a {kind_of(node)}")
    return _construct(node, at)


def plain(node: yaml.Node, at: Field) -> Any:
    """A whole subtree as plain Python lists/dicts/scalars (for literal values such as template args)."""
    budget = [_MAX_VALUES]
    return _plain(node, at, set(), budget)


def _plain(node: yaml.Node, at: Field, active: set[int], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        at.fail(node, f"too many values (over {_MAX_VALUES}; alias expansion?)")
    if isinstance(node, yaml.ScalarNode):
        return _construct(node, at)
    if id(node) in active:
        at.fail(node, "recursive alias")
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [_plain(item, at, active, budget) for item in node.value]
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = scalar(key_node, at)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    at.fail(key_node, f"mapping key {key!r} must be a string or number")
                if key in result:
                    at.fail(key_node, f"key {key!r} given twice")
                result[key] = _plain(value_node, at, active, budget)
            return result
    finally:
        active.discard(id(node))
    at.fail(node, f"unsupported YAML node {type(node).__name__}")


def _construct(node: yaml.ScalarNode, at: Field) -> Any:
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as error:
        at.fail(node, f"cannot read value {node.value!r}: {getattr(error, 'problem', None) or error}")
    except (ValueError, TypeError, OverflowError) as error:
        at.fail(node, f"cannot read value {node.value!r}: {error}")


def kind_of(node: yaml.Node) -> str:
    """'mapping', 'list' or 'value': for messages."""
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "value"


def mapping(node: yaml.Node, at: Field, allowed: tuple[str, ...], required: tuple[str, ...] = (),
            what: str = "") -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The entries of a mapping node as key -> (key node, value node); unknown/missing keys fail."""
    if not isinstance(node, yaml.MappingNode):
        at.fail(node, f"expected a mapping{' (' + what + ')' if what else ''} with keys {_listing(allowed)}, "
                      f"found a {kind_of(node)}")
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = scalar(key_node, at)
        if not isinstance(key, str) or key not in allowed:
            at.child(str(key)).fail(key_node, f"unknown key {key!r}; allowed keys: {_listing(allowed)}")
        if key in entries:
            at.child(key).fail(key_node, f"key {key!r} given twice")
        entries[key] = (key_node, value_node)
    for key in required:
        if key not in entries:
            at.child(key).fail(node, f"missing required key {key!r} (keys: {_listing(allowed)})")
    return entries


def string(node: yaml.Node, at: Field, what: str = "a string") -> str:
    """A non-empty string value."""
    value = scalar(node, at)
    if not isinstance(value, str) or not value.strip():
        at.fail(node, f"expected {what}, found {value!r}")
    return value


def strings(node: yaml.Node, at: Field, what: str = "a string") -> tuple[str, ...]:
    """One string or a non-empty list of strings."""
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            at.fail(node, f"expected {what} or a non-empty list of them, found an empty list")
        return tuple(string(item, at.child(i), what) for i, item in enumerate(node.value))
    return (string(node, at, what),)


def _listing(names: tuple[str, ...]) -> str:
    return ", ".join(names)
