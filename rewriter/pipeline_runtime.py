"""Running pipeline stages: one after another in one process, or one stage per rank over point-to-point sends.

In one process (`PipelinedModel`) the stages run in order on the same step; it has the
CompiledModel interface, so `verify` and `Generator` use it unchanged. That is what checks the cut.

Across ranks, rank (stage s, tp index t) = s * tp + t. The ranks of stage 0 drive: they schedule,
pack, run stage 0 and sample (`PipelineClient`, again with the CompiledModel interface); the
others serve (`PipelineServer`): receive, run their stage, send on. Messages go around a ring:
stage 0 -> 1 -> ... -> last -> stage 0, each a fixed-size int64 header (kind, sequence number,
descriptor length, tensor shapes), an int64 descriptor (the packed step's tensors, so no rank
re-runs the scheduler) and the activations; the last stage sends the logits back. Every rank keeps
the KV cache of its own layers only. Control messages (new cache, stop, error) take the same
ring, so the order of steps and cache changes is the same on every rank, and an error on any stage
travels to the driver, which raises it; every wait has a timeout, so nothing hangs.

`MicroBatchEngine` keeps several micro-batches in flight: running sequences are dealt into as many
groups as there are stages, each group has at most one step in the pipeline, and while the last
stage finishes group g the first already runs group g + 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from hfrewrite.kernels.paged_attention import METADATA_FIELDS, AttentionMetadata

from . import distributed
from .capture import CapturedModel, capture, retarget_devices
from .compiled import CompiledModel, mark_step_dims_dynamic
from .device import parse_dtype, pick_device
from .distributed import DistributedError
from .engine.apply import RewriteReport
from .errors import HfRewriteError
from .generation import Generator
from .pipeline import KV_CACHES, _timed, install_weights, rewrite, rule_paths
from .runtime.batch import Chunk, PackedStep, pack
from .runtime.engine import Engine, Event, Request, _Sequence
from .runtime.kv_cache import CacheConfig, KVCache
from .runtime.sampling import sample
from .stages import Stage, StageSplit, split_stages

# What a failing stage can raise while it computes (compile errors are RuntimeErrors too): these
# are reported to the driver and end every rank; anything else ends the rank and the launcher stops the rest.
STAGE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError, NotImplementedError,
                HfRewriteError)


# ----------------------------------------------------------------------------------------------
# One compiled stage


def step_feeds(step: PackedStep, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Graph-input name -> tensor for a packed step (the inputs every stage may read)."""
    feeds = {"input_ids": step.input_ids, "position_ids": step.position_ids,
             "logits_index": step.logits_index if rows is None else rows}
    feeds.update({f"attn_{name}": value for name, value in zip(METADATA_FIELDS, step.metadata.as_tuple())})
    return feeds


def stage_cache_feeds(cache: KVCache, specs: Sequence[Any]) -> dict[str, torch.Tensor]:
    """A stage's cache tensors under the global input names (k_cache_<site>), site numbers kept."""
    named = {f"k_cache_{spec.site}": key for spec, key in zip(specs, cache.keys)}
    named.update({f"v_cache_{spec.site}": value for spec, value in zip(specs, cache.values)})
    return named


def _concrete(shape: Sequence[int | str], tokens: int) -> tuple[int, ...]:
    """A crossing value's shape for a step of `tokens` tokens ('T' and expressions of it evaluated)."""
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        else:
            out.append(int(sympy.sympify(dim).subs(sympy.Symbol("T"), tokens)))
    return tuple(out)


