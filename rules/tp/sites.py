"""Linear sites of the tensor-parallel family: which matmul a node is, and the graph edits every TP template
shares (shard a parameter, all-reduce, all-gather).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from hfrewrite.compiler import attention_marker  # noqa: F401  (registers hfrewrite::attention)
from hfrewrite.engine.context import RewriteContext, erase_dead
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.sharding import HeadLayout, ShardSpec, group_name, record_shard
from hfrewrite.rules.attention_patterns.marker import ATTENTION_ALIBI


aten = torch.ops.aten
c10d = torch.ops._c10d_functional

ATTENTION = torch.ops.hfrewrite.attention.default
# the attention markers the TP rules shard by heads: args 0, 1, 2 are q, k, v [1, H|Hkv, T, D]
ATTENTION_OPS = frozenset({ATTENTION, ATTENTION_ALIBI, torch.ops.hfrewrite.attention_key_limit.default})
ALIBI_SLOPES_ARG = 5  # attention_alibi's per-head slopes: each rank keeps its own heads'
SPLIT_INPUT = "hfrewrite.tp_split_input"   # node.meta key on the narrows rowwise_linear inserts
ATTENTION_LAYOUTS = "tp_attention_layouts"  # ctx.state key: attention node name -> AttentionShapes
SLICED_SLOPES = "tp_sliced_alibi_slopes"     # ctx.state key: ALiBi markers whose slopes are the rank's
END = 9223372036854775807  # what export writes for an open-ended slice

TRANSPOSES = {aten.numpy_T.default, aten.t.default, aten.permute.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Ops that end a sharded region: other matmuls (their own rules shard them), lookups, collectives.
BOUNDARY_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
                aten.embedding.default, c10d.all_reduce.default, c10d.all_gather_into_tensor.default,
                c10d.wait_tensor.default}
# Single-input ops a rowwise input may pass through on its way back to the attention that made it.
PASSTHROUGH_OPS = VIEW_OPS | {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
                              aten.to.dtype_layout, aten._to_copy.default, aten.dropout.default}
# Ops that mix the features of their last dim (arg: index of the dims argument; None: always the last dims).
MIXING_OPS: dict[Any, int | None] = {
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.var.correction: 1, aten.var_mean.correction: 1,
    aten.amax.default: 1, aten.amin.default: 1, aten.softmax.int: 1, aten._softmax.default: 1,
    aten._log_softmax.default: 1, aten.layer_norm.default: None, aten.native_layer_norm.default: None}


# ----------------------------------------------------------------------------------------------
# Reading the matched site


@dataclass(frozen=True)
class LinearSite:
    """A matmul with a weight parameter: aten.linear (W [out, in]) or Conv1D's aten.addmm (W [in, out])."""

    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    out_dim: int  # the weight dim holding output features
    transposed: torch.fx.Node | None = None  # FalconLinear's x @ W.T: the W.T node (dead once rewritten)

    @property
    def in_dim(self) -> int:
        return 1 - self.out_dim

    @property
    def out_features(self) -> int:
        return int(self.weight.meta["val"].shape[self.out_dim])

    @property
    def in_features(self) -> int:
        return int(self.weight.meta["val"].shape[self.in_dim])

    def finish(self, ctx: RewriteContext) -> None:
        """After the site is replaced: erase what only the old matmul read (FalconLinear's W.T)."""
        if self.transposed is not None:
            erase_dead(ctx.graph, [self.transposed])

    def call(self, ctx: RewriteContext, x: torch.fx.Node, *, with_bias: bool) -> torch.fx.Node:
        """The same matmul on `x` with the (possibly resharded) weight, with or without its bias."""
        if self.node.target == aten.addmm.default:
            if with_bias and self.bias is not None:
                return ctx.insert_call(aten.addmm.default, (self.bias, x, self.weight), like=self.node)
            return ctx.insert_call(aten.mm.default, (x, self.weight), like=self.node)
        args = (x, self.weight, self.bias) if with_bias and self.bias is not None else (x, self.weight)
        return ctx.insert_call(aten.linear.default, args, like=self.node)


def linear_site(node: torch.fx.Node) -> LinearSite:
    """Read a matched matmul; its weight (and bias) must be parameters read only here."""
    if node.target == aten.linear.default:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        out_dim = 0
    elif node.target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise RewriteError(f"addmm {node.name} scales its terms (beta/alpha); only plain Conv1D addmm is sharded")
        bias, x, weight = node.args[0], node.args[1], node.args[2]
        out_dim = 1
    elif node.target == aten.matmul.default and isinstance(node.args[1], torch.fx.Node) and \
            node.args[1].target in TRANSPOSES and _is_2d_transpose(node.args[1]):
        # FalconLinear: x @ W.T, its bias (if any) added by a separate node
        transposed = node.args[1]
        if len(transposed.users) != 1:
            raise RewriteError(f"{node.name}: the transposed weight {transposed.name} is read by several nodes")
        for user in node.users:
            others = [a for a in user.args if isinstance(a, torch.fx.Node) and a is not node]
            if user.target == aten.add.Tensor and any(a.op == "get_attr" for a in others):
                raise RewriteError(f"{node.name}: x @ W.T followed by a bias add ({user.name}) is not sharded yet "
                                   f"(FalconLinear with bias=True)")
        site = linear_site_parts(node, node.args[0], transposed.args[0], None, 0)
        return LinearSite(node, site.x, site.weight, None, 0, transposed)
    else:
        raise RewriteError(f"node {node.name} is {node.target}, not aten.linear, aten.addmm or x @ W.T")
    return linear_site_parts(node, x, weight, bias, out_dim)


