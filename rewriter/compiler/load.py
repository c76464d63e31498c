"""The load stage: read the weights a graph needs (a rank only its slices) and put them in place."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx

from hfrewrite.compiler.capture import CapturedModel
from hfrewrite.compiler.derived import derived_parameters, load_with_derived
from hfrewrite.parallel.sharding import make_slicer, shard_specs, share_tied

# weights(specs, tied, device, dtype) -> tensors; under tp > 1 also slicer=... (what each rank reads).
WeightProvider = Callable[..., dict[str, torch.Tensor]]


def held_tensor(graph_module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer `name` (qualified, as HF names it) the module holds; None if it holds none."""
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    except AttributeError:
        return None
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers.get(leaf)


def install_weights(graph_module: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors in place of the meta parameters and buffers, under their HF names."""
    for name, tensor in sorted(tensors.items()):
        owner_path, _, leaf = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def load_graph_weights(captured: CapturedModel, context: Any, weights: WeightProvider,
                       specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read `specs` through `weights` (TP-sliced when the rewrite sharded them; tied weights shared) plus the
    captured buffers; the tensors by HF name, for `install_weights` on one graph or on each stage."""
    shards = shard_specs(context)
    sliced = {"slicer": make_slicer(shards)} if shards else {}  # each rank reads only its slices
    # fused projections are read as their sources (each through its own shard) and concatenated here
    tensors = load_with_derived(specs, derived_parameters(context.state),
                                lambda wanted: weights(wanted, captured.tied_weights, device, dtype, **sliced))
    share_tied(tensors, captured.tied_weights, shards)
    tensors.update({name: buffer.to(device) for name, buffer in captured.buffers.items()})
    return tensors
