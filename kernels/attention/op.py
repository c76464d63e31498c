"""The paged-attention op: write this step's K/V into a block-paged cache, attend over each sequence's blocks.

The cache of one attention site is two tensors of shape [num_slots, kv_heads, head_dim]
(num_slots = num_blocks * block_size; block b holds slots b*block_size ... b*block_size+block_size-1).
One step packs the query tokens of S sequences into one row of T tokens (sequence s owns tokens
query_start_loc[s] ... query_start_loc[s+1]-1, its newest ones, at the end of its context).
The per-step metadata, built once on the host by the runtime (runtime/step.py) and shared by every layer,
is what the kernels read; no dense masks:

  slot_mapping     [T]       int64  cache slot that token t's K/V is written to
  block_tables     [S, W]    int32  cache blocks of each sequence, in position order (unused tail: any block)
  seq_lens         [S]       int32  context length of each sequence, this step's tokens included (>= 1)
  query_start_loc  [S + 1]   int32  cumulative query counts: 0, q_0, q_0 + q_1, ..., T (every q_s >= 1)
  block_size       [1]       int32  tokens per cache block (a tensor: the cache layout is chosen after compile)

Key k of sequence s lives at slot block_tables[s, k // block_size] * block_size + k % block_size; query i
of s sits at position seq_lens[s] - q_s + i. A step with T == S is a decode step (one query per sequence)
and runs the decode kernel; any other step runs the prefill / mixed kernel. Neither syncs the device:
grid sizes come from T, S, W and the cache's shape, never from tensor values.

CUDA-graph capture of decode steps (the runner pads a batch of B sequences to a bucket P >= B): every
metadata shape is then fixed by (P, W): slot_mapping [P], block_tables [P, W] with W the static width
max_context / block_size (`pack(..., block_table_width=W)`), seq_lens [P], query_start_loc [P + 1]
(= 0..P), block_size [1]. A padding sequence is a one-token chunk at position 0 whose one block is a
scratch block reserved by the caller (`Chunk([0], 0, [scratch_block])`): it writes the scratch slot, reads
only that slot (seq_len 1), and its output row is ignored; it cannot touch a real sequence's cache.
The decode kernel's split count depends on (P, W, kv heads) only, so it is fixed per captured bucket;
each split's share of the context is computed on the device from seq_lens.

The CPU implementation is plain torch (`paged_attention_reference`, also the tests' oracle); devices where
Triton works run kernels/attention/triton.py. HFREWRITE_ATTENTION=reference forces the reference
everywhere; HFREWRITE_ATTENTION=triton runs the Triton kernels on the CPU too when TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.kernels.attention.cache_write import write_cache_triton
from hfrewrite.kernels.attention.reference import alibi_bias, allowed_mask, attend

METADATA_FIELDS = ("slot_mapping", "block_tables", "seq_lens", "query_start_loc", "block_size")
# example shapes (S=2 sequences, W=3 blocks per table, T=4 tokens) and dtypes, for fake graph inputs
METADATA_EXAMPLES = {"slot_mapping": ((4,), torch.long), "block_tables": ((2, 3), torch.int32),
                     "seq_lens": ((2,), torch.int32), "query_start_loc": ((3,), torch.int32),
                     "block_size": ((1,), torch.int32)}
BACKEND_VARIABLE = "HFREWRITE_ATTENTION"


@dataclass(frozen=True)
class AttentionMetadata:
    """The per-step tensors every paged-attention call of one forward shares."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    block_size: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in METADATA_FIELDS)


# Registered through torch.library.Library rather than torch.library.custom_op: the op runs 30 times per
# step in a compiled graph, and custom_op's Python wrapper costs ~75 us per call on a CPU (measured) for
# autograd and checks inference does not need. The schema marks the two caches as mutated, so
# torch.compile functionalizes the op (auto_functionalized) exactly as it would a custom_op.
_LIBRARY = torch.library.Library("hfrewrite", "FRAGMENT")
_LIBRARY.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
    "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor block_size, "
    "float scaling, int sliding_window, float softcap, bool causal, Tensor? sinks) -> Tensor")