def _is_2d_transpose(node: torch.fx.Node) -> bool:
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return False
    return node.target != aten.permute.default or list(node.args[1]) == [1, 0]


def linear_site_parts(node: torch.fx.Node, x: torch.fx.Node, weight: Any, bias: Any, out_dim: int) -> LinearSite:
    """Check a matmul's weight (and bias): parameters read only here, a 2-D weight."""
    for tensor in (weight, bias):
        if tensor is not None and (not isinstance(tensor, torch.fx.Node) or tensor.op != "get_attr"):
            raise RewriteError(f"{node.name}: its weight and bias must be parameters (get_attr), found {tensor}")
        if tensor is not None and len(tensor.users) != 1:
            users = ", ".join(user.name for user in tensor.users)
            raise RewriteError(f"parameter {tensor.target} is read by several nodes ({users}); sharding it for one "
                               f"would change the others")
    if len(weight.meta["val"].shape) != 2:
        raise RewriteError(f"{node.name}: weight {weight.target} is not 2-D")
    return LinearSite(node, x, weight, bias, out_dim)


def shard_parameter(ctx: RewriteContext, node: torch.fx.Node, dim: int, pieces: list[tuple[int, int]],
                    size: int) -> None:
    """Replace the parameter behind get_attr `node` by a meta tensor of the rank's shape; record the shard."""
    name = str(node.target)
    owner_path, _, leaf = name.rpartition(".")
    owner = ctx.graph_module.get_submodule(owner_path) if owner_path else ctx.graph_module
    current = getattr(owner, leaf)
    spec = ShardSpec(tuple(int(d) for d in current.shape), dim, tuple(pieces), size)
    record_shard(ctx, name, spec)
    local = torch.empty(spec.local_shape, dtype=current.dtype, device=current.device)  # meta, as captured
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(local, requires_grad=False)
    else:
        owner._buffers[leaf] = local
    mode = ctx.fake_mode
    if mode is not None:
        node.meta["val"] = mode.from_tensor(local, static_shapes=True)


def all_reduce(ctx: RewriteContext, value: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """Functional sum over the tp group, waited on."""
    reduced = ctx.insert_call(c10d.all_reduce.default, (value, "sum", group_name(ctx)), like=like)
    return ctx.insert_call(c10d.wait_tensor.default, (reduced,), like=like)


def all_gather_last(ctx: RewriteContext, value: torch.fx.Node, full: int, like: torch.fx.Node) -> torch.fx.Node:
    """Concatenate every rank's last dim (equal blocks, rank order), then drop the padding past `full`."""
    ndim = value.meta["val"].dim()
    first = ctx.insert_call(aten.permute.default, (value, [ndim - 1, *range(ndim - 1)]), like=like)
    packed = ctx.insert_call(aten.clone.default, (first,), {"memory_format": torch.contiguous_format}, like=like)
    gathered = ctx.insert_call(c10d.all_gather_into_tensor.default, (packed, ctx.tp, group_name(ctx)), like=like)
    waited = ctx.insert_call(c10d.wait_tensor.default, (gathered,), like=like)
    last = ctx.insert_call(aten.permute.default, (waited, [*range(1, ndim), 0]), like=like)
    if int(last.meta["val"].shape[-1]) == full:
        return last
    return ctx.insert_call(aten.slice.Tensor, (last, -1, 0, full), like=like)


def keep_rank_slopes(ctx: RewriteContext, attention: torch.fx.Node, layout: HeadLayout) -> None:
    """An ALiBi marker keeps the slopes of the rank's query heads (once: its captured list has all heads)."""
    if attention.target != ATTENTION_ALIBI:
        return
    done: set[str] = ctx.state.setdefault(SLICED_SLOPES, set())
    if attention.name in done:
        return
    slopes = list(attention.args[ALIBI_SLOPES_ARG])
    if len(slopes) != layout.heads:
        raise RewriteError(f"ALiBi attention {attention.name}: {len(slopes)} slopes for {layout.heads} heads")
    done.add(attention.name)
    args = list(attention.args)
    args[ALIBI_SLOPES_ARG] = slopes[layout.q_start:layout.q_stop]
    attention.args = tuple(args)
