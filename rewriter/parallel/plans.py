"""A model's parallelism plans as the named scope sets rules refer to, and the options `when:` reads.

The engine resolves `{NAME:STYLE}` scopes against whatever sets its caller gives it and knows no
plan names; this module is that caller's half for parallelism. From the config
(`base_model_tp_plan` / `base_model_ep_plan` / `base_model_pp_plan`, relative to the base model) and
the causal-LM class (`_tp_plan`, `_pp_plan`, relative to the top) it builds the sets `tp_plan`,
`ep_plan` and `pp_plan`, keyed by full module-path globs, and `rewrite_context` puts them, with the
options the ParallelLayout implies (tp, ep, pp, rank, device) and the dtype, into a RewriteContext.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.scopes import EMPTY_STACK_MARKER, ScopeSet, base_prefix, module_paths, normalise_module_path
from hfrewrite.parallel.layout import ParallelLayout
from hfrewrite.parallel.sharding import TP_GROUP

TP_PLAN, EP_PLAN, PP_PLAN = "tp_plan", "ep_plan", "pp_plan"
VOCAB_PARALLEL = "embedding_rowwise"


def _prefixed(plan: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {(f"{prefix}.{key}" if prefix else key): value for key, value in plan.items()}


def text_config(config: Any) -> Any:
    """The config of the language model (a vision-language config's text part; the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def base_plan(config: Any, attribute: str) -> dict[str, Any]:
    """A base-model plan (`base_model_tp_plan`, ...) of the config or else of its text config; {} for none."""
    return dict(getattr(config, attribute, None) or getattr(text_config(config), attribute, None) or {})


def model_plans(graph_module: torch.fx.GraphModule, config: Any, model_class: str | None = None,
                prefix: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """(tp_plan, pp_plan) keyed by full module-path globs, from the config and the model class.

    `model_class` None: the class of the graph's top module (from nn_module_stack); '' for none.
    """
    base_tp = base_plan(config, "base_model_tp_plan")
    base_pp = base_plan(config, "base_model_pp_plan")
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
    base_ep = base_plan(config, "base_model_ep_plan")
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
            if normalise_module_path(str(raw_path)) or str(raw_path).startswith(EMPTY_STACK_MARKER):
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


def _with_embedding(graph_module: torch.fx.GraphModule, config: Any, tp_plan: dict[str, str]) -> dict[str, str]:
    """As transformers does: a model whose base tp plan is not empty gets its `embed_tokens` vocabulary-parallel."""
    if not base_plan(config, "base_model_tp_plan"):
        return tp_plan
    tp_set = ScopeSet(tp_plan)
    for path in module_paths(graph_module):
        if path.rpartition(".")[2] == "embed_tokens" and tp_set.style(path) is None:
            tp_plan[path] = VOCAB_PARALLEL
    return tp_plan


def plan_scope_sets(graph_module: torch.fx.GraphModule, config: Any, model_class: str | None = None,
                    prefix: str | None = None, tp_plan: Mapping[str, str] | None = None,
                    ep_plan: Mapping[str, str] | None = None) -> dict[str, ScopeSet]:
    """{'tp_plan', 'ep_plan', 'pp_plan'} -> ScopeSet, from the model (or the plans given, keyed by full paths)."""
    model_tp, model_pp = model_plans(graph_module, config, model_class, prefix)
    tp = dict(tp_plan) if tp_plan is not None else _with_embedding(graph_module, config, model_tp)
    ep = dict(ep_plan) if ep_plan is not None else model_ep_plan(graph_module, config, prefix)
    return {TP_PLAN: ScopeSet({key: str(style) for key, style in tp.items()}),
            EP_PLAN: ScopeSet({key: str(style) for key, style in ep.items()}),
            PP_PLAN: ScopeSet({key: "" for key in model_pp}, subtree=True)}


def graph_dtype(graph_module: torch.fx.GraphModule) -> str | None:
    """The dtype name of the graph's first floating-point parameter ('bfloat16'), or None."""
    for _, parameter in sorted(graph_module.named_parameters()):
        if parameter.dtype.is_floating_point:
            return str(parameter.dtype).removeprefix("torch.")
    return None


def compile_options(layout: ParallelLayout, *, device: str | None = None, dtype: str | None = None,
                    logits: bool = True) -> dict[str, Any]:
    """The options rules' `when:` checks read, from the layout (device: a device type like 'cuda'; dtype: a name
    like 'float32'; logits: whether the graph returns logits, false for embedding models). `rank` is the rank
    within the stage's tp group: what a shard's range depends on."""
    return {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp, "rank": layout.tp_rank, "device": device,
            "dtype": dtype, "logits": logits}


def rewrite_context(graph_module: torch.fx.GraphModule, config: Any, layout: ParallelLayout | None = None, *,
                    dtype: torch.dtype | str | None = None, model_class: str | None = None, prefix: str | None = None,
                    tp_plan: Mapping[str, str] | None = None, ep_plan: Mapping[str, str] | None = None,
                    logits: bool = True) -> RewriteContext:
    """The context the compiler rewrites a model in: its plans as scope sets, the options the layout implies.

    `layout` (default: one device) gives tp, ep, pp, this rank, its device and its tp group's name; the
    context's options are made from it alone. `model_class` (a transformers class name) defaults to the
    class the graph was captured from; pass '' to leave the class's plan out. `prefix` (where the base
    model sits) defaults to what the graph shows. `tp_plan` / `ep_plan` replace the model's plans (tests
    of blocks that have none).
    """
    layout = layout or ParallelLayout()
    device_type = layout.device.type if layout.device is not None else None
    dtype_name = (str(dtype).removeprefix("torch.") if dtype is not None else graph_dtype(graph_module))
    options = compile_options(layout, device=device_type, dtype=dtype_name, logits=logits)
    sets = plan_scope_sets(graph_module, config, model_class, prefix, tp_plan, ep_plan)
    state: dict[str, Any] = {TP_GROUP: layout.tp_group_name} if layout.tp_group_name else {}
    return RewriteContext(graph_module, config, options=options, scope_sets=sets, state=state)
