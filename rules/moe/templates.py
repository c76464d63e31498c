"""Templates of the MoE rule family (rules/moe.yaml).

fused_moe: hfrewrite::experts(hidden, ids, weights, gate_up, down, biases, activation, alpha, limit,
transposed, interleaved) -> hfrewrite::fused_moe(the same arguments). The marker's arguments are the
fused op's, in the same order, so the rewrite only swaps the op; on CPU both run moe_reference, on GPUs
the fused op runs the Triton kernels.

Under --tp N the fused op is then split over the ranks, one of two ways (both end in one all-reduce,
because the tokens and the router's choices are replicated on every tp rank):

  tp_experts   (default)  every expert's intermediate width I split: W_gu[:, I_r], W_d[..., I_r]
  ep_experts   (--ep)     whole experts split: rank r holds experts [start_r, stop_r) and computes only
                          the slots routed to them (the kernel drops the others before its GEMMs)

Each records the weights' shards, so a rank loads only its slices (of the intermediate width, or of its
experts) from the checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from hfrewrite.compiler import experts_marker  # noqa: F401  (registers hfrewrite::experts, the op rules match)
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.scopes import module_of
from hfrewrite.engine.templates import Template, template
from hfrewrite.errors import RewriteError
from hfrewrite.kernels.moe import op as fused  # noqa: F401  (registers hfrewrite::fused_moe)
from hfrewrite.kernels.moe.reference import ExpertsLayout
from hfrewrite.rules.tp.sites import all_reduce, shard_parameter
from hfrewrite.parallel.sharding import EP_SPLIT, TP_LINEARS, note, split_range


def _marker_arguments() -> tuple[str, ...]:
    """The marker op's argument names, in order (the fused op's first arguments)."""
    return tuple(argument.name for argument in torch.ops.hfrewrite.experts.default._schema.arguments)


@template("fused_moe",
          equation="fused_moe(x, ids, w; W, layout, act) == experts(x, ids, w; W, layout, act) "
                    "== sum_k w[:, k] * expert_{ids[:, k]}(x)")
def fused_moe(ctx: RewriteContext, match: Match) -> None:
    args = tuple(match[name] for name in _marker_arguments())
    new = ctx.insert_call(torch.ops.hfrewrite.fused_moe.default, args, {}, like=match.root)
    ctx.replace(match, new)


# ----------------------------------------------------------------------------------------------
# Parallel experts (tp > 1): one of the two runs, as --ep says (the `when:` of their rules in rules.yaml)


def _fused_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """The fused op's arguments by name, defaults filled in."""
    schema = torch.ops.hfrewrite.fused_moe.default._schema
    values: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        else:
            values[argument.name] = argument.default_value
    return values


def _owned_parameter(node: Any, what: str, path: str) -> torch.fx.Node | None:
    """The get_attr node of an experts weight read only by this op (sharding it must change nothing else)."""
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise RewriteError(f"experts at {path}: {what} is not a parameter of the model, so it cannot be sharded")
    if len(node.users) != 1:
        raise RewriteError(f"experts at {path}: parameter {node.target} is read by several nodes; sharding it "
                           f"for one would change the others")
    return node


def _rank_range(ctx: RewriteContext, total: int, what: str, advice: str) -> tuple[int, int]:
    """This rank's near-even block of `total` units; at least one unit per rank."""
    if total < ctx.tp:
        raise RewriteError(f"{what} cannot be split over {ctx.tp} ranks; {advice}")
    if total % ctx.tp:
        note(ctx, f"{what} is split unevenly over {ctx.tp} ranks")
    return split_range(total, ctx.tp, ctx.rank)


def _split_and_reduce(ctx: RewriteContext, match: Match, arguments: dict[str, Any]) -> None:
    """The fused op on this rank's share, summed over the ranks by an all-reduce, in place of the match."""
    fused = ctx.insert_call(torch.ops.hfrewrite.fused_moe.default, (), arguments, like=match.root)
    ctx.replace(match, all_reduce(ctx, fused, match.root))


