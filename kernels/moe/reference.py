"""Plain-torch reference of transformers 5's routed experts: the CPU path of `hfrewrite::fused_moe` and its oracle.

Transformers 5 keeps all experts of a layer in two 3D parameters and calls the experts module as
`experts(hidden [M, H], top_k_index [M, K], top_k_weights [M, K]) -> [M, H]`. Two storage layouts exist:

  standard (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...):
      gate_up_proj [E, 2I, H]  (rows 0..I-1 = gate, I..2I-1 = up; `F.linear(x, W).chunk(2)`)
      down_proj    [E, H, I]
  transposed + interleaved (GPT-OSS):
      gate_up_proj [E, H, 2I]  (columns 0, 2, 4, ... = gate, 1, 3, 5, ... = up; `x @ W`)
      down_proj    [E, I, H]
      plus gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]

Each expert computes down(act(gate) * up); the output of token m is sum_k w[m, k] * expert_{id[m, k]}(x[m]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "gpt_oss")
# transformers' ACT2FN names -> ours; only the gated activations the kernel fuses.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ExpertsLayout:
    """How gate_up / down are stored, so callers state it instead of the op guessing from shapes.

    transposed=False: gate_up [E, 2I, H], down [E, H, I] (out-features first, like nn.Linear).
    transposed=True:  gate_up [E, H, 2I], down [E, I, H] (in-features first, GPT-OSS).
    interleaved=False: gate and up are the two halves of the 2I axis; True: they alternate (gate at even).
    """

    transposed: bool = False
    interleaved: bool = False

    def sizes(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[int, int, int]:
        """(E, H, I) read from the weights, checked against each other."""
        experts = gate_up.shape[0]
        _, rows, cols = gate_up.shape
        hidden, two_i = (rows, cols) if self.transposed else (cols, rows)
        inter = two_i // 2
        want_down = (experts, inter, hidden) if self.transposed else (experts, hidden, inter)
        if two_i % 2 or tuple(down.shape) != want_down:
            raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit {self}")
        return experts, hidden, inter

    @classmethod
    def from_module(cls, experts: torch.nn.Module) -> ExpertsLayout:
        """Read the flags that `@use_experts_implementation` puts on a transformers experts module."""
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
            raise ValueError(f"{type(experts).__name__}: only gated experts without a post-expert norm are supported")
        return cls(transposed=bool(getattr(experts, "is_transposed", False)),
                   interleaved=not getattr(experts, "is_concatenated", True))


@dataclass(frozen=True)
class Activation:
    """The gated activation: "silu" (SwiGLU), "gelu" (erf), "gelu_tanh", or GPT-OSS's clamped SwiGLU ("gpt_oss").

    alpha and limit are used by "gpt_oss" only: gate = min(gate, limit), up = clamp(up, -limit, limit),
    out = (up + 1) * gate * sigmoid(alpha * gate).
    """

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation {self.kind!r} is not one of {ACTIVATIONS}")

    @classmethod
    def from_module(cls, experts: torch.nn.Module) -> Activation:
        """GPT-OSS modules carry alpha/limit; the others name `config.hidden_act`."""
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):
            return cls("gpt_oss", float(experts.alpha), float(experts.limit))
        name = getattr(getattr(experts, "config", None), "hidden_act", None)
        if name not in HF_ACTIVATIONS:
            raise ValueError(f"{type(experts).__name__}: hidden_act {name!r} is not a supported gated activation")
        return cls(HF_ACTIVATIONS[name])


def apply_gate(gate_up: torch.Tensor, layout: ExpertsLayout, act: Activation) -> torch.Tensor:
    """[..., 2I] projection -> [..., I] gated activation, in the dtype it is given."""
    if layout.interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if act.kind == "silu":
        return F.silu(gate) * up
    if act.kind == "gelu":
        return F.gelu(gate) * up
    if act.kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One expert's linear map in the stored layout."""
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def moe_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, layout: ExpertsLayout = ExpertsLayout(), act: Activation = Activation(),
                  gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                  expert_offset: int = 0) -> torch.Tensor:
    """Routed experts, one gather per expert hit: the matmuls run in the input dtype (as HF's eager loop does),
    the activation and the weighted sum over top-k in fp32, so bf16 rounding is at most one step off HF's.

    Expert parallelism: the weights hold global experts [expert_offset, expert_offset + E); ids outside that
    range belong to other ranks and contribute nothing here."""
    if hidden.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, ids {tuple(topk_ids.shape)}, "
                         f"weights {tuple(topk_weights.shape)} are not [M, H], [M, K], [M, K]")
    layout.sizes(gate_up, down)
    tokens, top_k = topk_ids.shape
    out = torch.zeros(tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    token_of_slot = torch.arange(tokens, device=hidden.device).repeat_interleave(top_k)
    for expert in torch.unique(flat_ids).tolist():
        expert -= expert_offset
        if not 0 <= expert < gate_up.shape[0]:
            continue
        slots = (flat_ids == expert + expert_offset).nonzero().squeeze(1)
        rows = token_of_slot[slots]
        gu_bias = None if gate_up_bias is None else gate_up_bias[expert]
        mid = _project(hidden[rows], gate_up[expert], gu_bias, layout.transposed)
        mid = apply_gate(mid.float(), layout, act).to(hidden.dtype)
        d_bias = None if down_bias is None else down_bias[expert]
        y = _project(mid, down[expert], d_bias, layout.transposed)
        out.index_add_(0, rows, y.float() * flat_weights[slots, None])
    return out.to(hidden.dtype)
