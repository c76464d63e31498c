"""The pooling head: packed prefill-only steps through the compiled model, pooled per sequence.

An embedding model has no decode phase and keeps nothing between calls: each batch is packed into
one row (every sequence starting at position 0), run once, and the per-token hidden states of each
sequence are pooled (mean, CLS, last token or max; optionally L2-normalized) as the model's
sentence-transformers config says. Attention still goes through the paged op (causal=False for
encoders): its cache is a scratch cache sized to the batch and dropped afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from hfrewrite.errors import RequestError
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.step import Chunk, pack

POOLING_MODES = ("mean", "cls", "lasttoken", "max")


@dataclass(frozen=True)
class Pooling:
    """How per-token hidden states become one vector per sequence."""

    mode: str = "mean"        # one of POOLING_MODES
    normalize: bool = False   # L2-normalize the pooled vector (sentence-transformers' Normalize module)

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {self.mode!r}; expected one of {', '.join(POOLING_MODES)}")


def pool(hidden: torch.Tensor, lengths: Sequence[int], pooling: Pooling) -> torch.Tensor:
    """hidden [T, H] of sequences packed back to back (`lengths` tokens each) -> [S, H] in fp32."""
    pooled = []
    for piece in torch.split(hidden.float(), list(lengths)):
        if pooling.mode == "mean":
            pooled.append(piece.mean(0))
        elif pooling.mode == "cls":
            pooled.append(piece[0])
        elif pooling.mode == "lasttoken":
            pooled.append(piece[-1])
        else:
            pooled.append(piece.max(0).values)
    out = torch.stack(pooled)
    return torch.nn.functional.normalize(out, p=2, dim=-1) if pooling.normalize else out


@dataclass
class Embedder:
    """Embeds token sequences through a compiled embedding graph (outputs hidden states [1, T, H])."""

    model: CompiledModel
    pooling: Pooling
    block_size: int = 16
    max_tokens: int = 8192   # tokens per forward: a longer batch runs as several packed forwards

    @torch.no_grad()
    def hidden_states(self, sequences: Sequence[Sequence[int]],
                      token_types: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Per-token last hidden states [sum(len), H] of the sequences, packed into one forward."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise RequestError("every text to embed needs at least one token")
        longest = max(len(s) for s in sequences)
        if longest > self.model.max_context:
            raise RequestError(f"a sequence of {longest} tokens is longer than the model's "
                               f"{self.model.max_context} positions (max_position_embeddings)")
        config = CacheConfig(self.block_size, sum(-(-len(s) // self.block_size) for s in sequences))
        allocator = BlockAllocator(config.num_blocks)
        chunks = [Chunk(list(s), 0, allocator.allocate(config.blocks_for(len(s)))) for s in sequences]
        step = pack(chunks, self.block_size, self.model.device)
        types = None
        if token_types is not None:
            flat = [t for row in token_types for t in row]
            types = torch.tensor([flat], dtype=torch.long, device=self.model.device)
        rows = torch.arange(step.input_ids.shape[1], device=self.model.device)
        return self.model.forward(step, self.model.new_cache(config), rows=rows, token_type_ids=types)

    def embed(self, sequences: Sequence[Sequence[int]],
              token_types: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Pooled embeddings [S, H] (fp32) of the sequences, in groups of at most max_tokens tokens."""
        pooled, start = [], 0
        while start < len(sequences) or not pooled:
            end, tokens = start + 1, len(sequences[start]) if sequences else 0
            while end < len(sequences) and tokens + len(sequences[end]) <= self.max_tokens:
                tokens += len(sequences[end])
                end += 1
            group = sequences[start:end]
            hidden = self.hidden_states(group, token_types[start:end] if token_types is not None else None)
            pooled.append(pool(hidden, [len(s) for s in group], self.pooling))
            start = end
        return torch.cat(pooled)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (and token type ids when the tokenizer makes them) of each text, truncated to max_length."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)
        return [list(ids) for ids in encoded["input_ids"]], \
            [list(t) for t in encoded["token_type_ids"]] if "token_type_ids" in encoded else None
    ids = [list(tokenizer.encode(text)) for text in texts]  # the byte tokenizer of tiny models
    return [row[:max_length] if max_length else row for row in ids], None


def openai_response(vectors: torch.Tensor, model: str, tokens: int) -> dict:
    """The embeddings in OpenAI's /v1/embeddings response shape."""
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(vectors)],
            "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def format_embeddings(vectors: torch.Tensor, shown: int = 6) -> str:
    """One line per vector: its index, size, norm and first values (the CLI's text output)."""
    lines = []
    for i, row in enumerate(vectors):
        head = ", ".join(f"{value:+.4f}" for value in row[:shown].tolist())
        lines.append(f"[{i}] dim {row.numel()}, norm {row.norm().item():.4f}: [{head}, ...]")
    return "\n".join(lines)
