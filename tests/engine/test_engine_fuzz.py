"""Fuzzing the loader: whatever a rule file holds, loading gives a RuleSet or a RuleError, nothing else."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.engine import RuleSet, load_rules
from hfrewrite.errors import RuleError

from .templates_for_tests import LIBRARY

VOCABULARY = ["name", "doc", "priority", "models", "match", "where", "rewrite", "op", "args", "pattern", "scope",
              "module_type", "config", "root", "nodes", "template", "rules", "divisible", "equals", "in", "value",
              "aten.linear", "aten.mul.Tensor", "hfrewrite.attention", "x", "w", "_", "...", "tp", "rank",
              "config.hidden_size", "x.shape.0", "x.dtype", "ctx.tp", "float32", "{tp_plan:colwise}", "{pp_plan}",
              "model.layers.*.mlp", "engine_test_record_site", "engine_test_linear_as_matmul", "2001-13-45", "0x_"]

words = st.sampled_from(VOCABULARY) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=True) | words
structures = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                          | st.dictionaries(words, children, max_size=5), max_leaves=25)


def rule_like() -> st.SearchStrategy[dict[str, Any]]:
    """Mostly-valid rules with random parts, so the fuzz reaches the deeper validators."""
    names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
    expressions = st.sampled_from(["x", "x.shape.0", "x.shape.-1", "x.dtype", "x.ndim", "weight.shape.0",
                                   "config.hidden_size", "config.nope.x", "ctx.tp", "tp", "rank", "float32",
                                   "torch.bfloat16", "y.shape", "root.dtype", "ctx.state.k"]) | scalars \
        | st.lists(scalars, max_size=3)
    checks = st.dictionaries(st.sampled_from(["divisible", "equals", "in"]) | words,
                             st.lists(expressions, max_size=3), min_size=1, max_size=1)
    ops = st.sampled_from(["aten.linear", "aten.silu", "hfrewrite.attention", "aten.mul.Tensor", "x.y"])
    args = st.lists(st.sampled_from(["x", "y", "_", "...", "w"]) | scalars, max_size=3)
    pattern = st.fixed_dictionaries({"root": st.sampled_from(["a", "b", "c"]) | words, "nodes": st.dictionaries(
        st.sampled_from(["a", "b", "c", "root", "x"]),
        st.fixed_dictionaries({"op": ops}, optional={"args": st.lists(st.sampled_from(["a", "b", "c", "x", "_"]),
                                                                      max_size=3)}) | structures, max_size=3)})
    match = st.fixed_dictionaries({"op": ops}, optional={"scope": words | st.lists(words, max_size=2),
                                                         "args": args | structures, "config": structures,
                                                         "module_type": words | structures}) \
        | st.fixed_dictionaries({"pattern": pattern}, optional={"scope": words}) | structures
    templates = st.sampled_from(["engine_test_record_site", "engine_test_linear_as_matmul", "nope"])
    return st.fixed_dictionaries(
        {"name": names | words, "doc": words, "match": match,
         "rewrite": st.fixed_dictionaries({"template": templates}, optional={"args": st.dictionaries(
             st.sampled_from(["key", "variant"]) | words, scalars, max_size=2) | structures}) | structures},
        optional={"priority": st.integers(-3, 3) | scalars,
                  "models": st.lists(st.sampled_from(["llama", "gpt2"]), max_size=2) | structures,
                  "where": st.lists(checks | structures, max_size=3)})


def load_text(text: str | bytes) -> RuleSet | None:
    """Load `text` from a real file; a RuleError is a fine answer, any other exception fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            return load_rules([path], library=LIBRARY)
        except RuleError as error:
            assert str(error).startswith(f"{path}"), str(error)
            return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    result = load_text(text)
    assert result is None or isinstance(result, RuleSet)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures | st.lists(structures, max_size=3) | st.lists(rule_like(), min_size=1, max_size=3)
       | st.fixed_dictionaries({"rules": st.lists(rule_like(), max_size=2)}, optional={"models": structures}))
def test_arbitrary_yaml_structures(document: Any) -> None:
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    result = load_text(text)
    assert result is None or isinstance(result, RuleSet)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    result = load_text(data)
    assert result is None or isinstance(result, RuleSet)


def test_yaml_oddities_are_rule_errors() -> None:
    for text in ["- &a [*a]\n", "a: &a {b: *a}\n", "- !!python/object:os.system {}\n", "[" * 2000,
                 "- {name: a, doc: b, match: {op: aten.silu, args: [!!timestamp 2001-13-45]}, rewrite: {template: t}}",
                 "%YAML 1.1\n--- a\n--- b\n", "- name: a\n\t doc: b\n"]:
        assert load_text(text) is None, text
    mixed_keys = ("- {name: a, doc: b, match: {op: aten.silu, args: [{value: {1: a, '1': [b]}}]}, "
                  "rewrite: {template: engine_test_record_site}}")
    assert isinstance(load_text(mixed_keys), RuleSet)
