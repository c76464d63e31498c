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

import dataclasses
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

    def prepare_fed(self, chunks: Sequence[Chunk], tokens: torch.Tensor) -> PackedStep:
        """A decode step packed from `chunks` whose input ids are `tokens` [S] (on the device, not read yet)."""
        return fed_step(pack(chunks, self.cache.config.block_size, self.model.device), tokens)


def fed_step(step: PackedStep, tokens: torch.Tensor) -> PackedStep:
    """`step` (one token per chunk) with its input ids taken from the device tensor `tokens` [S]."""
    return dataclasses.replace(step, input_ids=tokens.to(step.input_ids.dtype).view(1, -1))


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
    """One bucket's device graph with the static inputs it reads, the output it writes and the host staging
    its decode steps are written into."""

    graph: Any
    inputs: list[torch.Tensor]
    output: torch.Tensor
    staging: "DecodeStaging | None" = None


@dataclass(frozen=True)
class StagedDecode:
    """A decode step already written into its bucket's static inputs (`DeviceGraphRunner.prepare`): replaying
    the bucket's graph runs it."""

    chunks: tuple[Chunk, ...]
    bucket: int


_SCRATCH_ROW = object()   # a block-table row that holds the scratch block (a padding row)


class DecodeStaging:
    """Pinned host mirrors of one bucket's per-step inputs: a decode step is written there in place (no tensors
    built per step) and copied into the graph's static inputs with one non-blocking copy per input.

    Per step only token ids, positions, cache slots and context lengths change; query offsets, logit rows and
    the block size were fixed at capture. A block-table row is rewritten (and the table copied) only when the
    sequence in that row changes: a sequence's blocks are allocated once, at admission.
    """

    def __init__(self, signature: Any, inputs: list[torch.Tensor], bucket: int, width: int, block_size: int,
                 scratch_block: int, device: torch.device, ids: Sequence[torch.Tensor] = ()) -> None:
        """`ids`: static token-id buffers [1, bucket] outside the signature (a vision-language runner embeds them
        inside its captured region). M-RoPE positions [3, 1, bucket] get each token's position in every row; a
        key_limit input [bucket] (Gemma 3) gets what seq_lens gets (a generated token's key end: position + 1)."""
        from hfrewrite.runtime.signature import Role

        by_name = {spec.name: tensor for spec, tensor in zip(signature.inputs, inputs)}
        fields = {spec.field: by_name[spec.name] for spec in signature.inputs if spec.role is Role.ATTENTION}
        tokens = [by_name[s.name] for s in signature.inputs if s.role is Role.TOKENS] + list(ids)
        positions = [by_name[s.name] for s in signature.inputs if s.role is Role.POSITIONS]
        limits = [by_name[s.name] for s in signature.inputs if s.role is Role.KEY_LIMIT]
        # (device static input, pinned host mirror) of each per-step input
        targets = {"ids": tokens, "positions": positions, "slots": [fields.get("slot_mapping")],
                   "seq_lens": [fields.get("seq_lens"), *limits], "tables": [fields.get("block_tables")]}
        pin = device.type != "cpu"
        self.pairs = {key: [(t, torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)) for t in found if t is not None]
                      for key, found in targets.items()}
        self.host = {key: [host.numpy().reshape(-1) if key != "tables" else host.numpy() for _, host in pairs]
                     for key, pairs in self.pairs.items()}
        self.bucket, self.width, self.block_size, self.scratch = bucket, width, block_size, scratch_block
        self.rows: list[object] = [None] * bucket   # what each block-table row holds now
        self.event = torch.get_device_module(device).Event() if pin else None
        self.pending = False

    def write(self, chunks: Sequence[Chunk], tokens: torch.Tensor | None = None,
              offsets: Sequence[int] | None = None) -> None:
        """Write a decode step (one token per chunk, padded to the bucket) and start its copies to the device.
        With `tokens` ([len(chunks)] on the device) the input ids are copied from there instead of the chunks
        (the padding rows keep ids of an earlier step: any id is fine for a row whose output is ignored).
        `offsets` (one per chunk): added to each token's position (a VLM's rope delta), not to its cache slot."""
        if self.pending:
            self.event.synchronize()   # the previous step's copies have read the host buffers
        block, n = self.block_size, len(chunks)
        ids = [c.tokens[0] for c in chunks] + [0] * (self.bucket - n)
        shifts = [0] * n if offsets is None else list(offsets)
        positions = [c.start + d for c, d in zip(chunks, shifts, strict=True)] + [0] * (self.bucket - n)
        slots = [c.blocks[c.start // block] * block + c.start % block for c in chunks]
        slots += [self.scratch * block] * (self.bucket - n)
        lengths = [c.start + 1 for c in chunks] + [1] * (self.bucket - n)
        for key, values in (("ids", ids), ("positions", positions), ("slots", slots), ("seq_lens", lengths)):
            for host in self.host[key]:
                host.reshape(-1, self.bucket)[:] = values   # every row of M-RoPE positions
        tables_changed = False
        for row in range(self.bucket):
            owner = chunks[row].blocks if row < n else _SCRATCH_ROW
            if self.rows[row] is owner:
                continue
            for table in self.host["tables"]:
                table[row, :] = 0
                if owner is _SCRATCH_ROW:
                    table[row, 0] = self.scratch
                else:
                    blocks = owner[:self.width]
                    table[row, :len(blocks)] = blocks
            self.rows[row] = owner
            tables_changed = True
        for key, pairs in self.pairs.items():
            if key == "ids" and tokens is not None:
                for device_tensor, _ in pairs:
                    device_tensor.view(-1)[:n].copy_(tokens)
            elif key != "tables" or tables_changed:
                for device_tensor, host in pairs:
                    device_tensor.copy_(host, non_blocking=True)
        if self.event is not None:
            self.event.record()
            self.pending = True


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
    bucket_seconds: dict[int, tuple[float, float]] = field(default_factory=dict)   # bucket: (warm call, capture)

    def report(self) -> dict[str, Any]:
        """What `compile` prints about the captured graphs."""
        return {"buckets": sorted(self.graphs), "capture_s": round(self.capture_seconds, 3),
                "capture_mib": round(self.capture_bytes / 2**20, 1), "captures": self.captures,
                "per_bucket_s": {b: [round(w, 3), round(c, 3)] for b, (w, c) in sorted(self.bucket_seconds.items())}}

    @property
    def width(self) -> int:
        """Blocks per sequence in a captured step: enough for the model's whole context."""
        block = self.cache.config.block_size
        return min(-(-self.model.max_context // block), self.cache.config.num_blocks)

    def _pack(self, chunks: Sequence[Chunk], bucket: int) -> PackedStep:
        """Padded to the bucket, block tables `width` wide: the shapes the bucket's graph was captured with."""
        return pack(padded_decode_chunks(chunks, bucket, self.scratch_block), self.cache.config.block_size,
                    self.model.device, block_table_width=self.width)

    def static_inputs(self, bucket: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A bucket's static graph inputs (signature order; the cache's own tensors) and the static buffers outside
        the signature that its steps also write (none here; a vision-language runner's token ids)."""
        step = self._pack([], bucket)
        return [t.clone() if not self._is_cache(t) else t for t in self.model.signature.feeds(step, self.cache)], []

    def captured_call(self, inputs: list[torch.Tensor], extra: list[torch.Tensor]) -> torch.Tensor:
        """What a bucket's graph runs on its static buffers."""
        return self.model.call(inputs)

    def staging(self, bucket: int, inputs: list[torch.Tensor], extra: list[torch.Tensor]) -> DecodeStaging:
        return DecodeStaging(self.model.signature, inputs, bucket, self.width, self.cache.config.block_size,
                             self.scratch_block, self.model.device, ids=extra)

    def capture(self) -> None:
        """Capture every bucket's graph (largest first: the shared memory pool is sized by it)."""
        module = torch.get_device_module(self.model.device)
        pool = module.graph_pool_handle()
        start, before = time.perf_counter(), module.memory_allocated(self.model.device)
        for bucket in sorted(self.buckets, reverse=True):
            inputs, extra = self.static_inputs(bucket)
            stream = module.Stream()
            stream.wait_stream(module.current_stream())
            begin = time.perf_counter()
            with module.stream(stream):
                self.captured_call(inputs, extra)   # warm: compiles nothing new (unbacked dims), allocates workspaces
            module.current_stream().wait_stream(stream)
            module.synchronize()
            warmed = time.perf_counter()
            graph = module.CUDAGraph()
            with module.graph(graph, pool=pool):
                output = self.captured_call(inputs, extra)
            module.synchronize()
            self.bucket_seconds[bucket] = (warmed - begin, time.perf_counter() - warmed)
            self.graphs[bucket] = CapturedGraph(graph, inputs, output, self.staging(bucket, inputs, extra))
            self.captures += 1
        module.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = module.memory_allocated(self.model.device) - before

    def _is_cache(self, tensor: torch.Tensor) -> bool:
        return any(tensor is t for t in self.cache.keys + self.cache.values)

    def bucket(self, chunks: Sequence[Chunk]) -> int | None:
        """The captured bucket a step replays in, or None when it is not a captured shape (prefill, mixed, too
        many sequences, a context wider than the captured block tables)."""
        if not chunks or not is_decode_step(chunks):
            return None
        bucket = bucket_for(len(chunks), self.graphs)
        block = self.cache.config.block_size
        if bucket is None or any(c.start // block >= self.width for c in chunks):
            return None
        return bucket

    def prepare(self, chunks: Sequence[Chunk]) -> PackedStep | StagedDecode:
        """What the scheduler submits for a step: a decode step written straight into its bucket's static
        inputs, or a packed step for the compiled graph."""
        bucket = self.bucket(chunks)
        if bucket is None:
            return pack(chunks, self.cache.config.block_size, self.model.device)
        self.graphs[bucket].staging.write(chunks)
        return StagedDecode(tuple(chunks), bucket)

    def prepare_fed(self, chunks: Sequence[Chunk], tokens: torch.Tensor) -> StagedDecode | None:
        """A decode step staged with its input ids copied from `tokens` [S] on the device (the tokens the
        previous step drew, not read by the host yet), or None when it is not a captured shape."""
        bucket = self.bucket(chunks)
        if bucket is None:
            return None
        self.graphs[bucket].staging.write(chunks, tokens)
        return StagedDecode(tuple(chunks), bucket)

    def replay(self, staged: StagedDecode) -> torch.Tensor:
        """Logits [S, V] of a staged decode step."""
        captured = self.graphs[staged.bucket]
        captured.graph.replay()
        self.replays += 1
        # one token per sequence, in order: row s of the output is sequence s's logits whether or not the
        # graph selects rows; a copy, since the next replay overwrites the static output
        return captured.output[0, :len(staged.chunks)].clone()

    def run_chunks(self, chunks: Sequence[Chunk]) -> torch.Tensor | None:
        """Logits of a decode step through its bucket's graph, or None when it is not a captured shape."""
        if self.bucket(chunks) is None:
            return None
        return self.replay(self.prepare(chunks))

    def __call__(self, step: PackedStep | StagedDecode) -> torch.Tensor:
        if isinstance(step, StagedDecode):
            return self.replay(step)
        chunks = getattr(step, "chunks", None)
        if chunks:
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
