"""The compiler's data flow in one place: resolve, capture, rewrite, load, compile, verify.

Each stage is timed; the report says what was done so `hfrewrite compile` can print it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.fx
from transformers import PretrainedConfig

from hfrewrite.parallel import distributed
from hfrewrite.compiler.capture import CapturedModel, capture, retarget_devices
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.device import parse_dtype, pick_device
from hfrewrite.engine.apply import RewriteReport, apply_rules
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules, shipped_rule_paths
from hfrewrite.parallel.sharding import Slicer, check_sharded, make_slicer, shard_specs, share_tied, tensor_parallel_rules
from hfrewrite.compiler.sources import ModelSource, resolve
from hfrewrite.compiler.verify import VerifyResult, verify
from hfrewrite.compiler.derived import derived_parameters, load_with_derived
from hfrewrite.compiler.weights import load_weights

KV_CACHES = "kv_caches"


@dataclass
class CompileOptions:
    """What `hfrewrite compile` and friends were asked for."""

    rules: Sequence[Path] = ()
    dtype: str | None = None
    device: str | None = None
    verify: bool = True
    backend: str | None = "inductor"
    progress: bool = True
    verify_seed: int = 0
    tp: int = 1
    ep: bool = False                     # split whole experts over the tp ranks instead of each expert's width
    pp: int = 1                          # pipeline stages (rewriter/stages.py cuts the graph)
    pp_layers: tuple[int, ...] = ()      # layers per stage; empty: near-even


@dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    source: ModelSource
    model: CompiledModel
    rewrite: RewriteReport
    timings: dict[str, float] = field(default_factory=dict)
    verification: VerifyResult | None = None
    ep: bool = False


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def rule_paths(extra: Sequence[Path], model_type: str | None = None) -> list[Path]:
    """The shipped rule files (arch/ files only for the model types they name), then the user's."""
    return list(shipped_rule_paths(model_type)) + [Path(p) for p in extra]


def rewrite(captured: CapturedModel, paths: Sequence[Path], tp: int = 1, rank: int = 0,
            group: str | None = None, ep: bool = False) -> tuple[RewriteContext, RewriteReport]:
    """Apply the rule files to the captured graph (in place); the TP rules only when tp > 1."""
    context = RewriteContext.for_model(captured.graph_module, captured.config, tp=tp, rank=rank, ep=ep)
    report = apply_rules(context, tensor_parallel_rules(context, load_rules(paths), group))
    check_sharded(context)
    return context, report


def install_weights(graph_module: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors in place of the meta parameters and buffers, under their HF names."""
    for name, tensor in sorted(tensors.items()):
        owner_path, _, leaf = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


# weights(specs, tied, device, dtype) -> tensors; under tp > 1 also slicer=... (what each rank reads).
WeightProvider = Callable[..., dict[str, torch.Tensor]]


def build_compiled(config: PretrainedConfig, weights: WeightProvider, options: CompileOptions,
                   timings: dict[str, float]) -> tuple[CompiledModel, RewriteReport]:
    """Capture, rewrite, load (through `weights`) and compile the model of `config`."""
    if options.pp > 1 or options.pp_layers:  # all stages in this process (launched ranks: pipeline_runtime)
        from hfrewrite.parallel.pp.build import build_pipeline

        return build_pipeline(config, weights, options, timings)
    device = pick_device(options.device)
    group = distributed.join(options.tp, device) if options.tp > 1 else None
    device = group.device if group is not None else device
    dtype = parse_dtype(options.dtype, device)
    with _timed(timings, "capture"):
        captured = capture(config, dtype)
    with _timed(timings, "rewrite"):
        context, report = rewrite(captured, rule_paths(options.rules, config.model_type), options.tp,
                                  group.rank if group else 0, group.name if group else None, options.ep)
    graph_module = captured.graph_module
    retarget_devices(graph_module, device)
    with _timed(timings, "load"):
        shards = shard_specs(context)
        sliced = {"slicer": make_slicer(shards)} if shards else {}  # each rank reads only its slices
        tensors = load_with_derived(captured.parameter_specs(), derived_parameters(context.state),
                                    lambda specs: weights(specs, captured.tied_weights, device, dtype, **sliced))
        share_tied(tensors, captured.tied_weights, shards)
        tensors.update({name: buf.to(device) for name, buf in captured.buffers.items()})
        install_weights(graph_module, tensors)
    with _timed(timings, "compile"):
        model = CompiledModel(graph_module, context.state.get(KV_CACHES, []), config, device, dtype,
                              backend=options.backend, tp=options.tp)
        if options.backend is not None:
            model.warmup()
    return model, report


def build(source: ModelSource, options: CompileOptions) -> CompileResult:
    """Capture, rewrite, load and compile `source`; verify unless told not to."""
    timings: dict[str, float] = {}

    def from_checkpoint(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype,
                        slicer: Slicer | None = None) -> dict:
        return load_weights(source.directory, specs, tied, device, dtype, slicer=slicer, progress=options.progress)

    model, report = build_compiled(source.config, from_checkpoint, options, timings)
    result = CompileResult(source, model, report, timings, ep=options.ep)
    if options.verify:
        with _timed(timings, "verify"):
            # under tp every rank runs the same forwards; rank 0 alone compares, then tells the others
            first = distributed.rank() == 0
            reference = reference_model(source, model.device, model.dtype, progress=options.progress) if first else None
            result.verification = distributed.broadcast(verify(model, reference, seed=options.verify_seed))
    return result


def reference_model(source: ModelSource, device: torch.device, dtype: torch.dtype,
                    progress: bool = True) -> torch.nn.Module:
    """HF's own eager model on the same weights: the function every rewrite must preserve."""
    from transformers import AutoModelForCausalLM

    from hfrewrite.compiler.tiny import hf_progress_bars

    with hf_progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def compile_model(model_id: str, options: CompileOptions | None = None) -> CompileResult:
    """Resolve a model id and build it (the library entry point behind `hfrewrite compile`)."""
    options = options or CompileOptions()
    return build(resolve(model_id, progress=options.progress), options)


def explain_model(model_id: str, options: CompileOptions | None = None) -> str:
    """Per rule: the sites it matches and the near misses with reasons (the graph is not changed)."""
    from hfrewrite.engine.apply import explain

    options = options or CompileOptions()
    source = resolve(model_id, progress=options.progress)
    device = pick_device(options.device)
    captured = capture(source.config, parse_dtype(options.dtype, device))
    context = RewriteContext.for_model(captured.graph_module, captured.config, tp=options.tp, ep=options.ep)
    ruleset = tensor_parallel_rules(context, load_rules(rule_paths(options.rules, source.config.model_type)))
    text = explain(context, ruleset).to_text()
    if options.pp > 1 or options.pp_layers:  # the cut, on a rewritten copy (this graph stays unrewritten)
        from hfrewrite.parallel.pp.build import describe_split

        text += "\n\n" + describe_split(source.config, options).to_text()
    return text
