"""Building a pipelined model: capture, rewrite, split, load each stage's weights, compile each stage.

The entry points of pipeline parallelism for the rest of the compiler (rewriter/pipeline.py calls
`build_pipeline` and `describe_split`). In one process every stage is built and chained
(`PipelinedModel`, rewriter/pp_stage.py); on launched ranks each rank builds, loads and compiles
only its own stage and joins the ring (rewriter/pp_serve.py). The split itself is rewriter/stages.py;
the command driver on launched ranks is rewriter/pp_command.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from hfrewrite.compiler.capture import CapturedModel, capture, retarget_devices
from hfrewrite.device import parse_dtype, pick_device
from hfrewrite.parallel.distributed import DistributedError
from hfrewrite.engine.apply import RewriteReport
from hfrewrite.compiler.build import KV_CACHES, _timed, install_weights, rewrite, rule_paths
from hfrewrite.parallel.pp.link import PipelineLayout
from hfrewrite.parallel.pp.ring import PipelineClient, PipelineServer, connect
from hfrewrite.parallel.pp.stage import PipelinedModel, compile_stages
from hfrewrite.parallel.pp.split import Stage, StageSplit, split_stages, stage_count


def _attribute_exists(graph_module: torch.fx.GraphModule, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    except AttributeError:
        return False
    return leaf in owner._parameters or leaf in owner._buffers


def stage_weight_specs(stage: Stage, captured: CapturedModel) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what this stage loads: its parameters and its checkpoint buffers only."""
    module = stage.graph_module
    specs = {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters(remove_duplicate=False)}
    for name in captured.checkpoint_buffers:
        if _attribute_exists(module, name):
            buffer = module.get_buffer(name)
            specs[name] = (tuple(buffer.shape), buffer.dtype)
    return specs


def distinct_parameters(captured: CapturedModel) -> int:
    """Parameter elements of the whole model, a tied weight counted once (the one-device number)."""
    params = dict(captured.graph_module.named_parameters(remove_duplicate=False))
    return sum(p.numel() for name, p in params.items()
               if not (name in captured.tied_weights and captured.tied_weights[name] in params))


def _load_stages(stages: Sequence[Stage], captured: CapturedModel, context: Any, weights: Callable[..., dict],
                 device: torch.device, dtype: torch.dtype) -> None:
    """Read the stages' weights (only theirs; TP-sliced if the rewrite sharded them) and put them in place."""
    from hfrewrite.compiler.derived import derived_parameters, load_with_derived
    from hfrewrite.parallel.sharding import make_slicer, shard_specs, share_tied

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for stage in stages:
        specs.update(stage_weight_specs(stage, captured))
    shards = shard_specs(context)
    sliced = {"slicer": make_slicer(shards)} if shards else {}
    tensors = load_with_derived(specs, derived_parameters(context.state),  # fused projections: from their sources
                                lambda wanted: weights(wanted, captured.tied_weights, device, dtype, **sliced))
    share_tied(tensors, captured.tied_weights, shards)
    tensors.update({name: buffer.to(device) for name, buffer in captured.buffers.items()})
    for stage in stages:
        install_weights(stage.graph_module, {name: tensor for name, tensor in tensors.items()
                                             if _attribute_exists(stage.graph_module, name)})


def _cut(config: PretrainedConfig, options: Any, dtype: torch.dtype, timings: dict[str, float],
         device: torch.device | None = None, layout: PipelineLayout | None = None
         ) -> tuple[CapturedModel, Any, RewriteReport, StageSplit]:
    """Capture, rewrite (TP-sharded on a layout with tp > 1), move the graph to `device` (if given), split."""
    tp, tp_rank, tp_group = (layout.tp, layout.tp_rank, layout.tp_group) if layout is not None else (1, 0, None)
    with _timed(timings, "capture"):
        captured = capture(config, dtype)
    with _timed(timings, "rewrite"):
        context, report = rewrite(captured, rule_paths(options.rules, config.model_type), tp, tp_rank, tp_group)
    if device is not None:
        retarget_devices(captured.graph_module, device)
    with _timed(timings, "split"):
        split = split_stages(captured.graph_module, config, context.state.get(KV_CACHES, []),
                             stage_count(options.pp, options.pp_layers), options.pp_layers or None,
                             tied=captured.tied_weights)
    return captured, context, report, split


def describe_split(config: PretrainedConfig, options: Any) -> StageSplit:
    """The cut `--pp` would make (for explain): capture and rewrite as for one device, split, load nothing."""
    return _cut(config, options, parse_dtype(options.dtype, pick_device(options.device)), {})[3]


def build_pipeline(config: PretrainedConfig, weights: Callable[..., dict], options: Any, timings: dict[str, float],
                   layout: PipelineLayout | None = None
                   ) -> tuple[PipelinedModel | PipelineClient | PipelineServer, RewriteReport]:
    """Capture, rewrite, split and compile: every stage here (layout None), or this rank's stage only."""
    if layout is None and options.tp > 1:
        raise DistributedError("--tp with --pp runs on pp x tp ranks; in one process only --pp is supported")
    device = layout.device if layout is not None else pick_device(options.device)
    dtype = parse_dtype(options.dtype, device)
    captured, context, report, split = _cut(config, options, dtype, timings, device, layout)
    mine = split.stages if layout is None else [split.stages[layout.stage]]
    with _timed(timings, "load"):
        _load_stages(mine, captured, context, weights, device, dtype)
    with _timed(timings, "compile"):
        compiled = compile_stages(split, mine, config, device, dtype, options.backend, layout.tp if layout else 1)
    if layout is None:
        return PipelinedModel(split, compiled, config, device, dtype), report
    return connect(split, compiled[0], layout, config, distinct_parameters(captured)), report
