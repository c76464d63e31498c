"""Templates of the tensor-parallel rule family (rules/tp.yaml; rules/arch/gpt2.yaml reuses them).

Each template rewrites one matmul (aten.linear with a [out, in] weight, or GPT-2's Conv1D as
aten.addmm with an [in, out] weight) or the input embedding for one rank of `ctx.tp`, records which
slice of each weight the rank holds (`hfrewrite.parallel.sharding.ShardSpec`) and inserts functional
collectives (`_c10d_functional.*` + `wait_tensor`) so torch.compile sees them:

  rowwise_linear          y = all_reduce(x[..., r] @ W[:, r]^T) + b         (input features sharded)
  colwise_linear          y_r = x @ W[r]^T + b[r]                            (output features sharded)
  colwise_gather_linear   y = all_gather(x @ W[r]^T + b[r])[..., :F]        (LM head; padded blocks)
  vocab_parallel_embedding  e = all_reduce(mask_r(ids) ? 0 : W[r][ids - start_r])

Row-parallel sites are rewritten first (higher priority) with an explicit narrow of their input,
`x[..., start:stop]`, marked in node.meta: valid on a replicated input (HF's rowwise_split_input).
The column-parallel rewrite then walks its sharded region forward (views, packing splits, rotary,
norms, attention via its query) and removes the narrows it reaches, after checking that both sides
agree on the range. So the graph computes the same function after every rule, which is what the
engine re-checks. Where the region flows into attention, the split is by whole heads
(`sharding.head_layout`), found from the dataflow (which attention argument the output reaches),
so a projection needs no role name in the rules, and packed projections (GPT-2's c_attn, split into
q, k, v) are split per section. Literal widths in views and splits of the region are rewritten to
the rank's widths; shapes are then re-propagated by the engine.

Sizes that tp does not divide are split near-evenly where that is sound (whole KV groups per rank,
MLP widths, padded vocabulary blocks for gathers) and reported as UnevenShardWarning; a rule can
demand even splits with `args: {uneven: false}`. Where no sound split exists (fewer query heads
than ranks, KV heads that cannot be replicated evenly, a norm over the sharded width) the template
raises, and the engine names the rule and the module.
"""
from __future__ import annotations


import torch
import torch.fx

from hfrewrite.compiler import attention_marker  # noqa: F401  (registers hfrewrite::attention)
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.errors import RewriteError
from hfrewrite.engine.templates import Template, template
from hfrewrite.parallel.sharding import padded_range, split_range
from hfrewrite.rules.tp.fused import FUSED_TEMPLATES
from hfrewrite.rules.tp.regions import (Region, _count_linear, _parent, _rewrite_packing, _section_range, attention_shapes,
                                       find_sections, localize_region)
from hfrewrite.rules.tp.sites import (ATTENTION_OPS, PASSTHROUGH_OPS, SPLIT_INPUT, all_gather_last, all_reduce, linear_site,
                                     shard_parameter)

aten = torch.ops.aten

@template("colwise_linear",
          equation="concat_r(x @ W[rows_r]^T + b[rows_r]) == x @ W^T + b, rows_r by heads or near-even")
def colwise_linear(ctx: RewriteContext, match: Match, uneven: bool = True) -> None:
    """Column-parallel: the rank computes its output features; no communication (the region stays sharded)."""
    site = linear_site(match.root)
    what = f"{match.module_path} ({site.weight.target})"
    prefix = _parent(match.module_path)
    full = site.out_features
    sections, packer = find_sections(site.node, full)
    for section in sections:
        _section_range(ctx, section, prefix, uneven, what)
    pieces = [(s.offset + s.start, s.offset + s.stop) for s in sections]
    local = sum(s.local for s in sections)
    shard_parameter(ctx, site.weight, site.out_dim, pieces, local)
    if site.bias is not None:
        shard_parameter(ctx, site.bias, 0, pieces, local)
    new = site.call(ctx, site.x, with_bias=True)
    ctx.replace(match, new)
    site.finish(ctx)
    _count_linear(ctx)
    entry_regions = {entry: Region(section.size, section.start, section.local)
                     for section in sections for entry in section.entries if packer is not None}
    if packer is not None:
        _rewrite_packing(ctx, packer, sections, full)
    start_region = Region(full, sections[0].start if packer is None else 0, local)
    localize_region(ctx, new, start_region, prefix, entry_regions, what)


@template("rowwise_linear",
          equation="sum_r(x[..., cols_r] @ W[:, cols_r]^T) + b == x @ W^T + b (all_reduce, bias once)")
