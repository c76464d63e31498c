"""The pipeline plan: which module list holds the decoder layers, and how many layers each stage gets.

From the model's `pp_plan` (config `base_model_pp_plan` plus the causal-LM class's `_pp_plan`), or, for a
model without one, derived from its single outermost list of numbered modules as the graph's
`nn_module_stack` shows it. rewriter/stages.py cuts the graph by this plan.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx

from hfrewrite.engine.scopes import module_paths
from hfrewrite.parallel.plans import model_plans
from hfrewrite.errors import HfRewriteError


class StageSplitError(HfRewriteError):
    """The model cannot be cut into the requested pipeline stages (counts, plan, graph shape)."""


@dataclass(frozen=True)
class LayerPlan:
    """Where the decoder layers are, and which modules the plan pins to the first and last stage."""

    layers_path: str
    num_layers: int
    first_modules: tuple[str, ...] = ()
    last_modules: tuple[str, ...] = ()
    source: str = "pp_plan"   # "pp_plan" or "derived" (from the module tree)


# ----------------------------------------------------------------------------------------------
# The plan: which module list holds the layers


def _layer_lists(paths: Sequence[str]) -> dict[str, list[int]]:
    """Module path -> sorted child indices, for every module with numbered children ('model.layers')."""
    lists: dict[str, set[int]] = {}
    for path in paths:
        match = re.fullmatch(r"(.+)\.(\d+)", path)
        if match:
            lists.setdefault(match.group(1), set()).add(int(match.group(2)))
    return {prefix: sorted(indices) for prefix, indices in sorted(lists.items())}


def _outermost_lists(lists: dict[str, list[int]]) -> list[str]:
    """Lists not nested inside another list's items (the experts of layer 3 are not layers)."""
    return [prefix for prefix in lists
            if not any(prefix.startswith(f"{other}.") and other != prefix for other in lists)]


def layer_plan(graph_module: torch.fx.GraphModule, config: Any, attention_paths: Sequence[str] = ()) -> LayerPlan:
    """The layer list and pinned modules from the pp_plan, or derived from the module tree without one.

    `attention_paths` (the modules of the KV-cache sites) pick the decoder layers when a model without
    a plan shows more than one list of numbered modules.
    """
    _, pp_plan = model_plans(graph_module, config)
    paths = module_paths(graph_module)
    lists = _layer_lists(paths)
    if not pp_plan or not any(key in lists for key in pp_plan):
        for key in pp_plan:  # a plan without the layers (OLMoE: only lm_head): derive them, data flow places the rest
            if key not in paths:
                raise StageSplitError(f"the model's pp_plan names module {key!r}, which is not in the captured "
                                      f"graph (modules: {', '.join(p for p in paths if p.count('.') <= 1)})")
        return _derived_plan(lists, attention_paths)
    keys = list(pp_plan)
    if _fed_embeddings(graph_module):  # a VLM's LM graph: its token embedding runs outside, before the graph
        position = next((i for i, key in enumerate(keys) if key in lists), len(keys))
        keys = [key for i, key in enumerate(keys) if i > position or key in paths or key in lists]
    layer_keys = [key for key in keys if key in lists]
    if len(layer_keys) != 1:
        raise StageSplitError(f"the model's pp_plan names several lists of numbered modules "
                              f"({', '.join(layer_keys)}); pipeline stages need exactly one list of decoder layers")
    layers_path = layer_keys[0]
    for key in keys:
        if key != layers_path and key not in paths:
            raise StageSplitError(f"the model's pp_plan names module {key!r}, which is not in the captured graph "
                                  f"(modules: {', '.join(p for p in paths if p.count('.') <= 1)}); the plan does "
                                  f"not match the module tree")
    _check_contiguous(layers_path, lists[layers_path])
    position = keys.index(layers_path)
    return LayerPlan(layers_path, len(lists[layers_path]), tuple(keys[:position]), tuple(keys[position + 1:]),
                     "pp_plan")


def _fed_embeddings(graph_module: torch.fx.GraphModule) -> bool:
    """Whether the graph takes `inputs_embeds` (a vision-language model's language model) instead of token ids."""
    return any(node.op == "placeholder" and node.target == "inputs_embeds" for node in graph_module.graph.nodes)


def _derived_plan(lists: dict[str, list[int]], attention_paths: Sequence[str] = ()) -> LayerPlan:
    """The plan of a model without one: its outermost list of numbered modules (the one holding the
    attention sites, if there are several) is the layers."""
    candidates = _outermost_lists(lists)
    if len(candidates) > 1 and attention_paths:
        candidates = [c for c in candidates
                      if any(re.match(rf"{re.escape(c)}\.\d+(\.|$)", path) for path in attention_paths)]
    if not candidates:
        raise StageSplitError("the model has no pp_plan and its graph shows no list of numbered modules "
                              "(like model.layers.0, model.layers.1) to divide between pipeline stages")
    if len(candidates) > 1:
        raise StageSplitError(f"the model has no pp_plan and its graph shows several lists of numbered modules "
                              f"({', '.join(candidates)}); which one holds the decoder layers is ambiguous")
    layers_path = candidates[0]
    _check_contiguous(layers_path, lists[layers_path])
    return LayerPlan(layers_path, len(lists[layers_path]), (), (), "derived")


def _check_contiguous(layers_path: str, indices: list[int]) -> None:
    if indices != list(range(len(indices))):
        raise StageSplitError(f"the graph shows layers {indices} of {layers_path}, not 0..{len(indices) - 1}; "
                              f"stages need every layer to appear in the graph")


def stage_count(pp: int, layers: Sequence[int] = ()) -> int:
    """Pipeline stages asked for: --pp, or as many as --pp-layers lists when --pp is left at 1."""
    return pp if pp > 1 or not layers else len(layers)


def layer_counts(num_layers: int, stages: int, counts: Sequence[int] | None = None) -> list[int]:
    """Layers per stage: the given counts (checked) or a near-even split, earlier stages taking the extra."""
    if counts:
        counts = [int(c) for c in counts]
        if stages and len(counts) != stages:
            raise StageSplitError(f"--pp-layers gives {len(counts)} stage sizes ({','.join(map(str, counts))}) but "
                                  f"--pp is {stages}")
        if any(c < 1 for c in counts):
            raise StageSplitError(f"--pp-layers {','.join(map(str, counts))}: every stage needs at least one layer")
        if sum(counts) != num_layers:
            raise StageSplitError(f"--pp-layers {','.join(map(str, counts))} adds up to {sum(counts)} layers; the "
                                  f"model has {num_layers}")
        return counts
    if stages < 1:
        raise StageSplitError(f"--pp must be at least 1, got {stages}")
    if stages > num_layers:
        raise StageSplitError(f"--pp {stages} asks for more pipeline stages than the model has decoder layers "
                              f"({num_layers}); every stage needs at least one layer")
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]
