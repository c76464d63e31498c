"""The generation loop: admit requests, pack prefill chunks and decode tokens, sample, stream, stop.

A request is admitted when the blocks for its prompt plus max_new_tokens are free (otherwise it
waits); a request that could never fit, or whose prompt is over the context, is refused on its own
with a RequestError event while the others go on.

Steps go through a `StepExecutor`: submit a packed step, later collect its logits, oldest first. A
plain forward function runs each step at once (`Immediate`); a pipeline keeps several steps in
flight. With `micro_batches` > 1 the running sequences are dealt into that many groups, each with at
most one step in flight, so the stages of a pipeline all have work while decoding; admission,
scheduling, sampling and finishing are the same code either way.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from hfrewrite.errors import RequestError

from hfrewrite.runtime.step import Chunk, PackedStep, pack
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.runtime.sampling import SamplingParams, make_generator, sample

ForwardFn = Callable[..., torch.Tensor]


@runtime_checkable
class StepExecutor(Protocol):
    """Runs packed steps, possibly several at once: `collect` returns the logits of the oldest one submitted."""

    def submit(self, step: PackedStep) -> object: ...

    def collect(self) -> torch.Tensor: ...


@dataclass
class Immediate:
    """A forward function as a StepExecutor: each step runs when it is submitted."""

    forward: ForwardFn
    _done: deque[torch.Tensor] = field(default_factory=deque)

    def submit(self, step: PackedStep) -> None:
        self._done.append(self.forward(step))

    def collect(self) -> torch.Tensor:
        return self._done.popleft()


@dataclass
class Request:
    """One prompt (token ids) and how to continue it."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: int = -1


@dataclass
class Event:
    """What a step produced for one request: a token (and its text delta), the end, or an error."""

    request_id: int
    token_id: int | None = None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: RequestError | None = None


@dataclass
class _Sequence:
    request: Request
    blocks: list[int]
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    cached: int = 0                 # tokens whose K/V are in the cache
    emitted_text: str = ""
    group: int = 0                  # the micro-batch it is scheduled in

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.generated


Plan = list[tuple[_Sequence, Chunk]]


