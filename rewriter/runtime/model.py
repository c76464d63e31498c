"""The compiled model: the rewritten graph with weights in place, behind torch.compile.

It owns everything a run needs (graph, KV-cache specs, compile counters); nothing is global, so two
models live side by side in one process.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx

from hfrewrite.kernels.attention.op import METADATA_FIELDS

from hfrewrite.runtime.step import Chunk, PackedStep, pack
from hfrewrite.runtime.kv_cache import CacheConfig, KVCache


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


def mark_step_dims_dynamic(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> None:
    """Tell dynamo which dims change from step to step, so one compiled graph serves every step.

    Token, sequence and context dims are unbacked (no 0/1 specialization: a batch-1 decode step and a
    64-token prefill share the graph); the cache's slot dim is dynamic; model widths stay static.
    """
    for name, tensor in zip(names, inputs):
        if name in ("input_ids", "position_ids", "token_type_ids"):
            torch._dynamo.decorators.mark_unbacked(tensor, 1)
        elif name.startswith("attn_") or name == "logits_index":
            for dim in range(tensor.dim()):
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
        elif name.startswith(("k_cache_", "v_cache_")):
            torch._dynamo.mark_dynamic(tensor, 0)


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

    def __post_init__(self) -> None:
        self.input_names = [n.name for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        self.selects_rows = "logits_index" in self.input_names
        if self.backend is None:
            self._fn: Callable = self.graph_module
        else:
            self._fn = torch.compile(self.graph_module, backend=self.counter.backend(self.backend), dynamic=False)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", 2048))

    def new_cache(self, cache_config: CacheConfig) -> KVCache:
        return KVCache(self.kv_specs, cache_config, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, step: PackedStep, cache: KVCache, rows: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(rows), V] for `rows` of the packed step (default: each sequence's last token).

        An embedding graph returns hidden states [len(rows), H] instead; encoders may take token type
        ids [1, T] (default: all zeros, the first segment)."""
        rows = step.logits_index if rows is None else rows
        feeds = {"input_ids": step.input_ids, "position_ids": step.position_ids, "logits_index": rows}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = torch.zeros_like(step.input_ids) if token_type_ids is None else token_type_ids
        feeds.update({f"attn_{name}": value for name, value in zip(METADATA_FIELDS, step.metadata.as_tuple())})
        feeds.update(cache.tensors())
        inputs = [feeds[name] for name in self.input_names]
        if self.backend is not None:
            mark_step_dims_dynamic(self.input_names, inputs)
        with self._compile_config():
            logits = self._fn(*inputs)
        if not self.selects_rows:
            logits = logits[:, rows]
        return logits[0]

    def _compile_config(self) -> contextlib.AbstractContextManager:
        """Inductor with freezing: weights become constants that it folds and, on the CPU, prepacks
        for the GEMM library (1.5-2x faster decode here). Active around calls, since the packing is
        looked up at run time too, and never left set for the rest of the process."""
        if self.backend == "inductor":
            return torch._inductor.config.patch(freezing=True)
        return contextlib.nullcontext()

    def parameter_count(self) -> int:
        """Distinct parameter elements (tied weights share storage and count once)."""
        storages = {p.untyped_storage().data_ptr(): p.numel() for p in self.graph_module.parameters()}
        return sum(storages.values())

    def warmup(self) -> None:
        """Compile now (torch.compile is lazy): one packed step of a prefill chunk and a decode token."""
        cache = self.new_cache(CacheConfig(block_size=4, num_blocks=4))
        step = pack([Chunk([1, 2, 3], 0, [0]), Chunk([4], 2, [1])], 4, self.device)
        self.forward(step, cache)
