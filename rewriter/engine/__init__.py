"""The rule engine: YAML rules (schema, loader), templates, matcher and the rewriter that applies them.

    library = shipped_library()             # or TemplateLibrary([...]) of your own @template functions
    ruleset = load_rules(shipped_rule_paths(config.model_type) + user_paths, library=library)
    ctx = RewriteContext(graph_module, config, options={...}, scope_sets={...})  # the caller's options and sets
    report = apply_rules(ctx, ruleset)      # or explain(ctx, ruleset).to_text()

The compiler builds its context with hfrewrite.parallel.plans.rewrite_context (plans as scope sets).
"""
from hfrewrite.engine.apply import RULE_META, apply_rules, explain, remaining_ops
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules, read_rule_file, shipped_rule_paths
from hfrewrite.engine.matcher import Match, NearMiss, find_matches
from hfrewrite.engine.report import ExplainReport, RewriteReport, RuleExplanation, UnmatchedRuleWarning
from hfrewrite.engine.schema import Rule, RuleSet, SourceLine
from hfrewrite.engine.scopes import ScopeSet
from hfrewrite.engine.templates import RegisteredTemplate, Template, TemplateLibrary, shipped_library, template
from hfrewrite.engine.validate import parse_rule_file

__all__ = [
    "RULE_META", "ExplainReport", "Match", "NearMiss", "RegisteredTemplate", "RewriteContext", "RewriteReport",
    "Rule", "RuleExplanation", "RuleSet", "ScopeSet", "SourceLine", "Template", "TemplateLibrary",
    "UnmatchedRuleWarning", "apply_rules", "explain", "find_matches", "load_rules", "parse_rule_file",
    "read_rule_file", "remaining_ops", "shipped_library", "shipped_rule_paths", "template",
]