# ALiBi (bloom, mpt, falcon alibi=True): per-head slopes as a constant list (a tensor parallel rank's op
# carries its own heads' slopes); the Triton kernels' USE_ALIBI variant where the plain op runs them.
_LIBRARY.define(
    "paged_attention_alibi(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor block_size, "
    "float scaling, int sliding_window, float[] alibi_slopes) -> Tensor")


# Per-query key limits (Gemma 3: an image's tokens attend to every token of their image): key_limit [T] int32 is
# the exclusive end of the keys query t sees (position + 1 for a text token, its image's end for an image token;
# never past its sequence's length, so a prefill chunk never ends inside an image). Causal otherwise; the sliding
# window still counts back from the query. Decode tokens are text (limit = position + 1): a decode step ignores it.
_LIBRARY.define(
    "paged_attention_key_limit(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor block_size, "
    "Tensor key_limit, float scaling, int sliding_window, float softcap, Tensor? sinks) -> Tensor")


def interpreting() -> bool:
    """Whether Triton kernels would run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_triton(device: torch.device) -> bool:
    """Whether the op runs the Triton kernels for tensors on `device` (see the module docstring)."""
    choice = os.environ.get(BACKEND_VARIABLE, "auto")
    if choice == "reference" or not triton_attention.available():
        return False
    if device.type == "cpu":
        return choice == "triton" and interpreting()
    return True


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: torch.Tensor, scaling: float,
                    sliding_window: int, softcap: float, causal: bool, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, Hkv, T, D] in HF's layout -> [1, T, H, Dv], like the marker op it replaces."""
    metadata = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc, block_size)
    if uses_triton(q.device):
        write_cache_triton(k, v, k_cache, v_cache, slot_mapping, interpret=q.device.type == "cpu")
        return triton_attention.paged_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scaling, sliding_window,
            softcap, causal, sinks, interpret=q.device.type == "cpu")
    return paged_attention_reference(q, k, v, k_cache, v_cache, metadata, scaling, sliding_window, softcap, causal,
                                     sinks)


@functools.lru_cache(maxsize=256)
def _slopes_on(slopes: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The slopes as a float32 tensor on `device`, made once per (slopes, device): a host-to-device copy
    on every call would cost a copy per layer per step and cannot run inside CUDA-graph capture (the
    runner's warm-up step makes it first)."""
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def _paged_attention_fake(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
                          block_size, scaling, sliding_window, softcap, causal, sinks):
    return q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1])


def paged_attention_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: torch.Tensor,
                          scaling: float, sliding_window: int, alibi_slopes: list[float]) -> torch.Tensor:
    """paged_attention, causal, with slopes[h] * (key - query position) added to each head's scores."""
    metadata = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc, block_size)
    slopes = _slopes_on(tuple(alibi_slopes), q.device)
    if uses_triton(q.device):
        write_cache_triton(k, v, k_cache, v_cache, slot_mapping, interpret=q.device.type == "cpu")
        return triton_attention.paged_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scaling, sliding_window, 0.0,
            True, None, interpret=q.device.type == "cpu", alibi_slopes=slopes)
    return paged_attention_reference(q, k, v, k_cache, v_cache, metadata, scaling, sliding_window, 0.0, True, None,
                                     alibi_slopes=slopes)


def paged_attention_key_limit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: torch.Tensor,
                              key_limit: torch.Tensor, scaling: float, sliding_window: int, softcap: float,
                              sinks: torch.Tensor | None) -> torch.Tensor:
    """paged_attention, each query seeing the keys before its key_limit (see the schema's comment above)."""
    metadata = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc, block_size)
    if uses_triton(q.device):
        write_cache_triton(k, v, k_cache, v_cache, slot_mapping, interpret=q.device.type == "cpu")
        return triton_attention.paged_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scaling, sliding_window,
            softcap, True, sinks, interpret=q.device.type == "cpu", key_limit=key_limit)
    return paged_attention_reference(q, k, v, k_cache, v_cache, metadata, scaling, sliding_window, softcap, True,
                                     sinks, key_limit=key_limit)


