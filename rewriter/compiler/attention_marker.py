"""The attention marker: one custom op per HF attention call, registered as an attention function.

transformers 5 routes every attention call of most models through `AttentionInterface`. We register
`hfrewrite` there; it calls `hfrewrite::attention`, so each attention call becomes one graph node that
carries its parameters (scaling, sliding window, softcap, causal, sinks). A model fed a `key_limit` input
(the vision-language kind of Gemma 3, whose image tokens attend to their whole image) passes it through
HF's attention kwargs; its calls become `hfrewrite::attention_key_limit` instead. The attention-mask interface
has no `hfrewrite` entry, so transformers builds no mask at all (the paged op masks by positions).

The op's own implementation computes attention over one unpadded sequence, so a captured graph
still runs and can be checked against HF eager before any rule touches it.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface

from hfrewrite.kernels.attention.reference import allowed_mask, attend

ATTN_IMPLEMENTATION = "hfrewrite"


@torch.library.custom_op("hfrewrite::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, sliding_window: int,
              softcap: float, causal: bool, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] (one sequence per row) -> [B, T, H, Dv] like HF attention functions."""
    batch, _, tokens, _ = q.shape
    positions = torch.arange(tokens, device=q.device).expand(batch, -1)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=q.device)
    allowed = allowed_mask(positions, positions, valid, causal, sliding_window)
    return attend(q, k, v, allowed, scaling, softcap, sinks).transpose(1, 2).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, scaling, sliding_window, softcap, causal, sinks):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@torch.library.custom_op("hfrewrite::attention_key_limit", mutates_args=())
def attention_key_limit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_limit: torch.Tensor, scaling: float,
                        sliding_window: int, softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """`attention`, causal but query t seeing the keys before key_limit[t] ([T]; Gemma 3's image tokens see their
    whole image), the window counted back from the query."""
    batch, _, tokens, _ = q.shape
    positions = torch.arange(tokens, device=q.device).expand(batch, -1)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=q.device)
    limits = key_limit.long().reshape(1, tokens).expand(batch, -1)
    allowed = allowed_mask(positions, positions, valid, True, sliding_window, limits)
    return attend(q, k, v, allowed, scaling, softcap, sinks).transpose(1, 2).contiguous()


@attention_key_limit.register_fake
def _attention_key_limit_fake(q, k, v, key_limit, scaling, sliding_window, softcap, sinks):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


def _hf_attention_function(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, softcap: float | None = None,
                           s_aux: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The AttentionInterface entry: forward HF's arguments to the marker op."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    sinks = kwargs.get("sinks", s_aux)
    key_limit = kwargs.get("key_limit")   # fed by a kind whose model lets image tokens see their image (Gemma 3)
    if key_limit is not None:
        out = torch.ops.hfrewrite.attention_key_limit(query, key, value, key_limit, float(scaling),
                                                      int(sliding_window or 0), float(softcap or 0.0), sinks)
        return out, None
    out = torch.ops.hfrewrite.attention(query, key, value, float(scaling), int(sliding_window or 0),
                                        float(softcap or 0.0), bool(causal), sinks)
    return out, None


def register() -> str:
    """Register the attention function (idempotent) and return its implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention_function)
    return ATTN_IMPLEMENTATION
