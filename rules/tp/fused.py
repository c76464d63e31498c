"""Column-parallel fused q/k/v projections whose output features interleave the heads (bloom, falcon).

Bloom views its query_key_value output as [B, T, H, 3, D] (each head's q, k, v rows together); falcon's
new decoder architecture as [B, T, Hkv, H/Hkv + 2, D] (each KV group's query heads, then its k and v),
its old one as [B, T, H, 3, D] or, multi-query, [B, T, H + 2, D]. Rather than one layout per model,
`colwise_fused_qkv` finds which output features each head of q, k and v is made of: it evaluates the
graph from the projection to the attention marker on the CPU and asks autograd which features each
head's values depend on (rotary and other per-head mixing included). The rank keeps the features of
its heads (`sharding.head_layout`: whole KV groups, replicated KV heads when there are fewer than
ranks), in their captured order. The region's literal shapes (views, reshapes, expands with the head
count baked in) are then re-solved from the rank's input shapes while the fake values are propagated
forward to the row-parallel output projection, whose input split is checked and dropped; an ALiBi
marker keeps its heads' slopes.
"""
from __future__ import annotations

import math
from typing import Any

import sympy
import torch
import torch.fx

from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.fakeprop import FAKE_ERRORS, fake_value
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.scopes import module_of
from hfrewrite.engine.templates import Template, template
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.sharding import HeadLayout
from hfrewrite.rules.attention_patterns import probe
from hfrewrite.rules.attention_patterns.templates import CAPTURED_BUFFERS
from hfrewrite.rules.tp.regions import _count_linear, _in_region, _parent, attention_roles, attention_shapes
from hfrewrite.rules.tp.sites import (ATTENTION_OPS, BOUNDARY_OPS, SPLIT_INPUT, VIEW_OPS, keep_rank_slopes,
                                      linear_site, shard_parameter)

aten = torch.ops.aten
EXPANDS = {aten.expand.default, aten.broadcast_to.default}
PROBE_TOKENS = 3


@template("colwise_fused_qkv",
          equation="x @ W[features of the rank's heads]^T == the rank's heads of q, k, v from x @ W^T")
def colwise_fused_qkv(ctx: RewriteContext, match: Match, uneven: bool = True) -> None:
    """Column-parallel fused q/k/v projection, the rank's features found from the dataflow (see the module)."""
    site = linear_site(match.root)
    what = f"{match.module_path} ({site.weight.target})"
    prefix = _parent(match.module_path)
    roles = attention_roles(site.node, prefix)
    attentions = sorted({attention for attention, _ in roles}, key=lambda node: node.name)
    if len(attentions) != 1 or {index for _, index in roles} != {0, 1, 2}:
        raise RewriteError(f"{what}: a fused q/k/v projection must feed q, k and v of one attention; it feeds "
                           f"{sorted((a.name, 'qkv'[i]) for a, i in roles)}")
    attention = attentions[0]
    shapes = attention_shapes(ctx, attention)
    layout = shapes.layout(ctx, uneven)
    features = _head_features(ctx, site.node, attention, what)
    keep: set[int] = set()
    for role, (first, last) in enumerate([(layout.q_start, layout.q_stop), (layout.kv_start, layout.kv_stop),
                                          (layout.kv_start, layout.kv_stop)]):
        for head in range(first, last):
            keep |= features[role][head]
    pieces = _runs(sorted(keep))
    captured = site.node.meta["val"]
    shard_parameter(ctx, site.weight, site.out_dim, pieces, len(keep))
    if site.bias is not None:
        shard_parameter(ctx, site.bias, 0, pieces, len(keep))
    new = site.call(ctx, site.x, with_bias=True)
    ctx.replace(match, new)
    site.finish(ctx)
    _count_linear(ctx)
    _repropagate(ctx, new, captured, prefix, layout, shapes.v_dim, what)


