"""The attention marker: one custom op per HF attention call, registered as an attention function.

transformers 5 routes every attention call of most models through `AttentionInterface`. We register
`hfrewrite` there; it calls `hfrewrite::attention`, so each attention call becomes one graph node that
carries its parameters (scaling, sliding window, softcap, causal, sinks). The attention-mask interface
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
    out = torch.ops.hfrewrite.attention(query, key, value, float(scaling), int(sliding_window or 0),
                                        float(softcap or 0.0), bool(causal), sinks)
    return out, None


def register() -> str:
    """Register the attention function (idempotent) and return its implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention_function)
    return ATTN_IMPLEMENTATION
