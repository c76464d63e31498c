"""Tensor-parallel sharding: how a rank's share of every weight is laid out, and how to read only that.

The TP templates (rules/tp.py) decide, per weight, which rows or columns a rank holds and record a
`ShardSpec` in the rewrite context's state (so it belongs to one compiled model). The loader then
reads exactly those slices through `make_slicer`, which indexes safetensors' lazy slices (or, in
tests, plain tensors) piece by piece, so a rank never materializes a whole sharded tensor.

The layout functions here are pure and shared by both sides of every pairing: a column-parallel
projection and the row-parallel one that consumes it compute the same ranges independently.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from hfrewrite.engine.context import RewriteContext
from hfrewrite.errors import RewriteError

TP_SHARDS = "tp_shards"        # ctx.state key: parameter name -> ShardSpec
TP_GROUP = "tp_group"          # ctx.state key: the process-group name collectives use
TP_NOTES = "tp_notes"          # ctx.state key: human-readable notes (uneven splits), in rule order
TP_LINEARS = "tp_linears"      # ctx.state key: how many matmul sites a TP template sharded
EP_SPLIT = "ep_split"          # ctx.state key: how many experts modules were split over the ranks (--ep)
DEFAULT_GROUP = "tp"           # name used when rewriting without a process group (explain, tests)


@dataclass(frozen=True)
class ShardSpec:
    """A rank's share of one weight: `pieces` of the full tensor along `dim`, concatenated, zero-padded to `size`."""

    full_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int], ...]
    size: int

    def __post_init__(self) -> None:
        taken = sum(stop - start for start, stop in self.pieces)
        if taken > self.size or any(not 0 <= a <= b <= self.full_shape[self.dim] for a, b in self.pieces):
            raise ValueError(f"shard pieces {self.pieces} do not fit dim {self.dim} of {self.full_shape} "
                             f"padded to {self.size}")

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape this rank holds."""
        shape = list(self.full_shape)
        shape[self.dim] = self.size
        return tuple(shape)

    def read(self, source: Any) -> torch.Tensor:
        """Index `source` (a safetensors slice or a tensor) piece by piece: only this rank's bytes are read."""
        parts = []
        for start, stop in self.pieces:
            index = (slice(None),) * self.dim + (slice(start, stop),)
            parts.append(source[index])
        taken = sum(stop - start for start, stop in self.pieces)
        if taken < self.size or not parts:
            like = parts[0] if parts else source[(slice(None),) * self.dim + (slice(0, 0),)]
            pad_shape = list(like.shape)
            pad_shape[self.dim] = self.size - taken
            parts.append(torch.zeros(pad_shape, dtype=like.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def record_shard(ctx: RewriteContext, name: str, spec: ShardSpec) -> None:
    """Remember that parameter `name` is sharded by `spec` (a second, different spec is a rule conflict)."""
    shards: dict[str, ShardSpec] = ctx.state.setdefault(TP_SHARDS, {})
    if name in shards and shards[name] != spec:
        raise RewriteError(f"weight {name} is sharded twice, differently ({shards[name]} and {spec}); two TP rules "
                           f"claim the same module")
    shards[name] = spec


def shard_specs(ctx: RewriteContext) -> dict[str, ShardSpec]:
    """Every shard the TP templates recorded (empty on one device)."""
    return dict(ctx.state.get(TP_SHARDS, {}))


def group_name(ctx: RewriteContext) -> str:
    """The process-group name the inserted collectives name."""
    return str(ctx.state.get(TP_GROUP, DEFAULT_GROUP))


def note(ctx: RewriteContext, text: str) -> None:
    """A note for the compile report (once per distinct text)."""
    notes: list[str] = ctx.state.setdefault(TP_NOTES, [])
    if text not in notes:
        notes.append(text)


Slicer = Callable[[str, Any], torch.Tensor]


def make_slicer(specs: dict[str, ShardSpec]) -> Slicer:
    """The `load_weights(..., slicer=...)` callback: sharded names read their pieces, others the whole tensor."""

    def slicer(name: str, source: Any) -> torch.Tensor:
        spec = specs.get(name)
        if spec is None:
            return source[...]
        return spec.read(source)

    return slicer


def share_tied(tensors: dict[str, torch.Tensor], tied: dict[str, str], specs: dict[str, ShardSpec]) -> None:
    """Tied weights sharded the same way (or not at all) share one tensor again, as they do on one device.

    With a slicer the loader reads each name on its own; the input embedding and the LM head of a
    tied model would otherwise take twice the memory on every rank.
    """
    for name, source in sorted(tied.items()):
        if name in tensors and source in tensors and specs.get(name) == specs.get(source) and \
                tensors[name].shape == tensors[source].shape:
            tensors[name] = tensors[source]


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous near-even split of `total` units into `parts`: the [start, stop) of part `index`."""
    return total * index // parts, total * (index + 1) // parts


def padded_range(total: int, parts: int, index: int) -> tuple[int, int, int]:
    """(start, stop, size): equal blocks of ceil(total / parts) for gathers; the last rank's block is padded."""
    size = -(-total // parts)
    start = min(total, index * size)
    return start, min(total, start + size), size


@dataclass(frozen=True)
class HeadLayout:
    """Which query and KV heads one rank holds for one attention call."""

    heads: int
    kv_heads: int
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int

    @property
    def local_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def local_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start


def head_layout(heads: int, kv_heads: int, tp: int, rank: int, *, uneven: bool = True) -> HeadLayout:
    """Split attention heads over `tp` ranks so each rank holds whole GQA groups (or a share of one).

    KV heads >= tp: the KV groups (a KV head and its heads/kv_heads query heads) are dealt out in
    contiguous near-even blocks; when kv_heads is not a multiple of tp the ranks get different head
    counts (SmolLM2's 3 groups over 2 ranks: 1 and 2 groups). KV heads < tp: tp must be a multiple
    of kv_heads; each KV head is replicated on the tp/kv_heads ranks that split its query heads.
    Raises ValueError with the reason when no sound split exists (or an uneven one is refused).
    """
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a whole number of groups of {kv_heads} KV heads")
    group = heads // kv_heads
    if kv_heads >= tp:
        if uneven is False and kv_heads % tp:
            raise ValueError(f"{kv_heads} KV heads ({heads} query heads) are not divisible by tp {tp}")
        g0, g1 = split_range(kv_heads, tp, rank)
        return HeadLayout(heads, kv_heads, g0 * group, g1 * group, g0, g1)
    if tp % kv_heads:
        raise ValueError(f"{kv_heads} KV heads cannot be shared by tp {tp} ranks: with fewer KV heads than ranks, "
                         f"tp must be a multiple of the KV heads (so each KV head is replicated evenly)")
    sharing = tp // kv_heads
    if group < sharing:
        raise ValueError(f"tp {tp} is larger than the model supports: {heads} query heads cannot give every "
                         f"rank at least one ({kv_heads} KV heads, {sharing} ranks per KV head)")
    if uneven is False and group % sharing:
        raise ValueError(f"{heads} query heads are not divisible by tp {tp}")
    g = rank // sharing
    a, b = split_range(group, sharing, rank % sharing)
    return HeadLayout(heads, kv_heads, g * group + a, g * group + b, g, g + 1)


class UnevenShardWarning(UserWarning):
    """Ranks hold different amounts of a layer (sound, but the busiest rank sets the pace)."""


def check_sharded(ctx: RewriteContext) -> None:
    """Under tp > 1: refuse a rewrite that sharded no layer (every rank would hold the whole model), and warn
    about uneven splits."""
    expert_parallel = bool(ctx.options.get("ep", False))
    if ctx.tp == 1:
        if expert_parallel:
            raise RewriteError("expert parallelism (--ep) splits the experts over the tensor-parallel ranks: "
                               "it needs --tp N with N > 1")
        return
    if expert_parallel and not ctx.state.get(EP_SPLIT, 0):
        raise RewriteError(f"expert parallelism (--ep) was asked for, but no rule split the experts of this "
                           f"{ctx.model_type or 'model'} graph (no routed experts, or their fused-MoE rewrite did not "
                           f"apply: `hfrewrite explain` shows why)")
    for text in ctx.state.get(TP_NOTES, []):
        warnings.warn(f"tp {ctx.tp}: {text}", UnevenShardWarning, stacklevel=2)
    if not ctx.state.get(TP_LINEARS, 0):
        raise RewriteError(
            f"tensor parallelism over {ctx.tp} ranks was asked for, but no rule shards a linear layer of this "
            f"{ctx.model_type or 'model'} graph: its config has no base_model_tp_plan and no rules/arch file covers "
            f"it. `hfrewrite rules suggest MODEL > tp_rules.yaml` proposes TP rules from the graph's dataflow; "
            f"pass them with --rules")


class SimulatedGroup:
    """Collectives among threads of one process, for running every rank's rewritten graph without processes.

    Tests and debugging only: each rank's graph runs in its own thread through `forward(rank, gm)`,
    and the functional collectives meet here (all-reduce sums in rank order, so every rank gets the
    same bits; all-gather concatenates along dim 0 in rank order), as a real process group would.
    """

    def __init__(self, size: int, timeout: float = 120.0) -> None:
        self.size = size
        self.timeout = timeout
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[torch.Tensor | None] = [None] * size

    def _exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = tensor
        self._barrier.wait()
        values = [value for value in self._slots if value is not None]
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        values = self._exchange(rank, tensor)
        total = values[0].clone()
        for value in values[1:]:
            total += value
        return total

    def all_gather(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(rank, tensor), dim=0)

    def forward(self, rank: int, graph_module: torch.fx.GraphModule) -> Callable[..., Any]:
        """A callable running `graph_module` as rank `rank`, its collectives routed through this group."""
        group = self
        c10d = torch.ops._c10d_functional

        class RankInterpreter(torch.fx.Interpreter):
            def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
                if target == c10d.all_reduce.default:
                    return group.all_reduce(rank, args[0])
                if target == c10d.all_gather_into_tensor.default:
                    return group.all_gather(rank, args[0])
                if target == c10d.wait_tensor.default:
                    return args[0]
                return super().call_function(target, args, kwargs)

        def run(*inputs: Any) -> Any:
            return RankInterpreter(graph_module).run(*inputs)

        return run

    def run(self, work: Callable[[int], Any]) -> list[Any]:
        """work(rank) for every rank, each in its own thread; results by rank. A failing rank breaks the
        barrier, so the others fail at their next collective instead of waiting; its error is raised here."""
        def guarded(rank: int) -> Any:
            finished = False
            try:
                result = work(rank)
                finished = True
                return result
            finally:
                if not finished:
                    self._barrier.abort()

        with ThreadPoolExecutor(max_workers=self.size) as pool:
            futures = [pool.submit(guarded, rank) for rank in range(self.size)]
            done = [future.exception(timeout=self.timeout * 4) for future in futures]
        failures = [error for error in done if error is not None]
        causes = [error for error in failures if not isinstance(error, threading.BrokenBarrierError)]
        if failures:
            raise (causes or failures)[0]
        return [future.result() for future in futures]
