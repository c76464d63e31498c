"""hfrewrite::attention_alibi: the ALiBi attention marker, what an ALiBi pattern match becomes.

Like hfrewrite::attention (compiler/attention_marker.py) it is one graph node per attention call that
carries its parameters, here with the per-head slopes as a constant list. It exists so that the
pattern rules can run before the tensor-parallel family (which shards q/k/v by whole heads and, for
this op, keeps each rank's slopes) and the paging rule after it (which then sizes the KV cache with
the rank's KV heads). Its own implementation attends over one unpadded causal sequence per row, so
a graph holding it still runs and can be checked against HF eager.
"""
from __future__ import annotations

import torch

from hfrewrite.kernels.attention.reference import alibi_bias, allowed_mask, attend


@torch.library.custom_op("hfrewrite::attention_alibi", mutates_args=())
def attention_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, sliding_window: int,
                    alibi_slopes: list[float]) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, T, H, Dv]: causal, slopes[h] * (key - query) added to the scores."""
    batch, heads, tokens, _ = q.shape
    if len(alibi_slopes) != heads:
        raise ValueError(f"{len(alibi_slopes)} ALiBi slopes for {heads} heads")
    positions = torch.arange(tokens, device=q.device).expand(batch, -1)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=q.device)
    allowed = allowed_mask(positions, positions, valid, True, sliding_window)
    slopes = torch.tensor(alibi_slopes, dtype=torch.float32, device=q.device)
    bias = alibi_bias(slopes, positions, positions)
    return attend(q, k, v, allowed, scaling, bias=bias).transpose(1, 2).contiguous()


@attention_alibi.register_fake
def _attention_alibi_fake(q, k, v, scaling, sliding_window, alibi_slopes):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


ATTENTION_ALIBI = torch.ops.hfrewrite.attention_alibi.default
