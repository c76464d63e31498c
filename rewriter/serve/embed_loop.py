"""The worker loop of an embedding server: one thread owns the model and runs the queued requests' texts
as packed prefill-only forwards (hfrewrite.runtime.embedding.Embedder).

Handlers `submit` a job and await its future; the thread takes every job waiting, packs all their
sequences into the fewest forwards (Embedder.max_tokens each), and gives each job its rows. A forward
that raises fails the jobs in it (logged with its traceback); the loop goes on. `stop` runs what is
queued, then ends the thread.

Under tensor parallelism the other ranks run `follow`: rank 0 sends them each batch before it runs it
(and a heartbeat while idle), so every rank runs the same forwards.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from hfrewrite.errors import HfRewriteError
from hfrewrite.runtime.embedding import Embedder
from hfrewrite.runtime.engine import REQUEST_FAILURES
from hfrewrite.serve.metrics import ServerMetrics

log = logging.getLogger("hfrewrite.serve")
IDLE_SYNC_S = 1.0   # an idle rank 0 still tells the other ranks it is alive this often

Command = tuple[str, Any]   # ("embed", (sequences, token_types)) | ("idle", None) | ("stop", None)
# texts -> (token ids, token type ids or None), as `hfrewrite embed` tokenizes (kinds.embedding.embedder_for)
Tokenize = Callable[[Sequence[str]], tuple[list[list[int]], list[list[int]] | None]]


class EmbeddingQueueFull(HfRewriteError):
    """More embedding requests are waiting than the server queues (--max-queue)."""


@dataclass
class EmbedJob:
    """One HTTP request's sequences; `future` gets their pooled vectors [S, H] (fp32, on the CPU)."""

    request_id: str
    ids: list[list[int]]
    token_types: list[list[int]] | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.ids)


class EmbeddingLoop:
    """Runs `embedder` on its own thread for the handlers of one server."""

    def __init__(self, embedder: Embedder, tokenize: Tokenize, takes_types: bool, metrics: ServerMetrics,
                 max_queue: int, sync: Callable[[Command], Command] | None = None) -> None:
        self.embedder = embedder
        self.tokenize = tokenize
        self.takes_types = takes_types      # the graph has a token_type_ids input (BERT)
        self.dimensions = int(embedder.model.config.get_text_config().hidden_size)
        self.metrics = metrics
        self.max_queue = max_queue
        self.sync = sync
        self.max_context = embedder.model.max_context
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0          # submitted, not yet taken by the thread (guarded by _lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hfrewrite-embed", daemon=True)

    # ----------------------------------------------------------------------------------------------
    # the asyncio side

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: EmbedJob) -> None:
        with self._lock:
            if self._stopping:
                raise EmbeddingQueueFull("the server is shutting down")
            if self._queued >= self.max_queue:
                self.metrics.rejected.inc()
                raise EmbeddingQueueFull(f"the server's queue is full ({self._queued} requests waiting, "
                                         f"--max-queue {self.max_queue}); retry later")
            self._queued += 1
            self.metrics.waiting.set(self._queued)
        self._jobs.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then end the thread."""
        with self._lock:
            self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ----------------------------------------------------------------------------------------------
    # the worker thread

    def _take(self) -> list[EmbedJob | None]:
        items = []
        try:
            items.append(self._jobs.get(timeout=IDLE_SYNC_S if self.sync else None))
        except queue.Empty:
            return items
        while True:
            try:
                items.append(self._jobs.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        stop = False
        while not stop:
            items = self._take()
            stop = any(item is None for item in items)
            jobs = [item for item in items if item is not None]
            with self._lock:
                self._queued -= len(jobs)
                self.metrics.waiting.set(self._queued)
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drop the cancelled
            if jobs:
                self._embed(jobs)
            elif self.sync is not None and not stop:
                self.sync(("idle", None))
        if self.sync is not None:
            self.sync(("stop", None))

    def _embed(self, jobs: list[EmbedJob]) -> None:
        sequences = [row for job in jobs for row in job.ids]
        types = None if jobs[0].token_types is None else [row for job in jobs for row in job.token_types]
        if self.sync is not None:
            self.sync(("embed", (sequences, types)))
        self.metrics.running.set(len(jobs))
        try:
            vectors = self.embedder.embed(sequences, types).cpu()
        except REQUEST_FAILURES as error:   # a failed forward fails its requests, not the server
            log.exception("embedding forward failed; failing its %d requests", len(jobs))
            for job in jobs:
                job.future.set_exception(error)
                self.metrics.finished.labels("error").inc()
            return
        finally:
            self.metrics.running.set(0)
        self.metrics.steps.inc()
        self.metrics.batch.observe(len(sequences))
        now, start = time.perf_counter(), 0
        for job in jobs:
            job.future.set_result(vectors[start:start + len(job.ids)])
            start += len(job.ids)
            self.metrics.prompt_tokens.inc(job.tokens)
            self.metrics.finished.labels("embedded").inc()
            self.metrics.e2e.observe(now - job.arrival)
            log.info("%s: embedded %d input(s), %d tokens in %.3fs", job.request_id, len(job.ids), job.tokens,
                     now - job.arrival)


def follow(embedder: Embedder, sync: Callable[[Command | None], Command]) -> None:
    """A non-zero rank under --tp: run the forwards rank 0 runs, until it stops."""
    while True:
        kind, payload = sync(None)
        if kind == "stop":
            return
        if kind == "embed":
            try:
                embedder.embed(*payload)
            except REQUEST_FAILURES:   # rank 0 fails the same forward and its requests; this rank goes on
                log.exception("embedding forward failed on this rank")
