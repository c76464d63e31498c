"""The one engine loop of a server: a thread that owns the model, between HTTP handlers and the Engine.

Handlers `submit` and `abort` from the asyncio side; the thread applies those commands between steps,
runs a step while there is work, and hands each event to its request's asyncio queue through
`call_soon_threadsafe`. A step that raises fails the requests in it (logged with its traceback); the
loop goes on. `stop` lets the requests in flight finish, then ends the thread.

Under tensor parallelism the other ranks run `follow`: rank 0's loop sends them every batch of
commands (`sync`), so each rank's Engine admits, aborts and steps exactly as rank 0's does.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from hfrewrite.errors import HfRewriteError
from hfrewrite.runtime.engine import REQUEST_FAILURES, Engine, Event, Request
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.serve.metrics import ServerMetrics

log = logging.getLogger("hfrewrite.serve")
IDLE_SYNC_S = 1.0   # an idle rank 0 still tells the other ranks it is alive this often


class QueueFull(HfRewriteError):
    """More requests are waiting than the server queues (--max-queue)."""


@dataclass
class Handle:
    """One sequence a client waits for: its events arrive on `events` as (index, Event) pairs."""

    request_id: str                       # the server's id (logged; "cmpl-..."), shared by the n choices
    index: int                            # the choice index within its HTTP request
    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    aloop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    engine_id: int | None = None
    last_token: float | None = None
    tokens: int = 0
    started: bool = False                 # an event came (it left the queue)
    finished: bool = False
    source: Any = None                    # the engine request's input source (a VLM prompt's images), if any
    # n choices of one prompt share one source: its vision features are computed once

    def deliver(self, event: Event) -> None:
        if not self.aloop.is_closed():
            self.aloop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


Command = tuple[str, object]   # ("submit", (prompt_ids, params, source)) | ("abort", engine_id) | ("stop", None)


class EngineLoop:
    """Runs `engine` on its own thread for the handlers of one server."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int,
                 sync: Callable[[list[Command]], list[Command]] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.sync = sync
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0                 # submitted, not yet admitted by the engine (guarded by _lock)
        self._handles: dict[int, Handle] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hfrewrite-engine", daemon=True)
        self._peak = 0

    # ----------------------------------------------------------------------------------------------
    # the asyncio side

    def start(self) -> None:
        self._thread.start()

    def submit(self, handles: list[Handle]) -> None:
        """Queue all of one HTTP request's sequences, or none of them (QueueFull)."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._queued + len(handles) > self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the server's queue is full ({self._queued} requests waiting, --max-queue "
                                f"{self.max_queue}); retry later")
            self._queued += len(handles)
        for handle in handles:
            self._commands.put(("submit", handle))

    def abort(self, handle: Handle) -> None:
        """End a sequence at the next step (its client went away); its blocks come back."""
        if not handle.finished:
            self._commands.put(("abort", handle))

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is in flight, then end the thread."""
        with self._lock:
            self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ----------------------------------------------------------------------------------------------
    # the engine thread

    def _take(self, block: bool) -> list:
        items = []
        try:
            items.append(self._commands.get(timeout=IDLE_SYNC_S if self.sync else None) if block
                         else self._commands.get_nowait())
        except queue.Empty:
            return items
        while True:
            try:
                items.append(self._commands.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        stop = False
        while not (stop and not self.engine.has_work):
            items = self._take(block=not self.engine.has_work and not stop)
            commands: list[Command] = []
            next_id = self.engine._next_id
            for kind, item in items:
                if kind == "stop":
                    stop = True
                elif kind == "submit":
                    if self.sync is not None and not item.params.greedy and item.params.seed is None:
                        item.params = replace(item.params, seed=random.randrange(2**31))  # every rank samples alike
                    commands.append(("submit", (item.prompt_ids, item.params, item.source)))
                    item.engine_id, next_id = next_id, next_id + 1   # the engine numbers requests in order
                    self._handles[item.engine_id] = item
                    log.debug("%s[%d] queued as engine request %d", item.request_id, item.index, item.engine_id)
                elif item.engine_id in self._handles:
                    commands.append(("abort", item.engine_id))
            if self.sync is not None:
                self.sync(commands)
            apply(self.engine, commands)
            if self.engine.has_work:
                self._step()
            self._gauges()
        if self.sync is not None:
            self.sync([("stop", None)])

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except REQUEST_FAILURES as error:  # a failed forward fails its requests, not the server
            log.exception("engine step failed; failing its %d running requests", len(self.engine.running))
            events = [Event(seq.request.request_id, finished=True, finish_reason="error", error=error)
                      for seq in self.engine.running]
            for event in events:
                self.engine.abort(event.request_id)   # their "abort" events find no handle: already failed
        sampled = len({event.request_id for event in events if event.token_id is not None})
        self.metrics.steps.inc()
        if sampled:
            self.metrics.batch.observe(sampled)
            self._peak = max(self._peak, sampled)
            self.metrics.peak_batch.set(self._peak)
        now = time.perf_counter()
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue
            if not handle.started:
                self._started(handle)
            if event.token_id is not None:
                self._timing(handle, now)
            if event.finished:
                self._finish(handle, event, now)
            handle.deliver(event)

    def _started(self, handle: Handle) -> None:
        """Its first event: it no longer counts against --max-queue."""
        handle.started = True
        with self._lock:
            self._queued -= 1
        self.metrics.prompt_tokens.inc(len(handle.prompt_ids))

    def _timing(self, handle: Handle, now: float) -> None:
        if handle.last_token is None:
            self.metrics.ttft.observe(now - handle.arrival)
        else:
            self.metrics.itl.observe(now - handle.last_token)
        handle.last_token = now
        handle.tokens += 1
        self.metrics.generation_tokens.inc()

    def _finish(self, handle: Handle, event: Event, now: float) -> None:
        handle.finished = True
        del self._handles[event.request_id]
        self.metrics.finished.labels(event.finish_reason or "unknown").inc()
        self.metrics.e2e.observe(now - handle.arrival)
        level = logging.WARNING if event.error is not None else logging.INFO
        log.log(level, "%s[%d] finished: %s, %d prompt + %d generated tokens in %.3fs%s", handle.request_id,
                handle.index, event.finish_reason, len(handle.prompt_ids), handle.tokens, now - handle.arrival,
                f" ({event.error})" if event.error is not None else "")

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.engine.running))
        with self._lock:
            self.metrics.waiting.set(self._queued)
        self.metrics.blocks_used.set(self.engine.allocator.num_blocks - self.engine.allocator.free_blocks)


def apply(engine: Engine, commands: list[Command]) -> None:
    """Submit and abort on `engine`, in order (rank 0 and its followers alike)."""
    for kind, payload in commands:
        if kind == "submit":
            prompt_ids, params, source = payload
            engine.submit(Request(list(prompt_ids), params, source=source))
        elif kind == "abort":
            engine.abort(payload)


def follow(engine: Engine, sync: Callable[[list[Command]], list[Command]]) -> None:
    """A non-zero rank under --tp: apply rank 0's commands and step when it steps, until it stops."""
    while True:
        commands = sync([])
        if any(kind == "stop" for kind, _ in commands):
            return
        apply(engine, commands)
        if engine.has_work:
            engine.step()
