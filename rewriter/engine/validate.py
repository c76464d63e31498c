"""YAML rule text -> validated `Rule`s; every problem is a RuleError naming file, line, rule and field."""
from __future__ import annotations

import re
from typing import Any

import torch
import yaml

from hfrewrite.engine.conditions import parse_when
from hfrewrite.engine.expressions import Check, parse_check
from hfrewrite.engine.patterns import parse_args, parse_pattern, single_op_pattern
from hfrewrite.engine.schema import OP_NAME, ConfigCondition, MatchSpec, OpSpec, Pattern, RewriteSpec, Rule, ScopeTerm, SourceLine
from hfrewrite.engine.yamlnodes import Field, compose, kind_of, line_of, mapping, plain, scalar, string, strings

RULE_KEYS = ("name", "doc", "priority", "models", "optional", "when", "match", "where", "rewrite")
FILE_KEYS = ("rules", "models")
MATCH_KEYS = ("op", "args", "pattern", "scope", "module_type", "config")
REWRITE_KEYS = ("template", "args")
RULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
SET_REFERENCE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z0-9_]+))?\}$")


def parse_rule_file(text: str, file: str, file_index: int = 0) -> list[Rule]:
    """All rules of one file: a list of rules, or a mapping {rules: [...], models: [...]}."""
    root = compose(text, file)
    at = Field(file, "", "")
    if root is None:
        return []
    default_models: tuple[str, ...] | None = None
    if isinstance(root, yaml.MappingNode):
        entries = mapping(root, at, FILE_KEYS, required=("rules",), what="a rule file")
        if "models" in entries:
            default_models = strings(entries["models"][1], at.child("models"), "a model type")
        rule_nodes = entries["rules"][1]
        if isinstance(rule_nodes, yaml.ScalarNode) and scalar(rule_nodes, at) is None:
            return []
    else:
        rule_nodes = root
    if not isinstance(rule_nodes, yaml.SequenceNode):
        at.fail(rule_nodes, f"a rule file holds a list of rules or a mapping with key 'rules', "
                            f"found a {kind_of(rule_nodes)}")
    return [parse_rule(node, file, index, file_index, default_models) for index, node in enumerate(rule_nodes.value)]


def parse_rule(node: yaml.Node, file: str, index: int, file_index: int = 0,
               default_models: tuple[str, ...] | None = None) -> Rule:
    """One rule mapping -> Rule."""
    label = f"#{index + 1}"
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == "name" and isinstance(
                    value_node, yaml.ScalarNode) and value_node.value:
                label = value_node.value
    at = Field(file, label, "")
    entries = mapping(node, at, RULE_KEYS, what="a rule")
    for key in ("name", "doc", "rewrite", "match"):
        if key not in entries:
            at.child(key).fail(node, f"missing required key {key!r} (keys: {', '.join(RULE_KEYS)})")
    name = string(entries["name"][1], at.child("name"), "a rule name")
    if not RULE_NAME.match(name):
        at.child("name").fail(entries["name"][1], f"rule name {name!r} may use letters, digits, '_', '-', '.'")
    doc = string(entries["doc"][1], at.child("doc"), "a sentence saying what the rule does and why")
    priority = 0
    if "priority" in entries:
        priority = scalar(entries["priority"][1], at.child("priority"))
        if not isinstance(priority, int) or isinstance(priority, bool):
            at.child("priority").fail(entries["priority"][1], f"expected an integer, found {priority!r}")
    optional = False
    if "optional" in entries:
        optional = scalar(entries["optional"][1], at.child("optional"))
        if not isinstance(optional, bool):
            at.child("optional").fail(entries["optional"][1], f"expected true or false, found {optional!r}")
    models = default_models
    if "models" in entries:
        models = strings(entries["models"][1], at.child("models"), "a model type")
    match = parse_match(entries["match"][1], at.child("match"))
    names = frozenset(match.pattern.nodes) | frozenset(match.pattern.captures) | {"root"}
    schema_names = match.pattern.root_op.schema_argument_names() if match.pattern.single_op else ()
    open_names = match.pattern.single_op and schema_names is None
    names |= frozenset(schema_names or ())
    where: tuple[Check, ...] = ()
    if "where" in entries:
        where_node = entries["where"][1]
        if not isinstance(where_node, yaml.SequenceNode):
            at.child("where").fail(where_node, f"expected a list of checks, found a {kind_of(where_node)}")
        where = tuple(parse_check(item, at.child("where").child(i), names, open_names)
                      for i, item in enumerate(where_node.value))
    when = parse_when(entries["when"][1], at.child("when")) if "when" in entries else ()
    rewrite = parse_rewrite(entries["rewrite"][1], at.child("rewrite"))
    return Rule(name=name, doc=doc, match=match, rewrite=rewrite, location=SourceLine(file, line_of(node)),
                priority=priority, models=models, where=where, when=when, file_index=file_index, optional=optional)


