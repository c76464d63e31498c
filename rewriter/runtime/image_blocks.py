"""Image blocks: the spans of a prompt whose tokens attend to each other in both directions (Gemma 3's images).

HF's Gemma 3 builds its mask from token_type_ids: its `get_block_sequence_ids_for_mask` gives every image token
the id of its image (each maximal run of image tokens is one image) and every text token -1, and the mask is
OR(causal, same image) (AND the sliding window on local layers). An image being one contiguous span [a, b), a
query's keys are exactly those before one limit: b for a token of the image [a, b), position + 1 otherwise. That
limit per query token is what the paged op takes (`key_limit`), so no dense mask is ever built.

Since an image token sees keys up to its image's end, a prefill chunk must never end inside an image (its later
keys would not be in the cache yet): `legal_end` moves a proposed chunk end out of an image, back to the image's
start, or past its end when the chunk starts there (an image longer than the step budget goes whole in one chunk).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Span = tuple[int, int]
BlockIds = Callable[[torch.Tensor], torch.Tensor]   # token_type_ids [1, n] -> block ids [1, n] (-1: no block)


def spans_of(block_ids: torch.Tensor) -> tuple[Span, ...]:
    """The [start, end) spans of the blocks in block ids [n] (-1 outside any block), in order; a block whose
    tokens are not contiguous is an error (one key limit per query cannot express it)."""
    ids = block_ids.tolist()
    spans: list[Span] = []
    seen: set[int] = set()
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and ids[i] == ids[start]:
            continue
        if ids[start] >= 0:
            if ids[start] in seen:
                raise ValueError(f"block {ids[start]} of the prompt's token_type_ids is not one contiguous span "
                                 f"(it ends and starts again at token {start}): per-query key limits cannot "
                                 f"express its attention")
            seen.add(ids[start])
            spans.append((start, i))
        start = i
    return tuple(spans)


def prompt_spans(block_ids: BlockIds | None, inputs: dict[str, torch.Tensor], row: int = 0) -> tuple[Span, ...]:
    """The image spans of batch row `row` of a processor output (unpadded, like its prompt ids); none for a
    model without image blocks (`block_ids` None) or a prompt without token_type_ids."""
    types = inputs.get("token_type_ids")
    if block_ids is None or types is None:
        return ()
    types = types[row]
    if "attention_mask" in inputs:
        types = types[inputs["attention_mask"][row].bool()]
    return spans_of(block_ids(types[None].cpu())[0])


def key_limits(length: int, spans: Sequence[Span]) -> torch.Tensor:
    """[length] int32: each token's key end (its image's end inside an image, else position + 1)."""
    limits = torch.arange(1, length + 1, dtype=torch.int32)
    for start, end in spans:
        limits[start:end] = end
    return limits


def legal_end(spans: Sequence[Span], start: int, end: int) -> int:
    """The end of a chunk [start, end) moved out of any image it would end inside (see the module docstring)."""
    for a, b in spans:
        if a < end < b:
            return a if a > start else b
    return end
