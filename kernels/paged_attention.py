"""The paged-attention op: write this step's K/V into a block-paged cache, attend over each sequence's blocks.

The cache of one attention site is two tensors of shape [num_slots, kv_heads, head_dim]
(num_slots = num_blocks * block_size; block b holds slots b*block_size ... b*block_size+block_size-1).
One step packs the tokens of several sequences into one row; per-step metadata, computed once by the
runtime and shared by every layer, says where things are:

  slot_mapping [T]     cache slot that token t's K/V is written to
  q_index      [S, Q]  packed token index of each sequence's queries (padding rows point at T)
  q_pos        [S, Q]  absolute position of each query (padding: -1)
  kv_slots     [S, K]  cache slots of each sequence's context, in position order (padding: 0)
  kv_len       [S]     context length of each sequence, this step's tokens included

The CPU implementation is plain torch (`attention_reference`); the GPU kernel sits behind the same op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_reference import allowed_mask, attend

METADATA_FIELDS = ("slot_mapping", "q_index", "q_pos", "kv_slots", "kv_len")


@dataclass(frozen=True)
class AttentionMetadata:
    """The per-step tensors every paged-attention call of one forward shares."""

    slot_mapping: torch.Tensor
    q_index: torch.Tensor
    q_pos: torch.Tensor
    kv_slots: torch.Tensor
    kv_len: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in METADATA_FIELDS)


@torch.library.custom_op("hfrewrite::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_index: torch.Tensor,
                    q_pos: torch.Tensor, kv_slots: torch.Tensor, kv_len: torch.Tensor, scaling: float,
                    sliding_window: int, softcap: float, causal: bool,
                    sinks: torch.Tensor | None) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, Hkv, T, D] in HF's layout -> [1, T, H, Dv], like the marker op it replaces."""
    return paged_attention_reference(q, k, v, k_cache, v_cache, slot_mapping, q_index, q_pos, kv_slots, kv_len,
                                     scaling, sliding_window, softcap, causal, sinks)


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, k_cache, v_cache, slot_mapping, q_index, q_pos, kv_slots, kv_len, scaling,
                          sliding_window, softcap, causal, sinks):
    return q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1])


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([1, Hkv, T, D]) at their slots."""
    k_cache.index_copy_(0, slot_mapping, k[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v[0].transpose(0, 1).to(v_cache.dtype))


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_index: torch.Tensor,
                              q_pos: torch.Tensor, kv_slots: torch.Tensor, kv_len: torch.Tensor, scaling: float,
                              sliding_window: int, softcap: float, causal: bool,
                              sinks: torch.Tensor | None) -> torch.Tensor:
    """Plain-torch paged attention: write the cache, gather each sequence's context, attend, scatter back."""
    write_cache(k, v, k_cache, v_cache, slot_mapping)
    tokens, heads, value_dim = q.shape[2], q.shape[1], v.shape[-1]
    q_tokens = q[0].transpose(0, 1)                                    # [T, H, D]
    padded = torch.cat([q_tokens, q_tokens.new_zeros(1, heads, q_tokens.shape[-1])])
    queries = padded[q_index].transpose(1, 2)                          # [S, H, Q, D]
    keys = k_cache[kv_slots].transpose(1, 2).to(q.dtype)               # [S, Hkv, K, D]
    values = v_cache[kv_slots].transpose(1, 2).to(q.dtype)
    kv_pos = torch.arange(kv_slots.shape[1], device=q.device)
    kv_valid = kv_pos[None, :] < kv_len[:, None]
    allowed = allowed_mask(q_pos, kv_pos.expand(kv_slots.shape[0], -1), kv_valid, causal, sliding_window)
    allowed = allowed & (q_pos >= 0)[:, :, None]
    out = attend(queries, keys, values, allowed, scaling, softcap, sinks)  # [S, H, Q, Dv]
    result = q.new_empty(tokens + 1, heads, value_dim)
    result.index_copy_(0, q_index.reshape(-1), out.transpose(1, 2).reshape(-1, heads, value_dim))
    return result[:tokens].unsqueeze(0)
