"""Completions and chat completions, the requests in: prompts to token ids (strings, token ids, a chat
through the model's template), the sampling parameters, and the engine handles a request submits.

A prompt that can never run (over the context, a token outside the vocabulary) is a 400 naming the
field; a full queue is a 503.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace
from typing import Any, Sequence

from hfrewrite.runtime.generation import encode_chat, encode_prompt
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.serve import protocol as p
from hfrewrite.serve.api_errors import ApiError
from hfrewrite.serve.loop import Handle, QueueFull
from hfrewrite.serve.state import ServerState

log = logging.getLogger("hfrewrite.serve")
DEFAULT_CHAT_MAX_TOKENS = 256


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


def chat_input(state: ServerState, messages: Sequence[p.ChatMessage]) -> tuple[list[int], Any]:
    """The prompt ids of a conversation and its engine input source: for a vision-language model the
    processor's output (images included), else None (the ids are the input)."""
    if state.processor is None:
        return chat_prompt(state, messages), None
    from hfrewrite.runtime.multimodal import PendingSequence, prompt_ids
    from hfrewrite.serve.images import vision_chat

    inputs = vision_chat(state.processor, messages, state.tokenizer_lock)
    return prompt_ids(inputs).tolist(), PendingSequence(inputs)


def sampling(body: p._Sampling, max_tokens: int, logprobs: int | None) -> SamplingParams:
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                          stop=body.stop_strings(), ignore_eos=body.ignore_eos, logprobs=logprobs)


def submit(state: ServerState, prefix: str, prompts: list[list[int]], params: SamplingParams, n: int,
           sources: Sequence[Any] | None = None) -> list[Handle]:
    """One handle per (prompt, choice); 400 for a request that can never run, 503 when the queue is full.
    `sources`: each prompt's engine input source (a VLM prompt's images), None for token ids."""
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
            source = None if sources is None else sources[prompt_index]
            handles.append(Handle(request_id, len(handles), ids, _with_seed(params, seed), queue, aloop,
                                  source=source))
    try:
        state.loop.submit(handles)
    except QueueFull as error:
        raise ApiError(503, str(error), None, "server_error", "queue_full") from error
    log.info("%s: %d prompt(s) of %s tokens, n=%d, max_tokens=%d, temperature=%g", request_id, len(prompts),
             ",".join(str(len(ids)) for ids in prompts), n, params.max_new_tokens, params.temperature)
    return handles


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return params if seed == params.seed else replace(params, seed=seed)



def chat_max_tokens(state: ServerState, body: p.ChatCompletionRequest, prompt: list[int]) -> int:
    """max_completion_tokens or max_tokens; else what fits in the context, at most DEFAULT_CHAT_MAX_TOKENS."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, state.loop.engine.max_context - len(prompt)))
    return max_tokens
