"""A compiled embedding model with its tokenizer and pooling: what `embed` and the server's embeddings run.

Out of kinds/embedding.py: it loads the tokenizer through sources, and sources sits below the tiny-model
builder that picks kinds (one direction of imports).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from hfrewrite.compiler.kinds import kind_for
from hfrewrite.compiler.kinds.embedding import max_seq_length
from hfrewrite.compiler.sources import load_tokenizer
from hfrewrite.errors import UnsupportedKindError
from hfrewrite.runtime.embedding import Embedder, Pooling, tokenize
from hfrewrite.runtime.generation import ByteTokenizer


def embedder_for(source: Any, model: Any) -> tuple[Embedder, Callable[[Sequence[str]], tuple[list, list | None]]]:
    """The pooling runtime of a compiled embedding model, and a function from texts to (token ids, token types)."""
    model_kind = kind_for(source.config, source.directory)
    if model_kind.head != "pool":
        raise UnsupportedKindError(f"{source.name!r} is a {model_kind.name} model; `embed` needs an embedding model "
                                   f"(an encoder such as BERT, or a decoder body with a pooling config)")
    tokenizer = load_tokenizer(source) or ByteTokenizer(int(source.config.vocab_size))
    limit = max_seq_length(source.directory) or model.max_context
    takes_types = "token_type_ids" in model_kind.inputs

    def to_tokens(texts: Sequence[str]) -> tuple[list, list | None]:
        ids, types = tokenize(tokenizer, texts, limit)
        return ids, types if takes_types else None

    return Embedder(model, model_kind.pooling or Pooling()), to_tokens