def _head_features(ctx: RewriteContext, linear: torch.fx.Node, attention: torch.fx.Node, what: str
                   ) -> list[list[set[int]]]:
    """For q, k, v of `attention`: per head, the output features of `linear` its values depend on."""
    try:
        token_dim = probe.token_dim_of(ctx.graph)
        shape = probe._concrete(linear.meta["val"].shape, PROBE_TOKENS, token_dim, f"{what}'s output")
        nodes = sorted({node for index in range(3) for node in probe.construction(attention.args[index], linear)},
                       key=list(ctx.graph.nodes).index)
        source = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=linear.meta["val"].dtype,
                             requires_grad=True)
        buffers = ctx.state.get(CAPTURED_BUFFERS, {})
        values = [probe.evaluate(nodes[:nodes.index(attention.args[index]) + 1], linear, source, {},
                                 ctx.graph_module, buffers, PROBE_TOKENS, token_dim) for index in range(3)]
    except probe.ProbeFailure as failure:
        raise RewriteError(f"{what}: cannot trace its features to the attention heads: {failure}") from None
    weights = torch.Generator().manual_seed(1)
    result = []
    for value in values:
        per_head = []
        for head in range(value.shape[1]):
            scale = torch.rand(value[:, head].shape, generator=weights) + 0.5
            (grad,) = torch.autograd.grad((value[:, head] * scale).sum(), source, retain_graph=True,
                                          allow_unused=True)
            used = torch.zeros(shape[-1], dtype=torch.bool) if grad is None else \
                (grad.reshape(-1, shape[-1]) != 0).any(0)
            per_head.append({int(f) for f in used.nonzero().flatten()})
        result.append(per_head)
    return result


def _runs(features: list[int]) -> list[tuple[int, int]]:
    """Sorted feature indices as [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for feature in features:
        if runs and runs[-1][1] == feature:
            runs[-1] = (runs[-1][0], feature + 1)
        else:
            runs.append((feature, feature + 1))
    return runs


def _region(start: torch.fx.Node, prefix: str) -> list[torch.fx.Node]:
    """The nodes fed by `start` inside the block, through attention, up to other matmuls and input splits."""
    found = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in found or user.op != "call_function" or not _in_region(user, prefix):
                continue
            if user.target in BOUNDARY_OPS and user.target not in ATTENTION_OPS:
                continue
            found.add(user)
            if SPLIT_INPUT not in user.meta:
                stack.append(user)
    order = {node: index for index, node in enumerate(start.graph.nodes)}
    return sorted(found - {start}, key=order.__getitem__)


def _repropagate(ctx: RewriteContext, new: torch.fx.Node, captured: torch.Tensor, prefix: str, layout: HeadLayout,
                 v_dim: int, what: str) -> None:
    """Propagate the rank's shapes from `new` through its region, re-solving literal shapes on the way."""
    nodes = _region(new, prefix)
    old: dict[torch.fx.Node, Any] = {node: node.meta.get("val") for node in nodes}
    old[new] = captured
    mode = ctx.fake_mode
    if mode is None:
        raise RewriteError(f"{what}: the graph has no fake values to propagate the rank's shapes")
    for node in nodes:
        if SPLIT_INPUT in node.meta:
            _drop_split(node, layout, v_dim, what)
            continue
        if node.target in ATTENTION_OPS:
            keep_rank_slopes(ctx, node, layout)
            _check_heads(node, layout, what)
        elif node.target in VIEW_OPS or node.target in EXPANDS:
            source = node.args[0]
            before = old.get(source, source.meta.get("val"))
            after = source.meta.get("val")
            if before is not None and after is not None and tuple(before.shape) != tuple(after.shape):
                solve = _solve_view if node.target in VIEW_OPS else _solve_expand
                node.args = (source, solve(node, before, after, old[node]), *node.args[2:])
        try:
            node.meta["val"] = fake_value(node, mode, ctx.graph_module)
        except FAKE_ERRORS as error:
            raise RewriteError(f"{what}: {node.name} ({node.target} in {module_of(node)[0]}) fails on the rank's "
                               f"shapes: {str(error).splitlines()[0] if str(error) else type(error).__name__}") \
                from error


