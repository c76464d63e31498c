"""The paged-attention op: write this step's K/V into a block-paged cache, attend over each sequence's blocks.

The cache of one attention site is two tensors of shape [num_slots, kv_heads, head_dim]
(num_slots = num_blocks * block_size; block b holds slots b*block_size ... b*block_size+block_size-1).
One step packs the tokens of several sequences into one row; per-step metadata, computed once by the
runtime and shared by every layer, says where things are:

  slot_mapping [T]        cache slot that token t's K/V is written to
  q_gather     [S, Q]     packed token index of each sequence's queries (padding: 0)
  q_scatter    [S * Q]    where each query row's output goes (padding: T, a scratch row)
  q_pos        [S, Q]     absolute position of each query (padding: -1)
  kv_slots     [S, K]     cache slots of each sequence's context, in position order (padding: 0)
  kv_len       [S]        context length of each sequence, this step's tokens included
  causal_mask  [S, Q, K]  key k visible to query q under plain causal attention

Padding query rows may come out as anything (even NaN): they land in the scratch row and are dropped.

The CPU implementation is plain torch (`attention_reference`); the GPU kernel sits behind the same op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hfrewrite.kernels.attention.reference import allowed_mask, attend

METADATA_FIELDS = ("slot_mapping", "q_gather", "q_scatter", "q_pos", "kv_slots", "kv_len", "causal_mask")
# example shapes (S=2 sequences, Q=3 queries, K=8 keys, T=4 tokens) and dtypes, for fake graph inputs
METADATA_EXAMPLES = {"slot_mapping": ((4,), torch.long), "q_gather": ((2, 3), torch.long),
                     "q_scatter": ((6,), torch.long), "q_pos": ((2, 3), torch.long), "kv_slots": ((2, 8), torch.long),
                     "kv_len": ((2,), torch.long), "causal_mask": ((2, 3, 8), torch.bool)}


@dataclass(frozen=True)
class AttentionMetadata:
    """The per-step tensors every paged-attention call of one forward shares."""

    slot_mapping: torch.Tensor
    q_gather: torch.Tensor
    q_scatter: torch.Tensor
    q_pos: torch.Tensor
    kv_slots: torch.Tensor
    kv_len: torch.Tensor
    causal_mask: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in METADATA_FIELDS)


# Registered through torch.library.Library rather than torch.library.custom_op: the op runs 30 times per
# step in a compiled graph, and custom_op's Python wrapper costs ~75 us per call on a CPU (measured) for
# autograd and checks inference does not need. The schema marks the two caches as mutated, so
# torch.compile functionalizes the op (auto_functionalized) exactly as it would a custom_op.
_LIBRARY = torch.library.Library("hfrewrite", "FRAGMENT")
_LIBRARY.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
    "Tensor q_gather, Tensor q_scatter, Tensor q_pos, Tensor kv_slots, Tensor kv_len, Tensor causal_mask, "
    "float scaling, int sliding_window, float softcap, bool causal, Tensor? sinks) -> Tensor")


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_gather: torch.Tensor,
                    q_scatter: torch.Tensor, q_pos: torch.Tensor, kv_slots: torch.Tensor, kv_len: torch.Tensor,
                    causal_mask: torch.Tensor, scaling: float, sliding_window: int, softcap: float, causal: bool,
                    sinks: torch.Tensor | None) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, Hkv, T, D] in HF's layout -> [1, T, H, Dv], like the marker op it replaces."""
    metadata = AttentionMetadata(slot_mapping, q_gather, q_scatter, q_pos, kv_slots, kv_len, causal_mask)
    return paged_attention_reference(q, k, v, k_cache, v_cache, metadata, scaling, sliding_window, softcap, causal,
                                     sinks)


def _paged_attention_fake(q, k, v, k_cache, v_cache, slot_mapping, q_gather, q_scatter, q_pos, kv_slots, kv_len,
                          causal_mask, scaling, sliding_window, softcap, causal, sinks):
    return q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1])


_LIBRARY.impl("paged_attention", paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("hfrewrite::paged_attention", _paged_attention_fake, lib=_LIBRARY)


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([1, Hkv, T, D]) at their slots."""
    k_cache.index_copy_(0, slot_mapping, k[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v[0].transpose(0, 1).to(v_cache.dtype))


def _gather_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [N, Hkv, D] rows at slots [S, K] -> [S, Hkv, K, D]."""
    rows = cache.index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:]).transpose(1, 2)


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, metadata: AttentionMetadata, scaling: float, sliding_window: int,
                              softcap: float, causal: bool, sinks: torch.Tensor | None) -> torch.Tensor:
    """Plain-torch paged attention: write the cache, gather each sequence's context, attend, scatter back."""
    write_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
    tokens, heads, value_dim = q.shape[2], q.shape[1], v.shape[-1]
    sequences, max_q = metadata.q_gather.shape
    # index_select copies whole rows (several times faster than advanced indexing's element-wise gather)
    queries = q[0].index_select(1, metadata.q_gather.reshape(-1)).view(heads, sequences, max_q, -1).transpose(0, 1)
    keys = _gather_rows(k_cache, metadata.kv_slots).to(q.dtype)           # [S, Hkv, K, D]
    values = _gather_rows(v_cache, metadata.kv_slots).to(q.dtype)
    if causal and sliding_window == 0:
        allowed = metadata.causal_mask
    else:
        kv_pos = torch.arange(metadata.kv_slots.shape[1], device=q.device).expand(metadata.kv_slots.shape[0], -1)
        kv_valid = kv_pos < metadata.kv_len[:, None]
        allowed = allowed_mask(metadata.q_pos, kv_pos, kv_valid, causal, sliding_window)
    out = attend(queries, keys, values, allowed, scaling, softcap, sinks)  # [S, H, Q, Dv]
    result = q.new_empty(tokens + 1, heads, value_dim)
    result.index_copy_(0, metadata.q_scatter, out.transpose(1, 2).reshape(-1, heads, value_dim))
    return result[:tokens].unsqueeze(0)
