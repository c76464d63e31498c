"""Plain-torch attention math shared by the capture marker op and the paged-attention reference.

One function so that every attention variant HF models use (GQA, sliding window, logit softcap,
attention sinks, custom scaling) is written once and tested once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def allowed_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, kv_valid: torch.Tensor, causal: bool,
                 sliding_window: int, key_limit: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may attend to: [S, Q, K] bool.

    q_pos [S, Q] and kv_pos [S, K] are absolute positions; kv_valid [S, K] marks real keys.
    HF's sliding window keeps keys with q - k < window (and k - q < window when not causal).
    `key_limit` [S, Q] (with causal): each query sees keys k < key_limit instead of k <= q (Gemma 3's image
    tokens see their whole image: AND(window, OR(causal, same image)) in HF, the window still counted back
    from the query).
    """
    allowed = kv_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    distance = q_pos[:, :, None] - kv_pos[:, None, :]
    if key_limit is not None:
        allowed = allowed & (kv_pos[:, None, :] < key_limit[:, :, None])
    elif causal:
        allowed = allowed & (distance >= 0)
    if sliding_window > 0:
        allowed = allowed & (distance < sliding_window)
        if not causal:  # a bidirectional window (ModernBERT's local layers): |q - k| < window
            allowed = allowed & (distance > -sliding_window)
    return allowed


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi: slopes [H] times (key - query) position, [S, H, Q, K] (bloom/mpt add slope * key; the per-query
    constant does not change the softmax)."""
    distance = kv_pos[:, None, :].float() - q_pos[:, :, None].float()      # [S, Q, K]
    return slopes.float().view(1, -1, 1, 1) * distance[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float,
           softcap: float = 0.0, sinks: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Masked attention: q [S, H, Q, D], k/v [S, Hkv, K, D], allowed [S, Q, K] -> [S, H, Q, Dv].

    `bias` [S, H, Q, K] (ALiBi) is added to the scaled scores. Every real query row must allow at least
    one key; rows with none (padding) come out undefined.
    """
    if bias is not None:
        if softcap != 0.0 or sinks is not None:
            raise NotImplementedError("attention with a bias and a softcap or sinks")
        additive = torch.where(allowed[:, None], bias, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if softcap == 0.0 and sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])
    else:
        groups = q.shape[1] // k.shape[1]
        k_full = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        v_full = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        scores = torch.matmul(q, k_full.transpose(-1, -2)).float() * scaling
        if softcap != 0.0:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
            combined = torch.cat([scores, sink], dim=-1)
            combined = combined - combined.amax(dim=-1, keepdim=True)
            probs = torch.softmax(combined, dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(v_full.dtype), v_full)
    return out