@dataclass
class CompiledStage(CompiledModel):
    """One stage behind torch.compile: (received activations, step inputs, own caches) -> sends or logits."""

    stage: Stage | None = None
    last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.stage is not None, "CompiledStage needs its Stage"
        self.receives = [value.name for value in self.stage.receives]
        placeholders = {n.target: n for n in self.graph_module.graph.nodes if n.op == "placeholder"}
        # dims of received activations that change with the step (the token count): unbacked, like input_ids
        self._dynamic_dims = [[d for d, size in enumerate(placeholders[name].meta["val"].shape)
                               if not isinstance(size, int)] for name in self.receives]

    @torch.no_grad()
    def run(self, step: PackedStep, cache: KVCache, received: Sequence[torch.Tensor],
            rows: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
        """This stage on one step: the tensors for the next stage, or on the last stage the logits [R, V]."""
        feeds = step_feeds(step, rows)
        feeds.update(zip(self.receives, received))
        feeds.update(stage_cache_feeds(cache, self.kv_specs))
        inputs = [feeds[name] for name in self.input_names]
        if self.backend is not None:
            mark_step_dims_dynamic(self.input_names, inputs)
            for tensor, dims in zip(received, self._dynamic_dims):
                for dim in dims:
                    torch._dynamo.decorators.mark_unbacked(tensor, dim)
        with self._compile_config():
            out = self._fn(*inputs)
        if not self.last:
            return list(out)
        if not self.selects_rows:
            out = out[:, step.logits_index if rows is None else rows]
        return out[0]

    def warmup(self) -> None:
        """Compile now, on zeros for the received activations (each rank warms its own stage alone)."""
        assert self.stage is not None
        cache = self.new_cache(CacheConfig(block_size=4, num_blocks=4))
        step = pack([Chunk([1, 2, 3], 0, [0]), Chunk([4], 2, [1])], 4, self.device)
        tokens = int(step.input_ids.shape[1])
        received = [torch.zeros(_concrete(value.shape, tokens), dtype=value.dtype, device=self.device)
                    for value in self.stage.receives]
        self.run(step, cache, received)

    @property
    def logits_dtype(self) -> torch.dtype:
        """The dtype of the last stage's output (what the driver receives)."""
        output = list(self.graph_module.graph.nodes)[-1].args[0]
        return output.meta["val"].dtype if isinstance(output, torch.fx.Node) else self.dtype


# ----------------------------------------------------------------------------------------------
# All stages in one process


@dataclass
class StagedCache:
    """The KV cache of a pipelined model: each stage's own KVCache (its layers' sites only)."""

    caches: list[KVCache]
    config: CacheConfig

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every site's cache under its graph-input name."""
        named: dict[str, torch.Tensor] = {}
        for cache in self.caches:
            named.update(cache.tensors())
        return named

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
    total_parameters: int = 0
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


# ----------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class PipelineLayout:
    """This rank's place: stage s and tensor-parallel index t of rank s * tp + t."""

    pp: int
    tp: int
    rank: int
    device: torch.device
    tp_group: str | None = None

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def previous(self) -> int:
        """The rank this one receives from (the last stage's rank of the same tp index for stage 0)."""
        return ((self.stage - 1) % self.pp) * self.tp + self.tp_rank

    @property
    def next(self) -> int:
        """The rank this one sends to (the driver of the same tp index for the last stage)."""
        return ((self.stage + 1) % self.pp) * self.tp + self.tp_rank

    @property
    def driver(self) -> bool:
        return self.stage == 0


def join_pipeline(pp: int, tp: int, device: torch.device) -> tuple[PipelineLayout, Any]:
    """Join the pp x tp ranks the launcher started; make one tensor-parallel group per stage.

    Returns the layout and this stage's tp process group (None when tp == 1).
    """
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; pipeline parallelism needs it")
    if not distributed.launched():
        raise DistributedError(f"--pp {pp} needs {pp * tp} processes: run it through the hfrewrite command (which "
                               f"spawns them) or under `torchrun --nproc-per-node {pp * tp}`")
    rank, world, local = distributed.env_rank()
    if world != pp * tp:
        raise DistributedError(f"--pp {pp} x --tp {tp} needs {pp * tp} ranks but the launcher started {world}")
    device = distributed.rank_device(device, local)
    if not dist.is_initialized():
        if device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.set_device_index(device.index)
        try:
            dist.init_process_group(distributed.backend_for(device), init_method="env://", rank=rank,
                                    world_size=world, timeout=distributed.timeout())
        except (RuntimeError, ValueError) as error:
            raise DistributedError(f"rank {rank} could not join the {world}-rank pipeline group within "
                                   f"{distributed.timeout().total_seconds():.0f}s: {str(error).splitlines()[0]}") \
                from error
    mine = None
    if tp > 1:
        for stage in range(pp):  # every rank creates every group, in the same order
            group = dist.new_group([stage * tp + t for t in range(tp)])
            if stage == rank // tp:
                mine = group
    name = str(mine.group_name) if mine is not None else None
    return PipelineLayout(pp, tp, rank, device, name), mine


def _attribute_exists(graph_module: torch.fx.GraphModule, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    except AttributeError:
        return False
    return leaf in owner._parameters or leaf in owner._buffers


def stage_weight_specs(stage: Stage, captured: CapturedModel) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what this stage loads: its parameters and its checkpoint buffers only."""
    module = stage.graph_module
    specs = {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters(remove_duplicate=False)}
    for name in captured.checkpoint_buffers:
        if _attribute_exists(module, name):
            buffer = module.get_buffer(name)
            specs[name] = (tuple(buffer.shape), buffer.dtype)
    return specs


def distinct_parameters(captured: CapturedModel) -> int:
    """Parameter elements of the whole model, a tied weight counted once (the one-device number)."""
    params = dict(captured.graph_module.named_parameters(remove_duplicate=False))
    return sum(p.numel() for name, p in params.items()
               if not (name in captured.tied_weights and captured.tied_weights[name] in params))


def _load_stages(stages: Sequence[Stage], captured: CapturedModel, context: Any, weights: Callable[..., dict],
                 device: torch.device, dtype: torch.dtype) -> None:
    """Read the stages' weights (only theirs; TP-sliced if the rewrite sharded them) and put them in place."""
    from .sharding import make_slicer, shard_specs, share_tied

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for stage in stages:
        specs.update(stage_weight_specs(stage, captured))
    shards = shard_specs(context)
    sliced = {"slicer": make_slicer(shards)} if shards else {}
    tensors = weights(specs, captured.tied_weights, device, dtype, **sliced)
    share_tied(tensors, captured.tied_weights, shards)
    tensors.update({name: buffer.to(device) for name, buffer in captured.buffers.items()})
    for stage in stages:
        install_weights(stage.graph_module, {name: tensor for name, tensor in tensors.items()
                                             if _attribute_exists(stage.graph_module, name)})


def stage_count(options: Any) -> int:
    """Pipeline stages asked for: --pp, or as many as --pp-layers lists."""
    return options.pp if options.pp > 1 or not options.pp_layers else len(options.pp_layers)


def compile_stages(split: StageSplit, stages: Sequence[Stage], config: Any, device: torch.device, dtype: torch.dtype,
                   backend: str | None, tp: int = 1) -> list[CompiledStage]:
    """Each stage behind its own torch.compile (weights already in place), compiled now unless eager."""
    last = len(split.stages) - 1
    compiled = [CompiledStage(stage.graph_module, stage.kv_specs, config, device, dtype, backend=backend, tp=tp,
                              stage=stage, last=stage.index == last) for stage in stages]
    if backend is not None:
        for stage in compiled:
            stage.warmup()
    return compiled


def check_stage_counts(model_id: str, stages: int, counts: Sequence[int], progress: bool = False) -> None:
    """Refuse a split the config already rules out (more stages than layers, counts that do not add up),
    before any rank starts; the ranks check the graph itself again."""
    from .sources import resolve
    from .stages import layer_counts

    config = resolve(model_id, progress=progress).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if isinstance(layers, int):
        layer_counts(layers, stages, counts or None)


def describe_split(config: PretrainedConfig, options: Any) -> StageSplit:
    """The cut `--pp` would make (for explain): capture and rewrite as for one device, split, load nothing."""
    captured = capture(config, parse_dtype(options.dtype, pick_device(options.device)))
    context, _ = rewrite(captured, rule_paths(options.rules, config.model_type))
    return split_stages(captured.graph_module, config, context.state.get(KV_CACHES, []), stage_count(options),
                        options.pp_layers or None, tied=captured.tied_weights)


def build_pipeline(config: PretrainedConfig, weights: Callable[..., dict], options: Any, timings: dict[str, float],
                   layout: PipelineLayout | None = None) -> tuple[Any, RewriteReport]:
    """Capture, rewrite, split and compile: every stage here (layout None), or this rank's stage only.

    Returns (PipelinedModel | PipelineClient | PipelineServer, rewrite report).
    """
    if layout is None and options.tp > 1:
        raise DistributedError("--tp with --pp runs on pp x tp ranks; in one process only --pp is supported")
    device = layout.device if layout is not None else pick_device(options.device)
    dtype = parse_dtype(options.dtype, device)
    with _timed(timings, "capture"):
        captured = capture(config, dtype)
    with _timed(timings, "rewrite"):
        if layout is not None and layout.tp > 1:
            context, report = rewrite(captured, rule_paths(options.rules, config.model_type), layout.tp,
                                      layout.tp_rank, layout.tp_group)
        else:
            context, report = rewrite(captured, rule_paths(options.rules, config.model_type))
    retarget_devices(captured.graph_module, device)
    with _timed(timings, "split"):
        split = split_stages(captured.graph_module, config, context.state.get(KV_CACHES, []), stage_count(options),
                             options.pp_layers or None, tied=captured.tied_weights)
    total = distinct_parameters(captured)
    mine = split.stages if layout is None else [split.stages[layout.stage]]
    with _timed(timings, "load"):
        _load_stages(mine, captured, context, weights, device, dtype)
    with _timed(timings, "compile"):
        compiled = compile_stages(split, mine, config, device, dtype, options.backend,
                                  layout.tp if layout is not None else 1)
    if layout is None:
        return PipelinedModel(split, compiled, config, device, dtype, total), report
    return connect(split, compiled[0], layout, config, total), report


# ----------------------------------------------------------------------------------------------
# Point-to-point transport

STEP, CACHE, STOP, ERROR = 1, 2, 3, 4
_KINDS = {STEP: "step", CACHE: "cache", STOP: "stop", ERROR: "error"}
HEADER = 4  # kind, sequence number, descriptor length, tensor count; then each tensor's shape
_CODES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Message:
    """What one rank sent another: a kind, a sequence number, an int64 descriptor and the activations."""

    kind: int
    sequence: int
    descriptor: torch.Tensor
    tensors: list[torch.Tensor]


@dataclass
class Link:
    """One direction between two ranks; the dtypes and ranks of the tensors it carries are fixed by the split."""

    peer: int
    specs: list[tuple[torch.dtype, int]]
    device: torch.device
    timeout: datetime.timedelta
    what: str
    _pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def header_size(self) -> int:
        return HEADER + sum(ndim for _, ndim in self.specs)

    def send(self, kind: int, sequence: int, descriptor: torch.Tensor, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Queue the message (non-blocking sends; the buffers stay referenced until they are done)."""
        if len(tensors) not in (0, len(self.specs)):
            raise DistributedError(f"{self.what}: {len(tensors)} tensors to send, the link carries {len(self.specs)}")
        header = [kind, sequence, int(descriptor.numel()), len(tensors)]
        for tensor in tensors:
            header.extend(int(d) for d in tensor.shape)
        header.extend([0] * (self.header_size - len(header)))
        parts = [torch.tensor(header, dtype=torch.int64, device=self.device)]
        if descriptor.numel():
            parts.append(descriptor.to(self.device, torch.int64).contiguous())
        for tensor, (dtype, _) in zip(tensors, self.specs):
            parts.append(tensor.to(dtype).contiguous())
        self._pending = [(work, buf) for work, buf in self._pending if not work.is_completed()]
        for part in parts:
            self._pending.append((dist.isend(part, self.peer), part))

    def recv(self) -> Message:
        """The next message from the peer; a DistributedError if nothing comes within the timeout."""
        header = torch.empty(self.header_size, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, self.peer), "the next message")
        values = header.tolist()
        kind, sequence, length, count = values[:4]
        if kind not in _KINDS or count not in (0, len(self.specs)):
            raise DistributedError(f"{self.what}: malformed header from rank {self.peer}: {values[:4]}")
        descriptor = torch.empty(length, dtype=torch.int64, device=self.device)
        if length:
            self._wait(dist.irecv(descriptor, self.peer), f"the descriptor of {_KINDS[kind]} {sequence}")
        tensors, offset = [], HEADER
        for dtype, ndim in self.specs[:count]:
            tensor = torch.empty(values[offset:offset + ndim], dtype=dtype, device=self.device)
            offset += ndim
            self._wait(dist.irecv(tensor, self.peer), f"the activations of step {sequence}")
            tensors.append(tensor)
        return Message(kind, sequence, descriptor, tensors)

    def _wait(self, work: Any, what: str, timeout: datetime.timedelta | None = None) -> None:
        timeout = timeout or self.timeout
        try:
            work.wait(timeout)
        except RuntimeError as error:
            raise DistributedError(f"{self.what}: waited {timeout.total_seconds():.0f}s for {what} with rank "
                                   f"{self.peer}, which failed or hangs ({str(error).splitlines()[0]})") from error

    def flush(self, timeout: datetime.timedelta | None = None) -> None:
        """Wait until every queued send has gone."""
        for work, _ in self._pending:
            self._wait(work, "a send to complete", timeout)
        self._pending.clear()


def encode_step(step: PackedStep, rows: torch.Tensor | None) -> torch.Tensor:
    """The packed step's tensors in one int64 vector: [count, (dtype code, ndim, *shape) ..., data ...]."""
    tensors = [step.input_ids, step.position_ids, *step.metadata.as_tuple(), step.logits_index]
    if rows is not None:
        tensors.append(rows)
    header = [len(tensors)]
    for tensor in tensors:
        header.extend([_CODES.index(tensor.dtype), tensor.dim(), *tensor.shape])
    body = [tensor.reshape(-1).to("cpu", torch.int64) for tensor in tensors]
    return torch.cat([torch.tensor(header, dtype=torch.int64), *body])


def decode_step(vector: torch.Tensor, device: torch.device) -> tuple[PackedStep, torch.Tensor | None]:
    """Inverse of `encode_step`, onto `device`."""
    values = vector.to("cpu")
    count = int(values[0])
    cursor, shapes = 1, []
    for _ in range(count):
        code, ndim = int(values[cursor]), int(values[cursor + 1])
        shapes.append((_CODES[code], [int(d) for d in values[cursor + 2:cursor + 2 + ndim]]))
        cursor += 2 + ndim
    tensors = []
    for dtype, shape in shapes:
        size = 1
        for dim in shape:
            size *= dim
        tensors.append(values[cursor:cursor + size].reshape(shape).to(device=device, dtype=dtype))
        cursor += size
    fields = len(METADATA_FIELDS)
    metadata = AttentionMetadata(*tensors[2:2 + fields])
    step = PackedStep(tensors[0], tensors[1], metadata, tensors[2 + fields])
    rows = tensors[3 + fields] if count > 3 + fields else None
    return step, rows


def _text_vector(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def _vector_text(vector: torch.Tensor) -> str:
    return bytes(int(v) for v in vector.tolist()).decode("utf-8", errors="replace")


def _links(split: StageSplit, stage: CompiledStage, layout: PipelineLayout) -> tuple[Link, Link]:
    """(from the previous rank, to the next rank) for this rank's stage."""
    timeout = distributed.timeout()
    index, last = layout.stage, len(split.stages) - 1
    incoming = split.stages[index - 1].sends if index > 0 else []
    in_specs = [(v.dtype, len(v.shape)) for v in incoming] if index > 0 else [(_last_logits_dtype(split, stage), 2)]
    outgoing = split.stages[index].sends
    out_specs = [(v.dtype, len(v.shape)) for v in outgoing] if index < last else [(stage.logits_dtype, 2)]
    source = f"stage {index} (rank {layout.rank})"
    return (Link(layout.previous, in_specs, layout.device, timeout, source),
            Link(layout.next, out_specs, layout.device, timeout, source))


def _last_logits_dtype(split: StageSplit, stage: CompiledStage) -> torch.dtype:
    output = list(split.stages[-1].graph_module.graph.nodes)[-1].args[0]
    return output.meta["val"].dtype if isinstance(output, torch.fx.Node) else stage.dtype


def connect(split: StageSplit, stage: CompiledStage, layout: PipelineLayout, config: Any,
            total_parameters: int) -> PipelineClient | PipelineServer:
    """This rank's end of the ring: a client on stage 0, a server elsewhere."""
    incoming, outgoing = _links(split, stage, layout)
    if layout.driver:
        return PipelineClient(split, stage, layout, outgoing, incoming, config, stage.device, stage.dtype,
                              total_parameters)
    return PipelineServer(stage, layout, incoming, outgoing, len(split.stages))


@dataclass
class PipelineServer:
    """A rank of stage > 0: receive, run the stage, send on, until told to stop."""

    stage: CompiledStage
    layout: PipelineLayout
    incoming: Link
    outgoing: Link
    stages: int
    cache: KVCache | None = None

    def serve(self) -> int:
        """Serve until a stop arrives; its exit code (0, or 1 for a failed verification) is returned.

        A stop after an error on the driver (code >= 2), or an error from an earlier stage, is raised
        as a DistributedError after being passed on, so every rank ends.
        """
        index = self.layout.stage
        while True:
            message = self.incoming.recv()
            if message.kind == STEP:
                self._step(message)
            elif message.kind == CACHE:
                block_size, num_blocks = message.descriptor.tolist()
                self.cache = self.stage.new_cache(CacheConfig(block_size, num_blocks))
                self.outgoing.send(CACHE, message.sequence, message.descriptor)
            elif message.kind == STOP:
                self.outgoing.send(STOP, message.sequence, message.descriptor)
                self.outgoing.flush()
                code = int(message.descriptor[0]) if message.descriptor.numel() else 0
                if code >= 2:
                    raise DistributedError(f"stage {index} (rank {self.layout.rank}) stopped: the driver rank "
                                           f"failed (its error is reported by rank 0)")
                return code
            else:
                self.outgoing.send(ERROR, message.sequence, message.descriptor)
                self.outgoing.flush()
                raise DistributedError(_vector_text(message.descriptor))

    def _step(self, message: Message) -> None:
        index = self.layout.stage
        try:
            if self.cache is None:
                raise DistributedError(f"stage {index} got step {message.sequence} before any KV cache was made")
            step, rows = decode_step(message.descriptor, self.layout.device)
            out = self.stage.run(step, self.cache, message.tensors, rows)
        except STAGE_ERRORS as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            text = (f"pipeline stage {index} (rank {self.layout.rank}, layers {self.stage.stage.layer_text()}) "
                    f"failed on step {message.sequence}: {type(error).__name__}: {first_line}")
            self.outgoing.send(ERROR, message.sequence, _text_vector(text))
            self.outgoing.flush()
            raise DistributedError(text) from error
        if index == self.stages - 1:
            assert isinstance(out, torch.Tensor)
            self.outgoing.send(STEP, message.sequence, torch.empty(0, dtype=torch.int64), [out])
        else:
            self.outgoing.send(STEP, message.sequence, message.descriptor, out)


@dataclass
class PipelineClient:
    """Stage 0 on a driver rank, with the CompiledModel interface; the later stages are reached over the ring.

    `forward` is synchronous (verify and the plain Engine use it); `submit`/`collect` keep several
    steps in flight (MicroBatchEngine). Steps come back in the order they were submitted.
    """

    split: StageSplit
    stage: CompiledStage
    layout: PipelineLayout
    outgoing: Link
    incoming: Link
    config: Any
    device: torch.device
    dtype: torch.dtype
    total_parameters: int
    _cache: KVCache | None = None
    _sequence: int = 0
    _in_flight: deque = field(default_factory=deque)
    closed: bool = False
    failed: bool = False
    peak_in_flight: int = 0   # most steps that were in the pipeline at once (micro-batching at work: > 1)

    @property
    def kv_specs(self) -> list[Any]:
        return [spec for stage in self.split.stages for spec in stage.kv_specs]

    @property
    def max_context(self) -> int:
        return self.stage.max_context

    @property
    def graph_modules(self) -> list[torch.fx.GraphModule]:
        return [stage.graph_module for stage in self.split.stages]

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.stage.graph_module

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def parameter_count(self) -> int:
        return self.total_parameters

    def new_cache(self, cache_config: CacheConfig) -> CacheConfig:
        """Every stage allocates its layers' cache (the request goes around the ring and is waited for)."""
        if self._in_flight:
            raise DistributedError("a new KV cache was asked for while steps are in flight")
        self._cache = self.stage.new_cache(cache_config)
        self._sequence += 1
        self.outgoing.send(CACHE, self._sequence, torch.tensor([cache_config.block_size, cache_config.num_blocks]))
        self._expect(CACHE, self._sequence)
        return cache_config

    def submit(self, step: PackedStep, rows: torch.Tensor | None = None) -> int:
        """Run stage 0 on `step` and send it on; returns its sequence number."""
        if self._cache is None:
            raise DistributedError("new_cache must be called before the first step")
        self._sequence += 1
        try:
            out = self.stage.run(step, self._cache, [], rows)
        except STAGE_ERRORS as error:
            text = f"pipeline stage 0 (rank {self.layout.rank}) failed on step {self._sequence}: {error}"
            self.outgoing.send(ERROR, self._sequence, _text_vector(text))
            raise
        assert isinstance(out, list)
        self.outgoing.send(STEP, self._sequence, encode_step(step, rows), out)
        self._in_flight.append(self._sequence)
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
        return self._sequence

    def collect(self) -> torch.Tensor:
        """The logits [R, V] of the oldest step in flight."""
        sequence = self._in_flight.popleft()
        message = self._expect(STEP, sequence)
        return message.tensors[0]

    @torch.no_grad()
    def forward(self, step: PackedStep, cache: Any = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, V] of one step through every stage (the cache argument is the handle new_cache gave)."""
        self.submit(step, rows)
        return self.collect()

    def _expect(self, kind: int, sequence: int) -> Message:
        message = self.incoming.recv()
        if message.kind == ERROR:
            self.failed = True  # the error went around the ring: every stage has stopped
            raise DistributedError(_vector_text(message.descriptor))
        if message.kind != kind or message.sequence != sequence:
            raise DistributedError(f"pipeline out of order: expected {_KINDS[kind]} {sequence}, got "
                                   f"{_KINDS[message.kind]} {message.sequence}")
        return message

    def close(self, code: int = 0) -> None:
        """Stop every stage (code: the exit code they end with; >= 2 says the driver failed).

        After an error that came around the ring the other stages have stopped already; after a failure
        here the stop is sent without waiting long for it (the launcher, or the receive timeouts, end
        a stage that is gone).
        """
        if self.closed or self.failed:
            return
        self.closed = True
        self._sequence += 1
        self.outgoing.send(STOP, self._sequence, torch.tensor([code]))
        if code >= 2:
            self.outgoing.flush(datetime.timedelta(seconds=5))
            return
        while self._in_flight:
            self.collect()
        self._expect(STOP, self._sequence)
        self.outgoing.flush()


# ----------------------------------------------------------------------------------------------
# Micro-batched generation


class MicroBatchEngine(Engine):
    """Continuous batching over a pipeline: running sequences are dealt into `groups` micro-batches, each
    with at most one step in flight, so every stage has work while decoding."""

    def __init__(self, client: PipelineClient, cache: CacheConfig, max_context: int, eos_ids: Sequence[int] = (),
                 decode: Callable[[list[int]], str] | None = None, max_tokens_per_step: int = 512,
                 groups: int = 2) -> None:
        super().__init__(client.forward, cache, client.device, max_context, eos_ids, decode, max_tokens_per_step)
        self.client = client
        self.groups = max(1, groups)
        self._group: dict[int, int] = {}

    def _admit(self) -> None:
        super()._admit()
        for seq in self.running:  # new sequences join the smallest group (lowest index on ties)
            if seq.request.request_id not in self._group:
                sizes = [sum(1 for s in self.running if self._group.get(s.request.request_id) == g)
                         for g in range(self.groups)]
                self._group[seq.request.request_id] = sizes.index(min(sizes))

    def _plan(self, group: int) -> list[tuple[_Sequence, Chunk]]:
        """Engine._schedule over one group: its decode tokens first, then prefill chunks in the budget."""
        members = [seq for seq in self.running if self._group[seq.request.request_id] == group]
        budget = self.max_tokens_per_step
        plan: list[tuple[_Sequence, Chunk]] = []
        for seq in members:
            if len(seq.all_ids) - seq.cached == 1:
                plan.append((seq, Chunk(seq.all_ids[seq.cached:], seq.cached, seq.blocks)))
                budget -= 1
        for seq in members:
            pending = len(seq.all_ids) - seq.cached
            if pending > 1 and budget > 0:
                take = min(pending, budget)
                plan.append((seq, Chunk(seq.all_ids[seq.cached:seq.cached + take], seq.cached, seq.blocks)))
                budget -= take
        return plan

    def _complete(self, plan: list[tuple[_Sequence, Chunk]], logits: torch.Tensor) -> list[Event]:
        """Engine.step's second half: advance the cache cursors, sample, free what finished."""
        events: list[Event] = []
        for row, (seq, chunk) in enumerate(plan):
            seq.cached += len(chunk.tokens)
            if seq.cached < len(seq.all_ids):
                continue
            events.append(self._append(seq, sample(logits[row], seq.request.params, seq.generator)))
        done = {e.request_id for e in events if e.finished}
        for seq in [s for s in self.running if s.request.request_id in done]:
            self.allocator.free(seq.blocks)
            self.running.remove(seq)
            self._group.pop(seq.request.request_id, None)
        return events

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit all requests; keep every idle group's next step in the pipeline; stream events in order."""
        for request in requests:
            self.submit(request)
        in_flight: deque[tuple[int, list[tuple[_Sequence, Chunk]]]] = deque()
        while self.has_work or in_flight:
            events, self._refused = self._refused, []
            yield from events
            self._admit()
            busy = {group for group, _ in in_flight}
            for group in range(self.groups):
                if group in busy:
                    continue
                plan = self._plan(group)
                if plan:
                    step = pack([chunk for _, chunk in plan], self.cache.block_size, self.device)
                    self.client.submit(step)
                    in_flight.append((group, plan))
            if not in_flight:
                if self.waiting and not self.running:
                    raise DistributedError("requests are waiting but none can be admitted")
                continue
            _, plan = in_flight.popleft()
            yield from self._complete(plan, self.client.collect())


@dataclass
class PipelinedGenerator(Generator):
    """Generator over a PipelineClient, with micro-batches in flight (one per stage unless told)."""

    micro_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        client = self.model
        assert isinstance(client, PipelineClient)
        groups = self.micro_batches or len(client.split.stages)
        self.engine = MicroBatchEngine(client, self.cache_config, client.max_context, sorted(self.engine.eos_ids),
                                       self.engine.decode, self.max_tokens_per_step, groups)


# ----------------------------------------------------------------------------------------------
# Commands on launched ranks (`hfrewrite compile|generate|bench MODEL --pp N`)


def run_command(args: argparse.Namespace, options: Any) -> int:
    """One launched rank of a --pp command: build this rank's stage; drive (stage 0) or serve (the others)."""
    from .sources import resolve
    from .weights import load_weights

    layout, tp_group = join_pipeline(options.pp, options.tp, pick_device(options.device))
    source = resolve(args.model, progress=options.progress)

    def from_checkpoint(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype,
                        slicer: Callable | None = None) -> dict:
        return load_weights(source.directory, specs, tied, device, dtype, slicer=slicer, progress=options.progress)

    timings: dict[str, float] = {}
    model, report = build_pipeline(source.config, from_checkpoint, options, timings, layout)
    if isinstance(model, PipelineServer):
        return model.serve()
    code = 2
    try:
        if args.command == "compile":
            code = _drive_compile(args, options, source, model, report, timings, tp_group)
        elif args.command == "generate":
            code = _drive_generate(args, source, model, tp_group)
        else:
            code = _drive_bench(args, model)
    finally:
        model.close(code)
    return code


def _drive_compile(args: argparse.Namespace, options: Any, source: Any, model: PipelineClient,
                   report: RewriteReport, timings: dict[str, float], tp_group: Any) -> int:
    from .pipeline import CompileResult, reference_model
    from .report import compile_report, format_compile_report, save_artifact
    from .verify import verify

    result = CompileResult(source, model, report, timings)
    if options.verify:
        with _timed(timings, "verify"):
            reference = reference_model(source, model.device, model.dtype, progress=options.progress) \
                if model.layout.rank == 0 else None
            outcome = verify(model, reference, seed=options.verify_seed)
            if tp_group is not None:
                box = [outcome]
                dist.broadcast_object_list(box, src=0, group=tp_group)
                outcome = box[0]
            result.verification = outcome
    printed = compile_report(result)
    if args.save:
        save_artifact(result, printed, args.save)
    print(json.dumps(printed) if args.json else format_compile_report(printed))
    verification = result.verification
    return 1 if verification is not None and not verification.passed else 0


def _shared_seed(tp_group: Any) -> int:
    seed = [int(torch.randint(0, 2**31 - 1, (1,)).item())]
    if tp_group is not None:
        dist.broadcast_object_list(seed, src=0, group=tp_group)
    return seed[0]


def _drive_generate(args: argparse.Namespace, source: Any, model: PipelineClient, tp_group: Any) -> int:
    from .generation import ByteTokenizer, encode_prompt
    from .runtime.sampling import SamplingParams
    from .sources import load_tokenizer

    tokenizer = load_tokenizer(source) or ByteTokenizer(int(model.config.vocab_size))
    prompts = [encode_prompt(tokenizer, p, chat=not args.no_chat_template) for p in args.prompt]
    seed = args.seed if args.seed is not None or args.temperature <= 0 else _shared_seed(tp_group)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=seed, stop=tuple(args.stop))
    generator = PipelinedGenerator(model, tokenizer, CacheConfig(args.block_size, args.num_blocks))
    texts: dict[int, str] = {}
    failed = False
    single = len(prompts) == 1
    for event in generator.stream(prompts, params):
        if event.error is not None:
            print(f"error: {event.error}", file=sys.stderr)
            failed = True
            continue
        texts[event.request_id] = texts.get(event.request_id, "") + event.text
        if single:
            print(event.text, end="", flush=True)
        elif event.finished:
            print(f"[{event.request_id}] {args.prompt[event.request_id]!r}\n{texts[event.request_id]}\n", flush=True)
    if single:
        print()
    return 2 if failed else 0


def _drive_bench(args: argparse.Namespace, model: PipelineClient) -> int:
    """Micro-batched generation throughput (tokens/s of wall time, prefill included), per batch size."""
    from .runtime.sampling import SamplingParams

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    block_size = 16
    per_seq = -(-(args.prompt_len + args.new_tokens) // block_size)
    cache = CacheConfig(block_size, per_seq * max(sizes) + 1)
    generator = PipelinedGenerator(model, None, cache, max_tokens_per_step=max(512, args.prompt_len * max(sizes)))
    vocab = int(model.config.vocab_size)
    warm = torch.randint(0, vocab, (max(sizes), args.prompt_len), generator=torch.Generator().manual_seed(1))
    for batch in sorted(set(sizes)):
        generator.generate_ids(warm[:batch].tolist(), SamplingParams(max_new_tokens=3, ignore_eos=True))
    prompts = torch.randint(0, vocab, (max(sizes), args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for batch in sizes:
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        generator.generate_ids(prompts[:batch].tolist(), params)
        seconds = time.perf_counter() - start
        rows.append({"model": args.model, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "pp": len(model.split.stages), "layer_counts": model.split.layer_counts,
                     "hfrewrite_tok_s": round(batch * args.new_tokens / seconds, 2), "device": str(model.device)})
    print(json.dumps(rows) if args.json else "\n".join(str(row) for row in rows))
    return 0
