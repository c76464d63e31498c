"""What every handler of one server shares: the model's worker loop, the tokenizer (behind the lock the
engine's decode also takes), the served name, and the checks every endpoint makes (API key, model name,
the model's kind).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

from fastapi import Request

from hfrewrite.runtime.generation import ByteTokenizer
from hfrewrite.serve.api_errors import ApiError
from hfrewrite.serve.embed_loop import EmbeddingLoop
from hfrewrite.serve.loop import EngineLoop
from hfrewrite.serve.metrics import ServerMetrics


@dataclass
class ServerState:
    """One served model: a causal LM runs on an EngineLoop, an embedding model on an EmbeddingLoop."""

    loop: Union[EngineLoop, EmbeddingLoop]
    metrics: ServerMetrics
    tokenizer: object
    tokenizer_lock: threading.Lock
    model_name: str
    vocab_size: int
    api_key: str | None = None
    processor: Any = None      # a vision-language model's HF processor: chat messages may hold images

    @property
    def kind(self) -> str:
        """"embedding" or "causal-lm": which endpoints this model answers."""
        return "embedding" if isinstance(self.loop, EmbeddingLoop) else "causal-lm"

    def encode(self, fn: Callable[[], list[int]]) -> list[int]:
        with self.tokenizer_lock:
            return fn()

    def token_text(self, token: int) -> str:
        with self.tokenizer_lock:
            if isinstance(self.tokenizer, ByteTokenizer) or self.tokenizer is None:
                return str(token)
            return self.tokenizer.decode([token])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(400, f"model {name!r} is not served here; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def require_kind(self, kind: str, endpoint: str) -> None:
        """400 when this model cannot answer `endpoint` (an embedding model has no completions, and back)."""
        if self.kind == kind:
            return
        other = "/v1/embeddings" if self.kind == "embedding" else "/v1/completions and /v1/chat/completions"
        raise ApiError(400, f"{endpoint} needs a {kind} model; {self.model_name!r} is {_article(self.kind)} model, "
                            f"which answers {other}", "model", code="model_not_supported")

    async def authorized(self, request: Request) -> None:
        """The FastAPI dependency that checks `Authorization: Bearer <key>` when the server has a key."""
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "authentication_error", "invalid_api_key")


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
