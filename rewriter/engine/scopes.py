"""Module paths of graph nodes, and the model's tp/pp plans as module-path globs.

`nn_module_stack` maps keys to (path, type); the innermost module is the last entry. Paths are
normalised to HF fully qualified names ('model.layers.0.self_attn'), whatever prefix export used.
Plans come from the config (`base_model_tp_plan`, relative to the base model) and the causal-LM
class (`_tp_plan`, relative to the top); we key both by full module-path globs.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch.fx

from hfrewrite.engine.schema import ScopeTerm

_PREFIXES = ("L['self'].", "L__self__.", "L__self__", "self.")
_EMPTY_STACK_MARKER = "_empty_nn_module_stack"


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


def _prefixed(plan: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {(f"{prefix}.{key}" if prefix else key): value for key, value in plan.items()}


def model_plans(graph_module: torch.fx.GraphModule, config: Any, model_class: str | None = None,
                prefix: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """(tp_plan, pp_plan) keyed by full module-path globs, from the config and the model class.

    `model_class` None: the class of the graph's top module (from nn_module_stack); '' for none.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base_tp = dict(getattr(config, "base_model_tp_plan", None) or getattr(text_config, "base_model_tp_plan", None)
                   or {})
    base_pp = dict(getattr(config, "base_model_pp_plan", None) or getattr(text_config, "base_model_pp_plan", None)
                   or {})
    if prefix is None:
        prefix = base_prefix(list(base_tp) + list(base_pp), module_paths(graph_module)) if (base_tp or base_pp) else ""
    tp_plan = _prefixed(base_tp, prefix)
    pp_plan = _prefixed(base_pp, prefix)
    model_cls = _top_module_class(graph_module) if model_class is None else _transformers_class(model_class)
    if model_cls is not None:
        tp_plan.update(dict(getattr(model_cls, "_tp_plan", None) or {}))
        pp_plan.update(dict(getattr(model_cls, "_pp_plan", None) or {}))
    return tp_plan, pp_plan


def model_ep_plan(graph_module: torch.fx.GraphModule, config: Any, prefix: str | None = None) -> dict[str, str]:
    """The expert-parallel plan (`base_model_ep_plan`: experts modules and their weights), keyed like the tp plan."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base_ep = dict(getattr(config, "base_model_ep_plan", None) or getattr(text_config, "base_model_ep_plan", None)
                   or {})
    if not base_ep:
        return {}
    if prefix is None:
        prefix = base_prefix(list(base_ep), module_paths(graph_module))
    return _prefixed(base_ep, prefix)


def _top_module_class(graph_module: torch.fx.GraphModule) -> type | None:
    """The class the graph was exported from: the outermost entry of any node's module stack."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for raw_path, raw_type in stack.values():
            if normalise_module_path(str(raw_path)) or str(raw_path).startswith(_EMPTY_STACK_MARKER):
                continue
            if isinstance(raw_type, type):
                return raw_type
            module_name, _, class_name = str(raw_type).rpartition(".")
            found = getattr(sys.modules.get(module_name), class_name, None)
            return found if isinstance(found, type) else _transformers_class(class_name)
    return None


def _transformers_class(name: str) -> type | None:
    if not name:
        return None
    import transformers

    try:
        found = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return found if isinstance(found, type) else None


def scope_failure(terms: tuple[ScopeTerm, ...], scope_text: Any, path: str, tp_plan: Mapping[str, str],
                  pp_plan: Mapping[str, Any], ep_plan: Mapping[str, str] | None = None) -> str | None:
    """None when `path` is in scope, else the near-miss reason."""
    if not terms:
        return None
    for term in terms:
        if term.kind == "ep_plan" and tp_style(path, ep_plan or {}) is not None and (
                not term.value or tp_style(path, ep_plan or {}) == term.value):
            return None
        if term.kind == "glob" and fnmatchcase(path, term.value):
            return None
        if term.kind == "tp_plan" and tp_style(path, tp_plan) is not None and (
                not term.value or tp_style(path, tp_plan) == term.value):
            return None
        if term.kind == "pp_plan" and any(path == key or path.startswith(key + ".") for key in pp_plan):
            return None
    reason = f"scope {scope_text!r} does not match {path!r}"
    if any(term.kind == "tp_plan" for term in terms):
        style = tp_style(path, tp_plan)
        reason += f" (tp plan style {style!r})" if style is not None else " (not in the tp plan)"
    if any(term.kind == "ep_plan" for term in terms):
        style = tp_style(path, ep_plan or {})
        reason += f" (ep plan style {style!r})" if style is not None else " (not in the ep plan)"
    return reason


def tp_style(path: str, tp_plan: Mapping[str, str]) -> str | None:
    """The tp plan style of the module at `path` (exact keys before globs), or None."""
    if path in tp_plan:
        return tp_plan[path]
    for key in sorted(tp_plan):
        if fnmatchcase(path, key):
            return tp_plan[key]
    return None
