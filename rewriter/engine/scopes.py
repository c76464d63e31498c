"""Module paths of graph nodes, and the named scope sets (module-path globs with styles) rules can refer to.

`nn_module_stack` maps keys to (path, type); the innermost module is the last entry. Paths are
normalised to HF fully qualified names ('model.layers.0.self_attn'), whatever prefix export used.
Which scope sets exist (a model's parallelism plans, say) is the caller's business: it builds them
and passes them in the RewriteContext; the engine only resolves `{NAME:STYLE}` against them.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch.fx

from hfrewrite.engine.schema import ScopeTerm

_PREFIXES = ("L['self'].", "L__self__.", "L__self__", "self.")
EMPTY_STACK_MARKER = "_empty_nn_module_stack"
_EMPTY_STACK_MARKER = EMPTY_STACK_MARKER


def normalise_module_path(raw: str) -> str:
    """'L['self'].model.layers[0]._modules['mlp']' -> 'model.layers.0.mlp'."""
    path = raw
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    if path.startswith(_EMPTY_STACK_MARKER):
        return ""
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, module class name) of the innermost module that produced `node`; ('', '') if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    raw_path, raw_type = list(stack.values())[-1]
    path = normalise_module_path(str(raw_path))
    if not path and str(raw_path).startswith(_EMPTY_STACK_MARKER):
        return "", ""
    type_name = raw_type.__name__ if isinstance(raw_type, type) else str(raw_type).rsplit(".", 1)[-1]
    return path, type_name


def module_paths(graph_module: torch.fx.GraphModule) -> list[str]:
    """Every module path named in the graph's stacks (all levels), sorted."""
    paths: set[str] = set()
    for node in graph_module.graph.nodes:
        for raw_path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if not str(raw_path).startswith(_EMPTY_STACK_MARKER):
                paths.add(normalise_module_path(str(raw_path)))
    return sorted(paths)


def base_prefix(plan_keys: Iterable[str], paths: list[str]) -> str:
    """The module path under which the base model's plan keys name real modules ('model', ...).

    Tried: '' and every path at most two levels deep; the one under which most keys match wins
    (ties: the shorter). This also finds 'model.language_model' for multimodal models.
    """
    keys = list(plan_keys)
    candidates = [""] + [path for path in paths if path and path.count(".") <= 1]
    best, best_score = "", -1
    for candidate in candidates:
        prefix = f"{candidate}." if candidate else ""
        score = sum(any(fnmatchcase(path, prefix + key) for path in paths) for key in keys)
        if score > best_score:
            best, best_score = candidate, score
    return best


@dataclass(frozen=True)
class ScopeSet:
    """A named set of modules a rule scope can refer to as `{NAME}` or `{NAME:STYLE}`, supplied by the caller.

    `styles` maps module-path globs (full paths, as `module_of` gives them) to a style ('' for none);
    with `subtree`, the modules under an entry belong to it too (a pipeline plan's layer lists).
    """

    styles: Mapping[str, str] = field(default_factory=dict)
    subtree: bool = False

    def style(self, path: str) -> str | None:
        """The style of the module at `path` (exact keys before globs, globs in sorted order), or None."""
        if path in self.styles:
            return self.styles[path]
        for key in sorted(self.styles):
            if fnmatchcase(path, key) or (self.subtree and path.startswith(key + ".")):
                return self.styles[key]
        return None

    def has_style(self, style: str) -> bool:
        """Whether some entry has `style` ('' = whether there is any entry)."""
        return style in self.styles.values() if style else bool(self.styles)


def unknown_scope_sets(terms: tuple[ScopeTerm, ...], scope_sets: Mapping[str, ScopeSet]) -> list[str]:
    """The set names `terms` refer to that `scope_sets` does not have, sorted."""
    return sorted({term.set_name for term in terms if term.kind == "set" and term.set_name not in scope_sets})


def scope_failure(terms: tuple[ScopeTerm, ...], scope_text: Any, path: str,
                  scope_sets: Mapping[str, ScopeSet]) -> str | None:
    """None when `path` is in scope, else the near-miss reason (with the styles the referenced sets give it)."""
    if not terms:
        return None
    for term in terms:
        if term.kind == "glob" and fnmatchcase(path, term.value):
            return None
        if term.kind == "set":
            style = scope_sets[term.set_name].style(path)
            if style is not None and (not term.value or style == term.value):
                return None
    reason = f"scope {scope_text!r} does not match {path!r}"
    for name in dict.fromkeys(term.set_name for term in terms if term.kind == "set"):
        style = scope_sets[name].style(path)
        reason += f" ({name} style {style!r})" if style else f" (not in {name})" if style is None else f" (in {name})"
    return reason
