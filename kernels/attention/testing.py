"""Test helpers for the paged-attention op: a naive float64 oracle and random paged steps.

Shared by the reference's and the Triton kernels' tests, so both are held to the same definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hfrewrite.runtime.step import Chunk, PackedStep, pack


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int, softcap: float,
                    causal: bool, sinks: torch.Tensor | None, q_start: int = 0,
                    images: list[tuple[int, int]] = ()) -> torch.Tensor:
    """One query at a time, from the definitions: q [H, Q, D] at positions q_start.., k/v [Hkv, K, D] -> [Q, H, Dv].

    `images` [a, b) spans (Gemma 3, causal only): a query inside one also sees every key of that image, HF's
    AND(window counted back from the query, OR(causal, same image))."""
    heads, queries, _ = q.shape
    group = heads // k.shape[0]
    image_of = {p: (a, b) for a, b in images for p in range(a, b)}
    out = torch.zeros(queries, heads, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for i in range(queries):
            pos = q_start + i
            # HF windows: causal keeps pos - j < window; bidirectional (masking_utils) keeps |pos - j| < window
            keys = [j for j in range(k.shape[1])
                    if (not causal or j <= pos or (pos in image_of and image_of.get(j) == image_of[pos]))
                    and (window == 0 or (pos - j if causal else abs(pos - j)) < window)]
            scores = [float(q[h, i].double() @ k[h // group, j].double()) * scaling for j in keys]
            if softcap:
                scores = [softcap * math.tanh(s / softcap) for s in scores]
            extra = [float(sinks[h])] if sinks is not None else []
            top = max(scores + extra)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights) + sum(math.exp(e - top) for e in extra)
            for w, j in zip(weights, keys):
                out[i, h] += (w / total) * v[h // group, j].double()
    return out


@dataclass
class RandomStep:
    """One packed step over a shuffled paged cache whose earlier context is already written."""

    step: PackedStep
    spans: list[tuple[int, int]]           # (cached context length, query count) of each real sequence
    q: torch.Tensor                        # [1, H, T, D]
    k: torch.Tensor                        # [1, Hkv, T, D]
    v: torch.Tensor
    k_cache: torch.Tensor                  # [slots, Hkv, D], garbage outside the written context
    v_cache: torch.Tensor
    full_k: list[torch.Tensor]             # per sequence [Hkv, end, D]: the whole context, this step included
    full_v: list[torch.Tensor]
    full_q: list[torch.Tensor]             # per sequence [H, count, D]
    scratch_slots: list[int]               # slots the padding rows write


def random_step(gen: torch.Generator, spans: list[tuple[int, int]], kv_heads: int, group: int, head_dim: int,
                block_size: int, padding: int = 0, extra_width: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device = torch.device("cpu")) -> RandomStep:
    """Sequences with `spans` (context, queries) in blocks handed out in a random order; `padding` extra
    one-token sequences on a scratch block, as a graph runner pads a decode batch."""
    heads = kv_heads * group
    ends = [context + count for context, count in spans]
    need = [-(-end // block_size) for end in ends]
    order = torch.randperm(sum(need) + 2, generator=gen).tolist()
    scratch = order.pop()
    tables, cursor = [], 0
    for count in need:
        tables.append(order[cursor:cursor + count])
        cursor += count

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    slots = (sum(need) + 2) * block_size
    k_cache, v_cache = randn(slots, kv_heads, head_dim), randn(slots, kv_heads, head_dim)  # stale garbage
    full_k = [randn(kv_heads, end, head_dim) for end in ends]
    full_v = [randn(kv_heads, end, head_dim) for end in ends]
    full_q = [randn(heads, count, head_dim) for _, count in spans]
    for (context, _), table, keys, values in zip(spans, tables, full_k, full_v):
        for p in range(context):
            slot = table[p // block_size] * block_size + p % block_size
            k_cache[slot], v_cache[slot] = keys[:, p], values[:, p]
    chunks = [Chunk([1] * count, context, table) for (context, count), table in zip(spans, tables)]
    chunks += [Chunk([0], 0, [scratch])] * padding
    width = max(need + [1]) + extra_width
    step = pack(chunks, block_size, device, block_table_width=width)
    pad_q, pad_kv = randn(heads, padding, head_dim), randn(kv_heads, padding, head_dim)
    q = torch.cat([*full_q, pad_q], dim=1)[None]
    k = torch.cat([keys[:, c:] for (c, _), keys in zip(spans, full_k)] + [pad_kv], dim=1)[None]
    v = torch.cat([values[:, c:] for (c, _), values in zip(spans, full_v)] + [pad_kv], dim=1)[None]
    return RandomStep(step, list(spans), q.to(device), k.to(device), v.to(device), k_cache.to(device),
                      v_cache.to(device), full_k, full_v, full_q, [scratch * block_size] if padding else [])


def expected_outputs(case: RandomStep, scaling: float, window: int, softcap: float, causal: bool,
                     sinks: torch.Tensor | None) -> list[torch.Tensor]:
    """The naive oracle's output of each real sequence, [count, H, Dv] in float64."""
    return [naive_attention(q.float(), keys.float(), values.float(), scaling, window, softcap, causal,
                            None if sinks is None else sinks.float(), q_start=context)
            for (context, _), q, keys, values in zip(case.spans, case.full_q, case.full_k, case.full_v)]