def _check_heads(attention: torch.fx.Node, layout: HeadLayout, what: str) -> None:
    """The attention's q, k, v now hold the rank's heads (a broadcast that kept the captured head count, e.g.
    falcon's new architecture with fewer KV heads than ranks, would otherwise go unnoticed)."""
    want = (layout.local_heads, layout.kv_stop - layout.kv_start, layout.kv_stop - layout.kv_start)
    got = tuple(int(attention.args[i].meta["val"].shape[1]) for i in range(3))
    if got != want:
        raise RewriteError(f"{what}: after sharding, attention {attention.name} gets q/k/v heads {got}, the rank "
                           f"holds {want}: a literal head count in the block (a broadcast of k/v to the query heads?) "
                           f"does not follow the rank's features")


def _drop_split(narrow: torch.fx.Node, layout: HeadLayout, v_dim: int, what: str) -> None:
    """The output projection's input split: it must want exactly the rank's heads, which it now receives."""
    start, length, full = narrow.meta[SPLIT_INPUT]
    want = (layout.q_start * v_dim, layout.local_heads * v_dim, layout.heads * v_dim)
    if (start, length, full) != want:
        raise RewriteError(f"{what}: the row-parallel projection reading {narrow.name} holds features "
                           f"[{start}, {start + length}) of {full}, the rank's heads are [{want[0]}, "
                           f"{want[0] + want[1]}) of {want[2]}")
    narrow.replace_all_uses_with(narrow.args[0])
    narrow.graph.erase_node(narrow)


def _sizes(shape: Any) -> list[int]:
    """A shape's sizes with every symbol standing for its own large prime (products stay comparable)."""
    primes = [1_000_003, 1_000_033, 1_000_037, 1_000_039]
    sizes = []
    for size in shape:
        if isinstance(size, int):
            sizes.append(size)
            continue
        expr = sympy.sympify(size.node.expr)
        symbols = sorted(expr.free_symbols, key=str)
        sizes.append(int(expr.subs({symbol: primes[i % len(primes)] for i, symbol in enumerate(symbols)})))
    return sizes


def _solve_view(node: torch.fx.Node, before: torch.Tensor, after: torch.Tensor, out: torch.Tensor) -> list[Any]:
    """The view's literal shape for the rank's input: the one input dim that changed scales the output dim
    it maps to (the outermost dim of more than one element inside that input dim's span)."""
    shape = list(node.args[1])
    old_in, new_in, old_out = _sizes(before.shape), _sizes(after.shape), _sizes(out.shape)
    changed = [i for i, (a, b) in enumerate(zip(old_in, new_in)) if a != b]
    if len(changed) != 1 or len(shape) != len(old_out):
        raise RewriteError(f"view {node.name}: its input changed from {list(before.shape)} to {list(after.shape)}; "
                           f"cannot re-solve {shape}")
    i = changed[0]
    high, low = math.prod(old_in[i:]), math.prod(old_in[i + 1:])
    for j, size in enumerate(old_out):
        if size <= 1 or not (math.prod(old_out[j + 1:]) < high and math.prod(old_out[j:]) > low):
            continue
        if (size * new_in[i]) % old_in[i]:
            continue
        if shape[j] == -1:
            return shape
        if not isinstance(shape[j], int):
            break
        shape[j] = size * new_in[i] // old_in[i]
        return shape
    raise RewriteError(f"view {node.name}: no dim of {shape} takes the rank's {after.shape[i]} (was "
                       f"{before.shape[i]}) of input dim {i}")


def _solve_expand(node: torch.fx.Node, before: torch.Tensor, after: torch.Tensor, out: torch.Tensor) -> list[Any]:
    """An expand's literal sizes follow the rank's input where the input was not broadcast."""
    shape = list(node.args[1])
    offset = len(shape) - before.dim()
    for k, (a, b) in enumerate(zip(before.shape, after.shape)):
        if a == b:
            continue
        if shape[offset + k] == -1:
            continue
        if not isinstance(shape[offset + k], int) or shape[offset + k] != a:
            raise RewriteError(f"expand {node.name}: input dim {k} changed from {a} to {b} but expands to "
                               f"{shape[offset + k]}")
        shape[offset + k] = int(b)
    return shape


# Shipped through rules/tp/templates.py's TEMPLATES.
FUSED_TEMPLATES: list[Template] = [colwise_fused_qkv]
