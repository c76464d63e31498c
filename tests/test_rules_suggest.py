"""`hfrewrite rules suggest`: proposed TP rule files from dataflow, checked by running them.

The proposal for GPT-2 must shard exactly what the hand-written rules/arch/gpt2.yaml shards, and
the proposals for GPT-2 and for a tiny llama whose tp_plan was removed must verify: every rank's
rewritten graph runs (two ranks in threads, collectives simulated by `SimulatedGroup`; the
multi-process tests run the same graphs over gloo) and the logits equal HF eager's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hfrewrite.compiler.capture import capture
from hfrewrite.cli import main
from hfrewrite.engine.loader import load_rules, shipped_rule_paths, shipped_rules_dir
from hfrewrite.errors import RewriteError
from hfrewrite.compiler.rewrite import rewrite
from hfrewrite.compiler.suggest import suggest_rules
from hfrewrite.compiler.tiny import tiny_config
from hfrewrite.parallel.layout import ParallelLayout
from tests.equivalence import simulated_verify

pytestmark = pytest.mark.timeout(300)


def generic_rules() -> list[Path]:
    """The shipped rule files without rules/arch (the proposal stands in for an arch file)."""
    return list(shipped_rule_paths(None))


def rule_scopes(path: Path) -> dict[str, set[str]]:
    """template -> the scopes its rules in `path` name."""
    scopes: dict[str, set[str]] = {}
    for rule in load_rules([path]):
        scopes.setdefault(rule.rewrite.template, set()).update(
            [rule.match.scope_text] if isinstance(rule.match.scope_text, str) else rule.match.scope_text)
    return scopes


@pytest.mark.filterwarnings("ignore::hfrewrite.engine.report.UnmatchedRuleWarning")
def test_gpt2_proposal_matches_the_arch_file_and_verifies(tmp_path: Path) -> None:
    config = tiny_config("gpt2")
    text = suggest_rules(config, "tiny:gpt2")
    proposal = tmp_path / "gpt2_tp.yaml"
    proposal.write_text(text)
    assert "gpt2.yaml in the shipped rules/arch already shards gpt2" in text
    assert rule_scopes(proposal) == rule_scopes(shipped_rules_dir() / "arch" / "gpt2.yaml")
    result = simulated_verify(config, generic_rules() + [proposal])
    assert result.passed and result.max_abs_err < 1e-4, result


@pytest.mark.filterwarnings("ignore::hfrewrite.engine.report.UnmatchedRuleWarning")
def test_llama_without_tp_plan_needs_the_proposal_and_it_verifies(tmp_path: Path) -> None:
    config = tiny_config("llama", num_hidden_layers=2)
    config.base_model_tp_plan = None
    with pytest.raises(RewriteError, match="rules suggest"):
        rewrite(capture(config), generic_rules(), ParallelLayout(tp=2))
    text = suggest_rules(config, "tiny:llama")
    proposal = tmp_path / "llama_tp.yaml"
    proposal.write_text(text)
    assert "already sharded by shipped rule tp-colwise-gather: lm_head" in text  # LlamaForCausalLM._tp_plan
    scopes = rule_scopes(proposal)
    assert scopes["rowwise_linear"] == {"model.layers.*.self_attn.o_proj", "model.layers.*.mlp.down_proj"}
    assert scopes["colwise_linear"] == {f"model.layers.*.self_attn.{p}_proj" for p in "qkv"} | {
        "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj"}
    assert scopes["vocab_parallel_embedding"] == {"model.embed_tokens"}
    result = simulated_verify(config, generic_rules() + [proposal])
    assert result.passed and result.max_abs_err < 1e-4, result


def test_cli_prints_a_loadable_rule_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    assert main(["rules", "suggest", "tiny:gpt2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["models"] == ["gpt2"]
    (tmp_path / "proposal.yaml").write_text(out)
    assert {rule.rewrite.template for rule in load_rules([tmp_path / "proposal.yaml"])} == {
        "rowwise_linear", "colwise_linear", "colwise_gather_linear", "vocab_parallel_embedding"}
