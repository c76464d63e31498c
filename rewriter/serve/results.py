"""Completions and chat completions, the results out: a request's engine events gathered into choices
(waiting, and aborting when the client goes away), logprobs, usage, and the response bodies.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from fastapi import Request

from hfrewrite.runtime.engine import Event
from hfrewrite.serve import protocol as p
from hfrewrite.serve.api_errors import ApiError, engine_failure
from hfrewrite.serve.loop import Handle
from hfrewrite.serve.state import ServerState

DISCONNECT_POLL_S = 0.5


@dataclass
class Choice:
    """What one handle produced."""

    text: str = ""
    tokens: int = 0
    finish: str | None = None
    events: list[Event] | None = None


async def events_of(handles: list[Handle]) -> AsyncIterator[tuple[int, Event]]:
    """Every event of these handles as it comes, until all have finished."""
    queue = handles[0].events
    remaining = len(handles)
    while remaining:
        index, event = await queue.get()
        if event.finished:
            remaining -= 1
        yield index, event


def failed(event: Event) -> ApiError:
    return engine_failure(event.error)


async def collect(state: ServerState, handles: list[Handle], request: Request) -> list[Choice]:
    """Wait for every handle (aborting them all when the client goes away); errors raised as ApiError."""
    choices = [Choice(events=[]) for _ in handles]
    queue = handles[0].events
    remaining = len(handles)
    try:
        while remaining:
            try:  # a bare queue.get (not an async generator) may be cancelled by the timeout and retried
                index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the request", None) from None
                continue
            if event.error is not None:
                raise failed(event)
            choice = choices[index]
            choice.text += event.text
            choice.events.append(event)
            choice.tokens += event.token_id is not None
            if event.finished:
                choice.finish = p.finish_reason(event.finish_reason)
                remaining -= 1
        return choices
    finally:
        for handle in handles:
            state.loop.abort(handle)   # nothing for the finished ones


def usage(prompts: list[list[int]], tokens: int) -> p.Usage:
    prompt_tokens = sum(len(ids) for ids in prompts)
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)


def completion_logprobs(state: ServerState, events: Sequence[Event], offset: int = 0) -> p.CompletionLogprobs:
    out = p.CompletionLogprobs()
    for event in events:
        if event.token_id is None or event.logprob is None:
            continue
        out.tokens.append(state.token_text(event.token_id))
        out.token_logprobs.append(event.logprob)
        out.top_logprobs.append({state.token_text(t): lp for t, lp in event.top_logprobs})
        out.text_offset.append(offset)
        offset += len(event.text)
    return out


def chat_logprobs(state: ServerState, events: Sequence[Event]) -> p.ChatLogprobs:
    def entry(token: int, logprob: float) -> p.TopLogprob:
        text = state.token_text(token)
        return p.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = [p.TokenLogprob(**entry(e.token_id, e.logprob).model_dump(),
                              top_logprobs=[entry(t, lp) for t, lp in e.top_logprobs])
               for e in events if e.token_id is not None and e.logprob is not None]
    return p.ChatLogprobs(content=content)


def completion_response(state: ServerState, body: p.CompletionRequest, handles: list[Handle],
                        prompts: list[list[int]], done: list[Choice]) -> p.CompletionResponse:
    choices = [p.CompletionChoice(index=i, text=c.text, finish_reason=c.finish,
                                  logprobs=completion_logprobs(state, c.events) if body.logprobs is not None else None)
               for i, c in enumerate(done)]
    return p.CompletionResponse(id=handles[0].request_id, model=state.model_name, choices=choices,
                                usage=usage(prompts, sum(c.tokens for c in done)))


def chat_response(state: ServerState, body: p.ChatCompletionRequest, handles: list[Handle],
                  done: list[Choice]) -> p.ChatCompletionResponse:
    choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=c.text), finish_reason=c.finish,
                            logprobs=chat_logprobs(state, c.events) if body.logprobs else None)
               for i, c in enumerate(done)]
    prompt = [handles[0].prompt_ids]
    return p.ChatCompletionResponse(id=handles[0].request_id, model=state.model_name, choices=choices,
                                    usage=usage(prompt, sum(c.tokens for c in done)))

