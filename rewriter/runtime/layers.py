"""Layer-wise compilation: compile time that does not grow with depth.

The rewritten graph is cut per decoder layer by the pipeline splitter (hfrewrite.parallel.pp.split, one
stage per layer). Every piece's parameters and buffers become *inputs* of its graph, so pieces with the same
structure (a canonical hash over ops, argument wiring, constants and input shapes) run the same compiled
callable: one compilation per group instead of one graph that grows with the layers. The first piece (the
embedding and layer 0) and the last (the last layer, the final norm and the head) differ from the middle
layers and form their own groups. A step runs the pieces in a loop, each reading the values the previous
ones sent; under a device-graph capture the loop is captured like any other host code.

The trade: weights passed as inputs cannot be frozen into the compiled code, so inductor's freezing
(CPU weight prepacking) does not apply to the shared layers; pieces of their own (embedding, head) keep their
weights as constants and stay frozen. `python bench/bench_compile.py` measures both granularities side by side.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from tqdm import tqdm

from hfrewrite.parallel.pp.split import layer_plan, split_stages

__all__ = ["LayeredGraph", "Piece", "structural_hash"]


@dataclass
class Piece:
    """One cut of the graph: its graph (weights lifted to trailing inputs), what it reads and sends."""

    index: int
    graph_module: torch.fx.GraphModule
    input_names: list[str]          # the values it reads, by name: step inputs, caches, earlier pieces' sends
    weights: list[torch.Tensor]     # the lifted parameters and buffers, in placeholder order after the inputs
    send_names: list[str]           # names of the values it returns (the last piece: the model's output)
    digest: str = ""
    marks: list[tuple[str, list[int]]] = field(default_factory=list)  # received values' token dims (unbacked)


def _target_text(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", "") or ""
    return f"{module}.{getattr(target, '__qualname__', None) or getattr(target, '__name__', repr(target))}"


def _value_text(value: Any) -> str:
    """Shape and dtype of a node's example value (symbolic dims by their expression)."""
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return f"T{tuple(str(d) for d in val.shape)}{val.dtype}"
    return type(val).__name__


