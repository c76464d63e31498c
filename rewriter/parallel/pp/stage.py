"""Compiled pipeline stages, and all of them run one after another in one process.

A `CompiledStage` is one stage graph behind torch.compile: it takes the activations the previous
stage sent, the step inputs and its own layers' KV caches, and gives the tensors for the next stage
(or, on the last stage, the logits). `PipelinedModel` chains every stage in one process behind the
CompiledModel interface, so `verify` and `Generator` check the cut unchanged; across ranks the same
CompiledStage runs behind the ring of parallel/pp/ring.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx

from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.step import PackedStep
from hfrewrite.runtime.kv_cache import CacheConfig, KVCache
from hfrewrite.parallel.pp.split import Stage, StageSplit


def concrete_shape(shape: Sequence[int | str], tokens: int) -> tuple[int, ...]:
    """A crossing value's shape for a step of `tokens` tokens ('T' and expressions of it evaluated)."""
    return tuple(dim if isinstance(dim, int) else int(sympy.sympify(dim).subs(sympy.Symbol("T"), tokens))
                 for dim in shape)


def logits_dtype(split: StageSplit, default: torch.dtype) -> torch.dtype:
    """The dtype of the last stage's output: what travels from the last stage back to the driver."""
    output = list(split.stages[-1].graph_module.graph.nodes)[-1].args[0]
    return output.meta["val"].dtype if isinstance(output, torch.fx.Node) else default


@dataclass
class CompiledStage(CompiledModel):
    """One stage behind torch.compile: (received activations, step inputs, own caches) -> sends or logits."""

    stage: Stage | None = None
    last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage is None:
            raise TypeError("CompiledStage needs its Stage")
        self.receives = [value.name for value in self.stage.receives]
        placeholders = {n.target: n for n in self.graph_module.graph.nodes if n.op == "placeholder"}
        # dims of received activations that change with the step (the token count): unbacked, like input_ids
        self._dynamic_dims = [[d for d, size in enumerate(placeholders[name].meta["val"].shape)
                               if not isinstance(size, int)] for name in self.receives]

    @torch.no_grad()
    def run(self, step: PackedStep, cache: KVCache, received: Sequence[torch.Tensor],
            rows: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
        """This stage on one step: the tensors for the next stage, or on the last stage the logits [R, V]."""
        inputs = self.signature.feeds(step, cache, rows, dict(zip(self.receives, received)))
        if self.backend is not None:
            for tensor, dims in zip(received, self._dynamic_dims):
                for dim in dims:
                    torch._dynamo.decorators.mark_unbacked(tensor, dim)
        out = self.call(inputs)
        if not self.last:
            return list(out)
        if not self.selects_rows:
            out = out[:, step.logits_index if rows is None else rows]
        return out[0]

    def warmup_run(self, step: PackedStep, cache: KVCache) -> None:
        """The warm-up step with zeros for the received activations (each rank warms its own stage alone)."""
        assert self.stage is not None
        tokens = int(step.input_ids.shape[1])
        received = [torch.zeros(concrete_shape(value.shape, tokens), dtype=value.dtype, device=self.device)
                    for value in self.stage.receives]
        self.run(step, cache, received)


def compile_stages(split: StageSplit, stages: Sequence[Stage], config: Any, device: torch.device, dtype: torch.dtype,
                   backend: str | None, tp: int = 1) -> list[CompiledStage]:
    """Each stage behind its own torch.compile (weights already in place), compiled now unless eager."""
    last = len(split.stages) - 1
    compiled = [CompiledStage(stage.graph_module, stage.kv_specs, config, device, dtype, backend=backend, tp=tp,
                              stage=stage, last=stage.index == last) for stage in stages]
    for stage in compiled:
        stage.warmup()
    return compiled


@dataclass
class StagedCache:
    """The KV cache of a pipelined model: each stage's own KVCache (its layers' sites only)."""

    caches: list[KVCache]
    config: CacheConfig

    def tensor(self, key: bool, site: int) -> torch.Tensor:
        """The key (or value) cache of `site`, from the stage that holds it."""
        for cache in self.caches:
            if cache.holds(site):
                return cache.tensor(key, site)
        raise KeyError(f"no pipeline stage holds attention site {site}")

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches)


@dataclass
class PipelinedModel:
    """All stages in one process, run one after another: the CompiledModel interface over a split graph."""

    split: StageSplit
    stages: list[CompiledStage]
    config: Any
    device: torch.device
    dtype: torch.dtype
    tp: int = 1

    @property
    def kv_specs(self) -> list[Any]:
        return [spec for stage in self.stages for spec in stage.kv_specs]

    @property
    def max_context(self) -> int:
        return self.stages[0].max_context

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The first stage's graph (the artifact writer saves every stage's, see `graph_modules`)."""
        return self.stages[0].graph_module

    @property
    def graph_modules(self) -> list[torch.fx.GraphModule]:
        return [stage.graph_module for stage in self.stages]

    @property
    def compile_frames(self) -> int:
        """Graph compilations over all stages (one per stage; more means a recompile)."""
        return sum(stage.counter.frames for stage in self.stages)

    def new_cache(self, cache_config: CacheConfig) -> StagedCache:
        return StagedCache([stage.new_cache(cache_config) for stage in self.stages], cache_config)

    @torch.no_grad()
    def forward(self, step: PackedStep, cache: StagedCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, V], as CompiledModel.forward: each stage's outputs are the next one's received inputs."""
        received: list[torch.Tensor] | torch.Tensor = []
        for stage, stage_cache in zip(self.stages, cache.caches):
            received = stage.run(step, stage_cache, received, rows)
        assert isinstance(received, torch.Tensor)
        return received

    def parameter_count(self) -> int:
        """Distinct parameter elements over all stages (a tied weight on two stages counts once)."""
        storages = {p.untyped_storage().data_ptr(): p.numel() for stage in self.stages
                    for p in stage.graph_module.parameters()}
        return sum(storages.values())

    def warmup(self) -> None:
        for stage in self.stages:
            stage.warmup()
