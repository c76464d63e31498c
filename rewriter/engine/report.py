"""What a rewrite did (`RewriteReport`) and what it would do (`ExplainReport`), for people and JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hfrewrite.engine.matcher import NearMiss


class UnmatchedRuleWarning(UserWarning):
    """A rule that applies to this model matched nothing: usually a stale or mis-scoped rule."""


@dataclass
class RewriteReport:
    """Per rule: how many sites were rewritten and where; plus what was left and why."""

    applied: dict[str, int] = field(default_factory=dict)
    sites: dict[str, list[str]] = field(default_factory=dict)
    near_misses: list[NearMiss] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    skipped_rules: list[str] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)  # `when:` false, plan styles absent, optional + nothing
    remaining_ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (keys sorted where order carries no meaning)."""
        return {
            "applied": dict(sorted(self.applied.items())),
            "sites": {name: list(paths) for name, paths in sorted(self.sites.items())},
            "near_misses": [miss.to_dict() for miss in self.near_misses],
            "unmatched_rules": list(self.unmatched_rules),
            "skipped_rules": list(self.skipped_rules),
            "not_applicable": list(self.not_applicable),
            "remaining_ops": dict(sorted(self.remaining_ops.items())),
        }


@dataclass
class RuleExplanation:
    """One rule as `explain` sees it: where it matches, where it nearly does, or why it is skipped."""

    rule: str
    location: str
    template: str
    priority: int
    doc: str
    sites: list[str] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    skipped: str = ""
    equation: str = ""
    not_applicable: str = ""  # why the rule does not run here (its `when:` is false, ...)
    failed: str = ""  # why the rule could not be applied to the explained copy (later rules then see no rewrite)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rule": self.rule, "location": self.location, "template": self.template, "priority": self.priority,
                "doc": self.doc, "equation": self.equation, "sites": list(self.sites),
                "near_misses": [miss.to_dict() for miss in self.near_misses], "skipped": self.skipped,
                "not_applicable": self.not_applicable, "failed": self.failed}


@dataclass
class ExplainReport:
    """Every rule of a set, in application order, applied to a copy of one model's graph (left unchanged)."""

    model_type: str
    rules: list[RuleExplanation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"model_type": self.model_type, "rules": [rule.to_dict() for rule in self.rules]}

    def to_text(self) -> str:
        """A readable listing: per rule, its matched sites and its near misses with reasons."""
        lines = [f"model type {self.model_type or '?'}: {len(self.rules)} rules"]
        for entry in self.rules:
            lines.append("")
            lines.append(f"rule {entry.rule}  (priority {entry.priority}, template {entry.template}, {entry.location})")
            lines.append(f"  {' '.join(entry.doc.split())}")
            if entry.equation:
                lines.append(f"  claims: {entry.equation}")
            if entry.skipped:
                lines.append(f"  skipped: {entry.skipped}")
                continue
            if entry.not_applicable:
                lines.append(f"  not applicable: {entry.not_applicable}")
                continue
            lines.append(f"  matched {len(entry.sites)} site{'s' if len(entry.sites) != 1 else ''}"
                         f"{':' if entry.sites else ''}")
            lines.extend(f"    {site or '<top level>'}" for site in entry.sites)
            if entry.near_misses:
                lines.append(f"  near misses ({len(entry.near_misses)}):")
                lines.extend(f"    {miss.module_path or '<top level>'} [{miss.node}]: {miss.reason}"
                             for miss in entry.near_misses)
            if entry.failed:
                lines.append(f"  {entry.failed}")
        return "\n".join(lines)