class Engine:
    """Continuous batching over a compiled model's forward(step) -> logits of each sequence's last token,
    or over a StepExecutor that keeps up to `micro_batches` steps in flight."""

    def __init__(self, forward: ForwardFn | StepExecutor, cache: CacheConfig, device: torch.device, max_context: int,
                 eos_ids: Sequence[int] = (), decode: Callable[[list[int]], str] | None = None,
                 max_tokens_per_step: int = 512, micro_batches: int = 1) -> None:
        self.executor = forward if isinstance(forward, StepExecutor) else Immediate(forward)
        self.cache = cache
        self.device = device
        self.max_context = max_context
        self.eos_ids = set(eos_ids)
        self.decode = decode
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step must be at least 1, got {max_tokens_per_step}")
        self.max_tokens_per_step = max_tokens_per_step
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.micro_batches = micro_batches
        self.in_flight: deque[tuple[int, Plan]] = deque()   # (group, plan) of each submitted step, oldest first
        self.peak_in_flight = 0
        self.allocator = BlockAllocator(cache.num_blocks)
        self.waiting: list[Request] = []
        self.running: list[_Sequence] = []
        self._next_id = 0
        self._refused: list[Event] = []

    def submit(self, request: Request) -> int:
        request.request_id = self._next_id
        self._next_id += 1
        needed = len(request.prompt_ids) + request.params.max_new_tokens
        if not request.prompt_ids:
            self._refuse(request, "the prompt is empty")
        elif request.params.max_new_tokens < 1:
            self._refuse(request, f"max_new_tokens={request.params.max_new_tokens}; it must be at least 1")
        elif needed > self.max_context:
            self._refuse(request, f"prompt of {len(request.prompt_ids)} tokens plus max_new_tokens="
                                  f"{request.params.max_new_tokens} is over the model's context of {self.max_context}")
        elif self.cache.blocks_for(needed) > self.cache.num_blocks:
            self._refuse(request, f"prompt plus max_new_tokens needs {self.cache.blocks_for(needed)} KV blocks of "
                                  f"{self.cache.block_size} tokens; the cache has only {self.cache.num_blocks} "
                                  f"(raise --num-blocks or lower --max-new-tokens)")
        else:
            self.waiting.append(request)
        return request.request_id

    def _refuse(self, request: Request, why: str) -> None:
        error = RequestError(f"request {request.request_id} refused: {why}")
        self._refused.append(Event(request.request_id, finished=True, finish_reason="error", error=error))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._refused)

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            count = self.cache.blocks_for(len(request.prompt_ids) + request.params.max_new_tokens)
            if not self.allocator.can_allocate(count):
                return  # waits until running requests finish and free their blocks
            self.waiting.pop(0)
            sizes = [sum(1 for seq in self.running if seq.group == g) for g in range(self.micro_batches)]
            self.running.append(_Sequence(request, self.allocator.allocate(count), make_generator(request.params),
                                          group=sizes.index(min(sizes))))  # the smallest group, lowest on ties

    def _schedule(self, group: int = 0) -> Plan:
        """One group's step: decode tokens first (one per sequence), then prefill chunks within the token budget."""
        budget = self.max_tokens_per_step
        members = [seq for seq in self.running if seq.group == group]
        plan: Plan = []
        for seq in members:
            pending = len(seq.all_ids) - seq.cached
            if pending == 1:
                plan.append((seq, Chunk(seq.all_ids[seq.cached:], seq.cached, seq.blocks)))
                budget -= 1
        for seq in members:
            pending = len(seq.all_ids) - seq.cached
            if pending > 1 and budget > 0:
                take = min(pending, budget)
                plan.append((seq, Chunk(seq.all_ids[seq.cached:seq.cached + take], seq.cached, seq.blocks)))
                budget -= take
        return plan

    def step(self) -> list[Event]:
        """Submit a step for every idle group, then finish the oldest step in flight; the events it produced.

        With one micro-batch this is one forward over everything schedulable.
        """
        events, self._refused = self._refused, []
        self._admit()
        busy = {group for group, _ in self.in_flight}
        for group in range(self.micro_batches):
            plan = [] if group in busy else self._schedule(group)
            if plan:
                self.executor.submit(pack([chunk for _, chunk in plan], self.cache.block_size, self.device))
                self.in_flight.append((group, plan))
        self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
        if not self.in_flight:
            return events
        _, plan = self.in_flight.popleft()
        logits = self.executor.collect()
        for row, (seq, chunk) in enumerate(plan):
            seq.cached += len(chunk.tokens)
            if seq.cached < len(seq.all_ids):
                continue  # mid-prompt chunk: nothing to sample yet
            token = sample(logits[row], seq.request.params, seq.generator)
            events.append(self._append(seq, token))
        finished = [seq for seq in self.running if seq.request.request_id in {e.request_id for e in events if e.finished}]
        for seq in finished:
            self.allocator.free(seq.blocks)
            self.running.remove(seq)
        return events

    def _append(self, seq: _Sequence, token: int) -> Event:
        seq.generated.append(token)
        params = seq.request.params
        event = Event(seq.request.request_id, token_id=token)
        text = None
        if self.decode is not None:
            text = self.decode(seq.generated)
            stop_at = min((text.find(s) for s in params.stop if s and s in text), default=-1)
            if stop_at >= 0:
                text = text[:stop_at]
                event.finished, event.finish_reason = True, "stop"
        if not event.finished:
            if token in self.eos_ids and not params.ignore_eos:
                event.finished, event.finish_reason = True, "eos"
            elif len(seq.generated) >= params.max_new_tokens:
                event.finished, event.finish_reason = True, "length"
        if text is not None:
            if not event.finished:
                # hold back half a UTF-8 character, and a tail that may grow into a stop string
                text = "" if text.endswith("\ufffd") else text[:len(text) - _stop_prefix(text, params.stop)]
            if len(text) > len(seq.emitted_text):
                event.text = text[len(seq.emitted_text):]
                seq.emitted_text = text
        return event

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit all requests and stream events until every one has finished."""
        for request in requests:
            self.submit(request)
        while self.has_work:
            yield from self.step()


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of a stop string (not yet emitted)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
