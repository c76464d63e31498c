"""Completions and chat completions as server-sent events: one chunk per token, an error as one chunk of
OpenAI's error body, the usage last when asked for, then [DONE]; a client that goes away aborts its
sequences.
"""
from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from hfrewrite.serve import protocol as p
from hfrewrite.serve.loop import Handle
from hfrewrite.serve.results import chat_logprobs, completion_logprobs, events_of, failed, usage
from hfrewrite.serve.state import ServerState

log = logging.getLogger("hfrewrite.serve")


def sse(chunks: AsyncIterator[str], state: ServerState, handles: list[Handle]) -> StreamingResponse:
    """A server-sent-event stream; when the client goes away (the stream is cancelled) its handles abort."""
    async def body() -> AsyncIterator[str]:
        try:
            async for data in chunks:
                yield f"data: {data}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            unfinished = [h for h in handles if not h.finished]
            if unfinished:
                log.info("%s: client went away; aborting %d sequence(s)", handles[0].request_id, len(unfinished))
            for handle in unfinished:
                state.loop.abort(handle)
    return StreamingResponse(body(), media_type="text/event-stream", headers={"X-Request-Id": handles[0].request_id})


async def completion_stream(state: ServerState, body: p.CompletionRequest, handles: list[Handle],
                            prompts: list[list[int]], usage_asked: bool) -> AsyncIterator[str]:
    tokens = 0
    offsets = [0] * len(handles)
    async for index, event in events_of(handles):
        if event.error is not None:
            yield failed(event).chunk()
            continue
        tokens += event.token_id is not None
        logprobs = completion_logprobs(state, [event], offsets[index]) if body.logprobs is not None else None
        offsets[index] += len(event.text)
        choice = p.CompletionChoice(index=index, text=event.text, logprobs=logprobs,
                                    finish_reason=p.finish_reason(event.finish_reason) if event.finished else None)
        yield p.CompletionResponse(id=handles[0].request_id, model=state.model_name,
                                   choices=[choice]).model_dump_json()
    if usage_asked:
        yield p.CompletionResponse(id=handles[0].request_id, model=state.model_name, choices=[],
                                   usage=usage(prompts, tokens)).model_dump_json()


async def chat_stream(state: ServerState, body: p.ChatCompletionRequest, handles: list[Handle],
                      usage_asked: bool) -> AsyncIterator[str]:
    def chunk(choices: list[p.ChatChunkChoice], use: p.Usage | None = None) -> str:
        return p.ChatCompletionChunk(id=handles[0].request_id, model=state.model_name, choices=choices,
                                     usage=use).model_dump_json()

    yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content="")) for i in range(len(handles))])
    tokens = 0
    async for index, event in events_of(handles):
        if event.error is not None:
            yield failed(event).chunk()
            continue
        tokens += event.token_id is not None
        logprobs = chat_logprobs(state, [event]) if body.logprobs else None
        yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(content=event.text), logprobs=logprobs,
                                       finish_reason=p.finish_reason(event.finish_reason) if event.finished else None)])
    if usage_asked:
        yield chunk([], usage([handles[0].prompt_ids], tokens))

