"""`where:` checks: tiny expressions over captures, the config and the rewrite context.

Grammar (a YAML value):
  CAPTURE[.shape[.N] | .dtype | .ndim]   a pattern node or capture (its tensor's shape/dtype/rank)
  config.ATTR[.ATTR|.N ...]              a config attribute (nested configs, list items)
  ctx.tp, ctx.rank, ctx.state.KEY, tp, rank
  torch.DTYPE or any other bare word     a string literal ('float32', 'silu')
  numbers, booleans, null, [lists]       literals
A check that does not hold yields a reason string; explain shows it as a near miss.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from hfrewrite.engine.yamlnodes import Field, kind_of, plain, scalar

CTX_ATTRIBUTES = ("tp", "rank", "state")
TENSOR_ATTRIBUTES = ("shape", "dtype", "ndim")
RESERVED_NAMES = frozenset({"config", "ctx", "tp", "rank", "torch"})
_INDEX = re.compile(r"-?[0-9]+")


class EvalError(Exception):
    """An expression cannot be evaluated on this match (missing capture, symbolic size, ...)."""


@dataclass(frozen=True)
class EvalEnv:
    """What expressions can see for one candidate match."""

    names: Mapping[str, Any]
    config: Any
    ctx: Any


@dataclass(frozen=True)
class Expr:
    """One parsed expression; `text` is how the rule author wrote it."""

    kind: str  # "literal" | "capture" | "config" | "ctx" | "option" (a `when:` operand: env.names are the options)
    path: tuple[str, ...]
    value: Any
    text: str

    def evaluate(self, env: EvalEnv) -> Any:
        """The expression's value, normalised (dtypes as names, concrete SymInts as ints)."""
        if self.kind == "literal":
            return self.value
        if self.kind == "config":
            return normalise(walk_path(env.config, self.path, "config"))
        if self.kind == "ctx":
            return normalise(walk_path(env.ctx, self.path, "ctx"))
        if self.kind == "option":
            if self.path[0] not in env.names:
                raise EvalError(f"no option {self.path[0]!r}; options: {', '.join(sorted(env.names)) or 'none'}")
            return normalise(env.names[self.path[0]])
        head, rest = self.path[0], self.path[1:]
        if head not in env.names:
            raise EvalError(f"no capture or pattern node named {head!r}")
        return normalise(_tensor_attribute(env.names[head], rest, head))


def walk_path(obj: Any, path: tuple[str, ...], what: str) -> Any:
    """Follow `path` through mappings, list indices and public attributes (never a '_' name)."""
    for part in path:
        if part.startswith("_"):
            raise EvalError(f"{what}: names starting with '_' are not reachable from expressions ({part!r})")
        if isinstance(obj, Mapping):
            if part not in obj:
                raise EvalError(f"{what} has no key {part!r}")
            obj = obj[part]
        elif _INDEX.fullmatch(part) and isinstance(obj, (list, tuple)):
            index = int(part)
            if not -len(obj) <= index < len(obj):
                raise EvalError(f"{what} index {index} out of range")
            obj = obj[index]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise EvalError(f"{what} has no attribute {part!r}")
        what = f"{what}.{part}"
    return obj


def _tensor_attribute(value: Any, rest: tuple[str, ...], head: str) -> Any:
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
        if not rest:
            return value
        if not isinstance(value, torch.Tensor):
            raise EvalError(f"{head} is not a tensor")
    elif not rest:
        return value
    elif not isinstance(value, torch.Tensor):
        raise EvalError(f"{head} is {value!r}, not a tensor")
    if rest[0] == "dtype":
        return value.dtype
    if rest[0] == "ndim":
        return value.dim()
    if len(rest) == 1:
        return tuple(value.shape)
    index = int(rest[1])
    if not -value.dim() <= index < value.dim():
        raise EvalError(f"{head} has {value.dim()} dimensions, no dimension {index}")
    return value.shape[index]


