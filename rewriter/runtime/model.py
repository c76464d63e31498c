"""The compiled model: the rewritten graph with weights in place, behind torch.compile.

It owns everything a run needs (graph, KV-cache specs, compile counters); nothing is global, so two
models live side by side in one process.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.fx

from hfrewrite.runtime.step import Chunk, PackedStep, pack
from hfrewrite.runtime.kv_cache import CacheConfig, KVCache
from hfrewrite.runtime.layers import LayeredGraph
from hfrewrite.runtime.runner import DeviceGraphRunner, EagerRunner, Runner, decode_buckets, supports_device_graphs
from hfrewrite.runtime.signature import GraphSignature, Role

# The warm-up step: a 3-token prefill chunk and a decode token, in a cache of its own (every site's shapes).
WARMUP_CACHE = CacheConfig(block_size=4, num_blocks=4)
WARMUP_CHUNKS = (Chunk((1, 2, 3), 0, (0,)), Chunk((4,), 2, (1,)))


@dataclass
class CompileCounter:
    """Counts graph compilations of this model's torch.compile wrapper (a recompile per step is a bug)."""

    frames: int = 0

    def backend(self, inner: str) -> Callable:
        """A dynamo backend that counts its calls, then hands the graph to `inner`.

        """
        def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
            self.frames += 1
            from torch._dynamo.backends.registry import lookup_backend


            return lookup_backend(inner)(graph_module, example_inputs)
        return counting_backend


@runtime_checkable
class StepModel(Protocol):
    """What the scheduler and generation run a step on: one device (CompiledModel), all pipeline stages in one
    process (parallel.pp.stage.PipelinedModel) or a pipeline's driver (parallel.pp.ring.PipelineClient).
    How a step then runs on the device is the runner's business (runtime/runner.py)."""

    config: Any
    device: torch.device

    @property
    def max_context(self) -> int: ...

    def new_cache(self, cache_config: CacheConfig) -> Any: ...

    def forward(self, step: PackedStep, cache: Any, rows: torch.Tensor | None = None) -> torch.Tensor: ...

    def parameter_count(self) -> int: ...


