"""Packing: several sequences' chunks (prefill pieces and decode tokens) into one forward's inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hfrewrite.kernels.paged_attention import AttentionMetadata


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


def pack(chunks: Sequence[Chunk], block_size: int, device: torch.device) -> PackedStep:
    """Build the packed inputs; built on the CPU with plain lists, moved to the device once."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    max_q = max(len(c.tokens) for c in chunks)
    max_k = max(c.start + len(c.tokens) for c in chunks)
    total = sum(len(c.tokens) for c in chunks)
    q_index = torch.full((len(chunks), max_q), total, dtype=torch.long)
    q_pos = torch.full((len(chunks), max_q), -1, dtype=torch.long)
    kv_slots = torch.zeros(len(chunks), max_k, dtype=torch.long)
    kv_len = torch.empty(len(chunks), dtype=torch.long)
    last = torch.empty(len(chunks), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        count, end = len(chunk.tokens), chunk.start + len(chunk.tokens)
        chunk_positions = range(chunk.start, end)
        table = torch.tensor(list(chunk.blocks), dtype=torch.long)
        context = torch.arange(end)
        kv_slots[row, :end] = table[context // block_size] * block_size + context % block_size
        q_index[row, :count] = torch.arange(len(ids), len(ids) + count)
        q_pos[row, :count] = torch.arange(chunk.start, end)
        kv_len[row] = end
        ids.extend(chunk.tokens)
        positions.extend(chunk_positions)
        slots.extend(kv_slots[row, chunk.start:end].tolist())
        last[row] = len(ids) - 1
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device),
        q_index=q_index.to(device), q_pos=q_pos.to(device), kv_slots=kv_slots.to(device), kv_len=kv_len.to(device))
    return PackedStep(torch.tensor([ids], dtype=torch.long, device=device),
                      torch.tensor([positions], dtype=torch.long, device=device), metadata, last.to(device))
