"""Checkpoint names to runtime names, through transformers' own conversion rules.

transformers 5 keeps checkpoints in their original layout (per-expert MoE tensors, mixtral's
`block_sparse_moe.experts.N.w1`, legacy names) and converts them while loading: each model type has a
list of WeightRenaming / WeightConverter transforms (transformers.conversion_mapping), and
`rename_source_key` maps every checkpoint key to the parameter it feeds. This module asks transformers
for those transforms (`get_model_conversion_mapping` on a meta-device model of the config, as
`from_pretrained` does), groups the checkpoint keys exactly as its loader does, and then either runs the
converter itself on whole tensors (`materialize`) or, for a tensor-parallel rank, builds a lazy view of
the result (`view`, lazy_views.py) so the rank reads only its share of each source tensor. Nothing here
names a model type: what is converted, and how, is transformers' table.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hfrewrite.compiler.lazy_views import Computed, Source, View, lazy_convert
from hfrewrite.errors import WeightError

logger = logging.getLogger(__name__)

# Reads a checkpoint tensor by name: whole (materialize) or as an indexable slice with get_shape (view).
Reader = Callable[[str], Any]


@dataclass
class Rules:
    """transformers' transforms for one model, and what its loader needs beside them."""

    renamings: list[Any]
    converters: list[Any]
    base_model_prefix: str | None
    model: torch.nn.Module | None      # meta-device model: some ops read a parameter's shape from it
    config: Any
    parameters: frozenset[str] | None  # the model's state-dict names; None: any name (no config known)

    @property
    def identity(self) -> bool:
        return not self.renamings and not self.converters


def identity_rules() -> Rules:
    """No conversion: every checkpoint tensor feeds the parameter of its own name (no config at hand)."""
    return Rules([], [], None, None, None, None)


def conversion_rules(config: Any, directory: Any = None) -> Rules:
    """transformers' conversion transforms for the model of `config` as its kind loads it (a causal LM, or the
    base model of an embedding model; the installed version's table)."""
    from hfrewrite.compiler.kinds import kind_for
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        raise WeightError(f"the checkpoint is quantized ({method} quantization_config in its config): hfrewrite "
                          f"loads plain floating-point weights only; dequantize it first (e.g. from_pretrained, then "
                          f"save_pretrained)")
    auto_class = kind_for(config, directory).hf_class()
    config = copy.deepcopy(config)  # from_config records the attention implementation on the config
    try:
        with torch.device("meta"):
            model = auto_class.from_config(config)
    except ValueError as error:
        raise WeightError(f"transformers cannot build a {auto_class.__name__} for model type {config.model_type!r} "
                          f"to look up its checkpoint conversion: {str(error).splitlines()[0]}") from error
    transforms = get_model_conversion_mapping(model)
    return Rules(renamings=[t for t in transforms if isinstance(t, WeightRenaming)],
                 converters=[t for t in transforms if isinstance(t, WeightConverter)],
                 base_model_prefix=model.base_model_prefix, model=model, config=model.config,
                 parameters=frozenset(model.state_dict().keys()))


@dataclass
class Group:
    """Checkpoint tensors that become runtime tensors together (one converter call in transformers' loader)."""

    layer_name: str                          # transformers' key for the group: the first target's full name
    converter: Any | None                    # the WeightConverter, None for a plain renaming
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> checkpoint keys, in order
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # runtime name -> full shape

    def keys(self) -> list[str]:
        """Every checkpoint key the group reads."""
        return [key for keys in self.sources.values() for key in keys]

    def describe(self) -> str:
        """The sources, for an error message: the first one and how many more."""
        keys = self.keys()
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        return f"{keys[0]}{more}"


@dataclass
class Layout:
    """Which checkpoint tensors make which runtime tensor, for one checkpoint and one model."""

    rules: Rules
    groups: list[Group]
    by_target: dict[str, Group]
    unused: list[str]    # checkpoint tensors no parameter of the model takes (rotary caches, MTP layers, ...)
    origin: str = ""     # the checkpoint, for messages

    def __contains__(self, name: object) -> bool:
        return name in self.by_target

    def names(self) -> list[str]:
        """Every runtime name the checkpoint provides, sorted."""
        return sorted(self.by_target)

    def renamed(self, name: str) -> bool:
        """Whether `name` is read from a checkpoint tensor of another name or made by a converter."""
        group = self.by_target[name]
        return group.converter is not None or group.keys() != [name]


def _natural_order(keys: list[str]) -> list[str]:
    from transformers.core_model_loading import dot_natural_key

    return sorted(keys, key=dot_natural_key)


