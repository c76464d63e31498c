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

import operator
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from hfrewrite.compiler import attention_marker  # noqa: F401  (registers hfrewrite::attention)
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.scopes import module_of
from hfrewrite.engine.templates import Template, template
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.sharding import (TP_LINEARS, HeadLayout, ShardSpec, group_name, head_layout,
                                note, padded_range, record_shard, split_range)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
ATTENTION = torch.ops.hfrewrite.attention.default
SPLIT_INPUT = "hfrewrite.tp_split_input"   # node.meta key on the narrows rowwise_linear inserts
ATTENTION_LAYOUTS = "tp_attention_layouts"  # ctx.state key: attention node name -> AttentionShapes
END = 9223372036854775807  # what export writes for an open-ended slice

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

    @property
    def in_dim(self) -> int:
        return 1 - self.out_dim

    @property
    def out_features(self) -> int:
        return int(self.weight.meta["val"].shape[self.out_dim])

    @property
    def in_features(self) -> int:
        return int(self.weight.meta["val"].shape[self.in_dim])

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
    else:
        raise RewriteError(f"node {node.name} is {node.target}, not aten.linear or aten.addmm")
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


# ----------------------------------------------------------------------------------------------
# Attention heads


@dataclass(frozen=True)
class AttentionShapes:
    """Head counts and dims of one attention call, as captured (before any sharding)."""

    module_path: str
    heads: int
    kv_heads: int
    q_dim: int
    k_dim: int
    v_dim: int

    def layout(self, ctx: RewriteContext, uneven: bool) -> HeadLayout:
        """This rank's heads; errors name the attention module."""
        try:
            layout = head_layout(self.heads, self.kv_heads, ctx.tp, ctx.rank, uneven=uneven)
        except ValueError as error:
            raise RewriteError(f"attention at {self.module_path or '<top level>'}: {error}") from None
        counts = [head_layout(self.heads, self.kv_heads, ctx.tp, r).local_heads for r in range(ctx.tp)]
        if len(set(counts)) > 1:
            note(ctx, f"{self.heads} query heads in {self.kv_heads} KV groups do not divide by tp {ctx.tp}: split by "
                      f"whole groups, query heads per rank {counts}")
        return layout


def attention_shapes(ctx: RewriteContext, node: torch.fx.Node) -> AttentionShapes:
    """The captured shapes of attention `node`, remembered on first use (later rules see sharded shapes)."""
    known: dict[str, AttentionShapes] = ctx.state.setdefault(ATTENTION_LAYOUTS, {})
    if node.name not in known:
        q, k, v = (node.args[i].meta["val"] for i in range(3))
        known[node.name] = AttentionShapes(module_of(node)[0], int(q.shape[1]), int(k.shape[1]), int(q.shape[3]),
                                           int(k.shape[3]), int(v.shape[3]))
    return known[node.name]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _in_region(node: torch.fx.Node, prefix: str) -> bool:
    """Inside the module that owns the sharded projection (its parent: the attention or MLP block)."""
    path = module_of(node)[0]
    return not prefix or path == prefix or path.startswith(prefix + ".")


def attention_roles(start: torch.fx.Node, prefix: str) -> set[tuple[torch.fx.Node, int]]:
    """(attention node, argument index 0/1/2 = q/k/v) pairs that `start`'s value flows into, inside the block."""
    found: set[tuple[torch.fx.Node, int]] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target == ATTENTION:
                found.update((user, i) for i in range(3) if user.args[i] is node)
                continue
            if user.target in BOUNDARY_OPS or user in seen or not _in_region(user, prefix):
                continue
            seen.add(user)
            queue.append(user)
    return found


# ----------------------------------------------------------------------------------------------
# Column-parallel regions


@dataclass(frozen=True)
class Region:
    """A tensor whose last dim (when it is `full` wide as captured) is sharded: the rank holds [start, start+local)."""

    full: int
    start: int
    local: int