def split_rows(out: torch.Tensor, case: RandomStep) -> list[torch.Tensor]:
    """The op's output [1, T, H, Dv] cut into each real sequence's rows (padding rows dropped)."""
    rows, offset = [], 0
    for _, count in case.spans:
        rows.append(out[0, offset:offset + count])
        offset += count
    return rows


def compile_for_target(arch: int) -> str:
    """Compile the kernels (no launch) for an NVIDIA sm_<arch> target with every variant flag on, in a process
    without TRITON_INTERPRET; returns the shared-memory bytes of each as a comma list."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hfrewrite.kernels.attention import triton as triton_attention

    variants = dict(IEEE=False, USE_SOFTCAP=True, USE_WINDOW=True, USE_SINKS=True, USE_ALIBI=True)
    configs = [(triton_attention._decode_kernel, "bf16", dict(G_PAD=16, D_PAD=128, DV_PAD=128, BLOCK_N=64, SPLIT=True,
                                                              **variants), 3),
               (triton_attention._decode_kernel, "fp32", dict(G_PAD=16, D_PAD=256, DV_PAD=256, BLOCK_N=32, SPLIT=False,
                                                              **{**variants, "IEEE": True}), 2),
               (triton_attention._prefill_kernel, "fp16", dict(BLOCK_Q=16, BLOCK_M=64, D_PAD=128, DV_PAD=128,
                                                               BLOCK_N=64, CAUSAL=True, USE_KEY_LIMIT=True,
                                                               **variants), 3),
               # an int argument of 1 is specialized into a constant: the binary search must cope
               (triton_attention._prefill_kernel, "bf16", dict(BLOCK_Q=64, BLOCK_M=64, D_PAD=64, DV_PAD=64, BLOCK_N=64,
                                                               CAUSAL=False, num_seqs=1, group=1, USE_KEY_LIMIT=False,
                                                               **variants), 3),
               (triton_attention._reduce_kernel, "bf16", dict(SPLITS_PAD=16, DV_PAD=128, USE_SINKS=True), 3)]
    ints = ("tables_ptr", "seq_lens_ptr", "qsl_ptr", "block_size_ptr", "key_limit_ptr")
    floats = ("part_m_ptr", "part_l_ptr", "part_acc_ptr", "sinks_ptr", "alibi_ptr")
    shared = []
    for kernel, dtype, constants, stages in configs:
        function = triton.jit(kernel)
        signature = {name: "constexpr" if name in constants else "*i32" if name in ints else "*fp32"
                     if name in floats else f"*{dtype}" if name.endswith("_ptr") else "fp32"
                     if name in ("scale", "softcap") else "i32" for name in function.arg_names}
        compiled = triton.compile(ASTSource(function, signature, constants), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": 4, "num_stages": stages})
        shared.append(int(compiled.metadata.shared))
    return ",".join(map(str, shared))
