"""What goes into and comes out of the Engine (runtime/engine.py): a request, a chunk that carries its request's
input source, and the per-request events of a step. Apart from the scheduler so that runners and servers can
use the types without it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.runtime.step import Chunk


@dataclass
class Request:
    """One prompt (token ids) and how to continue it."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: int = -1
    source: Any = None  # what the forward builds this request's inputs from (None: its token ids)


@dataclass(frozen=True)
class SourcedChunk(Chunk):
    """A chunk of a request with an input source: the forward's `prepare` reads the chunk's inputs from it."""

    source: Any = None


@dataclass
class Event:
    """What a step produced for one request: a token (and its text delta), the end, or an error."""

    request_id: int
    token_id: int | None = None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "eos" | "length" | "abort" | "error"
    error: Exception | None = None      # a RequestError when refused; an isolated failure's exception otherwise
    logprob: float | None = None        # with SamplingParams.logprobs: the token's log-probability
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
