"""Verification: the compiled, rewritten model against HF eager on random batches of mixed lengths.

Each sequence is fed in pieces (a prefill chunk, the rest of the prompt, then single decode tokens),
and every step packs the next piece of every sequence, so one forward mixes prefill and decode of
different sequences; the logits of every token are compared with HF's full-sequence eager forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.step import Chunk, pack
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig


@dataclass
class VerifyResult:
    """How close the compiled model came to HF eager."""

    passed: bool
    max_abs_err: float
    top1_agreement: float
    max_logprob_err: float
    tokens_compared: int
    sequences: int
    atol: float
    min_top1: float

    def to_dict(self) -> dict:
        return asdict(self)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(absolute logit tolerance, minimum top-1 agreement): tight in fp32, top-1 based in half precision."""
    if dtype == torch.float32:
        return 2e-3, 1.0
    return float("inf"), 0.9


def draw_pieces(lengths: list[int], generator: torch.Generator, decode_steps: int) -> list[list[int]]:
    """Split each length into a prefill chunk, the rest of the prompt, and `decode_steps` single tokens."""
    pieces = []
    for length in lengths:
        decodes = min(decode_steps, length - 1)
        prompt = length - decodes
        first = int(torch.randint(1, prompt + 1, (1,), generator=generator))
        parts = [first] + ([prompt - first] if prompt > first else []) + [1] * decodes
        pieces.append(parts)
    return pieces


@torch.no_grad()
def verify(compiled: CompiledModel, reference: torch.nn.Module | None, *, seed: int = 0, sequences: int = 3,
           min_len: int = 3, max_len: int = 24, decode_steps: int = 3, block_size: int = 4,
           atol: float | None = None) -> VerifyResult | None:
    """Compare every token's logits of packed, chunked, paged runs with HF eager full-sequence logits.

    Under tensor parallelism every rank must run the same forwards (they meet in collectives), but
    only one needs the reference: the others pass None and get None.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = int(compiled.config.vocab_size)
    lengths = [int(x) for x in torch.randint(min_len, max_len + 1, (sequences,), generator=generator)]
    prompts = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    cache_config = CacheConfig(block_size=block_size, num_blocks=sum(-(-n // block_size) for n in lengths) + 2)
    cache = compiled.new_cache(cache_config)
    allocator = BlockAllocator(cache_config.num_blocks)
    blocks = [allocator.allocate(cache_config.blocks_for(n)) for n in lengths]
    pieces = draw_pieces(lengths, generator, decode_steps)
    cursor = [0] * sequences
    got: list[list[torch.Tensor]] = [[] for _ in range(sequences)]
    while any(pieces):
        active = [i for i in range(sequences) if pieces[i]]
        chunks = []
        for i in active:
            size = pieces[i].pop(0)
            chunks.append(Chunk(prompts[i][cursor[i]:cursor[i] + size].tolist(), cursor[i], blocks[i]))
            cursor[i] += size
        step = pack(chunks, block_size, compiled.device)
        rows = torch.arange(step.input_ids.shape[1], device=compiled.device)
        logits = compiled.forward(step, cache, rows=rows).float().cpu()
        offset = 0
        for i, chunk in zip(active, chunks):
            got[i].append(logits[offset:offset + len(chunk.tokens)])
            offset += len(chunk.tokens)
    if reference is None:
        return None
    max_err, max_lp_err, agree, total = 0.0, 0.0, 0, 0
    for i, prompt in enumerate(prompts):
        ours = torch.cat(got[i])
        theirs = reference(input_ids=prompt[None].to(compiled.device)).logits[0].float().cpu()
        max_err = max(max_err, (ours - theirs).abs().max().item())
        lp_err = (torch.log_softmax(ours, -1) - torch.log_softmax(theirs, -1)).abs()
        max_lp_err = max(max_lp_err, lp_err.max().item())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += ours.shape[0]
    default_atol, min_top1 = tolerances(compiled.dtype)
    atol = default_atol if atol is None else atol
    top1 = agree / total
    passed = max_err <= atol and top1 >= min_top1
    return VerifyResult(passed, max_err, top1, max_lp_err, total, sequences, atol, min_top1)
