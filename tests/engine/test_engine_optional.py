"""Optional rules: a generic family with nothing to do in a model is not warned about; others still are."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from hfrewrite.engine import UnmatchedRuleWarning, apply_rules, load_rules
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.errors import RuleError

from .templates_for_tests import LIBRARY
from .graphs import capture_tiny

RULE = """
- name: {name}
  doc: Rewrites an op this graph does not have.
  {optional}
  match: {{op: aten.convolution}}
  rewrite: {{template: engine_test_silu_as_sigmoid}}
"""


def test_optional_rule_matching_nothing_is_not_applicable(write_rules: Callable[..., Path]) -> None:
    path = write_rules(RULE.format(name="conv-family", optional="optional: true"))
    captured = capture_tiny()
    ctx = rewrite_context(captured.graph_module, captured.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        report = apply_rules(ctx, load_rules([path], library=LIBRARY))
    assert report.not_applicable == ["conv-family"] and report.unmatched_rules == []


def test_plain_rule_matching_nothing_still_warns(write_rules: Callable[..., Path]) -> None:
    path = write_rules(RULE.format(name="conv-rule", optional=""))
    captured = capture_tiny()
    ctx = rewrite_context(captured.graph_module, captured.config)
    with pytest.warns(UnmatchedRuleWarning, match="conv-rule"):
        report = apply_rules(ctx, load_rules([path], library=LIBRARY))
    assert report.unmatched_rules == ["conv-rule"] and report.not_applicable == []


def test_optional_must_be_a_boolean(write_rules: Callable[..., Path]) -> None:
    path = write_rules(RULE.format(name="bad", optional="optional: sometimes"))
    with pytest.raises(RuleError, match=r":\d+: rule bad: field optional: expected true or false"):
        load_rules([path], library=LIBRARY)
