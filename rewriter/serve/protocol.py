"""The OpenAI API's request and response bodies as pydantic models (the subset `hfrewrite serve` speaks).

Requests are strict (a string where a number belongs is a 400 naming the field, as the OpenAI API does)
and ignore fields they do not know (clients send extras such as `user`).
"""
from __future__ import annotations

import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 16
MAX_N = 16
MAX_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """The knobs completions and chat share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)                    # -1 or 0: off (vLLM's extension)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["image_url", "input_audio", "file"]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Union[TextPart, ImagePart]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Request):
    """POST /v1/embeddings: a text, texts, token ids, or lists of token ids."""

    model: str
    # a text, texts, token ids or lists of token ids: checked by hand (serve.embeddings.token_inputs) so an
    # error names the item ("input.2") rather than pydantic's union branches
    input: Any
    encoding_format: Literal["float", "base64"] = "float"   # the openai client asks for base64 unless told
    dimensions: int | None = Field(None, ge=1)              # only the model's own width (no truncation)


# --------------------------------------------------------------------------------------------------
# responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hfrewrite"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str          # floats, or base64 of little-endian float32 (encoding_format)


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def finish_reason(engine_reason: str | None) -> str | None:
    """The engine's reasons in OpenAI's words (an end-of-sequence token is a "stop")."""
    return {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}.get(engine_reason or "", engine_reason)