def normalise(value: Any) -> Any:
    """Comparable plain values: dtype -> 'float32', concrete SymInt -> int; symbolic sizes fail."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        if is_concrete_int(value):
            return int(value)
        raise EvalError(f"size {value} is symbolic")
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(normalise(item) for item in value)
    if isinstance(value, torch.Tensor):
        raise EvalError("a tensor cannot be compared; use .shape, .shape.N, .dtype or .ndim")
    return value


@dataclass(frozen=True)
class Check:
    """One `where:` entry: a named test over two expressions."""

    kind: str
    left: Expr
    right: Expr
    line: int

    def failure(self, env: EvalEnv) -> str | None:
        """None when the check holds, else the reason (for near misses)."""
        try:
            left, right = self.left.evaluate(env), self.right.evaluate(env)
        except EvalError as error:
            return f"where {self.kind}: cannot evaluate: {error}"
        return CHECKS[self.kind](left, right, self.left.text, self.right.text)


def _divisible(a: Any, b: Any, a_text: str, b_text: str) -> str | None:
    if not _is_int(a) or not _is_int(b):
        return f"where divisible: {a!r} and {b!r} must be integers ({a_text} % {b_text})"
    if b == 0 or a % b != 0:
        return f"where divisible: {a} not divisible by {b} ({a_text} % {b_text})"
    return None


def _equals(a: Any, b: Any, a_text: str, b_text: str) -> str | None:
    return None if a == b else f"where equals: {a!r} != {b!r} ({a_text} vs {b_text})"


def _in(a: Any, b: Any, a_text: str, b_text: str) -> str | None:
    if not isinstance(b, (tuple, list)):
        return f"where in: {b_text} is {b!r}, not a list"
    return None if a in b else f"where in: {a!r} not in {list(b)!r} ({a_text})"


def _greater(a: Any, b: Any, a_text: str, b_text: str) -> str | None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return f"where gt: {a!r} and {b!r} must be numbers ({a_text} > {b_text})"
    return None if a > b else f"where gt: {a!r} is not greater than {b!r} ({a_text} > {b_text})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


CHECKS: dict[str, Callable[[Any, Any, str, str], str | None]] = {
    "divisible": _divisible, "equals": _equals, "in": _in, "gt": _greater}


def parse_check(node: yaml.Node, at: Field, names: frozenset[str], open_names: bool) -> Check:
    """A `where:` entry {KIND: [a, b]}; `names` are the captures and pattern nodes the rule binds."""
    if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
        at.fail(node, f"each check is a mapping with one key, one of {', '.join(CHECKS)}: "
                      f"{{divisible: [a, b]}}")
    key_node, args_node = node.value[0]
    kind = scalar(key_node, at)
    if kind not in CHECKS:
        at.fail(key_node, f"unknown check {kind!r}; allowed: {', '.join(CHECKS)}")
    at = at.child(kind)
    if not isinstance(args_node, yaml.SequenceNode) or len(args_node.value) != 2:
        found = len(args_node.value) if isinstance(args_node, yaml.SequenceNode) else kind_of(args_node)
        at.fail(args_node, f"expects a list of two expressions, found {found}")
    left = parse_expr(args_node.value[0], at.child(0), names, open_names)
    right = parse_expr(args_node.value[1], at.child(1), names, open_names)
    if kind == "divisible":
        for expr, arg in ((left, args_node.value[0]), (right, args_node.value[1])):
            if expr.kind == "literal" and not _is_int(expr.value):
                at.fail(arg, f"divisible needs integers, found {expr.value!r}")
    if kind == "in" and right.kind == "literal" and not isinstance(right.value, tuple):
        at.fail(args_node.value[1], f"'in' needs a list of allowed values, found {right.value!r}")
    return Check(kind, left, right, args_node.start_mark.line + 1)


def parse_expr(node: yaml.Node, at: Field, names: frozenset[str], open_names: bool) -> Expr:
    """One expression (see module docstring); unknown names and bad paths fail with the grammar."""
    if isinstance(node, yaml.SequenceNode):
        value = plain(node, at)
        if any(isinstance(item, (list, dict)) for item in value):
            at.fail(node, "a literal list holds plain values only")
        return Expr("literal", (), tuple(normalise(_literal_word(item)) for item in value), str(value))
    value = scalar(node, at)
    if not isinstance(value, str):
        return Expr("literal", (), value, repr(value))
    parts = tuple(value.split("."))
    head = parts[0]
    private = next((part for part in parts if part.startswith("_")), None)
    if private is not None:
        at.fail(node, f"expression {value!r} names {private!r}: names starting with '_' (private attributes, "
                      f"dunders) are not allowed in expressions")
    if value in ("tp", "rank"):
        return Expr("ctx", (value,), None, value)
    if head == "config":
        if len(parts) < 2 or not all(part.isidentifier() or _INDEX.fullmatch(part) for part in parts[1:]):
            at.fail(node, f"bad config expression {value!r}; write config.ATTR (e.g. config.num_attention_heads)")
        return Expr("config", parts[1:], None, value)
    if head == "ctx":
        valid = (len(parts) == 2 and parts[1] in ("tp", "rank")) or (len(parts) == 3 and parts[1] == "state")
        if not valid:
            at.fail(node, f"bad ctx expression {value!r}; allowed: ctx.tp, ctx.rank, ctx.state.KEY")
        return Expr("ctx", parts[1:], None, value)
    if head == "torch" and len(parts) == 2 and isinstance(getattr(torch, parts[1], None), torch.dtype):
        return Expr("literal", (), parts[1], value)
    if head in names or (open_names and len(parts) > 1 and head.isidentifier()):
        _check_tensor_path(node, at, value, parts[1:])
        return Expr("capture", parts, None, value)
    if len(parts) == 1:
        return Expr("literal", (), value, value)
    known = ", ".join(sorted(names)) or "none"
    at.fail(node, f"unknown name {head!r} in {value!r}; known captures/pattern nodes: {known}; "
                  f"also config.ATTR, ctx.tp, ctx.rank, tp, rank")


def _literal_word(item: Any) -> Any:
    if isinstance(item, str) and item.startswith("torch.") and isinstance(getattr(torch, item[6:], None), torch.dtype):
        return item[6:]
    return item


def _check_tensor_path(node: yaml.Node, at: Field, text: str, rest: tuple[str, ...]) -> None:
    if not rest:
        return
    ok = (rest[0] in ("dtype", "ndim") and len(rest) == 1) or (
        rest[0] == "shape" and (len(rest) == 1 or (len(rest) == 2 and _INDEX.fullmatch(rest[1]) is not None)))
    if not ok:
        at.fail(node, f"bad expression {text!r}; after a capture write .shape, .shape.N, .dtype or .ndim")
