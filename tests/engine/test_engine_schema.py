"""Rule files: every schema error names FILE:LINE, the rule, the field, and what is allowed."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from hfrewrite.engine import load_rules, loader, parse_rule_file
from hfrewrite.engine.schema import AnyArg, ListArg, LiteralArg, NameArg, RestArg
from hfrewrite.errors import RuleError

from .templates_for_tests import LIBRARY

GOOD = """\
- name: good
  doc: A valid rule.
  match: {op: aten.linear, scope: "lm_head"}
  rewrite: {template: engine_test_linear_as_matmul}
"""


def error_of(write_rules: Callable[..., Path], text: str, name: str = "rules.yaml") -> tuple[str, str]:
    """Load `text` from a file; return (file path, error message)."""
    path = write_rules(text, name)
    with pytest.raises(RuleError) as caught:
        load_rules([path], library=LIBRARY)
    return str(path), str(caught.value)


def test_malformed_yaml_reports_the_line_of_the_yaml_error(write_rules: Callable[..., Path]) -> None:
    path, message = error_of(write_rules, "- name: a\n  doc: b\n  match: {op: [aten.linear\n  rewrite: x\n")
    assert message.startswith(f"{path}:"), message
    assert "malformed YAML" in message
    assert re.match(rf"{re.escape(path)}:[34]: ", message), message


def test_unknown_rule_key_names_key_and_allowed_keys(write_rules: Callable[..., Path]) -> None:
    text = GOOD + "  priorty: 3\n"
    path, message = error_of(write_rules, text)
    assert message.startswith(f"{path}:5: rule good: field priorty: unknown key 'priorty'"), message
    assert "allowed keys: name, doc, priority, models, optional, when, match, where, rewrite" in message


@pytest.mark.parametrize("text, line, field", [
    (GOOD.replace('scope: "lm_head"', 'scop: "lm_head"'), 3, "match.scop"),
    (GOOD.replace("{template: engine_test_linear_as_matmul}", "{template: engine_test_linear_as_matmul, arg: 1}"),
     4, "rewrite.arg"),
    ("- name: p\n  doc: d\n  match:\n    pattern:\n      root: a\n      nodes:\n        a: {op: aten.silu, argz: [x]}\n"
     "  rewrite: {template: engine_test_record_site}\n", 7, "match.pattern.nodes.a.argz"),
])
def test_unknown_nested_keys_carry_their_field_path(write_rules: Callable[..., Path], text: str, line: int,
                                                    field: str) -> None:
    path, message = error_of(write_rules, text)
    assert message.startswith(f"{path}:{line}: rule "), message
    assert f"field {field}: unknown key" in message


@pytest.mark.parametrize("missing", ["name", "doc", "rewrite", "match"])
def test_missing_required_fields(write_rules: Callable[..., Path], missing: str) -> None:
    lines = [line for line in GOOD.splitlines() if not line.lstrip("- ").startswith(f"{missing}:")]
    text = "\n".join(lines).replace("  doc:", "- doc:", 1) if missing == "name" else "\n".join(lines)
    path, message = error_of(write_rules, text + "\n")
    rule = "#1" if missing == "name" else "good"
    assert message.startswith(f"{path}:1: rule {rule}: field {missing}: missing required key '{missing}'"), message


def test_unknown_template_lists_the_known_ones(write_rules: Callable[..., Path]) -> None:
    path, message = error_of(write_rules, GOOD.replace("engine_test_linear_as_matmul", "no_such_template"))
    assert message.startswith(f"{path}:4: rule good: field rewrite.template: unknown template 'no_such_template'")
    assert "engine_test_linear_as_matmul" in message and "engine_test_silu_as_sigmoid" in message


def test_template_args_must_fit_the_template(write_rules: Callable[..., Path]) -> None:
    text = GOOD.replace("{template: engine_test_linear_as_matmul}",
                        "{template: engine_test_record_site, args: {keyy: x}}")
    path, message = error_of(write_rules, text)
    assert message.startswith(f"{path}:4: rule good: field rewrite.args: "), message
    assert "keyy" in message


def test_duplicate_rule_names_name_both_places(write_rules: Callable[..., Path]) -> None:
    first = write_rules(GOOD, "a.yaml")
    second = write_rules("# another file\n" + GOOD, "b.yaml")
    with pytest.raises(RuleError) as caught:
        load_rules([first, second], library=LIBRARY)
    message = str(caught.value)
    assert message.startswith(f"{second}:2: rule good: field name: duplicate rule name"), message
    assert f"{first}:1" in message


@pytest.mark.parametrize("check, fragment", [
    ("{divisible: [wx.shape.0, tp]}", "unknown name 'wx'"),
    ("{divisible: [weight.shape.x, tp]}", "bad expression 'weight.shape.x'"),
    ("{divisible: [weight.shape.0]}", "expects a list of two expressions, found 1"),
    ("{divisible: [weight.shape.0, four]}", "divisible needs integers"),
    ("{between: [1, 2]}", "unknown check 'between'; allowed: divisible, equals, in"),
    ("{in: [config.hidden_act, silu]}", "'in' needs a list"),
    ("{equals: [ctx.world, 2]}", "bad ctx expression 'ctx.world'"),
    ("{equals: [config, 2]}", "bad config expression 'config'"),
])
def test_bad_where_expressions(write_rules: Callable[..., Path], check: str, fragment: str) -> None:
    text = GOOD.replace("  rewrite:", f"  where:\n    - {check}\n  rewrite:")
    path, message = error_of(write_rules, text)
    assert message.startswith(f"{path}:5: rule good: field where[0]"), message
    assert fragment in message


@pytest.mark.parametrize("match, fragment", [
    ("{op: aten.linaer}", "unknown op 'aten.linaer'"),
    ("{op: aten.linear.nope}", "unknown overload 'aten.linear.nope'"),
    ("{op: linear}", "bad op name 'linear'"),
    ("{op: aten.linear, pattern: {root: a, nodes: {a: {op: aten.silu}}}}", "exactly one of 'op'"),
    ("{op: aten.linear, scope: '{tp_plan:colwise'}", "bad scope set reference"),
    ("{pattern: {root: b, nodes: {a: {op: aten.silu}}}}", "root 'b' is not one of the nodes"),
    ("{pattern: {root: a, nodes: {a: {op: aten.silu, args: [x]}, b: {op: aten.neg}}}}", "not reachable from root"),
    ("{pattern: {root: a, nodes: {a: {op: aten.silu, args: [b]}, b: {op: aten.neg, args: [a]}}}}", "cycle"),
    ("{op: aten.linear, args: [..., x]}", "'...' may only be the last argument"),
    ("{op: aten.linear, args: [config]}", "bad capture name 'config'"),
    ("{op: aten.linear, config: {model_type: [[llama]]}}", "plain values"),
])
def test_bad_match_sections(write_rules: Callable[..., Path], match: str, fragment: str) -> None:
    text = GOOD.replace('{op: aten.linear, scope: "lm_head"}', match)
    path, message = error_of(write_rules, text)
    assert message.startswith(f"{path}:3: rule good: field match"), message
    assert fragment in message


@pytest.mark.parametrize("text, fragment", [
    ("name: x\n", "unknown key 'name'; allowed keys: rules, models"),
    ("just text\n", "a rule file holds a list of rules"),
    ("- 42\n", "expected a mapping (a rule)"),
    ("- name: a\n  doc: b\n  priority: high\n  match: {op: aten.silu}\n  rewrite: {template: t}\n",
     "field priority: expected an integer"),
    ("- name: 'bad name'\n  doc: b\n  match: {op: aten.silu}\n  rewrite: {template: t}\n", "may use letters"),
    ("- name: a\n  doc: ''\n  match: {op: aten.silu}\n  rewrite: {template: t}\n", "field doc"),
    ("- name: a\n  name: b\n", "given twice"),
    ("- name: a\n  doc: b\n  match: {op: aten.silu}\n  rewrite: {template: t}\n  whence: 2001-13-45\n",
     "unknown key 'whence'"),
    ("- name: a\n  doc: b\n  match: {op: aten.silu}\n  rewrite: {template: t}\n  when: 2001-13-45\n",
     "field when: expected a check like {gt: [tp, 1]}"),
    ("- name: a\n  doc: b\n  match: {op: aten.silu}\n  rewrite: {template: t}\n  when: [{gt: [tp]}]\n",
     "field when[0].gt: expects a list of two expressions"),
    ("- name: a\n  doc: b\n  match: {op: aten.silu, args: [{value: 2001-13-45}]}\n  rewrite: {template: t}\n",
     "cannot read value"),
])
def test_other_schema_errors(write_rules: Callable[..., Path], text: str, fragment: str) -> None:
    path, message = error_of(write_rules, text)
    assert re.match(rf"{re.escape(path)}:\d+: ", message), message
    assert fragment in message


def test_valid_files_load_in_priority_then_file_then_name_order(fixtures_dir: Path,
                                                                 write_rules: Callable[..., Path]) -> None:
    extra = write_rules(GOOD.replace("good", "zz-late") + GOOD.replace("good", "aa-early"), "zz.yaml")
    ruleset = load_rules([fixtures_dir, extra], library=LIBRARY)
    assert ruleset.names() == ["colwise-as-matmul", "mlp-silu-as-sigmoid", "aa-early", "zz-late"]
    colwise = ruleset.get("colwise-as-matmul")
    assert colwise.priority == 5 and colwise.models == ("llama",)
    assert colwise.location.file.endswith("colwise_matmul.yaml") and colwise.location.line == 4
    mlp = ruleset.get("mlp-silu-as-sigmoid")
    assert mlp.models is None and mlp.match.pattern.root == "out"
    assert set(mlp.match.pattern.captures) == {"x", "w_gate", "w_up"}
    assert [group[0].priority for group in ruleset.priority_groups()] == [5, 0]


def test_argument_patterns_parse_to_their_kinds() -> None:
    rules = parse_rule_file("- name: a\n  doc: b\n  match: {op: aten.cat, args: [[x, _, ...], -1]}\n"
                            "  rewrite: {template: t}\n", "inline.yaml")
    args = rules[0].match.pattern.nodes["root"].args
    assert args == (ListArg((NameArg("x"), AnyArg(), RestArg())), LiteralArg(-1))


def test_empty_file_and_empty_rule_list_load_as_nothing(write_rules: Callable[..., Path]) -> None:
    assert len(load_rules([write_rules("", "a.yaml"), write_rules("rules: []\n", "b.yaml")])) == 0


def test_missing_path_is_a_rule_error(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="no such rule file or directory"):
        load_rules([tmp_path / "absent.yaml"], library=LIBRARY)


def test_non_utf8_file_is_a_rule_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    with pytest.raises(RuleError, match=rf"{re.escape(str(path))}:5: rule file is not UTF-8"):
        load_rules([path], library=LIBRARY)


def test_arch_rules_load_only_for_their_model_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "arch").mkdir()
    (tmp_path / "generic").mkdir()
    (tmp_path / "generic" / "rules.yaml").write_text(GOOD)
    (tmp_path / "arch" / "gpt2.yaml").write_text("models: [gpt2]\nrules:\n" + GOOD.replace("good", "gpt2-only"))
    monkeypatch.setattr(loader, "shipped_rules_dir", lambda: tmp_path)
    generic = tmp_path / "generic" / "rules.yaml"
    assert loader.shipped_rule_paths() == [generic]
    assert loader.shipped_rule_paths("llama") == [generic]
    assert loader.shipped_rule_paths("gpt2") == [generic, tmp_path / "arch" / "gpt2.yaml"]
    assert load_rules(loader.shipped_rule_paths("gpt2"), library=LIBRARY).get("gpt2-only").models == ("gpt2",)


def test_shipped_rules_load_and_name_real_templates() -> None:
    ruleset = load_rules(loader.shipped_rule_paths())
    assert all(not Path(path).parent.name == "arch" for path in ruleset.files)
    assert all(rule.doc for rule in ruleset)
