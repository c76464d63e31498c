"""The experts marker: one custom op per routed-experts call, registered as an experts implementation.

transformers 5 keeps a MoE layer's experts in two 3-D parameters and dispatches the experts module's
forward on `config._experts_implementation` through `ExpertsInterface` (5.17 and 5.24 alike). We
register `hfrewrite` there; it calls `hfrewrite::experts`, so each experts call becomes one graph
node whose inputs are the router's top-k ids and weights and the expert weights, and whose literal
arguments carry the layout and the gated activation. The router itself is left as the model wrote it.

Layout and activation are not guessed from class names: the module's own `_apply_gate` is run on a
probe and compared with each gate the fused kernel has (SwiGLU, GeGLU, GPT-OSS's clamped SwiGLU, with
the 2I axis split in halves or interleaved). A module no candidate reproduces (ungated experts, a
post-expert norm, an unknown gate) is captured as a grouped-GEMM graph that calls the module's own gate
instead, with an `ExpertsFallbackWarning` saying why, so the graph still computes the model's function.

The op's own implementation is the plain-torch reference, so a captured graph runs before any rule.
"""
from __future__ import annotations

import concurrent.futures
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

from hfrewrite.kernels.moe.reference import Activation, ExpertsLayout, apply_gate, moe_reference

EXPERTS_IMPLEMENTATION = "hfrewrite"
# Names under which experts modules keep the clamped-SwiGLU constants (GPT-OSS: alpha/limit; others swiglu_*).
_CLAMP_ATTRIBUTES = (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit"))
_PROBE_WIDTH = 16  # 2I of the probe: the gate functions do not depend on the module's real width
T = TypeVar("T")


class ExpertsFallbackWarning(UserWarning):
    """An experts module the marker cannot express; it stays as transformers' grouped_mm graph."""


@dataclass(frozen=True)
class ExpertsPlan:
    """How one experts module maps onto the marker op: weight layout and gated activation."""

    layout: ExpertsLayout
    activation: Activation
    has_bias: bool


@torch.library.custom_op("hfrewrite::experts", mutates_args=())
def experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str,
            alpha: float, limit: float, transposed: bool, interleaved: bool) -> torch.Tensor:
    """hidden [M, H], top_k_index/top_k_weights [M, K] -> [M, H]: the routed experts (moe_reference)."""
    return moe_reference(hidden, top_k_index, top_k_weights, gate_up, down, ExpertsLayout(transposed, interleaved),
                         Activation(activation, alpha, limit), gate_up_bias, down_bias)


@experts.register_fake
def _experts_fake(hidden: torch.Tensor, *args: object) -> torch.Tensor:
    """Shapes only: the output is like hidden."""
    return hidden.new_empty(hidden.shape)


def _candidates(module: torch.nn.Module) -> list[tuple[ExpertsLayout, Activation]]:
    """Every (layout, activation) the kernel could run for this module, the flags' own layout first."""
    transposed = bool(getattr(module, "is_transposed", False))
    flagged = not getattr(module, "is_concatenated", True)
    activations = [Activation(kind) for kind in ("silu", "gelu", "gelu_tanh")]
    for alpha_name, limit_name in _CLAMP_ATTRIBUTES:
        alpha, limit = getattr(module, alpha_name, None), getattr(module, limit_name, None)
        if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
            activations.append(Activation("gpt_oss", float(alpha), float(limit)))
    return [(ExpertsLayout(transposed, interleaved), act) for interleaved in (flagged, not flagged)
            for act in activations]


def _probe_gate(module: torch.nn.Module, candidates: list[tuple[ExpertsLayout, Activation]]) -> int | None:
    """Index of the first candidate whose gate equals the module's `_apply_gate` on a probe, or None.

    Runs on real CPU tensors; the caller runs it outside any tracing mode.
    """
    limits = [act.limit for _, act in candidates if act.kind == "gpt_oss"] or [7.0]
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(8, _PROBE_WIDTH, generator=generator) * 3.0
    large = torch.randn(8, _PROBE_WIDTH, generator=generator) * (2.0 * max(limits) + 4.0)
    probe = torch.cat([small, large])
    with torch.no_grad():
        try:
            theirs = module._apply_gate(probe.clone()).float()
        except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
            return None
        for index, (layout, act) in enumerate(candidates):
            ours = apply_gate(probe, layout, act)
            if theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5):
                return index
    return None


