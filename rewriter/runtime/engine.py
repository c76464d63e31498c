"""The generation loop: admit requests, pack prefill chunks and decode tokens, sample, stream, stop.

A request is admitted when the blocks for its prompt plus max_new_tokens are free (otherwise it
waits); a request that could never fit, or whose prompt is over the context, is refused on its own
with a RequestError event while the others go on.

Steps go through a `StepExecutor`: submit a packed step, later collect its logits, oldest first. A
plain forward function runs each step at once (`Immediate`); a pipeline keeps several steps in
flight. With `micro_batches` > 1 the running sequences are dealt into that many groups, each with at
most one step in flight, so the stages of a pipeline all have work while decoding; admission,
scheduling, sampling and finishing are the same code either way.

Text is decoded incrementally (constant work per token): only a window of recent tokens is decoded,
the text of the window's older part is subtracted (the prefix-offset technique), and stop strings are
searched only in the newly decoded text plus the few characters before it a stop string can span.
`abort` ends a request between steps and frees its blocks at once.

The engine is kind-agnostic: a request may carry an input `source` (a vision-language prompt's
embeddings and positions, hfrewrite.runtime.multimodal), handed to the forward on each chunk of that
request (`SourcedChunk`); the forward's own `prepare` builds a step's inputs from it, and its `chunk_end`
may move the end of a prefill chunk of it (Gemma 3: never inside an image). A request without one is its ids.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from hfrewrite.errors import HfRewriteError, RequestError

from hfrewrite.runtime.step import Chunk, PackedStep, pack
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.runtime.device_sampling import DrawState, PendingTokens, draw_rows, make_generator
from hfrewrite.runtime.sampling import SamplingParams, logprobs
from hfrewrite.runtime.text import IncrementalText, stop_prefix
from hfrewrite.runtime.requests import Event, Request, SourcedChunk

__all__ = ["Engine", "Event", "Immediate", "Request", "SourcedChunk", "StepExecutor"]

ForwardFn = Callable[..., torch.Tensor]
# What running one step's data can raise (our errors, torch's RuntimeError incl. out-of-memory, bad values or
# indices, undecodable text): with isolate_errors these fail the requests involved; anything else propagates.
REQUEST_FAILURES = (HfRewriteError, RuntimeError, ValueError, TypeError, IndexError, KeyError, UnicodeError)


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
class _Sequence:
    request: Request
    blocks: list[int]
    generator: DrawState | None      # None: greedy
    generated: list[int] = field(default_factory=list)
    cached: int = 0                 # tokens whose K/V are in the cache
    group: int = 0                  # the micro-batch it is scheduled in
    text: IncrementalText | None = None
    tail: str = ""                  # the last stable characters (as many as a stop string can reach back)
    held: int = 0                   # characters at the end of `tail` not emitted yet (a stop string may begin there)
    done: bool = False              # finished or aborted: rows of it still in flight are dropped

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    def chunk(self, start: int, end: int) -> Chunk:
        """Tokens start..end-1 as a chunk of this sequence (with its request's input source, if any)."""
        if self.request.source is None:
            return Chunk(self.tokens(start, end), start, self.blocks)
        return SourcedChunk(self.tokens(start, end), start, self.blocks, self.request.source)

    def fed_chunk(self) -> Chunk:
        """The next decode token as a chunk whose id is a stand-in (0), fed on the device (lookahead), with the
        request's input source, if any (a VLM's runner reads the token's rope delta from it)."""
        if self.request.source is None:
            return Chunk([0], self.cached, self.blocks)
        return SourcedChunk([0], self.cached, self.blocks, self.request.source)

    def tokens(self, start: int, end: int) -> list[int]:
        """(prompt + generated)[start:end], without building the whole list (a decode step reads one token)."""
        prompt = self.request.prompt_ids
        if start >= len(prompt):
            return self.generated[start - len(prompt):end - len(prompt)]
        return (prompt + self.generated)[start:end]


Plan = list[tuple[_Sequence, Chunk]]


class Engine:
    """Continuous batching over a compiled model's forward(step) -> logits of each sequence's last token,
    or over a StepExecutor that keeps up to `micro_batches` steps in flight."""

    def __init__(self, forward: ForwardFn | StepExecutor, cache: CacheConfig, device: torch.device, max_context: int,
                 eos_ids: Sequence[int] = (), decode: Callable[[list[int]], str] | None = None,
                 max_tokens_per_step: int = 512, micro_batches: int = 1, max_running: int | None = None,
                 isolate_errors: bool = False, lookahead: bool | None = None) -> None:
        """`max_running` caps the sequences running at once (None: only the cache does); with `isolate_errors`
        (a server) an exception while sampling or decoding one request fails that request alone. With
        `lookahead` (default: on a device other than the CPU, when the runner can feed device tokens) a decode
        step's successor is launched, fed the tokens just drawn on the device, before the host reads them."""
        self.executor = forward if isinstance(forward, StepExecutor) else Immediate(forward)
        # how a step's chunks become what the executor runs: a runner may write decode steps straight into its
        # captured graphs' inputs (DeviceGraphRunner.prepare); otherwise they are packed
        self.prepare: Callable[[list[Chunk]], object] = (
            getattr(forward, "prepare", None) or (lambda chunks: pack(chunks, cache.block_size, device)))
        # a runner's prepare_fed(chunks, device_tokens) stages a decode step whose input ids are on the device
        self.prepare_fed: Callable[[list[Chunk], torch.Tensor], object | None] | None = (
            getattr(forward, "prepare_fed", None))
        self.chunk_end = getattr(forward, "chunk_end", None)   # (source, start, end) -> a legal prefill end
        self.lookahead = self.prepare_fed is not None and (device.type != "cpu" if lookahead is None else lookahead)
        self.lookahead_steps = 0                             # steps launched before their input tokens were read
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
        self.max_running = max_running
        self.isolate_errors = isolate_errors
        self.steps = 0                                       # forwards collected
        self.in_flight: deque[tuple[int, Plan]] = deque()   # (group, plan) of each submitted step, oldest first
        self.peak_in_flight = 0
        self.allocator = BlockAllocator(cache.num_blocks)
        self.waiting: list[Request] = []
        self.running: list[_Sequence] = []
        self._next_id = 0
        self._refused: list[Event] = []

    def refusal(self, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a request of this size can never run (None when it can)."""
        needed = prompt_tokens + max_new_tokens
        if prompt_tokens < 1:
            return "the prompt is empty"
        if max_new_tokens < 1:
            return f"max_new_tokens={max_new_tokens}; it must be at least 1"
        if needed > self.max_context:
            return (f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} is over the model's "
                    f"context of {self.max_context}")
        if self.cache.blocks_for(needed) > self.cache.num_blocks:
            return (f"prompt plus max_new_tokens needs {self.cache.blocks_for(needed)} KV blocks of "
                    f"{self.cache.block_size} tokens; the cache has only {self.cache.num_blocks} "
                    f"(raise --num-blocks or lower --max-new-tokens)")
        return None

    def submit(self, request: Request) -> int:
        request.request_id = self._next_id
        self._next_id += 1
        why = self.refusal(len(request.prompt_ids), request.params.max_new_tokens)
        if why is not None:
            self._refuse(request, why)
        else:
            self.waiting.append(request)
        return request.request_id

    def abort(self, request_id: int) -> bool:
        """End a waiting or running request now: its blocks are free, and the next step reports it finished
        with reason "abort". False when it is not (or no longer) here."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                break
        else:
            found = [seq for seq in self.running if seq.request.request_id == request_id]
            if not found:
                return False
            self._release(found[0])
        self._refused.append(Event(request_id, finished=True, finish_reason="abort"))
        return True

    def _release(self, seq: _Sequence) -> None:
        seq.done = True
        self.allocator.free(seq.blocks)
        self.running.remove(seq)

    def _refuse(self, request: Request, why: str) -> None:
        error = RequestError(f"request {request.request_id} refused: {why}")
        self._refused.append(Event(request.request_id, finished=True, finish_reason="error", error=error))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._refused)

    def _admit(self) -> None:
        while self.waiting and (self.max_running is None or len(self.running) < self.max_running):
            request = self.waiting[0]
            count = self.cache.blocks_for(len(request.prompt_ids) + request.params.max_new_tokens)
            if not self.allocator.can_allocate(count):
                return  # waits until running requests finish and free their blocks
            self.waiting.pop(0)
            sizes = [sum(1 for seq in self.running if seq.group == g) for g in range(self.micro_batches)]
            text = None if self.decode is None else IncrementalText(self.decode)
            self.running.append(_Sequence(request, self.allocator.allocate(count), make_generator(request.params),
                                          group=sizes.index(min(sizes)), text=text))  # smallest group, lowest on ties

    def _schedule(self, group: int = 0) -> Plan:
        """One group's step: decode tokens first (one per sequence), then prefill chunks within the token budget."""
        budget = self.max_tokens_per_step
        members = [seq for seq in self.running if seq.group == group]
        plan: Plan = []
        for seq in members:
            if seq.length - seq.cached == 1:
                plan.append((seq, seq.chunk(seq.cached, seq.length)))
                budget -= 1
        for seq in members:
            pending = seq.length - seq.cached
            if pending > 1 and budget > 0:
                end = seq.cached + min(pending, budget)
                if self.chunk_end is not None and seq.request.source is not None:  # never inside an image
                    end = self.chunk_end(seq.request.source, seq.cached, end)
                plan.append((seq, seq.chunk(seq.cached, end)))
                budget -= end - seq.cached
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
                self.executor.submit(self.prepare([chunk for _, chunk in plan]))
                self.in_flight.append((group, plan))
        self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
        if not self.in_flight:
            return events
        _, plan = self.in_flight.popleft()
        logits = self.executor.collect()
        self.steps += 1
        ready: list[tuple[int, _Sequence]] = []
        for row, (seq, chunk) in enumerate(plan):
            if seq.done:
                continue  # aborted while this step was in flight
            seq.cached += len(chunk.tokens)
            if seq.cached < seq.length:
                continue  # mid-prompt chunk: nothing to sample yet
            ready.append((row, seq))
        drawn = self._draw(logits, ready)
        if self.lookahead and isinstance(drawn, PendingTokens):
            self._launch_next(plan, ready, drawn.device)
        for (row, seq), token in zip(ready, self._read(drawn)):
            event = self._event(seq, token, logits, row)
            events.append(event)
            if event.finished:
                self._release(seq)
        return events

    def _draw(self, logits: torch.Tensor, ready: list[tuple[int, _Sequence]]) -> PendingTokens | list[Exception]:
        """Every ready row's next token at once, on the device, its copy to the host started."""
        if not ready:
            return []
        if len(ready) < logits.shape[0]:
            chosen = logits.index_select(0, torch.tensor([row for row, _ in ready], device=logits.device))
        else:  # every row (a decode step): no index to build and copy
            chosen = logits
        params = [seq.request.params for _, seq in ready]
        if not self.isolate_errors:
            return PendingTokens.start(draw_rows(chosen, params, [seq.generator for _, seq in ready]))
        try:
            return PendingTokens.start(draw_rows(chosen, params, [seq.generator for _, seq in ready]))
        except REQUEST_FAILURES as error:  # a server fails the requests of this step, the loop goes on
            return [error] * len(ready)

    def _read(self, drawn: PendingTokens | list[Exception]) -> list[int | Exception]:
        """The drawn tokens on the host (waits for their copy: for this step's work only)."""
        if not isinstance(drawn, PendingTokens):
            return list(drawn)
        if not self.isolate_errors:
            return drawn.tolist()
        try:
            return drawn.tolist()
        except REQUEST_FAILURES as error:  # a device error shows when the copy is waited for
            return [error] * drawn.device.shape[0]

    def _launch_next(self, plan: Plan, ready: list[tuple[int, _Sequence]], tokens: torch.Tensor) -> None:
        """Launch the decode step after `plan`, fed `tokens` (drawn on the device, not read yet), so the host's
        reading, events and text run while the device computes it.

        Only when the next step is sure to be exactly this one's sequences decoding on: a pure decode step of
        every running sequence, nobody waiting, one micro-batch. A sequence that ends on the token just drawn
        (eos, a stop string) still gets its row computed; its result is dropped (it is `done` when the step is
        collected), and the K/V it writes lands in its own blocks at a position they hold, before any later
        step can reuse those blocks. A sequence at its last token is left out.
        """
        if (self.micro_batches != 1 or self.waiting or self.in_flight or len(ready) != len(plan)
                or any(len(chunk.tokens) != 1 for _, chunk in plan)
                or len(self.running) != len(ready)):
            return
        keep = [i for i, (_, seq) in enumerate(ready) if len(seq.generated) + 1 < seq.request.params.max_new_tokens]
        if not keep:
            return
        sequences = [ready[i][1] for i in keep]
        chunks = [seq.fed_chunk() for seq in sequences]
        if len(keep) < len(ready):
            tokens = tokens.index_select(0, torch.tensor(keep, device=tokens.device))
        staged = self.prepare_fed(chunks, tokens)
        if staged is None:   # not a shape the runner can feed (e.g. over its largest captured batch)
            return
        self.executor.submit(staged)
        self.in_flight.append((0, list(zip(sequences, chunks))))
        self.lookahead_steps += 1

    def _event(self, seq: _Sequence, token: int | Exception, logits: torch.Tensor, row: int) -> Event:
        """The next token's event; with isolate_errors a failure becomes that request's error event."""
        if isinstance(token, Exception):
            return Event(seq.request.request_id, finished=True, finish_reason="error", error=token)
        if not self.isolate_errors:
            return self._append(seq, token, logits, row)
        try:
            return self._append(seq, token, logits, row)
        except REQUEST_FAILURES as error:  # a server fails the one request, the others go on
            return Event(seq.request.request_id, finished=True, finish_reason="error", error=error)

    def _append(self, seq: _Sequence, token: int, logits: torch.Tensor, row: int) -> Event:
        seq.generated.append(token)
        params = seq.request.params
        event = Event(seq.request.request_id, token_id=token)
        if params.logprobs is not None:  # logits[row] only here: a view per row costs host time on every step
            event.logprob, event.top_logprobs = logprobs(logits[row], params, token)
        if token in self.eos_ids and not params.ignore_eos:
            event.finished, event.finish_reason = True, "eos"
        elif len(seq.generated) >= params.max_new_tokens:
            event.finished, event.finish_reason = True, "length"
        if seq.text is not None:
            self._text(seq, event)
        return event

    def _text(self, seq: _Sequence, event: Event) -> None:
        """The event's text delta: stop strings end it; while it goes on, a half character and a tail that
        may grow into a stop string are held back."""
        stops = [s for s in seq.request.params.stop if s]
        stable, pending = seq.text.add(seq.generated)
        window = seq.tail + stable + pending       # all text a new stop string can lie in
        emitted = len(seq.tail) - seq.held          # window[:emitted] went out in earlier events
        hits = [window.find(s) for s in stops if s in window]
        if hits:
            event.finished, event.finish_reason = True, "stop"
            event.text = window[emitted:max(emitted, min(hits))]
        elif event.finished:
            event.text = window[emitted:]
        else:
            stable_window = seq.tail + stable
            seq.held = stop_prefix(stable_window, stops)
            event.text = stable_window[emitted:len(stable_window) - seq.held]
            reach = max((len(s) for s in stops), default=1) - 1   # a stop string reaches this far back
            seq.tail = stable_window[max(0, len(stable_window) - max(reach, seq.held)):]

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit all requests and stream events until every one has finished."""
        for request in requests:
            self.submit(request)
        while self.has_work:
            yield from self.step()
