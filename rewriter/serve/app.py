"""The FastAPI app of `hfrewrite serve`: OpenAI's completions, chat completions and models endpoints,
health and Prometheus metrics, over one EngineLoop.

Every error leaves as OpenAI's body {"error": {"message", "type", "param", "code"}}: a bad field, bad
JSON, an unknown model or a prompt over the context is a 400 naming the field; a missing or wrong key
is a 401; a full queue is a 503. Streams are server-sent events, one chunk per token, then [DONE].
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hfrewrite.errors import RequestError
from hfrewrite.runtime.engine import Event
from hfrewrite.runtime.generation import ByteTokenizer, encode_chat, encode_prompt
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.serve import protocol as p
from hfrewrite.serve.loop import EngineLoop, Handle, QueueFull
from hfrewrite.serve.metrics import ServerMetrics

log = logging.getLogger("hfrewrite.serve")
DISCONNECT_POLL_S = 0.5
DEFAULT_CHAT_MAX_TOKENS = 256


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        body = p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


@dataclass
class ServerState:
    """What the handlers need: the loop, the tokenizer (behind a lock shared with the engine's decode)."""

    loop: EngineLoop
    metrics: ServerMetrics
    tokenizer: object
    tokenizer_lock: threading.Lock
    model_name: str
    vocab_size: int
    api_key: str | None = None

    def encode(self, fn: Callable[[], list[int]]) -> list[int]:
        with self.tokenizer_lock:
            return fn()

    def token_text(self, token: int) -> str:
        with self.tokenizer_lock:
            if isinstance(self.tokenizer, ByteTokenizer) or self.tokenizer is None:
                return str(token)
            return self.tokenizer.decode([token])


def create_app(state: ServerState) -> FastAPI:
    """The app; its lifespan starts the engine loop and, on shutdown, lets it finish what is in flight."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        yield
        await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="hfrewrite", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", "body").response()
        field = ".".join(location) or "body"
        return ApiError(400, f"{field}: {first.get('msg')} (got {first.get('input')!r})"[:500], field).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return ApiError(error.status_code, str(error.detail), None, kind).response()

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        if not state.loop.alive:
            raise ApiError(503, "the engine loop is not running", None, "server_error")
        return Response("ok", media_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return p.ModelList(data=[p.ModelCard(id=state.model_name)]).model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        check_model(state, body.model)
        prompts = completion_prompts(state, body.prompt)
        params = sampling(body, body.max_tokens or 16, body.logprobs)
        handles = submit(state, "cmpl", prompts, params, body.n)
        usage_asked = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            return sse(completion_stream(state, body, handles, prompts, usage_asked), state, handles)
        done = await collect(state, handles, request)
        return JSONResponse(completion_response(state, body, handles, prompts, done).model_dump())

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Response:
        check_model(state, body.model)
        prompt = chat_prompt(state, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, state.loop.engine.max_context - len(prompt)))
        params = sampling(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        handles = submit(state, "chatcmpl", [prompt], params, body.n)
        usage_asked = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            return sse(chat_stream(state, body, handles, usage_asked), state, handles)
        done = await collect(state, handles, request)
        return JSONResponse(chat_response(state, body, handles, done).model_dump())

    return app


# --------------------------------------------------------------------------------------------------
# requests in


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise ApiError(400, f"model {name!r} is not served here; this server serves {state.model_name!r}",
                       "model", code="model_not_found")


def completion_prompts(state: ServerState, prompt: str | list) -> list[list[int]]:
    """Token ids of each prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: empty list", "prompt")
    out = []
    for item in prompt:
        if isinstance(item, str):
            out.append(state.encode(lambda: encode_prompt(state.tokenizer, item, chat=False)))
        else:
            bad = [t for t in item if not 0 <= t < state.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary of {state.vocab_size}",
                               "prompt")
            out.append(list(item))
    return out


def chat_prompt(state: ServerState, messages: Sequence[p.ChatMessage]) -> list[int]:
    """The conversation through the model's chat template (text parts only: no model here takes images)."""
    turns = []
    for i, message in enumerate(messages):
        content = message.content or ""
        if not isinstance(content, str):
            images = [part for part in content if not isinstance(part, p.TextPart)]
            if images:
                raise ApiError(400, f"messages.{i}.content: {images[0].type} parts need a vision-language model; "
                                    f"{state.model_name} takes text", f"messages.{i}.content")
            content = "".join(part.text for part in content)
        turns.append({"role": message.role, "content": content})
    return state.encode(lambda: encode_chat(state.tokenizer, turns))


def sampling(body: p._Sampling, max_tokens: int, logprobs: int | None) -> SamplingParams:
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                          stop=body.stop_strings(), ignore_eos=body.ignore_eos, logprobs=logprobs)


def submit(state: ServerState, prefix: str, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Handle]:
    """One handle per (prompt, choice); 400 for a request that can never run, 503 when the queue is full."""
    engine = state.loop.engine
    for ids in prompts:
        why = engine.refusal(len(ids), params.max_new_tokens)
        if why is not None:
            prompt_field = "prompt" if prefix == "cmpl" else "messages"
            field = "max_tokens" if ids and len(ids) < engine.max_context else prompt_field
            raise ApiError(400, why, field, code="context_length_exceeded" if ids else None)
    request_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
    queue: asyncio.Queue = asyncio.Queue()
    aloop = asyncio.get_running_loop()
    handles = []
    for prompt_index, ids in enumerate(prompts):
        for choice in range(n):
            seed = params.seed + choice if params.seed is not None and n > 1 else params.seed
            handles.append(Handle(request_id, len(handles), ids, _with_seed(params, seed), queue, aloop))
    try:
        state.loop.submit(handles)
    except QueueFull as error:
        raise ApiError(503, str(error), None, "server_error", "queue_full") from error
    log.info("%s: %d prompt(s) of %s tokens, n=%d, max_tokens=%d, temperature=%g", request_id, len(prompts),
             ",".join(str(len(ids)) for ids in prompts), n, params.max_new_tokens, params.temperature)
    return handles


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return params if seed == params.seed else replace(params, seed=seed)


# --------------------------------------------------------------------------------------------------
# results out


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
    if isinstance(event.error, RequestError):
        return ApiError(400, str(event.error), None)
    return ApiError(500, f"the request failed in the engine: {type(event.error).__name__}: {event.error}", None,
                    "server_error")


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


def error_chunk(error: ApiError) -> str:
    return p.ErrorResponse(error=p.ErrorInfo(message=error.message, type=error.type, param=error.param,
                                             code=error.code)).model_dump_json()


async def completion_stream(state: ServerState, body: p.CompletionRequest, handles: list[Handle],
                            prompts: list[list[int]], usage_asked: bool) -> AsyncIterator[str]:
    tokens = 0
    offsets = [0] * len(handles)
    async for index, event in events_of(handles):
        if event.error is not None:
            yield error_chunk(failed(event))
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
            yield error_chunk(failed(event))
            continue
        tokens += event.token_id is not None
        logprobs = chat_logprobs(state, [event]) if body.logprobs else None
        yield chunk([p.ChatChunkChoice(index=index, delta=p.Delta(content=event.text), logprobs=logprobs,
                                       finish_reason=p.finish_reason(event.finish_reason) if event.finished else None)])
    if usage_asked:
        yield chunk([], usage([handles[0].prompt_ids], tokens))
