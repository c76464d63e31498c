"""POST /v1/embeddings: OpenAI's request (a text, texts, token ids or lists of token ids) to pooled vectors
through the server's EmbeddingLoop, answered in OpenAI's shape (`data[i].embedding`, `usage`).

Texts are tokenized as `hfrewrite embed` does (the model's tokenizer, truncated at its
sentence-transformers max_seq_length); token ids are taken as they are and must fit the vocabulary and
the context. A bad item is a 400 naming it (`input.2`); `encoding_format` base64 is little-endian
float32, as the OpenAI API sends it (and its Python client asks for by default).
"""
from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import torch

from hfrewrite.runtime.engine import REQUEST_FAILURES
from hfrewrite.serve import protocol as p
from hfrewrite.serve.api_errors import ApiError, engine_failure
from hfrewrite.serve.embed_loop import EmbeddingLoop, EmbeddingQueueFull, EmbedJob, Tokenize
from hfrewrite.serve.state import ServerState

MAX_INPUTS = 2048   # the OpenAI API's limit on inputs per request


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def input_items(value: Any) -> list[str | list[int]]:
    """The request's `input` as a list of texts and token-id lists, or a 400 naming the bad item."""
    if isinstance(value, str):
        return [value]
    what = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
    if not isinstance(value, list) or not value:
        shown = "an empty list" if value == [] else f"{type(value).__name__} {str(value)[:80]!r}"
        raise ApiError(400, f"input: must be {what} (got {shown})", "input")
    if _is_ids(value):
        return [value]
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} inputs per request (got {len(value)})", "input")
    for i, item in enumerate(value):
        if not (isinstance(item, str) or (_is_ids(item) and item)):
            shown = "an empty list" if item == [] else f"{type(item).__name__} {str(item)[:80]!r}"
            raise ApiError(400, f"input.{i}: each input must be a string or a non-empty list of token ids "
                                f"(got {shown})", f"input.{i}")
    return list(value)


def token_inputs(state: ServerState, tokenize: Tokenize, items: list[str | list[int]], takes_types: bool,
                 max_context: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """(token ids, token type ids or None) of each item; 400 for an item that cannot run."""
    texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
    ids: list[list[int]] = [[] if isinstance(item, str) else list(item) for item in items]
    types: list[list[int] | None] = [None] * len(items)
    if texts:
        encoded, encoded_types = state.encode(lambda: tokenize([text for _, text in texts]))
        for k, (i, _) in enumerate(texts):
            ids[i] = encoded[k]
            types[i] = encoded_types[k] if encoded_types is not None else None
    single = len(items) == 1
    for i, row in enumerate(ids):
        field = "input" if single else f"input.{i}"
        if not row:
            raise ApiError(400, f"{field}: the text has no tokens", field)
        bad = [t for t in row if not 0 <= t < state.vocab_size]
        if bad:
            raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary of {state.vocab_size}", field)
        if len(row) > max_context:
            raise ApiError(400, f"{field}: {len(row)} tokens is more than the model's {max_context} positions",
                           field, code="context_length_exceeded")
    if not takes_types:
        return ids, None
    return ids, [t if t is not None else [0] * len(row) for t, row in zip(types, ids)]


def encode_vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def create_embeddings(state: ServerState, body: p.EmbeddingRequest) -> p.EmbeddingResponse:
    """Check, tokenize, queue, wait, answer."""
    state.check_model(body.model)
    state.require_kind("embedding", "/v1/embeddings")
    loop = state.loop
    assert isinstance(loop, EmbeddingLoop)
    if body.dimensions is not None and body.dimensions != loop.dimensions:
        raise ApiError(400, f"dimensions: {state.model_name} makes vectors of {loop.dimensions} dimensions; "
                            f"other sizes are not supported (got {body.dimensions})", "dimensions")
    ids, types = token_inputs(state, loop.tokenize, input_items(body.input), loop.takes_types, loop.max_context)
    job = EmbedJob(f"embd-{uuid.uuid4().hex[:24]}", ids, types)
    try:
        loop.submit(job)
    except EmbeddingQueueFull as error:
        raise ApiError(503, str(error), None, "server_error", "queue_full") from error
    try:
        vectors = await asyncio.wrap_future(job.future)
    except REQUEST_FAILURES as error:
        raise engine_failure(error) from error
    tokens = job.tokens
    data = [p.EmbeddingData(index=i, embedding=encode_vector(row, body.encoding_format))
            for i, row in enumerate(vectors.float())]
    return p.EmbeddingResponse(data=data, model=state.model_name,
                               usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
