"""Derived parameters: weights the rewrite made that no checkpoint holds (a fused QKV is the concatenation
of q, k and v), built from loaded ones right after loading.

A template that replaces several parameters by one records a `DerivedParameter` (its new name, its
sources in order, their shapes as this rank loads them, the concat dim) in the rewrite context's state
and registers the new parameter on the graph module (meta, as captured). The loader never sees the
new name: `load_with_derived` asks the weight provider for the sources instead (each through its TP
shard spec, so a rank concatenates its own slices), concatenates them and drops the sources that
nothing else asked for, one derived tensor at a time so memory does not double.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hfrewrite.errors import RewriteError, WeightError

DERIVED = "derived_parameters"  # ctx.state key: derived name -> DerivedParameter

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class DerivedParameter:
    """A parameter made by concatenating `sources` (loaded with `shapes`) along `dim`."""

    name: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    dim: int = 0

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.shapes) or not self.sources:
            raise ValueError(f"derived parameter {self.name}: {len(self.sources)} sources, {len(self.shapes)} shapes")
        ranks = {len(shape) for shape in self.shapes}
        if len(ranks) != 1 or not 0 <= self.dim < next(iter(ranks)):
            raise ValueError(f"derived parameter {self.name}: cannot concatenate shapes {self.shapes} on dim "
                             f"{self.dim}")
        for shape in self.shapes:
            if shape[:self.dim] + shape[self.dim + 1:] != self.shapes[0][:self.dim] + self.shapes[0][self.dim + 1:]:
                raise ValueError(f"derived parameter {self.name}: shapes {self.shapes} differ off dim {self.dim}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The derived tensor's shape."""
        shape = list(self.shapes[0])
        shape[self.dim] = sum(s[self.dim] for s in self.shapes)
        return tuple(shape)

    def build(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the loaded sources (checked against the shapes recorded at rewrite time)."""
        parts = []
        for source, shape in zip(self.sources, self.shapes):
            if source not in tensors:
                raise WeightError(f"derived weight {self.name}: its source {source} was not loaded")
            tensor = tensors[source]
            if tuple(tensor.shape) != shape:
                raise WeightError(f"derived weight {self.name}: source {source} has shape {tuple(tensor.shape)}, "
                                  f"the rewrite expected {shape}")
            parts.append(tensor)
        return torch.cat(parts, dim=self.dim)


def record_derived(state: dict[str, Any], derived: DerivedParameter) -> None:
    """Remember `derived` in a rewrite context's state; its name and its sources must not be derived already."""
    known: dict[str, DerivedParameter] = state.setdefault(DERIVED, {})
    taken = {source for entry in known.values() for source in entry.sources}
    if derived.name in known or derived.name in taken:
        raise RewriteError(f"derived weight {derived.name} is recorded twice")
    for source in derived.sources:
        if source in known or source in taken:
            raise RewriteError(f"weight {source} would feed two derived weights ({derived.name} and another); "
                               f"two rules claim the same parameter")
    known[derived.name] = derived


def derived_parameters(state: Mapping[str, Any]) -> dict[str, DerivedParameter]:
    """Every derived parameter a rewrite recorded (empty when none), by name."""
    return dict(state.get(DERIVED, {}))


def source_specs(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 derived: Mapping[str, DerivedParameter]) -> Specs:
    """`specs` with every derived name replaced by its sources (the names a checkpoint holds)."""
    expanded: Specs = {}
    for name, (shape, dtype) in sorted(specs.items()):
        entry = derived.get(name)
        if entry is None:
            expanded[name] = (tuple(shape), dtype)
            continue
        if tuple(shape) != entry.shape:
            raise WeightError(f"derived weight {name}: the graph holds shape {tuple(shape)}, its sources make "
                              f"{entry.shape}")
        for source, source_shape in zip(entry.sources, entry.shapes):
            expanded[source] = (source_shape, dtype)
    return expanded


def materialise(tensors: dict[str, torch.Tensor], derived: Mapping[str, DerivedParameter],
                wanted: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Build the derived tensors `wanted` names from `tensors` (in place), dropping sources `wanted` lacks."""
    for name in sorted(wanted):
        entry = derived.get(name)
        if entry is None:
            continue
        tensors[name] = entry.build(tensors)
        for source in entry.sources:
            if source not in wanted:
                del tensors[source]  # the fused copy replaces it: the source's memory is freed now
    return tensors


def load_with_derived(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      derived: Mapping[str, DerivedParameter],
                      load: Callable[[Specs], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load `specs` through `load` (a weight provider taking specs), derived names built from their sources."""
    if not any(name in derived for name in specs):
        return load(dict(specs))
    return materialise(load(source_specs(specs, derived)), derived, specs)
