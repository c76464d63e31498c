"""The two ends of a pipeline ring: stage 0 drives (`PipelineClient`), every later stage serves.

The ranks of stage 0 schedule, pack, run stage 0 and sample; they look like a CompiledModel
(`forward`), and like a StepExecutor (`submit`/`collect`) so the runtime Engine keeps one
micro-batch per stage in flight. The others (`PipelineServer`) receive a step, run their stage and
send it on; the last stage sends the logits back. Every rank keeps the KV cache of its own layers.
Control messages (new cache, stop, error) take the same ring as the steps, so every rank sees steps
and cache changes in the same order, and an error on any stage travels on to the driver, which
raises it; every rank then ends.
"""
from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from hfrewrite.parallel import distributed
from hfrewrite.parallel.distributed import DistributedError
from hfrewrite.parallel.layout import ParallelLayout
from hfrewrite.engine.origin import add_note
from hfrewrite.errors import HfRewriteError
from hfrewrite.parallel.pp.link import CACHE, ERROR, KINDS, STEP, STOP, Link, Message, decode_step, encode_step, \
    text_vector
from hfrewrite.parallel.pp.stage import CompiledStage, logits_dtype
from hfrewrite.runtime.step import PackedStep
from hfrewrite.runtime.kv_cache import CacheConfig, KVCache
from hfrewrite.parallel.pp.split import StageSplit

# What a failing stage can raise while it computes (compile errors are RuntimeErrors too): these are
# reported along the ring and end every rank; anything else ends the rank and the launcher stops the rest.
# On the failing rank only our own errors become a DistributedError; any other keeps its traceback,
# with a note naming the stage.
_GRACE = datetime.timedelta(seconds=5)  # how long a failing driver waits for the ring to stop
STAGE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError, NotImplementedError,
                HfRewriteError)


def _links(split: StageSplit, stage: CompiledStage, layout: ParallelLayout) -> tuple[Link, Link]:
    """(from the previous rank, to the next rank) for this rank's stage; logits [R, V] close the ring."""
    index, last = layout.stage, len(split.stages) - 1
    logits = [(logits_dtype(split, stage.dtype), 2)]
    incoming = [(v.dtype, len(v.shape)) for v in split.stages[index - 1].sends] if index > 0 else logits
    outgoing = [(v.dtype, len(v.shape)) for v in split.stages[index].sends] if index < last else logits
    source = f"stage {index} (rank {layout.rank})"
    timeout = distributed.timeout()
    return (Link(layout.previous, incoming, layout.device, timeout, source),
            Link(layout.next, outgoing, layout.device, timeout, source))


def _failure(stage: CompiledStage, layout: ParallelLayout, sequence: int, error: Exception) -> str:
    """The message every rank ends with when a stage fails: which stage, rank, layers and step, and why."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    layers = stage.stage.layer_text() if stage.stage is not None else "?"
    return (f"pipeline stage {layout.stage} (rank {layout.rank}, layers {layers}) failed on step {sequence}: "
            f"{type(error).__name__}: {first_line}")


def _raise_stage_error(error: Exception, text: str) -> NoReturn:
    """Our own error as the one-paragraph DistributedError `text`; any other error re-raised with `text` as a note."""
    if isinstance(error, HfRewriteError):
        raise DistributedError(text) from error
    add_note(error, text)
    raise error


def connect(split: StageSplit, stage: CompiledStage, layout: ParallelLayout, config: Any,
            total_parameters: int) -> PipelineClient | PipelineServer:
    """This rank's end of the ring: a client on stage 0, a server elsewhere."""
    incoming, outgoing = _links(split, stage, layout)
    if layout.driver:
        return PipelineClient(split, stage, layout, outgoing, incoming, config, total_parameters)
    return PipelineServer(stage, layout, incoming, outgoing, len(split.stages))