def parse_op(node: yaml.Node, at: Field) -> OpSpec:
    """'ns.name' or 'ns.name.overload'; aten ops are checked to exist."""
    text = string(node, at, "an op name like aten.linear or aten.mul.Tensor")
    if not OP_NAME.match(text):
        at.fail(node, f"bad op name {text!r}; write ns.name or ns.name.overload (aten.linear, aten.mul.Tensor)")
    parts = text.split(".")
    if parts[0] in ("aten", "prims"):
        try:
            packet = getattr(getattr(torch.ops, parts[0]), parts[1])
        except (AttributeError, RuntimeError):
            at.fail(node, f"unknown op {text!r}: torch.ops.{parts[0]} has no {parts[1]!r}")
        if len(parts) == 3 and parts[2] not in packet.overloads():
            at.fail(node, f"unknown overload {text!r}; {parts[0]}.{parts[1]} has {', '.join(packet.overloads())}")
    return OpSpec(text)


def parse_match(node: yaml.Node, at: Field) -> MatchSpec:
    """The `match:` mapping: op (+args) or pattern, then scope, module_type, config."""
    entries = mapping(node, at, MATCH_KEYS, what="match")
    if ("op" in entries) == ("pattern" in entries):
        at.fail(node, "give exactly one of 'op' (a single op) or 'pattern' (a small DAG)")
    if "args" in entries and "pattern" in entries:
        at.child("args").fail(entries["args"][0], "'args' goes with 'op'; inside a pattern give args per node")
    pattern: Pattern
    if "op" in entries:
        op = parse_op(entries["op"][1], at.child("op"))
        args = parse_args(entries["args"][1], at.child("args")) if "args" in entries else None
        pattern = single_op_pattern(op, args, line_of(entries["op"][1]), at.child("args"),
                                    entries["args"][1] if "args" in entries else node)
    else:
        pattern = parse_pattern(entries["pattern"][1], at.child("pattern"), parse_op)
    scope: tuple[ScopeTerm, ...] = ()
    scope_text = None
    if "scope" in entries:
        scope_node = entries["scope"][1]
        globs = strings(scope_node, at.child("scope"), "a module path glob or a scope set {SET} / {SET:STYLE}")
        scope = tuple(_scope_term(glob, scope_node, at.child("scope")) for glob in globs)
        scope_text = globs[0] if isinstance(scope_node, yaml.ScalarNode) else list(globs)
    module_types: tuple[str, ...] = ()
    if "module_type" in entries:
        module_types = strings(entries["module_type"][1], at.child("module_type"), "a module class name")
    config: tuple[ConfigCondition, ...] = ()
    if "config" in entries:
        config = _config_conditions(entries["config"][1], at.child("config"))
    return MatchSpec(pattern=pattern, scope=scope, scope_text=scope_text, module_types=module_types, config=config)


def _scope_term(text: str, node: yaml.Node, at: Field) -> ScopeTerm:
    if "{" not in text and "}" not in text:
        return ScopeTerm("glob", text)
    found = SET_REFERENCE.match(text)
    if found is None:
        at.fail(node, f"bad scope set reference {text!r}; write {{SET}} or {{SET:STYLE}} (e.g. {{tp_plan:colwise}}, "
                      f"a set the caller supplies), or a glob without braces")
    return ScopeTerm("set", found.group(2) or "", found.group(1))


def _config_conditions(node: yaml.Node, at: Field) -> tuple[ConfigCondition, ...]:
    if not isinstance(node, yaml.MappingNode):
        at.fail(node, f"expected a mapping ATTRIBUTE: value or [allowed values], found a {kind_of(node)}")
    conditions = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        attribute = scalar(key_node, at)
        if not isinstance(attribute, str) or not all(part.isidentifier() for part in attribute.split(".")):
            at.fail(key_node, f"config attribute {attribute!r} must be a name like model_type or text_config.x")
        if any(part.startswith("_") for part in attribute.split(".")):
            at.fail(key_node, f"config attribute {attribute!r}: names starting with '_' (private attributes, "
                              f"dunders) are not allowed")
        if attribute in seen:
            at.fail(key_node, f"key {attribute!r} given twice")
        seen.add(attribute)
        value = plain(value_node, at.child(attribute))
        allowed = tuple(value) if isinstance(value, list) else (value,)
        if any(isinstance(item, (list, dict)) for item in allowed):
            at.child(attribute).fail(value_node, "allowed values must be plain values (strings, numbers, bools)")
        conditions.append(ConfigCondition(attribute, allowed))
    return tuple(conditions)


def parse_rewrite(node: yaml.Node, at: Field) -> RewriteSpec:
    """`rewrite: {template: NAME, args: {...}}`."""
    entries = mapping(node, at, REWRITE_KEYS, required=("template",), what="rewrite")
    template = string(entries["template"][1], at.child("template"), "a template name")
    args: dict[str, Any] = {}
    if "args" in entries:
        args = plain(entries["args"][1], at.child("args"))
        if args is None:
            args = {}
        if not isinstance(args, dict) or not all(isinstance(key, str) and key.isidentifier() for key in args):
            at.child("args").fail(entries["args"][1], "expected a mapping of keyword argument names to values")
    return RewriteSpec(template=template, args=args, line=line_of(entries["template"][1]))
