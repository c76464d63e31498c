"""The rule engine: YAML rules (schema, loader), templates, matcher and the rewriter that applies them.

    ruleset = load_rules(shipped_rule_paths(config.model_type) + user_paths)
    ctx = RewriteContext.for_model(graph_module, config, tp=2, rank=0, model_class="LlamaForCausalLM")
    report = apply_rules(ctx, ruleset)      # or explain(ctx, ruleset).to_text()
"""
from hfrewrite.engine.apply import RULE_META, apply_rules, explain, remaining_ops
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules, read_rule_file, shipped_rule_paths
from hfrewrite.engine.matcher import Match, NearMiss, find_matches
from hfrewrite.engine.report import ExplainReport, RewriteReport, RuleExplanation, UnmatchedRuleWarning
from hfrewrite.engine.schema import Rule, RuleSet, SourceLine
from hfrewrite.engine.templates import RegisteredTemplate, get_template, import_template_modules, known_templates, register_template
from hfrewrite.engine.validate import parse_rule_file

__all__ = [
    "RULE_META", "ExplainReport", "Match", "NearMiss", "RegisteredTemplate", "RewriteContext", "RewriteReport",
    "Rule", "RuleExplanation", "RuleSet", "SourceLine", "UnmatchedRuleWarning", "apply_rules", "explain",
    "find_matches", "get_template", "import_template_modules", "known_templates", "load_rules", "parse_rule_file",
    "read_rule_file", "register_template", "remaining_ops", "shipped_rule_paths",
]