def rowwise_linear(ctx: RewriteContext, match: Match, uneven: bool = True) -> None:
    """Row-parallel: the rank multiplies its input features; an all-reduce sums the partial products."""
    site = linear_site(match.root)
    what = f"{match.module_path} ({site.weight.target})"
    full = site.in_features
    start, stop = _input_range(ctx, site.x, full, uneven, what)
    shard_parameter(ctx, site.weight, site.in_dim, [(start, stop)], stop - start)
    narrow = ctx.insert_call(aten.slice.Tensor, (site.x, -1, start, stop), like=site.node)
    narrow.meta[SPLIT_INPUT] = (start, stop - start, full)
    partial = site.call(ctx, narrow, with_bias=False)
    out = all_reduce(ctx, partial, site.node)
    if site.bias is not None:
        out = ctx.insert_call(aten.add.Tensor, (out, site.bias), like=site.node)
    ctx.replace(match, out)
    site.finish(ctx)
    _count_linear(ctx)


def _input_range(ctx: RewriteContext, x: torch.fx.Node, full: int, uneven: bool, what: str) -> tuple[int, int]:
    """The input features this rank holds: the heads of the attention that made `x`, else a near-even split."""
    node = x
    while node.op == "call_function" and node.target in PASSTHROUGH_OPS:
        node = node.args[0]
    if node.op == "call_function" and node.target in ATTENTION_OPS:
        shapes = attention_shapes(ctx, node)
        layout = shapes.layout(ctx, uneven)
        if full != shapes.heads * shapes.v_dim:
            raise RewriteError(f"{what}: input width {full} is not the {shapes.heads} heads x {shapes.v_dim} of the "
                               f"attention at {shapes.module_path}")
        return layout.q_start * shapes.v_dim, layout.q_stop * shapes.v_dim
    if full < ctx.tp:
        raise RewriteError(f"{what}: tp {ctx.tp} is larger than the model supports: {full} input features cannot "
                           f"give every rank one")
    if uneven is False and full % ctx.tp:
        raise RewriteError(f"{what}: {full} input features are not divisible by tp {ctx.tp}")
    return split_range(full, ctx.tp, ctx.rank)


@template("colwise_gather_linear",
          equation="all_gather_r(x @ W[block_r]^T + b[block_r])[..., :F] == x @ W^T + b (padded blocks)")
def colwise_gather_linear(ctx: RewriteContext, match: Match) -> None:
    """Column-parallel with the output gathered (the LM head: each rank computes a block of the vocabulary)."""
    site = linear_site(match.root)
    full = site.out_features
    start, stop, size = padded_range(full, ctx.tp, ctx.rank)
    pieces = [(start, stop)] if stop > start else []
    shard_parameter(ctx, site.weight, site.out_dim, pieces, size)
    if site.bias is not None:
        shard_parameter(ctx, site.bias, 0, pieces, size)
    local = site.call(ctx, site.x, with_bias=True)
    ctx.replace(match, all_gather_last(ctx, local, full, site.node))
    site.finish(ctx)


@template("vocab_parallel_embedding",
          equation="sum_r(where(ids in block_r, W[block_r][ids - start_r], 0)) == W[ids]")
def vocab_parallel_embedding(ctx: RewriteContext, match: Match) -> None:
    """Vocabulary-parallel lookup: each rank holds a block of rows, looks up the ids in it, zeros the rest, sums."""
    node = match.root
    weight, ids = node.args[0], node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or len(weight.users) != 1:
        raise RewriteError(f"embedding {node.name}: its table must be a parameter read only here")
    vocab = int(weight.meta["val"].shape[0])
    start, stop, size = padded_range(vocab, ctx.tp, ctx.rank)
    shard_parameter(ctx, weight, 0, [(start, stop)] if stop > start else [], size)
    below = ctx.insert_call(aten.lt.Scalar, (ids, start), like=node)
    above = ctx.insert_call(aten.ge.Scalar, (ids, stop), like=node)
    outside = ctx.insert_call(aten.logical_or.default, (below, above), like=node)
    shifted = ctx.insert_call(aten.sub.Scalar, (ids, start), like=node)
    local_ids = ctx.insert_call(aten.masked_fill.Scalar, (shifted, outside, 0), like=node)
    rows = ctx.insert_call(aten.embedding.default, (weight, local_ids), like=node)
    mask = ctx.insert_call(aten.unsqueeze.default, (outside, -1), like=node)
    zeroed = ctx.insert_call(aten.masked_fill.Scalar, (rows, mask, 0.0), like=node)
    ctx.replace(match, all_reduce(ctx, zeroed, node))


# The templates this family ships (the shipped TemplateLibrary is built from every family's list).
TEMPLATES: list[Template] = [colwise_linear, rowwise_linear, colwise_gather_linear, vocab_parallel_embedding,
                             *FUSED_TEMPLATES]
