"""Shared machinery of the equivalence tests: build a tiny model both ways and compare."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from hfrewrite.compiled import CompiledModel
from hfrewrite.engine.apply import RewriteReport
from hfrewrite.pipeline import CompileOptions, build_compiled
from hfrewrite.tiny import tiny_model
from hfrewrite.verify import VerifyResult, verify


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
    model, report, reference = compile_tiny(config, seed, backend)
    assert report.applied.get("paged-attention", 0) == len(model.kv_specs) > 0, report.applied
    result = verify(model, reference, seed=seed, sequences=sequences, atol=atol)
    assert result.passed, (config.model_type, result)
    return result
