"""Parsing `match.op`/`match.args` and `match.pattern` into a `Pattern` (a small op DAG)."""
from __future__ import annotations

from collections.abc import Callable

import yaml

from hfrewrite.engine.expressions import RESERVED_NAMES
from hfrewrite.engine.schema import AnyArg, ArgPattern, ListArg, LiteralArg, NameArg, OpSpec, Pattern, PatternNode, RestArg
from hfrewrite.engine.yamlnodes import Field, kind_of, line_of, mapping, plain, scalar, string

PATTERN_KEYS = ("root", "nodes")
NODE_KEYS = ("op", "args")
ROOT_ALIAS = "root"


def check_name(name: str, node: yaml.Node, at: Field, what: str) -> None:
    """Pattern node and capture names: identifiers, not reserved words."""
    if not name.isidentifier() or name in RESERVED_NAMES:
        at.fail(node, f"bad {what} name {name!r}: use an identifier other than "
                      f"{', '.join(sorted(RESERVED_NAMES))}")


def parse_args(node: yaml.Node, at: Field) -> tuple[ArgPattern, ...]:
    """A list of argument patterns: NAME, '_', '...' (last only), literals, {value: X}, nested lists."""
    if not isinstance(node, yaml.SequenceNode):
        at.fail(node, f"expected a list of argument patterns, found a {kind_of(node)}")
    items = tuple(_parse_arg(item, at.child(i)) for i, item in enumerate(node.value))
    for i, item in enumerate(items[:-1]):
        if isinstance(item, RestArg):
            at.child(i).fail(node.value[i], "'...' may only be the last argument")
    return items


def _parse_arg(node: yaml.Node, at: Field) -> ArgPattern:
    if isinstance(node, yaml.SequenceNode):
        return ListArg(parse_args(node, at))
    if isinstance(node, yaml.MappingNode):
        entries = mapping(node, at, ("value",), required=("value",), what="a literal argument")
        return LiteralArg(_freeze(plain(entries["value"][1], at.child("value"))))
    value = scalar(node, at)
    if not isinstance(value, str):
        return LiteralArg(value)
    if value == "_":
        return AnyArg()
    if value == "...":
        return RestArg()
    check_name(value, node, at, "capture")
    return NameArg(value)


def _freeze(value: object) -> object:
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted(((str(key), _freeze(item)) for key, item in value.items()), key=lambda kv: kv[0]))
    return value


def arg_names(args: tuple[ArgPattern, ...] | None) -> list[str]:
    """Every name used in an argument list, in order, nested lists included."""
    names: list[str] = []
    for item in args or ():
        if isinstance(item, NameArg):
            names.append(item.name)
        elif isinstance(item, ListArg):
            names.extend(arg_names(item.items))
    return names


def single_op_pattern(op: OpSpec, args: tuple[ArgPattern, ...] | None, line: int, at: Field,
                      node: yaml.Node) -> Pattern:
    """`match: {op: X, args: [...]}` as a one-node pattern whose node is called 'root'."""
    captures = tuple(dict.fromkeys(arg_names(args)))
    if ROOT_ALIAS in captures:
        at.fail(node, "'root' names the matched node itself; pick another capture name")
    return Pattern(ROOT_ALIAS, {ROOT_ALIAS: PatternNode(ROOT_ALIAS, op, args, line)}, captures, single_op=True)


def parse_pattern(node: yaml.Node, at: Field, parse_op: Callable[[yaml.Node, Field], OpSpec]) -> Pattern:
    """`pattern: {root: NAME, nodes: {NAME: {op: ..., args: [...]}}}`: a DAG reachable from root."""
    entries = mapping(node, at, PATTERN_KEYS, required=PATTERN_KEYS, what="pattern")
    root = string(entries["root"][1], at.child("root"), "the name of the root node")
    nodes_node = entries["nodes"][1]
    if not isinstance(nodes_node, yaml.MappingNode) or not nodes_node.value:
        at.child("nodes").fail(nodes_node, "expected a non-empty mapping NAME: {op: ..., args: [...]}")
    nodes: dict[str, PatternNode] = {}
    for key_node, value_node in nodes_node.value:
        name = string(key_node, at.child("nodes"), "a pattern node name")
        check_name(name, key_node, at.child("nodes"), "pattern node")
        if name in nodes:
            at.child("nodes").fail(key_node, f"pattern node {name!r} defined twice")
        node_at = at.child("nodes").child(name)
        fields = mapping(value_node, node_at, NODE_KEYS, required=("op",), what="a pattern node")
        args = parse_args(fields["args"][1], node_at.child("args")) if "args" in fields else None
        nodes[name] = PatternNode(name, parse_op(fields["op"][1], node_at.child("op")), args, line_of(value_node))
    if root not in nodes:
        at.child("root").fail(entries["root"][1], f"root {root!r} is not one of the nodes ({', '.join(nodes)})")
    if ROOT_ALIAS in nodes and root != ROOT_ALIAS:
        at.child("nodes").fail(nodes_node, "'root' names the root node; call the other node something else")
    captures = [name for spec in nodes.values() for name in arg_names(spec.args) if name not in nodes]
    if ROOT_ALIAS in captures:
        at.fail(node, "'root' names the root node; pick another capture name")
    _check_dag(root, nodes, node, at)
    return Pattern(root, nodes, tuple(dict.fromkeys(captures)))


def _check_dag(root: str, nodes: dict[str, PatternNode], node: yaml.Node, at: Field) -> None:
    """Every node reachable from the root, and no cycles (a pattern is matched root-down)."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "active":
            at.fail(node, f"pattern has a cycle: {' -> '.join(path + [name])}")
        if state.get(name) == "done":
            return
        state[name] = "active"
        for child in arg_names(nodes[name].args):
            if child in nodes:
                visit(child, path + [name])
        state[name] = "done"

    visit(root, [])
    unreachable = [name for name in nodes if name not in state]
    if unreachable:
        at.fail(node, f"pattern nodes not reachable from root {root!r}: {', '.join(unreachable)}")