_LIBRARY.impl("paged_attention", paged_attention, "CompositeExplicitAutograd")
_LIBRARY.impl("paged_attention_alibi", paged_attention_alibi, "CompositeExplicitAutograd")
torch.library.register_fake("hfrewrite::paged_attention_alibi", lambda q, k, v, *rest: _paged_attention_fake(
    q, k, v, *rest[:9], 0.0, True, None), lib=_LIBRARY)
_LIBRARY.impl("paged_attention_key_limit", paged_attention_key_limit, "CompositeExplicitAutograd")
torch.library.register_fake("hfrewrite::paged_attention_key_limit",
                            lambda q, k, v, *rest: q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1]), lib=_LIBRARY)
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
                              softcap: float, causal: bool, sinks: torch.Tensor | None,
                              alibi_slopes: torch.Tensor | None = None,
                              key_limit: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch paged attention: write the cache, gather each sequence's context, attend, scatter back.

    `alibi_slopes` [H]: add slopes[h] * (key - query position) to the scores (ALiBi). `key_limit` [T] (with
    causal): query t sees keys before key_limit[t] (moot in a decode step: its one query's limit is its length).

    Reads the block size, the longest context and the longest query chunk off the metadata's values: cheap
    on the CPU, a device sync elsewhere (where it is only the tests' oracle).
    """
    write_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
    tokens, heads, value_dim = q.shape[2], q.shape[1], v.shape[-1]
    seq_lens = metadata.seq_lens
    sequences = metadata.block_tables.shape[0]
    block_size = int(metadata.block_size[0])
    max_k = int(seq_lens.max())
    # the slots of every table entry in position order, up to the longest context: [S, K] (keys past a
    # sequence's length are masked below); int64, index_select's faster path. index_select copies whole rows
    # (several times faster than advanced indexing's element-wise gather)
    kv_slots = (metadata.block_tables.unsqueeze(-1) * block_size
                + torch.arange(block_size, device=q.device)).view(sequences, -1)[:, :max_k]
    keys = _gather_rows(k_cache, kv_slots).to(q.dtype)                    # [S, Hkv, K, D]
    values = _gather_rows(v_cache, kv_slots).to(q.dtype)
    kv_pos = torch.arange(max_k, device=q.device)
    kv_valid = kv_pos < seq_lens[:, None]
    if tokens == sequences:  # decode: each sequence's one query is its last position, so causal is moot
        queries = q[0].transpose(0, 1).unsqueeze(2)                       # [S, H, 1, D]
        allowed = kv_valid[:, None, :]
        if sliding_window > 0:
            allowed = allowed & (kv_pos >= seq_lens[:, None] - sliding_window)[:, None, :]
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, (seq_lens - 1)[:, None],
                                                             kv_pos.expand(sequences, -1))
        out = attend(queries, keys, values, allowed, scaling, softcap, sinks, bias)  # [S, H, 1, Dv]
        return out.transpose(1, 2).reshape(1, tokens, heads, value_dim)
    starts = metadata.query_start_loc.long()
    seq_lens = seq_lens.long()
    q_lens = starts[1:] - starts[:-1]
    max_q = int(q_lens.max())
    offsets = torch.arange(max_q, device=q.device)
    q_valid = offsets < q_lens[:, None]
    q_gather = torch.where(q_valid, starts[:-1, None] + offsets, 0)      # [S, Q]
    q_pos = seq_lens[:, None] - q_lens[:, None] + offsets
    queries = q[0].index_select(1, q_gather.reshape(-1)).view(heads, sequences, max_q, -1).transpose(0, 1)
    limits = None if key_limit is None else torch.where(q_valid, key_limit.long()[q_gather], q_pos + 1)
    allowed = allowed_mask(q_pos, kv_pos.expand(sequences, -1), kv_valid, causal, sliding_window, limits)
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, q_pos, kv_pos.expand(sequences, -1))
    out = attend(queries, keys, values, allowed, scaling, softcap, sinks, bias)  # [S, H, Q, Dv]
    result = q.new_empty(tokens + 1, heads, value_dim)
    scatter = torch.where(q_valid, q_gather, tokens).reshape(-1)        # padding rows land on the scratch row
    result.index_copy_(0, scatter, out.transpose(1, 2).reshape(-1, heads, value_dim))
    return result[:tokens].unsqueeze(0)