def structural_hash(graph_module: torch.fx.GraphModule) -> str:
    """A digest equal for graphs that compute the same function of their inputs in the same order.

    Nodes are numbered in graph order; each contributes its op, target, arguments (nodes by number,
    constants by repr) and, for inputs, the shape and dtype of its example value. Names (which carry layer
    numbers) do not take part.
    """
    number: dict[torch.fx.Node, int] = {}

    def arg_text(arg: Any) -> str:
        if isinstance(arg, torch.fx.Node):
            return f"%{number[arg]}"
        if isinstance(arg, (list, tuple)):
            inner = ",".join(arg_text(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
        if isinstance(arg, dict):
            return "{" + ",".join(f"{k}:{arg_text(v)}" for k, v in sorted(arg.items())) + "}"
        return repr(arg)

    digest = hashlib.sha256()
    for node in graph_module.graph.nodes:
        number[node] = len(number)
        target = "" if node.op in ("placeholder", "output", "get_attr") else _target_text(node.target)
        if node.op == "get_attr":  # a weight: what lifting it to an input would make of it
            value = _attribute(graph_module, str(node.target))
            shape = f"T{tuple(value.shape)}{value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
        else:
            shape = _value_text(node) if node.op == "placeholder" else ""
        digest.update(f"{node.op}|{target}|{arg_text(node.args)}|{arg_text(node.kwargs)}|{shape}\n".encode())
    return digest.hexdigest()


def _lift_attributes(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """The same graph with every get_attr tensor (parameter or buffer) turned into a trailing input."""
    graph = graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    weights: list[torch.Tensor] = []
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = _attribute(graph_module, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        if anchor is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                placeholder = graph.placeholder(f"weight_{len(weights)}")
        else:
            with graph.inserting_after(anchor):
                placeholder = graph.placeholder(f"weight_{len(weights)}")
        placeholder.meta = dict(node.meta)
        placeholder.meta.setdefault("val", value)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        anchor = placeholder
        # a plain tensor on the same storage: dynamo guards Parameter arguments by identity (one compile each)
        weights.append(value.detach() if isinstance(value, torch.nn.Parameter) else value)
    graph.lint()
    graph_module.recompile()
    return graph_module, weights


def _attribute(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


@dataclass
class LayeredGraph:
    """The graph as pieces that share compiled callables by structure; call it like the whole graph."""

    pieces: list[Piece]
    input_names: list[str]
    groups: list[list[int]] = field(default_factory=list)     # piece indices per group, in first-use order
    callables: list[Callable] = field(default_factory=list)   # one per group
    progress: bool = False                                    # a bar over the groups the first call compiles
    calls: int = 0

    @classmethod
    def cut(cls, graph_module: torch.fx.GraphModule, config: Any, kv_specs: Sequence[Any],
            lift_all: bool = False, progress: bool = False, share_step_values: bool = True) -> LayeredGraph:
        """Cut `graph_module` per decoder layer and group the pieces by structural hash (`lift_all`: weights
        become inputs in every piece, not only in the shared ones; `share_step_values`: values of the step inputs only,
        such as rotary cos/sin, made once and read by every piece, else recomputed in each as pipeline stages do)."""
        plan = layer_plan(graph_module, config, [spec.module_path for spec in kv_specs])
        split = split_stages(graph_module, config, kv_specs, plan.num_layers, ends=True,
                             share_step_values=share_step_values)
        pieces = [Piece(stage.index, stage.graph_module, stage.input_names, [], [value.name for value in stage.sends],
                        structural_hash(stage.graph_module)) for stage in split.stages]
        by_digest: dict[str, list[int]] = {}
        for piece in pieces:  # pieces are in layer order, so groups are in first-use order: deterministic
            by_digest.setdefault(piece.digest, []).append(piece.index)
        groups = list(by_digest.values())
        for group in groups:
            if len(group) > 1 or lift_all:  # shared code: the weights become inputs (a piece of its own keeps
                for index in group:         # them as constants, which inductor's freezing folds and prepacks)
                    pieces[index].graph_module, pieces[index].weights = _lift_attributes(pieces[index].graph_module)
        inputs = [n.target for n in graph_module.graph.nodes if n.op == "placeholder"]
        for piece in pieces:  # step inputs are marked by the graph signature; values sent between pieces here
            piece.marks = [(name, dims) for name, dims in _symbolic_dims(piece).items() if name not in inputs]
        return cls(pieces, inputs, groups, progress=progress)

    def compile(self, compile_fn: Callable[[torch.fx.GraphModule], Callable]) -> LayeredGraph:
        """One callable per group, made by `compile_fn` from the group's first piece (lazy, like torch.compile)."""
        self.callables = [compile_fn(self.pieces[group[0]].graph_module) for group in self.groups]
        self._group_of = {index: g for g, group in enumerate(self.groups) for index in group}
        return self

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.calls += 1
        return self._run(inputs, self.progress and self.calls == 1)

    def describe(self) -> dict:
        """The compile report's view: pieces, groups (by their pieces) and how many weights became inputs."""
        return {"pieces": len(self.pieces), "groups": [list(group) for group in self.groups],
                "lifted_weights": sum(len(piece.weights) for piece in self.pieces)}

    def _run(self, inputs: Sequence[torch.Tensor], progress: bool) -> Any:
        values: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        bar = tqdm(total=len(self.groups), desc=f"compiling {len(self.pieces)} pieces in {len(self.groups)} groups",
                   file=sys.stderr) if progress else None
        out: Any = None
        for piece in self.pieces:
            group = self._group_of[piece.index]
            for name, dims in piece.marks:
                for dim in dims:
                    torch._dynamo.decorators.mark_unbacked(values[name], dim)
            out = self.callables[group](*[values[name] for name in piece.input_names], *piece.weights)
            if bar is not None and piece.index == self.groups[group][0]:
                bar.update(1)
            if piece.send_names:
                values.update(zip(piece.send_names, out))
        if bar is not None:
            bar.close()
        return out


def _symbolic_dims(piece: Piece) -> dict[str, list[int]]:
    """Per input of the piece: its symbolic dims (the token count), to be marked unbacked like the step inputs'."""
    dims: dict[str, list[int]] = {}
    for node, name in zip([n for n in piece.graph_module.graph.nodes if n.op == "placeholder"], piece.input_names):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            symbolic = [d for d, size in enumerate(val.shape) if not isinstance(size, int)]
            if symbolic:
                dims[name] = symbolic
    return dims
