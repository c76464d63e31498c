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

from .capture import CapturedModel, capture, retarget_devices
from .compiled import CompiledModel
from .device import parse_dtype, pick_device
from .engine.apply import RewriteReport, apply_rules
from .engine.context import RewriteContext
from .engine.loader import load_rules, shipped_rule_paths
from .sources import ModelSource, resolve
from .verify import VerifyResult, verify
from .weights import load_weights

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


@dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    source: ModelSource
    model: CompiledModel
    rewrite: RewriteReport
    timings: dict[str, float] = field(default_factory=dict)
    verification: VerifyResult | None = None


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def rule_paths(extra: Sequence[Path], model_type: str | None = None) -> list[Path]:
    """The shipped rule files (arch/ files only for the model types they name), then the user's."""
    return list(shipped_rule_paths(model_type)) + [Path(p) for p in extra]


def rewrite(captured: CapturedModel, paths: Sequence[Path]) -> tuple[RewriteContext, RewriteReport]:
    """Apply the rule files to the captured graph (in place)."""
    ruleset = load_rules(paths)
    context = RewriteContext.for_model(captured.graph_module, captured.config)
    return context, apply_rules(context, ruleset)


def install_weights(graph_module: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors in place of the meta parameters and buffers, under their HF names."""
    for name, tensor in sorted(tensors.items()):
        owner_path, _, leaf = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


WeightProvider = Callable[[dict, dict, torch.device, torch.dtype], dict[str, torch.Tensor]]


def build_compiled(config: PretrainedConfig, weights: WeightProvider, options: CompileOptions,
                   timings: dict[str, float]) -> tuple[CompiledModel, RewriteReport]:
    """Capture, rewrite, load (through `weights`) and compile the model of `config`."""
    device = pick_device(options.device)
    dtype = parse_dtype(options.dtype, device)
    with _timed(timings, "capture"):
        captured = capture(config, dtype)
    with _timed(timings, "rewrite"):
        context, report = rewrite(captured, rule_paths(options.rules, config.model_type))
    graph_module = captured.graph_module
    retarget_devices(graph_module, device)
    with _timed(timings, "load"):
        tensors = weights(captured.parameter_specs(), captured.tied_weights, device, dtype)
        tensors.update({name: buf.to(device) for name, buf in captured.buffers.items()})
        install_weights(graph_module, tensors)
    with _timed(timings, "compile"):
        model = CompiledModel(graph_module, context.state.get(KV_CACHES, []), config, device, dtype,
                              backend=options.backend)
        if options.backend is not None:
            model.warmup()
    return model, report


def build(source: ModelSource, options: CompileOptions) -> CompileResult:
    """Capture, rewrite, load and compile `source`; verify unless told not to."""
    timings: dict[str, float] = {}

    def from_checkpoint(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype) -> dict:
        return load_weights(source.directory, specs, tied, device, dtype, progress=options.progress)

    model, report = build_compiled(source.config, from_checkpoint, options, timings)
    result = CompileResult(source, model, report, timings)
    if options.verify:
        with _timed(timings, "verify"):
            result.verification = verify(model, reference_model(source, model.device, model.dtype),
                                         seed=options.verify_seed)
    return result


def reference_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """HF's own eager model on the same weights: the function every rewrite must preserve."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def compile_model(model_id: str, options: CompileOptions | None = None) -> CompileResult:
    """Resolve a model id and build it (the library entry point behind `hfrewrite compile`)."""
    options = options or CompileOptions()
    return build(resolve(model_id, progress=options.progress), options)


def explain_model(model_id: str, options: CompileOptions | None = None) -> str:
    """Per rule: the sites it matches and the near misses with reasons (the graph is not changed)."""
    from .engine.apply import explain

    options = options or CompileOptions()
    source = resolve(model_id, progress=options.progress)
    device = pick_device(options.device)
    captured = capture(source.config, parse_dtype(options.dtype, device))
    context = RewriteContext.for_model(captured.graph_module, captured.config)
    return explain(context, load_rules(rule_paths(options.rules, source.config.model_type))).to_text()
