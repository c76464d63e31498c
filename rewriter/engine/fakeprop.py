"""Re-running a rewritten graph on fake values, so every node's meta['val'] is true again.

Later rules (`where: x.shape.0`), sharding and pipeline splitting read shapes from meta['val'], so
after each rule we re-propagate through the whole graph under the fake mode the capture made (the
placeholders' values carry it, symbolic token count included). Parameters are meta tensors on the
module; they enter as static-shape fakes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_arg

from hfrewrite.errors import RewriteError
from hfrewrite.engine.scopes import module_of

# What torch's shape checks raise when an op's inputs do not fit (torch._check and friends: shape, dtype,
# device, arity): the rewritten graph no longer computes, a RewriteError naming the node. Anything else
# (KeyError, AttributeError, AssertionError, NotImplementedError: a bug in an op or its fake kernel)
# propagates with its traceback; apply adds a note naming the rule.
FAKE_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


class MissingValue(Exception):
    """An input of the node has no fake value to run on."""


def fake_mode_of(graph_module: torch.fx.GraphModule) -> FakeTensorMode | None:
    """The fake mode of the graph's values (placeholders first), or None if it has none."""
    nodes = sorted(graph_module.graph.nodes, key=lambda node: node.op != "placeholder")
    for node in nodes:
        value = node.meta.get("val")
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return None


def _attribute(graph_module: torch.fx.GraphModule, target: str) -> Any:
    owner: Any = graph_module
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


def fake_value(node: torch.fx.Node, mode: FakeTensorMode, graph_module: torch.fx.GraphModule) -> Any:
    """The value `node` computes, run on its inputs' fake values under `mode`."""
    if node.op == "placeholder":
        return node.meta.get("val")
    if node.op == "output":
        return None
    if node.op == "get_attr":
        value = _attribute(graph_module, str(node.target))
        if not isinstance(value, torch.Tensor):
            return None
        if isinstance(value, FakeTensor) and value.fake_mode is mode:
            return value
        return mode.from_tensor(value, static_shapes=True)

    def lookup(arg: torch.fx.Node) -> Any:
        if "val" not in arg.meta:
            raise MissingValue(f"its input {arg.name} has no fake value")
        return arg.meta["val"]

    args = map_arg(node.args, lookup)
    kwargs = map_arg(node.kwargs, lookup)
    with mode, torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return graph_module.get_submodule(str(node.target))(*args, **kwargs)


def propagate(graph_module: torch.fx.GraphModule, what: str) -> None:
    """Recompute meta['val'] for every node; a node that no longer computes -> RewriteError naming it."""
    mode = fake_mode_of(graph_module)
    if mode is None:
        return
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        try:
            node.meta["val"] = fake_value(node, mode, graph_module)
        except MissingValue as error:
            raise RewriteError(f"{what}: node {node.name} ({node.format_node()}) cannot be checked: {error}") \
                from error
        except FAKE_ERRORS as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RewriteError(f"{what}: node {node.name} ({_describe(node)}) no longer computes after the "
                               f"rewrite: {first}") from error


def _describe(node: torch.fx.Node) -> str:
    path = module_of(node)[0]
    return f"{node.target} in {path}" if path else str(node.target)
