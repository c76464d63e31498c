"""Lazy views of converted checkpoint tensors, so a tensor-parallel rank reads only its share of each source.

transformers' checkpoint conversion builds one runtime tensor from many on-disk tensors: MergeModulelist
stacks per-expert tensors into the 3-D experts weight, Concatenate joins gate and up, Chunk splits a fused
tensor, Transpose swaps two dims. A rank needs one slice of the result (whole experts under --ep, a
range of each expert's rows or columns under the width split). Each view here is the same op applied
to index ranges instead of data: indexing the view with the rank's slice indexes every source with only
the part of it that lands in that slice, so a rank never opens another rank's experts. `lazy_convert`
mirrors a converter's op chain with views (None for an op it does not know: then the caller runs the op
itself on whole tensors, `Computed`); conversion.py checks every view's names and shapes against the op
chain run on meta tensors, so a view that disagreed with transformers would never be used.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hfrewrite.errors import WeightError

Ranges = list[tuple[int, int]]


def index_ranges(index: Any, shape: Sequence[int], name: str) -> Ranges:
    """(start, stop) per dim from `...` or a tuple of leading step-1 slices (what ShardSpec.read passes)."""
    if index is Ellipsis:
        index = ()
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(part, slice) and part.step in (None, 1) for part in index):
        raise WeightError(f"weight {name}: unsupported slice {index!r} (step-1 slices of leading dims)")
    ranges = [part.indices(size)[:2] for part, size in zip(index, shape)]
    ranges += [(0, size) for size in shape[len(ranges):]]
    return [(start, max(start, stop)) for start, stop in ranges]


class View:
    """A tensor not read yet: its shape and dtype, and `view[index]` reading only the indexed part."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def sources(self) -> list[str]:
        """The checkpoint tensors this view is made of."""
        raise NotImplementedError

    def read(self, ranges: Ranges) -> torch.Tensor:
        """The part of the tensor inside `ranges` (one (start, stop) per dim)."""
        raise NotImplementedError

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.read(index_ranges(index, self.shape, ", ".join(self.sources()[:2])))

    def _empty(self, ranges: Ranges) -> torch.Tensor:
        return torch.empty([stop - start for start, stop in ranges], dtype=self.dtype)


class Source(View):
    """One checkpoint tensor, read through `slice_` (a FileSlice, a safetensors slice or a tensor)."""

    def __init__(self, name: str, slice_: Any, dtype: torch.dtype) -> None:
        self.name, self.slice_, self.dtype = name, slice_, dtype
        self.shape = tuple(int(size) for size in slice_.get_shape()) if hasattr(slice_, "get_shape") \
            else tuple(slice_.shape)

    def sources(self) -> list[str]:
        return [self.name]

    def read(self, ranges: Ranges) -> torch.Tensor:
        return self.slice_[tuple(slice(start, stop) for start, stop in ranges)]


class Stack(View):
    """torch.stack(parts, dim), as MergeModulelist does: a slice along `dim` opens only the parts in it."""

    def __init__(self, parts: Sequence[View], dim: int) -> None:
        first = parts[0].shape
        if any(part.shape != first for part in parts):
            raise WeightError(f"cannot stack {', '.join(parts[0].sources() + parts[-1].sources())}: "
                              f"their shapes differ ({first} and {parts[-1].shape})")
        self.parts, self.dim, self.dtype = list(parts), dim, parts[0].dtype
        self.shape = first[:dim] + (len(parts),) + first[dim:]

    def sources(self) -> list[str]:
        return [name for part in self.parts for name in part.sources()]

    def read(self, ranges: Ranges) -> torch.Tensor:
        start, stop = ranges[self.dim]
        inner = ranges[:self.dim] + ranges[self.dim + 1:]
        if stop <= start:
            return self._empty(ranges)
        return torch.stack([self.parts[i].read(inner) for i in range(start, stop)], dim=self.dim)


