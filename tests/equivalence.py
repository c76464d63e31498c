"""Shared machinery of the equivalence tests: build a tiny model both ways and compare."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from hfrewrite.compiler.capture import capture, retarget_devices
from hfrewrite.compiler.derived import derived_parameters, load_with_derived
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.engine.apply import RewriteReport
from hfrewrite.engine.context import RewriteContext
from hfrewrite.compiler.build import CompileOptions, build_compiled
from hfrewrite.compiler.load import install_weights
from hfrewrite.compiler.rewrite import KV_CACHES, rewrite
from hfrewrite.parallel.sharding import SimulatedGroup, make_slicer, shard_specs
from hfrewrite.compiler.tiny import tiny_model
from hfrewrite.compiler.verify import VerifyResult, verify
from hfrewrite.parallel.layout import ParallelLayout


def state_dict_weights(model: torch.nn.Module):
    """A weight provider reading from an in-memory HF model (tests skip the safetensors round trip)."""
    state = model.state_dict()

    def provide(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {name: state[name if name in state else tied[name]].to(device, dtype) for name in specs}
    return provide


def compile_tiny(config: PretrainedConfig, seed: int, backend: str | None) -> tuple[CompiledModel, RewriteReport, torch.nn.Module]:
    """(compiled rewritten model, rewrite report, HF eager reference) for one config and weight seed."""
    reference = tiny_model(config, seed)
    options = CompileOptions(backend=backend, verify=False, progress=False, device="cpu")
    model, report = build_compiled(config, state_dict_weights(reference), options, {})
    return model, report, reference


def check_equivalent(config: PretrainedConfig, seed: int, backend: str | None, atol: float = 1e-4,
                     sequences: int = 3) -> VerifyResult:
    """Compile and verify on packed, chunked batches; assert the fp32 logits match HF eager within atol."""
    return check_compiled(*compile_tiny(config, seed, backend), seed=seed, atol=atol, sequences=sequences)


def check_compiled(model: CompiledModel, report: RewriteReport, reference: torch.nn.Module, seed: int,
                   atol: float = 1e-4, sequences: int = 3) -> VerifyResult:
    """check_equivalent on a model `compile_tiny` already built (a test that also inspects it compiles once)."""
    assert report.applied.get("paged-attention", 0) == len(model.kv_specs) > 0, report.applied
    result = verify(model, reference, seed=seed, sequences=sequences, atol=atol)
    assert result.passed, (model.config.model_type, result)
    return result


@dataclass
class SimulatedRun:
    """What `simulated_verify` saw: rank 0's verification, and every rank's rewrite and loaded model."""

    result: VerifyResult
    contexts: list[RewriteContext]
    reports: list[RewriteReport]
    models: list[CompiledModel]


def simulated_run(config: PretrainedConfig, rules: list[Path], tp: int = 2, seed: int = 0, ep: bool = False,
                  atol: float = 1e-4) -> SimulatedRun:
    """Rewrite the model once per rank with `rules`, load each rank's slices of the HF weights, and verify all
    ranks (threads whose collectives meet in SimulatedGroup) against HF eager, in fp32."""
    reference = tiny_model(config, seed)
    state = reference.state_dict()
    group = SimulatedGroup(tp, timeout=120)
    contexts, reports, models = [], [], []
    for rank in range(tp):
        captured = capture(config)
        context, report = rewrite(captured, rules, ParallelLayout(tp=tp, ep=ep, rank=rank))
        retarget_devices(captured.graph_module, torch.device("cpu"))
        slicer = make_slicer(shard_specs(context))
        tensors = load_with_derived(captured.parameter_specs(), derived_parameters(context.state), lambda specs: {
            name: slicer(name, state[name if name in state else captured.tied_weights[name]]) for name in specs})
        install_weights(captured.graph_module, {**tensors, **captured.buffers})
        model = CompiledModel(captured.graph_module, context.state.get(KV_CACHES, []), config, torch.device("cpu"),
                              torch.float32, backend=None, tp=tp)
        model._fn = group.forward(rank, captured.graph_module)
        contexts.append(context)
        reports.append(report)
        models.append(model)
    results = group.run(lambda rank: verify(models[rank], reference if rank == 0 else None, seed=seed, atol=atol))
    assert results[1:] == [None] * (tp - 1)
    return SimulatedRun(results[0], contexts, reports, models)


def simulated_verify(config: PretrainedConfig, rules: list[Path], tp: int = 2, seed: int = 0) -> VerifyResult:
    """Rank 0's verification of `simulated_run`."""
    return simulated_run(config, rules, tp, seed).result
