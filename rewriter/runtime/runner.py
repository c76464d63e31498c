"""Runners: how a packed step runs on the device, between the scheduler and the compiled model.

The scheduler hands a runner one packed step and gets the logits of its sampled rows back; it never knows
which runner it has. `EagerRunner` calls the compiled graph. `DeviceGraphRunner` replays device graphs
(CUDA graphs) captured once per decode batch bucket (1, 2, 4, ... up to a maximum): a decode step of S
sequences is padded to the smallest bucket >= S with one-token dummy sequences that write to a scratch
block of the cache, its inputs are copied into the bucket's static buffers, and the graph is replayed.
Prefill and mixed steps, and decode batches over the largest bucket, run the compiled graph uncaptured.
Graphs are captured at warm-up and never during a run; `captures` counts them so tests can check that.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from hfrewrite.runtime.kv_cache import KVCache
from hfrewrite.runtime.step import Chunk, PackedStep, pack

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Runner(Protocol):
    """Runs one packed step: logits [S, V] of each sequence's last token."""

    def __call__(self, step: PackedStep) -> torch.Tensor: ...


@dataclass
class EagerRunner:
    """The compiled graph, called for every step."""

    model: Any
    cache: KVCache

    def __call__(self, step: PackedStep) -> torch.Tensor:
        return self.model.forward(step, self.cache)


def decode_buckets(max_batch: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """The captured batch sizes: the powers of two up to max_batch, and max_batch itself."""
    chosen = sorted({b for b in buckets if b < max_batch} | {max_batch})
    return [b for b in chosen if b >= 1]


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `batch` sequences, or None when none does."""
    return next((b for b in sorted(buckets) if b >= batch), None)


def is_decode_step(chunks: Sequence[Chunk]) -> bool:
    return all(len(chunk.tokens) == 1 for chunk in chunks)


def padded_decode_chunks(chunks: Sequence[Chunk], bucket: int, scratch_block: int) -> list[Chunk]:
    """The step's chunks plus dummy one-token sequences at position 0 in the scratch block, up to `bucket`
    (a dummy writes and reads only the scratch block's first slot; its output row is ignored)."""
    return list(chunks) + [Chunk([0], 0, [scratch_block])] * (bucket - len(chunks))


@dataclass
class CapturedGraph:
    """One bucket's device graph with the static inputs it reads and the output it writes."""

    graph: Any
    inputs: list[torch.Tensor]
    output: torch.Tensor


@dataclass
class DeviceGraphRunner:
    """Decode steps replayed from device graphs, one per batch bucket; everything else uncaptured."""

    model: Any
    cache: KVCache
    buckets: list[int]
    scratch_block: int
    graphs: dict[int, CapturedGraph] = field(default_factory=dict)
    captures: int = 0
    capture_seconds: float = 0.0
    capture_bytes: int = 0
    replays: int = 0

    def report(self) -> dict[str, Any]:
        """What `compile` prints about the captured graphs."""
        return {"buckets": sorted(self.graphs), "capture_s": round(self.capture_seconds, 3),
                "capture_mib": round(self.capture_bytes / 2**20, 1), "captures": self.captures}

    @property
    def width(self) -> int:
        """Blocks per sequence in a captured step: enough for the model's whole context."""
        block = self.cache.config.block_size
        return min(-(-self.model.max_context // block), self.cache.config.num_blocks)

    def _pack(self, chunks: Sequence[Chunk], bucket: int) -> PackedStep:
        """Padded to the bucket, block tables `width` wide: the shapes the bucket's graph was captured with."""
        return pack(padded_decode_chunks(chunks, bucket, self.scratch_block), self.cache.config.block_size,
                    self.model.device, block_table_width=self.width)

    def capture(self) -> None:
        """Capture every bucket's graph (largest first: the shared memory pool is sized by it)."""
        module = torch.get_device_module(self.model.device)
        pool = module.graph_pool_handle()
        start, before = time.perf_counter(), module.memory_allocated(self.model.device)
        for bucket in sorted(self.buckets, reverse=True):
            step = self._pack([], bucket)
            inputs = [t.clone() if not self._is_cache(t) else t
                      for t in self.model.signature.feeds(step, self.cache)]
            stream = module.Stream()
            stream.wait_stream(module.current_stream())
            with module.stream(stream):
                self.model.call(inputs)   # warm: compiles nothing new (dims are unbacked), allocates workspaces
            module.current_stream().wait_stream(stream)
            graph = module.CUDAGraph()
            with module.graph(graph, pool=pool):
                output = self.model.call(inputs)
            self.graphs[bucket] = CapturedGraph(graph, inputs, output)
            self.captures += 1
        module.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = module.memory_allocated(self.model.device) - before

    def _is_cache(self, tensor: torch.Tensor) -> bool:
        return any(tensor is t for t in self.cache.keys + self.cache.values)

    def run_chunks(self, chunks: Sequence[Chunk]) -> torch.Tensor | None:
        """Logits of a decode step through its bucket's graph, or None when it is not a captured shape."""
        bucket = bucket_for(len(chunks), self.graphs) if is_decode_step(chunks) else None
        if bucket is None or any(-(-(c.start + 1) // self.cache.config.block_size) > self.width for c in chunks):
            return None
        captured = self.graphs[bucket]
        # packed (pinned, non-blocking host-to-device copies), then copied into the static buffers on the device
        fresh = self.model.signature.feeds(self._pack(chunks, bucket), self.cache)
        for static, value in zip(captured.inputs, fresh):
            if static is not value:
                static.copy_(value, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        # one token per sequence, in order: row s of the output is sequence s's logits whether or not the
        # graph selects rows; a copy, since the next replay overwrites the static output
        return captured.output[0, :len(chunks)].clone()

    def __call__(self, step: PackedStep) -> torch.Tensor:
        chunks = getattr(step, "chunks", None)
        if chunks is not None:
            logits = self.run_chunks(chunks)
            if logits is not None:
                return logits
        return self.model.forward(step, self.cache)


def supports_device_graphs(device: torch.device) -> bool:
    """Whether the device's torch module can capture and replay graphs (CUDA and look-alikes)."""
    if device.type == "cpu":
        return False
    module = torch.get_device_module(device)
    return hasattr(module, "CUDAGraph") and hasattr(module, "graph")