class Cat(View):
    """torch.cat(parts, dim), as Concatenate does: each part is read only where the slice overlaps it."""

    def __init__(self, parts: Sequence[View], dim: int) -> None:
        self.parts, self.dim, self.dtype = list(parts), dim, parts[0].dtype
        shape = list(parts[0].shape)
        shape[dim] = sum(part.shape[dim] for part in parts)
        self.shape = tuple(shape)

    def sources(self) -> list[str]:
        return [name for part in self.parts for name in part.sources()]

    def read(self, ranges: Ranges) -> torch.Tensor:
        start, stop = ranges[self.dim]
        pieces, offset = [], 0
        for part in self.parts:
            size = part.shape[self.dim]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                local = list(ranges)
                local[self.dim] = (lo - offset, hi - offset)
                pieces.append(part.read(local))
            offset += size
        if not pieces:
            return self._empty(ranges)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


class Narrow(View):
    """part.narrow(dim, start, length), one piece of a Chunk."""

    def __init__(self, part: View, dim: int, start: int, length: int) -> None:
        self.part, self.dim, self.start, self.dtype = part, dim, start, part.dtype
        shape = list(part.shape)
        shape[dim] = length
        self.shape = tuple(shape)

    def sources(self) -> list[str]:
        return self.part.sources()

    def read(self, ranges: Ranges) -> torch.Tensor:
        local = list(ranges)
        local[self.dim] = (ranges[self.dim][0] + self.start, ranges[self.dim][1] + self.start)
        return self.part.read(local)


class Transposed(View):
    """part.transpose(dim0, dim1): the slice's ranges swap dims before reading."""

    def __init__(self, part: View, dim0: int, dim1: int) -> None:
        self.part, self.dims, self.dtype = part, (dim0, dim1), part.dtype
        shape = list(part.shape)
        shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
        self.shape = tuple(shape)

    def sources(self) -> list[str]:
        return self.part.sources()

    def read(self, ranges: Ranges) -> torch.Tensor:
        a, b = self.dims
        local = list(ranges)
        local[a], local[b] = ranges[b], ranges[a]
        return self.part.read(local).transpose(a, b).contiguous()


class Computed(View):
    """A tensor only the op itself can make: `make()` reads every source whole, then the slice is taken."""

    def __init__(self, make: Callable[[], torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                 names: Sequence[str]) -> None:
        self.make, self.shape, self.dtype, self.names = make, tuple(shape), dtype, list(names)

    def sources(self) -> list[str]:
        return list(self.names)

    def read(self, ranges: Ranges) -> torch.Tensor:
        return self.make()[tuple(slice(start, stop) for start, stop in ranges)].contiguous()


def _chunks(view: View, dim: int, count: int) -> list[View]:
    """torch.chunk's pieces: ceil(size / count) each, the last smaller, fewer pieces when it runs out."""
    size = view.shape[dim]
    step = max(1, math.ceil(size / count)) if size else 0
    return [Narrow(view, dim, start, min(step, size - start)) for start in range(0, size, step or 1)][:count]


def lazy_convert(converter: Any, collected: dict[str, list[View]], config: Any) -> dict[str, View] | None:
    """The converter's op chain on views: pattern -> view, as `op.convert` returns pattern -> tensor; None when
    an op is not one of MergeModulelist, Concatenate, Chunk or Transpose (without check_dims)."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Transpose

    values: dict[str, Any] = dict(collected)
    sources, targets = converter.source_patterns, converter.target_patterns
    for op in converter.operations:
        if type(op) is MergeModulelist:
            count = len(values)
            values = {op.get_target_pattern(count, pattern, targets):
                      items if isinstance(items, View) else Stack(items, op.dim) for pattern, items in values.items()}
        elif type(op) is Concatenate:
            parts: list[View] = []
            for pattern in sources:
                if pattern in values:
                    items = values.pop(pattern)
                    parts.extend([items] if isinstance(items, View) else items)
            values = {op.get_target_pattern(targets): Cat(parts, op.dim)}
        elif type(op) is Chunk:
            if len(values) != 1:
                return None
            items = next(iter(values.values()))
            view = items if isinstance(items, View) else items[0]
            names = op.get_target_patterns(targets, config=config)
            values = dict(zip(names, _chunks(view, op.dim, len(names))))
        elif type(op) is Transpose and not op.check_dims:
            if len(values) != 1:
                return None
            items = next(iter(values.values()))
            view = items if isinstance(items, View) else items[0]
            values = {op.get_target_pattern(values, sources, targets): Transposed(view, op.dim0, op.dim1)}
        else:
            return None
    return {pattern: items if isinstance(items, View) else items[0] for pattern, items in values.items()}
