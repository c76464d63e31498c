"""The rewrite context: the graph being rewritten, the model it is of, and what templates record.

Everything a template creates that outlives the rewrite (KV-cache specs, sharding specs) goes into
`state`, which belongs to this object and so to one compiled model; never to module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from hfrewrite.errors import RewriteError
from hfrewrite.engine.fakeprop import FAKE_ERRORS, MissingValue, fake_mode_of, fake_value
from hfrewrite.engine.scopes import ScopeSet

if TYPE_CHECKING:
    from hfrewrite.engine.matcher import Match


@dataclass
class RewriteContext:
    """One model's rewrite: graph, config, the caller's options and scope sets, and state.

    `options` are what rules' `when:` checks read (the compiler puts its compile options there);
    `scope_sets` are the named module sets scopes refer to as `{NAME:STYLE}` (the compiler: the
    model's parallelism plans, rewriter/parallel/plans.py). The engine gives neither any meaning.
    """

    graph_module: torch.fx.GraphModule
    config: Any
    options: dict[str, Any] = field(default_factory=dict)
    scope_sets: dict[str, ScopeSet] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    replaced: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict, repr=False)

    @property
    def tp(self) -> int:
        """The caller's option `tp` (1 if it gave none): what `ctx.tp` in expressions and templates reads."""
        return int(self.options.get("tp", 1))

    @property
    def rank(self) -> int:
        """The caller's option `rank` (0 if it gave none): this rank's index among the `tp` ranks."""
        return int(self.options.get("rank", 0))

    @property
    def graph(self) -> torch.fx.Graph:
        """The graph being rewritten."""
        return self.graph_module.graph

    @property
    def model_type(self) -> str:
        """config.model_type ('' if the config has none)."""
        return str(getattr(self.config, "model_type", "") or "")

    @property
    def fake_mode(self) -> Any:
        """The FakeTensorMode of the graph's values (None for a graph without them)."""
        return fake_mode_of(self.graph_module)

    def insert_call(self, op: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                    like: torch.fx.Node, after: bool = False) -> torch.fx.Node:
        """A call_function node before (or after) `like`, with its fake value computed now."""
        inserting = self.graph.inserting_after(like) if after else self.graph.inserting_before(like)
        with inserting:
            node = self.graph.call_function(op, tuple(args), dict(kwargs or {}))
        if "nn_module_stack" in like.meta:
            node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
        mode = self.fake_mode
        if mode is not None:
            try:
                value = fake_value(node, mode, self.graph_module)
            except MissingValue:  # an input made by the template without a value: propagate() will say
                value = None
            except FAKE_ERRORS as error:
                raise RewriteError(f"new call {op} (inserted near node {like.name}) fails on its inputs' "
                                   f"shapes: {str(error).splitlines()[0] if str(error) else type(error).__name__}") \
                    from error
            if value is not None:
                node.meta["val"] = value
        return node

    def add_placeholder(self, name: str, fake_value: Any) -> torch.fx.Node:
        """A new graph input after the existing ones (or the existing input called `name`)."""
        placeholders = [node for node in self.graph.nodes if node.op == "placeholder"]
        for node in placeholders:
            if node.target == name:
                return node
        anchor = placeholders[-1] if placeholders else None
        if anchor is not None:
            with self.graph.inserting_after(anchor):
                node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_before(next(iter(self.graph.nodes), None)):
                node = self.graph.placeholder(name)
        node.meta["val"] = fake_value
        return node

    def add_attribute(self, qualified_name: str, value: torch.Tensor, *, parameter: bool = True) -> torch.fx.Node:
        """Register `value` on the graph module under `qualified_name` and return a get_attr node for it."""
        owner_path, _, leaf = qualified_name.rpartition(".")
        owner = self.graph_module
        for part in owner_path.split(".") if owner_path else ():
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if parameter:
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.requires_grad))
        else:
            owner.register_buffer(leaf, value)
        existing = [node for node in self.graph.nodes if node.op == "get_attr"]
        first = next(node for node in self.graph.nodes)
        inserting = self.graph.inserting_after(existing[-1]) if existing else self.graph.inserting_before(first)
        with inserting:
            node = self.graph.get_attr(qualified_name)
        mode = self.fake_mode
        if mode is not None:
            node.meta["val"] = mode.from_tensor(value, static_shapes=True)
        return node

    def replace(self, match: Match, new_node: torch.fx.Node) -> None:
        """Route every user of the match root to `new_node`, then erase the matched nodes now dead."""
        root = self.resolve(match.root)
        root.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
        self.replaced[root] = new_node
        erase_dead(self.graph, list(match.nodes.values()))

    def resolve(self, value: Any) -> Any:
        """`value` with replaced nodes followed to what replaced them (captures of later matches)."""
        seen = 0
        while isinstance(value, torch.fx.Node) and value in self.replaced and seen < 10_000:
            value = self.replaced[value]
            seen += 1
        return value


def erase_dead(graph: torch.fx.Graph, owned: list[torch.fx.Node]) -> None:
    """Erase the nodes of `owned` that nothing uses anymore (users first); impure nodes and inputs stay."""
    alive = set(graph.nodes)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted((n for n in owned if n in alive), key=order.__getitem__, reverse=True):
        if not node.users and node.op in ("call_function", "get_attr") and not node.is_impure():
            graph.erase_node(node)
