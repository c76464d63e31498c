"""Pipeline parallelism as the placement step of the one build: split, load each stage's weights, compile.

hfrewrite.compiler.build captures and rewrites as for one device (on the ParallelLayout's tp), then
hands the rewritten graph to `place_stages` when the layout has pp > 1. In one process every stage
is placed and chained (`PipelinedModel`, pp/stage.py); on launched ranks each rank loads and compiles
only its own stage and joins the ring (pp/ring.py). `describe_split` is explain's view of the cut.
The split itself is pp/split.py; the command driver on launched ranks is pp/command.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from hfrewrite.compiler.capture import CapturedModel, capture
from hfrewrite.device import parse_dtype, pick_device
from hfrewrite.compiler.load import held_tensor, install_weights, load_graph_weights
from hfrewrite.compiler.options import CompileOptions, timed
from hfrewrite.compiler.rewrite import KV_CACHES, rewrite, rule_paths
from hfrewrite.parallel.layout import ParallelLayout
from hfrewrite.parallel.pp.ring import PipelineClient, PipelineServer, connect
from hfrewrite.parallel.pp.stage import PipelinedModel, compile_stages
from hfrewrite.parallel.pp.split import Stage, StageSplit, split_stages


def stage_weight_specs(stage: Stage, captured: CapturedModel) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what this stage loads: its parameters and its checkpoint buffers only."""
    module = stage.graph_module
    specs = {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters(remove_duplicate=False)}
    for name in captured.checkpoint_buffers:
        buffer = held_tensor(module, name)
        if buffer is not None:
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
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for stage in stages:
        specs.update(stage_weight_specs(stage, captured))
    tensors = load_graph_weights(captured, context, weights, specs, device, dtype)
    for stage in stages:
        install_weights(stage.graph_module, {name: tensor for name, tensor in tensors.items()
                                             if held_tensor(stage.graph_module, name) is not None})


def _split(captured: CapturedModel, context: Any, stages: int, layers: Sequence[int]) -> StageSplit:
    return split_stages(captured.graph_module, captured.config, context.state.get(KV_CACHES, []), stages,
                        list(layers) or None, tied=captured.tied_weights)


def describe_split(config: PretrainedConfig, options: CompileOptions) -> StageSplit:
    """The cut `--pp` would make (for explain): capture and rewrite as for one device, split, load nothing."""
    dtype = parse_dtype(options.dtype, pick_device(options.device))
    captured = capture(config, dtype)
    stages = options.layout().pp
    context, _ = rewrite(captured, rule_paths(options.rules, config.model_type), ParallelLayout(pp=stages),
                         dtype=dtype, library=options.templates)
    return _split(captured, context, stages, options.pp_layers)


def place_stages(captured: CapturedModel, context: Any, weights: Callable[..., dict], options: CompileOptions,
                 layout: ParallelLayout, dtype: torch.dtype, timings: dict[str, float]
                 ) -> PipelinedModel | PipelineClient | PipelineServer:
    """Split the rewritten graph, load and compile the stages this process runs: all of them in one process
    (chained), this rank's only on launched ranks (its end of the ring)."""
    assert layout.device is not None
    with timed(timings, "split"):
        split = _split(captured, context, layout.pp, options.pp_layers)
    mine = [split.stages[layout.stage]] if layout.joined else split.stages
    with timed(timings, "load"):
        _load_stages(mine, captured, context, weights, layout.device, dtype)
    with timed(timings, "compile"):
        compiled = compile_stages(split, mine, captured.config, layout.device, dtype, options.backend, layout.tp)
    if not layout.joined:
        return PipelinedModel(split, compiled, captured.config, layout.device, dtype)
    return connect(split, compiled[0], layout, captured.config, distinct_parameters(captured))