def plan(keys: list[str], rules: Rules, tensor_meta: Callable[[str], torch.Tensor], origin: str = "") -> Layout:
    """Group the checkpoint `keys` as transformers' loader does (convert_and_load_state_dict_in_model).

    `tensor_meta(key)` is the tensor as a meta tensor of its stored shape and dtype: the converters run
    on those to learn their outputs' names and shapes without reading any data.
    """
    from transformers.core_model_loading import rename_source_key

    if rules.identity and rules.parameters is None:
        groups = [Group(key, None, {key: [key]}, {key: tuple(tensor_meta(key).shape)}) for key in sorted(keys)]
        return Layout(rules, groups, {group.layer_name: group for group in groups}, [], origin)
    wanted = {name: True for name in rules.parameters or ()}
    pattern_to_converter = {pattern: converter for converter in rules.converters
                            for pattern in converter.source_patterns}
    by_layer: dict[str, Group] = {}
    unused: list[str] = []
    for key in _natural_order(keys):
        renamed, pattern = rename_source_key(key, rules.renamings, rules.converters, rules.base_model_prefix, wanted)
        if renamed not in wanted and key in wanted:  # as transformers: a key already in runtime form stays
            renamed, pattern = rename_source_key(key, [], [], rules.base_model_prefix, wanted)
        if renamed not in wanted:
            unused.append(key)
            continue
        converter = pattern_to_converter[pattern] if pattern is not None else None
        group = by_layer.setdefault(renamed, Group(renamed, converter))
        if (group.converter is None) != (converter is None) or (converter is None and group.sources):
            unused.append(key)  # transformers reads the first key for a renamed name; the others are dropped
            continue
        group.sources.setdefault(pattern if pattern is not None else key, []).append(key)
    groups = list(by_layer.values())
    by_target: dict[str, Group] = {}
    for group in groups:
        if group.converter is None:
            group.outputs = {group.layer_name: tuple(tensor_meta(group.keys()[0]).shape)}
        else:
            made = _run(group, rules, tensor_meta, origin)  # on meta tensors: names and shapes, no data read
            group.outputs = {name: tuple(tensor.shape) for name, tensor in made.items()}
        for name in group.outputs:
            by_target.setdefault(name, group)
    return Layout(rules, groups, by_target, sorted(unused), origin)


def _run(group: Group, rules: Rules, read: Callable[[str], torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """transformers' own WeightConverter.convert on the group's tensors (read with `read`): runtime name -> tensor."""
    converter = copy.deepcopy(group.converter)
    for pattern, keys in group.sources.items():
        for key in keys:
            converter.add_tensor(group.layer_name, key, pattern, lambda key=key: read(key))
    try:
        with torch.no_grad():
            outputs = converter.convert(group.layer_name, model=rules.model, config=rules.config)
    except (RuntimeError, ValueError) as error:  # the sources do not fit together (shapes, counts)
        ops = ", ".join(type(op).__name__ for op in converter.operations)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightError(f"transformers' checkpoint conversion ({ops}) failed on {group.describe()} of the "
                          f"checkpoint {origin} for weight {group.layer_name}: {reason}") from error
    return {name: value[0] if isinstance(value, list) else value for name, value in outputs.items()}


def materialize(layout: Layout, name: str, read: Reader) -> dict[str, torch.Tensor]:
    """The runtime tensor `name` and the others its group makes (whole, as transformers' loader makes them)."""
    group = layout.by_target[name]
    if group.converter is None:
        return {name: read(group.keys()[0])}
    return _run(group, layout.rules, read, layout.origin)


def view(layout: Layout, name: str, open_slice: Reader) -> Any:
    """A lazy, indexable view of the runtime tensor `name`: indexing it reads only the indexed part of each
    source through `open_slice(key)` (an object with get_shape, dtype and step-1 slicing)."""
    group = layout.by_target[name]
    if group.converter is None:
        return open_slice(group.keys()[0])
    slices = {key: open_slice(key) for key in group.keys()}
    collected = {pattern: [Source(key, slices[key], slices[key].dtype) for key in keys]
                 for pattern, keys in group.sources.items()}
    views = lazy_convert(group.converter, collected, layout.rules.config)
    full = _full_names(group.layer_name, views) if views is not None else None
    if full is not None and {key: value.shape for key, value in full.items()} == group.outputs:
        return full[name]
    logger.debug("%s: reading %s whole (no lazy form of its conversion)", name, group.describe())
    dtype = next(iter(slices.values())).dtype

    def make() -> torch.Tensor:
        return _run(group, layout.rules, lambda key: slices[key][...], layout.origin)[name]
    return Computed(make, group.outputs[name], dtype, group.keys())


def _full_names(layer_name: str, outputs: dict[str, View]) -> dict[str, View]:
    """Patterns -> full names, as WeightConverter.convert expands them (prefix and suffix of the layer name)."""
    full_name = layer_name.replace("*.", "0.") if "*." in layer_name else layer_name
    for pattern in outputs:
        if pattern in full_name:
            prefix, _, suffix = full_name.partition(pattern)
            return {prefix + key + suffix: value for key, value in outputs.items()}
    return dict(outputs)
