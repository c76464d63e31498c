"""Packing: several sequences' chunks (prefill pieces and decode tokens) into one forward's inputs.

The attention metadata (format in kernels/attention/op.py) is built here once per step, from plain
lists on the host, and moved with one copy per tensor (pinned and non-blocking off the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
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


def pack(chunks: Sequence[Chunk], block_size: int, device: torch.device, *,
         block_table_width: int | None = None) -> PackedStep:
    """Build the packed inputs on the host, once per step for every layer, and move them to the device.

    `block_table_width` pads every block table to that many columns (a static shape for graph capture);
    by default the tables are as wide as the longest context needs.
    """
    widths = []
    for chunk in chunks:
        end = chunk.start + len(chunk.tokens)
        if len(chunk.tokens) == 0:
            raise ValueError(f"a chunk at position {chunk.start} has no tokens (every sequence needs one query)")
        if len(chunk.blocks) * block_size < end:
            raise ValueError(f"chunk needs {end} cache slots but holds {len(chunk.blocks)} blocks of {block_size}")
        widths.append(-(-end // block_size))
    width = max(widths)
    if block_table_width is not None:
        if block_table_width < width:
            raise ValueError(f"block_table_width {block_table_width} is narrower than the {width} blocks a "
                             f"context of this step needs")
        width = block_table_width
    ids, positions, slots, tables, seq_lens = [], [], [], [], []
    for chunk, need in zip(chunks, widths):
        end = chunk.start + len(chunk.tokens)
        blocks = list(chunk.blocks[:need])
        ids.extend(chunk.tokens)
        positions.extend(range(chunk.start, end))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(chunk.start, end))
        tables.append(blocks + [0] * (width - need))
        seq_lens.append(end)
    starts = [0, *accumulate(len(chunk.tokens) for chunk in chunks)]
    pin = device.type != "cpu"

    def move(values: list, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=pin)
        return host.to(device, non_blocking=True) if pin else host

    metadata = AttentionMetadata(
        slot_mapping=move(slots, torch.long), block_tables=move(tables, torch.int32),
        seq_lens=move(seq_lens, torch.int32), query_start_loc=move(starts, torch.int32),
        block_size=move([block_size], torch.int32))
    return PackedStep(move([ids], torch.long), move([positions], torch.long), metadata,
                      move([s - 1 for s in starts[1:]], torch.long), tuple(chunks))
