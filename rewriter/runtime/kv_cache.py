"""The block-paged KV cache: a block allocator and the per-site cache tensors.

Blocks are handed out from a free list in ascending order (deterministic); a request reserves all the
blocks it can ever need when it is admitted, so a running request never runs out mid-generation.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch

from hfrewrite.errors import RequestError


@dataclass(frozen=True)
class CacheConfig:
    """Size of the paged cache: num_blocks blocks of block_size token slots each."""

    block_size: int = 16
    num_blocks: int = 256

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise RequestError(f"a KV cache block needs at least one token slot, got block_size={self.block_size}")

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def capacity(self) -> int:
        return self.block_size * self.num_blocks


class BlockAllocator:
    """Free-list allocator of cache blocks (lowest ids first)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise RequestError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RequestError(f"KV cache full: {count} blocks wanted, {len(self._free)} of {self.num_blocks} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)


class KVCache:
    """Cache tensors for every attention site: k[i], v[i] of shape [num_blocks * block_size, kv_heads, dim]."""

    def __init__(self, specs: Sequence, config: CacheConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self._index = {int(getattr(spec, "site", i)): i for i, spec in enumerate(specs)}
        self.keys = [torch.zeros(config.capacity, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in specs]
        self.values = [torch.zeros(config.capacity, s.kv_heads, s.value_dim, dtype=dtype, device=device) for s in specs]

    def holds(self, site: int) -> bool:
        return site in self._index

    def tensor(self, key: bool, site: int) -> torch.Tensor:
        """The key (or value) cache of attention site `site` (a pipeline stage holds only its sites)."""
        index = self._index[site]
        return self.keys[index] if key else self.values[index]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
