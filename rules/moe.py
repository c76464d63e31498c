"""Template of the MoE rule family (rules/moe.yaml).

fused_moe: hfrewrite::experts(hidden, ids, weights, gate_up, down, biases, activation, alpha, limit,
transposed, interleaved) -> hfrewrite::fused_moe(the same arguments). The marker's arguments are the
fused op's, in the same order, so the rewrite only swaps the op; on CPU both run moe_reference, on GPUs
the fused op runs the Triton kernels.
"""
from __future__ import annotations

import torch

from hfrewrite import experts_marker  # noqa: F401  (registers hfrewrite::experts, the op rules match)
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.templates import register_template
from hfrewrite.kernels import fused_moe as fused  # noqa: F401  (registers hfrewrite::fused_moe)


def _marker_arguments() -> tuple[str, ...]:
    """The marker op's argument names, in order (the fused op's first arguments)."""
    return tuple(argument.name for argument in torch.ops.hfrewrite.experts.default._schema.arguments)


@register_template("fused_moe",
                   equation="fused_moe(x, ids, w; W, layout, act) == experts(x, ids, w; W, layout, act) "
                            "== sum_k w[:, k] * expert_{ids[:, k]}(x)")
def fused_moe(ctx: RewriteContext, match: Match) -> None:
    args = tuple(match[name] for name in _marker_arguments())
    new = ctx.insert_call(torch.ops.hfrewrite.fused_moe.default, args, {}, like=match.root)
    ctx.replace(match, new)