@template("tp_experts",
          equation="sum_r fused_moe(x; W_gu[:, I_r], W_d[:, :, I_r], b_d if r == 0) == fused_moe(x; W_gu, "
                    "W_d, b_d): every expert's intermediate width split over the ranks")
def tp_experts(ctx: RewriteContext, match: Match) -> None:
    """TP inside the experts (the default under --tp): each rank holds a near-even block of every expert's
    intermediate width (gate and up rows alike, in either packing) and the matching columns of down; the
    down bias is added on rank 0 only; an all-reduce sums the partial outputs."""
    node, path = match.root, module_of(match.root)[0]
    arguments = _fused_arguments(node)
    gate_up = _owned_parameter(arguments["gate_up"], "gate_up", path)
    down = _owned_parameter(arguments["down"], "down", path)
    gate_up_bias = _owned_parameter(arguments["gate_up_bias"], "gate_up_bias", path)
    layout = ExpertsLayout(bool(arguments["transposed"]), bool(arguments["interleaved"]))
    _, _, inter = layout.sizes(gate_up.meta["val"], down.meta["val"])
    start, stop = _rank_range(ctx, inter, f"experts at {path}: intermediate size {inter}",
                              "use --ep to split the experts instead")
    width = stop - start
    packed = [(2 * start, 2 * stop)] if layout.interleaved else [(start, stop), (inter + start, inter + stop)]
    gate_up_dim, down_dim = (2, 1) if layout.transposed else (1, 2)
    shard_parameter(ctx, gate_up, gate_up_dim, packed, 2 * width)
    shard_parameter(ctx, down, down_dim, [(start, stop)], width)
    if gate_up_bias is not None:
        shard_parameter(ctx, gate_up_bias, 1, packed, 2 * width)
    if ctx.rank != 0:
        arguments["down_bias"] = None  # added once, after the sum
    _split_and_reduce(ctx, match, arguments)
    ctx.state[TP_LINEARS] = ctx.state.get(TP_LINEARS, 0) + 1


@template("ep_experts",
          equation="sum_r fused_moe(x, ids; W[E_r], offset=start_r) == fused_moe(x, ids; W): the experts "
                    "split over the ranks, each rank computing the slots routed to its own")
def ep_experts(ctx: RewriteContext, match: Match) -> None:
    """Expert parallelism (--ep): rank r holds a near-even block of whole experts [start_r, stop_r) with their
    biases, and computes only the (token, k) slots the router sent there (the kernel skips the others); tokens
    are replicated over the tp ranks, so an all-reduce of the partial outputs is the combine."""
    node, path = match.root, module_of(match.root)[0]
    arguments = _fused_arguments(node)
    if arguments["expert_parallel"]:
        raise RewriteError(f"experts at {path} are already split over ranks")
    names = ("gate_up", "down", "gate_up_bias", "down_bias")
    weights = {name: _owned_parameter(arguments[name], name, path) for name in names}
    experts = int(weights["gate_up"].meta["val"].shape[0])
    start, stop = _rank_range(ctx, experts, f"experts at {path}: {experts} experts (--ep)",
                              "drop --ep to split each expert's width instead")
    for weight in weights.values():
        if weight is not None:
            shard_parameter(ctx, weight, 0, [(start, stop)], stop - start)
    arguments.update(expert_offset=start, expert_parallel=True)
    _split_and_reduce(ctx, match, arguments)
    ctx.state[EP_SPLIT] = ctx.state.get(EP_SPLIT, 0) + 1
    ctx.state[TP_LINEARS] = ctx.state.get(TP_LINEARS, 0) + 1


# The templates this family ships (the shipped TemplateLibrary is built from every family's list).
TEMPLATES: list[Template] = [fused_moe, tp_experts, ep_experts]
