"""Packing: several sequences' chunks (prefill pieces and decode tokens) into one forward's inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hfrewrite.kernels.attention.op import AttentionMetadata


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: `tokens` at positions start, start+1, ...; its cache blocks."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]


@dataclass(frozen=True)
class PackedStep:
    """The inputs of one forward: one row of T tokens and the metadata the attention sites share."""

    input_ids: torch.Tensor      # [1, T]
    position_ids: torch.Tensor   # [1, T]
    metadata: AttentionMetadata
    logits_index: torch.Tensor   # [S] packed index of each chunk's last token
    chunks: tuple[Chunk, ...] = ()  # what was packed (a device-graph runner re-packs decode steps into its buckets)


def pack(chunks: Sequence[Chunk], block_size: int, device: torch.device) -> PackedStep:
    """Build the packed inputs on the CPU, once per step for every layer, and move them to the device."""
    sequences = len(chunks)
    max_q = max(len(c.tokens) for c in chunks)
    max_k = max(c.start + len(c.tokens) for c in chunks)
    total = sum(len(c.tokens) for c in chunks)
    q_gather = torch.zeros(sequences, max_q, dtype=torch.long)
    q_scatter = torch.full((sequences, max_q), total, dtype=torch.long)
    q_pos = torch.full((sequences, max_q), -1, dtype=torch.long)
    kv_slots = torch.zeros(sequences, max_k, dtype=torch.long)
    kv_len = torch.empty(sequences, dtype=torch.long)
    last = torch.empty(sequences, dtype=torch.long)
    slots, offset = [], 0
    for row, chunk in enumerate(chunks):
        count, end = len(chunk.tokens), chunk.start + len(chunk.tokens)
        if len(chunk.blocks) * block_size < end:
            raise ValueError(f"chunk needs {end} cache slots but holds {len(chunk.blocks)} blocks of {block_size}")
        table = torch.tensor(list(chunk.blocks), dtype=torch.long)
        context = torch.arange(end)
        kv_slots[row, :end] = table[context // block_size] * block_size + context % block_size
        q_gather[row, :count] = q_scatter[row, :count] = torch.arange(offset, offset + count)
        q_pos[row, :count] = torch.arange(chunk.start, end)
        kv_len[row] = end
        slots.append(kv_slots[row, chunk.start:end])
        offset += count
        last[row] = offset - 1
    causal_mask = torch.arange(max_k)[None, None, :] <= q_pos[:, :, None]
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device), q_gather=q_gather.to(device),
        q_scatter=q_scatter.reshape(-1).to(device), q_pos=q_pos.to(device), kv_slots=kv_slots.to(device),
        kv_len=kv_len.to(device), causal_mask=causal_mask.to(device))
    ids = [token for chunk in chunks for token in chunk.tokens]
    positions = [p for chunk in chunks for p in range(chunk.start, chunk.start + len(chunk.tokens))]
    return PackedStep(torch.tensor([ids], dtype=torch.long, device=device),
                      torch.tensor([positions], dtype=torch.long, device=device), metadata, last.to(device),
                      tuple(chunks))
