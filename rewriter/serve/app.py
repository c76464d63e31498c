"""The FastAPI app of `hfrewrite serve`: its routes, over one worker loop (serve.state).

OpenAI's completions and chat completions (a causal LM: serve.completions, results, streams), its
embeddings (an embedding model: serve.embeddings), the models list, health and Prometheus metrics.
Every error leaves as OpenAI's error body (serve.api_errors); an endpoint the served model's kind
cannot answer is a 400 naming `model`.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hfrewrite.serve import protocol as p
from hfrewrite.serve.api_errors import ApiError, install_handlers
from hfrewrite.serve.completions import chat_input, chat_max_tokens, completion_prompts, sampling, submit
from hfrewrite.serve.embeddings import create_embeddings
from hfrewrite.serve.results import chat_response, collect, completion_response
from hfrewrite.serve.state import ServerState
from hfrewrite.serve.streams import chat_stream, completion_stream, sse

__all__ = ["ServerState", "create_app"]


def create_app(state: ServerState) -> FastAPI:
    """The app; its lifespan starts the worker loop and, on shutdown, lets it finish what is in flight."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        yield
        await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="hfrewrite", lifespan=lifespan)
    app.state.server = state
    install_handlers(app)
    authorized = [Depends(state.authorized)]

    @app.get("/health")
    async def health() -> Response:
        if not state.loop.alive:
            raise ApiError(503, "the engine loop is not running", None, "server_error")
        return Response("ok", media_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return p.ModelList(data=[p.ModelCard(id=state.model_name)]).model_dump()

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.require_kind("causal-lm", "/v1/completions")
        prompts = completion_prompts(state, body.prompt)
        params = sampling(body, body.max_tokens or 16, body.logprobs)
        handles = submit(state, "cmpl", prompts, params, body.n)
        usage_asked = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            return sse(completion_stream(state, body, handles, prompts, usage_asked), state, handles)
        done = await collect(state, handles, request)
        return JSONResponse(completion_response(state, body, handles, prompts, done).model_dump())

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat(body: p.ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.require_kind("causal-lm", "/v1/chat/completions")
        prompt, source = chat_input(state, body.messages)
        params = sampling(body, chat_max_tokens(state, body, prompt), (body.top_logprobs or 0) if body.logprobs
                          else None)
        handles = submit(state, "chatcmpl", [prompt], params, body.n, [source])
        usage_asked = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            return sse(chat_stream(state, body, handles, usage_asked), state, handles)
        done = await collect(state, handles, request)
        return JSONResponse(chat_response(state, body, handles, done).model_dump())

    @app.post("/v1/embeddings", dependencies=authorized)
    async def embeddings(body: p.EmbeddingRequest) -> Response:
        return JSONResponse((await create_embeddings(state, body)).model_dump())

    return app