def _outside_tracing(function: Callable[..., T], *args: object) -> T:
    """Run `function` on a fresh thread: dispatch and function modes (export's fake and proxy modes) are
    thread-local, so the probe computes on real tensors and leaves nothing in the graph being traced."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfrewrite-probe") as pool:
        return pool.submit(function, *args).result()


def experts_plan(module: torch.nn.Module) -> ExpertsPlan | str:
    """The plan for `module`, or the reason it cannot use the marker (a sentence for the warning)."""
    name = type(module).__name__
    if not getattr(module, "has_gate", True):
        return f"{name} has ungated experts (up_proj only)"
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} normalises each expert's output"
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return f"{name} has no 3-D gate_up_proj / down_proj parameters"
    candidates = _candidates(module)
    try:
        candidates[0][0].sizes(gate_up, down)
    except ValueError as error:
        return str(error)
    choice = _outside_tracing(_probe_gate, module, candidates)
    if choice is None:
        return f"{name}._apply_gate is none of the fused kernel's gates " \
               f"({', '.join(sorted({act.kind for _, act in candidates}))}, halves or interleaved)"
    layout, activation = candidates[choice]
    has_bias = bool(getattr(module, "has_bias", False))
    if has_bias and not (isinstance(getattr(module, "gate_up_proj_bias", None), torch.Tensor)
                         and isinstance(getattr(module, "down_proj_bias", None), torch.Tensor)):
        return f"{name} says it has biases but lacks gate_up_proj_bias / down_proj_bias"
    return ExpertsPlan(layout, activation, has_bias)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                    transposed: bool) -> torch.Tensor:
    """Rows of x (sorted by expert, expert e's rows ending at offsets[e]) times their expert's weight."""
    weight = weight if transposed else weight.transpose(-2, -1)
    out = torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight, offsets)
    return out if bias is None else out + bias


def grouped_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts path, with the module's own gate, activation and post-expert norm.

    Rewritten rather than called because transformers' version picks histc's input dtype from the device
    it runs on: captured on meta, it would bake in the integer histc that CPUs lack. Counting by
    scatter_add works on every device.
    """
    gated = getattr(module, "has_gate", True)
    biased = getattr(module, "has_bias", False)
    up = module.gate_up_proj if gated else module.up_proj
    up_bias = (module.gate_up_proj_bias if gated else module.up_proj_bias) if biased else None
    num_experts, tokens, top_k = up.shape[0], hidden_states.shape[0], top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    counts = torch.zeros(num_experts, dtype=torch.int32, device=expert_ids.device)
    counts = counts.scatter_add(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    transposed = bool(getattr(module, "is_transposed", False))
    mid = _grouped_linear(hidden_states[order // top_k], up, offsets,
                          None if up_bias is None else up_bias[expert_ids], transposed)
    mid = module._apply_gate(mid) if gated else module.act_fn(mid)
    out = _grouped_linear(mid, module.down_proj, offsets,
                          module.down_proj_bias[expert_ids] if biased else None, transposed)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.zeros_like(out).index_copy(0, order, out)
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _hf_experts_function(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ExpertsInterface entry: forward the module's weights and layout to the marker op."""
    if getattr(module, "_is_expert_parallel", False):  # sentinel ids: transformers' own path masks them
        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    plan = experts_plan(module)
    if isinstance(plan, str):
        warnings.warn(f"{plan}: its experts are captured as a grouped-GEMM graph, not the fused op",
                      ExpertsFallbackWarning, stacklevel=2)
        return grouped_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    gate_up_bias = module.gate_up_proj_bias if plan.has_bias else None
    down_bias = module.down_proj_bias if plan.has_bias else None
    act, layout = plan.activation, plan.layout
    return torch.ops.hfrewrite.experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj,
                                       module.down_proj, gate_up_bias, down_bias, act.kind, act.alpha, act.limit,
                                       layout.transposed, layout.interleaved)


def register() -> str:
    """Register the experts function (idempotent) and return its implementation name."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _hf_experts_function)
    return EXPERTS_IMPLEMENTATION