@dataclass
class Section:
    """One part of a (possibly packed) projection output: full offset and size, and the rank's range in it."""

    offset: int
    size: int
    entries: list[torch.fx.Node]
    start: int = 0
    stop: int = 0

    @property
    def local(self) -> int:
        return self.stop - self.start


def _last_dim(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    return int(value.shape[-1]) if isinstance(value, torch.Tensor) and value.dim() else None


def _is_last(dim: Any, node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(dim, int) and isinstance(value, torch.Tensor) and dim in (-1, value.dim() - 1)


def _packing(node: torch.fx.Node, full: int) -> list[Section] | None:
    """Sections if `node` (a user of a `full`-wide tensor) splits its last dim: split, split_with_sizes, chunk."""
    if node.op != "call_function" or not node.args or _last_dim(node.args[0]) != full:
        return None
    sizes: list[int] | None = None
    if node.target == aten.split.Tensor and _is_last(node.args[2] if len(node.args) > 2 else 0, node.args[0]):
        step = int(node.args[1])
        sizes = [min(step, full - at) for at in range(0, full, step)]
    elif node.target == aten.split_with_sizes.default and _is_last(node.args[2] if len(node.args) > 2 else 0,
                                                                   node.args[0]):
        sizes = [int(s) for s in node.args[1]]
    elif node.target == aten.chunk.default and _is_last(node.args[2] if len(node.args) > 2 else 0, node.args[0]):
        step = -(-full // int(node.args[1]))
        sizes = [min(step, full - at) for at in range(0, full, step)]
    if sizes is None:
        return None
    entries: dict[int, list[torch.fx.Node]] = {}
    for user in node.users:
        if user.target is not operator.getitem:
            raise RewriteError(f"packed split {node.name} is used other than by indexing ({user.name})")
        entries.setdefault(int(user.args[1]), []).append(user)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [Section(offsets[i], sizes[i], entries.get(i, [])) for i in range(len(sizes))]


def _slice_packing(node: torch.fx.Node, full: int) -> list[Section] | None:
    """Sections if every user of `node` slices its last dim (Phi-3 style q/k/v = qkv[..., a:b])."""
    slices = [user for user in node.users if user.target == aten.slice.Tensor and _is_last(user.args[1], node)]
    if not slices or len(slices) != len(node.users) or len(slices) < 2:
        return None
    bounds = sorted({int(user.args[2] or 0) for user in slices} | {min(int(user.args[3]), full) for user in slices})
    if bounds[0] != 0 or bounds[-1] != full:
        return None
    sections = [Section(a, b - a, []) for a, b in zip(bounds, bounds[1:])]
    for user in slices:
        covered = [s for s in sections if s.offset >= int(user.args[2] or 0) and
                   s.offset + s.size <= min(int(user.args[3]), full)]
        if len(covered) != 1:
            return None  # overlapping slices: not a packing
        covered[0].entries.append(user)
    return sections


def find_sections(root: torch.fx.Node, full: int) -> tuple[list[Section], torch.fx.Node | None]:
    """The projection's output sections, and the node that unpacks them (None for an unpacked output).

    Followed through views that keep the last dim `full` wide (GPT-2's [T, 3E] -> [1, T, 3E]).
    """
    node = root
    while True:
        for user in node.users:
            sections = _packing(user, full)
            if sections is not None:
                return sections, user
        sections = _slice_packing(node, full)
        if sections is not None:
            return sections, node
        views = [user for user in node.users if user.target in VIEW_OPS and _last_dim(user) == full]
        if len(views) != 1 or len(node.users) != 1:
            return [Section(0, full, [root])], None
        node = views[0]


def _section_range(ctx: RewriteContext, section: Section, prefix: str, uneven: bool, what: str) -> None:
    """Set the rank's [start, stop) inside `section`: by heads when it feeds attention, else a near-even split."""
    roles: set[tuple[torch.fx.Node, int]] = set()
    for entry in section.entries:
        roles |= attention_roles(entry, prefix)
    if len(roles) > 1:
        places = ", ".join(f"{'qkv'[i]} of {attn.name}" for attn, i in sorted(roles, key=lambda r: (r[0].name, r[1])))
        raise RewriteError(f"{what}: one output section feeds several attention inputs ({places}); cannot split it "
                           f"by heads")
    if roles:
        attention, index = next(iter(roles))
        shapes = attention_shapes(ctx, attention)
        layout = shapes.layout(ctx, uneven)
        head_dim, first, last, count = (
            (shapes.q_dim, layout.q_start, layout.q_stop, shapes.heads) if index == 0 else
            (shapes.k_dim if index == 1 else shapes.v_dim, layout.kv_start, layout.kv_stop, shapes.kv_heads))
        if section.size != count * head_dim:
            raise RewriteError(f"{what}: output width {section.size} is not {count} heads x {head_dim} of the "
                               f"attention at {shapes.module_path}")
        section.start, section.stop = first * head_dim, last * head_dim
        return
    if section.size < ctx.tp:
        raise RewriteError(f"{what}: tp {ctx.tp} is larger than the model supports: {section.size} output features "
                           f"cannot give every rank one")
    if uneven is False and section.size % ctx.tp:
        raise RewriteError(f"{what}: {section.size} output features are not divisible by tp {ctx.tp}")
    if section.size % ctx.tp:
        counts = [b - a for a, b in (split_range(section.size, ctx.tp, r) for r in range(ctx.tp))]
        note(ctx, f"{section.size} output features do not divide by tp {ctx.tp}: features per rank {counts}")
    section.start, section.stop = split_range(section.size, ctx.tp, ctx.rank)


def _local_sizes(sections: list[Section]) -> list[int]:
    return [section.local for section in sections]


def _rewrite_packing(ctx: RewriteContext, packer: torch.fx.Node, sections: list[Section], full: int) -> None:
    """Make the unpacking node split the rank's sections: a split_with_sizes of the local sizes (the same
    graph structure on every rank, whatever the sizes), or new bounds for slices."""
    sizes = _local_sizes(sections)
    if packer.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = packer.args[2] if len(packer.args) > 2 else 0
        with ctx.graph.inserting_before(packer):  # no fake value yet: its input is re-propagated after the rule
            split = ctx.graph.call_function(aten.split_with_sizes.default, (packer.args[0], sizes, dim))
        split.meta.update({key: value for key, value in packer.meta.items() if key == "nn_module_stack"})
        packer.replace_all_uses_with(split)
        ctx.graph.erase_node(packer)
        return
    offset = 0
    for section in sections:  # slices of the last dim, one per section
        for entry in section.entries:
            end = END if int(entry.args[3]) >= full and section is sections[-1] else offset + section.local
            entry.args = (entry.args[0], entry.args[1], offset, end, *entry.args[4:])
        offset += section.local


def _localize_view(node: torch.fx.Node, region: Region) -> None:
    """Rewrite literal widths in a view of the region: [..., full] and [..., heads, dim] with heads*dim == full."""
    value = node.meta.get("val")
    shape = list(node.args[1])
    if not isinstance(value, torch.Tensor) or not shape:
        return
    captured = [int(d) if isinstance(d, int) else None for d in value.shape]  # as captured; None: symbolic
    last = captured[-1]
    if last == region.full and isinstance(shape[-1], int) and shape[-1] == region.full:
        shape[-1] = region.local
    elif len(shape) >= 2 and isinstance(shape[-2], int) and shape[-2] > 0 and last and \
            captured[-2] is not None and captured[-2] * last == region.full and shape[-2] == captured[-2]:
        if region.local % last:
            raise RewriteError(f"view {node.name} splits the sharded width {region.full} into {shape[-2]} x {last}; "
                               f"the rank's {region.local} is not a multiple of {last}")
        shape[-2] = region.local // last
    else:
        return
    node.args = (node.args[0], shape, *node.args[2:])


def localize_region(ctx: RewriteContext, start: torch.fx.Node, region: Region, prefix: str,
                    sections: dict[torch.fx.Node, Region], what: str) -> None:
    """Walk the sharded region from `start`: fix view widths, follow attention's query to its output, and drop
    the rowwise narrows that now receive exactly the rank's slice (after checking the ranges agree)."""
    queue = deque([(start, region)])
    seen = {start}
    while queue:
        node, current = queue.popleft()
        for user in list(node.users):
            if user.op != "call_function" or user in seen:
                continue
            if SPLIT_INPUT in user.meta:
                _drop_narrow(user, node, current, what)
                continue
            if user.target == ATTENTION:
                if user.args[0] is node:
                    shapes = attention_shapes(ctx, user)
                    layout = shapes.layout(ctx, uneven=True)
                    seen.add(user)
                    queue.append((user, Region(shapes.heads * shapes.v_dim, layout.q_start * shapes.v_dim,
                                               layout.local_heads * shapes.v_dim)))
                continue
            if user.target in BOUNDARY_OPS or not _in_region(user, prefix):
                continue
            if _mixes_sharded_features(user, node, current):
                raise RewriteError(f"{what}: {user.name} ({user.target} in {module_of(user)[0]}) mixes the features "
                                   f"this rank holds with the others' (a norm or reduction over the whole sharded "
                                   f"width); this projection cannot be column-parallel")
            seen.add(user)
            if user in sections:
                queue.append((user, sections[user]))
                continue
            if user.target in VIEW_OPS:
                _localize_view(user, current)
            queue.append((user, current))


def _mixes_sharded_features(user: torch.fx.Node, node: torch.fx.Node, region: Region) -> bool:
    """Whether `user` reduces or normalizes over the last dim of `node` while that dim is the sharded width
    (a rank holding all of it, as with a replicated KV head under its q/k norm, mixes nothing)."""
    if user.target not in MIXING_OPS or _last_dim(node) != region.full or user.args[0] is not node:
        return False
    if region.local == region.full:
        return False
    index = MIXING_OPS[user.target]
    if index is None:
        return True
    dims = user.args[index] if len(user.args) > index else None
    ndim = node.meta["val"].dim()
    dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
    return any(dim % ndim == ndim - 1 for dim in dims)


def _drop_narrow(narrow: torch.fx.Node, source: torch.fx.Node, region: Region, what: str) -> None:
    """The rowwise narrow now sees the rank's slice already: check it wants exactly that, then bypass it."""
    start, length, full = narrow.meta[SPLIT_INPUT]
    if (start, length, full) != (region.start, region.local, region.full):
        raise RewriteError(f"{what}: the column-parallel region reaches {narrow.name} (the input split of a "
                           f"row-parallel matmul) with features [{region.start}, {region.start + region.local}) of "
                           f"{region.full}, but that matmul holds [{start}, {start + length}) of {full}")
    narrow.replace_all_uses_with(source)
    narrow.graph.erase_node(narrow)


def _count_linear(ctx: RewriteContext) -> None:
    ctx.state[TP_LINEARS] = ctx.state.get(TP_LINEARS, 0) + 1


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
    _count_linear(ctx)


def _input_range(ctx: RewriteContext, x: torch.fx.Node, full: int, uneven: bool, what: str) -> tuple[int, int]:
    """The input features this rank holds: the heads of the attention that made `x`, else a near-even split."""
    node = x
    while node.op == "call_function" and node.target in PASSTHROUGH_OPS:
        node = node.args[0]
    if node.op == "call_function" and node.target == ATTENTION:
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
TEMPLATES: list[Template] = [colwise_linear, rowwise_linear, colwise_gather_linear, vocab_parallel_embedding]