@dataclass
class CompiledModel:
    """forward(step, cache) -> logits [S, V] of each sequence's last token (or of chosen rows)."""

    graph_module: torch.fx.GraphModule
    kv_specs: Sequence
    config: object
    device: torch.device
    dtype: torch.dtype
    backend: str | None = "inductor"
    counter: CompileCounter = field(default_factory=CompileCounter)
    tp: int = 1  # ranks the graph is sharded over (its collectives need all of them to run)
    device_graphs: bool = False       # replay decode steps from device graphs (CUDA graphs) per batch bucket
    max_graph_batch: int = 64         # the largest captured decode batch
    granularity: str = "graph"        # "graph": one compiled graph; "layer": per layer, shared by structure
    progress: bool = False            # a progress bar over the layer groups the first call compiles
    _serving: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.signature = GraphSignature.of(self.graph_module)
        self.input_names = self.signature.names
        self.selects_rows = self.signature.has(Role.LOGIT_ROWS)
        if self.backend is None:
            self._fn: Callable = self.graph_module
        elif self.granularity == "layer":
            self._fn = LayeredGraph.cut(self.graph_module, self.config, self.kv_specs, progress=self.progress).compile(
                lambda piece: torch.compile(piece, backend=self.counter.backend(self.backend), dynamic=False))
        else:
            self._fn = torch.compile(self.graph_module, backend=self.counter.backend(self.backend), dynamic=False)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", 2048))

    def graph_reports(self) -> list[dict]:
        """What each device-graph runner of this model captured (for the compile report)."""
        return [runner.report() for _, runner in self._serving.values() if isinstance(runner, DeviceGraphRunner)]

    def compile_info(self) -> dict:
        """For the compile report: the granularity, compilations so far and, layer-wise, the pieces' groups."""
        layered = self._fn.describe() if isinstance(self._fn, LayeredGraph) else {}
        return {"granularity": self.granularity, "compilations": self.counter.frames, **layered}

    def new_cache(self, cache_config: CacheConfig) -> KVCache:
        return KVCache(self.kv_specs, cache_config, self.dtype, self.device)

    def serving(self, cache_config: CacheConfig) -> tuple[KVCache, Runner]:
        """The cache and runner that generation uses for `cache_config`, made (and graphs captured) once per
        config and kept on this model: captured graphs point at that cache's tensors."""
        if cache_config not in self._serving:
            if self.device_graphs and self.backend is not None and supports_device_graphs(self.device):
                # one extra block, never allocated to a request: the padding rows of a bucket write there
                cache = self.new_cache(CacheConfig(cache_config.block_size, cache_config.num_blocks + 1))
                runner: Runner = DeviceGraphRunner(self, cache, decode_buckets(self.max_graph_batch),
                                                   scratch_block=cache_config.num_blocks)
                runner.capture()
            else:
                cache = self.new_cache(cache_config)
                runner = EagerRunner(self, cache)
            self._serving[cache_config] = (cache, runner)
        return self._serving[cache_config]

    def served(self, key: Any, make: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """The (cache, runner) kept under `key`, made once by `make` (another model kind's graph runner, e.g.
        runtime/vision_graphs.py): captured graphs point at that cache's tensors, so both live with the model."""
        if key not in self._serving:
            self._serving[key] = make()
        return self._serving[key]

    @torch.no_grad()
    def forward(self, step: PackedStep, cache: KVCache, rows: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(rows), V] for `rows` of the packed step (default: each sequence's last token).

        An embedding graph returns hidden states [len(rows), H] instead; encoders may take token type
        ids [1, T] (default: all zeros, the first segment)."""
        rows = step.logits_index if rows is None else rows
        logits = self.call(self.signature.feeds(step, cache, rows, token_type_ids=token_type_ids))
        if not self.selects_rows:
            logits = logits[:, rows]
        return logits[0]

    def call(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The compiled graph on its inputs in signature order (what a device-graph runner captures).

        Always without autograd: dynamo guards on the grad mode, so one call with it on (a graph capture
        outside `forward`'s no_grad did this) recompiled every graph (measured on the H200: 5-6 s per capture)."""
        if self.backend is not None:
            self.signature.mark_dynamic(inputs)
        with torch.no_grad(), self._compile_config():
            return self._fn(*inputs)

    def _compile_config(self) -> contextlib.AbstractContextManager:
        """Inductor's settings for this model, active around calls and never left set for the rest of the process.

        freezing: weights become constants that it folds and, on the CPU, prepacks for the GEMM library
        (1.5-2x faster decode here); the packing is looked up at run time too.
        combo_kernels (off the CPU): data-independent kernels share one launch. A decode step is latency-bound
        at small batches, and the rotary embedding of q and of k and the copies around the attention op were
        5 launches per layer, 2 with it: llama-1b batch-1 decode 771 -> 825 tok/s on the H200 (BENCHMARKS.md)."""
        if self.backend == "inductor":
            return torch._inductor.config.patch(freezing=True, combo_kernels=self.device.type != "cpu")
        return contextlib.nullcontext()

    def parameter_count(self) -> int:
        """Distinct parameter elements (tied weights share storage and count once)."""
        storages = {p.untyped_storage().data_ptr(): p.numel() for p in self.graph_module.parameters()}
        return sum(storages.values())

    def warmup(self) -> None:
        """Compile now (torch.compile is lazy; nothing to do when eager) on the warm-up step: a prefill chunk and a
        decode token packed together, in a small cache of its own. The same routine for every compiled graph:
        a pipeline stage only says how it runs the step (`warmup_run`)."""
        if self.backend is None:
            return
        self.warmup_run(pack(WARMUP_CHUNKS, WARMUP_CACHE.block_size, self.device), self.new_cache(WARMUP_CACHE))

    def warmup_run(self, step: PackedStep, cache: KVCache) -> None:
        """Run the warm-up step (a stage adds the activations it would receive)."""
        self.forward(step, cache)