@dataclass
class PipelineServer:
    """A rank of stage > 0: receive, run the stage, send on, until told to stop."""

    stage: CompiledStage
    layout: ParallelLayout
    incoming: Link
    outgoing: Link
    stages: int
    cache: KVCache | None = None

    def serve(self) -> int:
        """Serve until a stop arrives; its exit code (0, or 1 for a failed verification) is returned.

        A stop after an error on the driver (code >= 2), or an error from an earlier stage, is raised
        as a DistributedError after being passed on, so every rank ends.
        """
        while True:
            message = self.incoming.recv()
            if message.kind == STEP:
                self._step(message)
            elif message.kind == CACHE:
                block_size, num_blocks = message.descriptor.tolist()
                self.cache = self.stage.new_cache(CacheConfig(block_size, num_blocks))
                self.outgoing.send(CACHE, message.sequence, message.descriptor)
            elif message.kind == STOP:
                self._pass_on(message)
                code = int(message.descriptor[0]) if message.descriptor.numel() else 0
                if code >= 2:
                    raise DistributedError(f"stage {self.layout.stage} (rank {self.layout.rank}) stopped: the driver "
                                           f"rank failed (its error is reported by rank 0)")
                return code
            else:
                self._pass_on(message)
                raise DistributedError(message.text())

    def _pass_on(self, message: Message) -> None:
        self.outgoing.send(message.kind, message.sequence, message.descriptor)
        self.outgoing.flush()

    def _step(self, message: Message) -> None:
        index = self.layout.stage
        try:
            if self.cache is None:
                raise DistributedError(f"stage {index} got step {message.sequence} before any KV cache was made")
            step, rows = decode_step(message.descriptor, self.layout.device)
            out = self.stage.run(step, self.cache, message.tensors, rows)
        except STAGE_ERRORS as error:
            text = _failure(self.stage, self.layout, message.sequence, error)
            self._pass_on(Message(ERROR, message.sequence, text_vector(text), []))
            _raise_stage_error(error, text)
        if index == self.stages - 1:
            assert isinstance(out, torch.Tensor)
            self.outgoing.send(STEP, message.sequence, torch.empty(0, dtype=torch.int64), [out])
        else:
            self.outgoing.send(STEP, message.sequence, message.descriptor, out)


@dataclass
class PipelineClient:
    """Stage 0 on a driver rank, with the CompiledModel interface; the later stages are reached over the ring.

    `forward` is synchronous (verify and the plain Engine use it); `submit`/`collect` keep several
    steps in flight (the Engine with micro-batches). Steps come back in the order they were submitted.
    """

    split: StageSplit
    stage: CompiledStage
    layout: ParallelLayout
    outgoing: Link
    incoming: Link
    config: Any
    total_parameters: int
    _cache: KVCache | None = None
    _sequence: int = 0
    _in_flight: deque[int] = field(default_factory=deque)
    closed: bool = False
    failed: bool = False

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stage.dtype

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

    def parameter_count(self) -> int:
        """The whole model's parameters (this rank holds only stage 0's: `stage.parameter_count()`)."""
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
            text = _failure(self.stage, self.layout, self._sequence, error)
            self._fail(text)
            _raise_stage_error(error, text)
        assert isinstance(out, list)
        self.outgoing.send(STEP, self._sequence, encode_step(step, rows), out)
        self._in_flight.append(self._sequence)
        return self._sequence

    def collect(self) -> torch.Tensor:
        """The logits [R, V] of the oldest step in flight."""
        sequence = self._in_flight.popleft()
        return self._expect(STEP, sequence).tensors[0]

    @torch.no_grad()
    def forward(self, step: PackedStep, cache: Any = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, V] of one step through every stage (the cache argument is the handle new_cache gave)."""
        self.submit(step, rows)
        return self.collect()

    def _expect(self, kind: int, sequence: int) -> Message:
        message = self.incoming.recv()
        if message.kind == ERROR:
            self.failed = True  # the error went around the ring: every stage has stopped
            raise DistributedError(message.text())
        if message.kind != kind or message.sequence != sequence:
            raise DistributedError(f"pipeline out of order: expected {KINDS[kind]} {sequence}, got "
                                   f"{KINDS[message.kind]} {message.sequence}")
        return message

    def _fail(self, text: str) -> None:
        """Send an error around the ring and wait briefly for it to come back: then every stage has stopped."""
        self.failed = True  # no stop message after the error
        self.outgoing.send(ERROR, self._sequence, text_vector(text))
        try:
            while self.incoming.recv(_GRACE).kind != ERROR:  # steps still in flight come back first
                continue
        except DistributedError:
            return  # a stage that is gone or hangs: the launcher, or the receive timeouts, end the rest

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
            self.outgoing.flush(_GRACE)
            return
        while self._in_flight:
            self.collect()
        self._expect(STOP, self._sequence)
        self.outgoing.flush()
