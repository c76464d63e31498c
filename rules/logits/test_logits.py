"""select-logit-rows runs on graphs that return logits and is not applicable (no warning) on the others.

Its equation is checked end to end by every causal-LM equivalence test (tests/test_equivalence.py); here
only when it applies: a causal LM's LM head, and not an embedding model (no LM head, hidden states out).
"""
from __future__ import annotations

import warnings

import pytest

from hfrewrite.compiler.capture import capture
from hfrewrite.compiler.kinds import kind_for
from hfrewrite.compiler.rewrite import rewrite, rule_paths
from hfrewrite.compiler.tiny import tiny_config
from hfrewrite.engine import UnmatchedRuleWarning

RULE = "select-logit-rows"


@pytest.mark.parametrize("model_type,applies", [("llama", True), ("bert", False), ("qwen3-body", False)])
def test_select_logit_rows_applies_only_with_logits(model_type: str, applies: bool) -> None:
    config = tiny_config(model_type.removesuffix("-body"))
    if model_type.endswith("-body"):
        config.architectures = ["Qwen3Model"]   # a decoder embedding model: the base model, no LM head
    kind = kind_for(config)
    assert (kind.output == "logits") is applies
    captured = capture(config, kind=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        _, report = rewrite(captured, rule_paths((), config.model_type))
    assert (report.applied.get(RULE) == 1) is applies
    assert (RULE in report.not_applicable) is not applies
