"""Sharded regions of the tensor-parallel family: from a column-parallel output forward through views, packing
splits, rotary, norms and attention, rewriting literal widths to a rank's share (see templates.py).
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
from hfrewrite.engine.scopes import module_of
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.sharding import TP_LINEARS, HeadLayout, head_layout, note, split_range
from hfrewrite.rules.tp.sites import (ATTENTION_LAYOUTS, ATTENTION_OPS, BOUNDARY_OPS, END, MIXING_OPS, SPLIT_INPUT,
                                     VIEW_OPS, keep_rank_slopes)

aten = torch.ops.aten

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
            if user.target in ATTENTION_OPS:
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
            if user.target in ATTENTION_OPS:
                if user.args[0] is node:
                    shapes = attention_shapes(ctx, user)
                    layout = shapes.layout(ctx, uneven=True)
                    keep_rank_slopes(ctx, user, layout)
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
