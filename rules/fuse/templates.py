"""Templates of the fused-projection rule family (rules/fuse/rules.yaml).

  fuse_sibling_linears   y_i = (x @ cat(W_1..W_n)^T + cat(b_1..b_n))[..., o_i : o_i + out_i]
  fuse_gate_up           the same, guarded: only where the leader is a gated MLP's gate (see gate_up_problem)

The matched linear is the leader (q_proj, gate_proj); its siblings are found from the dataflow, not
from names: every other aten.linear that reads the same input node inside the same parent module
(the attention or MLP block), in graph order. The members' weights become one derived parameter
(`hfrewrite.compiler.derived`): registered on the graph module (meta, as captured) under a new name,
recorded with its sources so the loader reads q, k and v and concatenates them. Under --tp the TP
rules have already sharded every member (whole KV head groups per rank), so the concatenation is of
the rank's local slices and the slice bounds are the local widths: nothing here knows about ranks.

The gate/up rule is guarded by dataflow, not by the name `gate_proj` alone: attention blocks have gates
too (AFMoE's and Beam's `self_attn.gate_proj`, sigmoid(gate) * attention output), which are q/k/v's
siblings; the gate-up rule taking them would fuse q, k and v away under the q/k/v rule's match. The guard
wants a product act(gate) * up: one operand a function of the leader's output alone (through at least one
op: the activation, casts; constants and weights may join), the other a function of a sibling linear's
output alone.

Fusion is skipped (the site left as it is, with a FusionSkippedWarning saying why) where it would not
pay or not be safe: fewer than two members, a weight or bias read by any other node, members with
and without a bias, different dtypes or input widths, or weights that are not 2-D parameters.
"""
from __future__ import annotations

import heapq
import warnings

import torch
import torch.fx

from hfrewrite.compiler.derived import DerivedParameter, record_derived
from hfrewrite.compiler.load import held_tensor
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.scopes import module_of
from hfrewrite.engine.templates import Template, template
from hfrewrite.errors import RewriteError

aten = torch.ops.aten
FUSED = "fused_projections"  # ctx.state key: one dict per fused site (its members, fused weight and bias, sizes)
FUSED_PREFIX = "fused_"
# ctx.state key: whether the graph is cut into pieces after the rewrite (pipeline stages, layer-wise compile),
# whose inputs leave the token count unbacked (a view of a strided slice then breaks the graph)
GRAPH_CUT = "graph_cut"


class FusionSkippedWarning(UserWarning):
    """A fusion rule matched a site but left it unfused (the message says why)."""


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _parameter(node: object) -> torch.fx.Node | None:
    """`node` if it is a get_attr of a parameter, else None."""
    return node if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _operands(node: torch.fx.Node) -> tuple[object, object, object | None]:
    """(input, weight, bias or None) of an aten.linear node."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def siblings(leader: torch.fx.Node) -> list[torch.fx.Node]:
    """The linears reading the leader's input inside the leader's parent module, the leader included, in graph
    order."""
    x = leader.args[0]
    parent = _parent(module_of(leader)[0])
    found = [user for user in x.users if user.op == "call_function" and user.target == aten.linear.default
             and user.args[0] is x and _parent(module_of(user)[0]) == parent]
    order = {node: index for index, node in enumerate(leader.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _constant(node: torch.fx.Node) -> bool:
    """A weight or buffer (get_attr), or a value made from none (aten.full): what an activation may read beside x."""
    return node.op == "get_attr" or (node.op == "call_function" and not node.all_input_nodes)


def _function_of(source: torch.fx.Node, nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes computed from `source` alone (every input is `source`, such a node or a constant: a learnable
    activation's parameters), `source` included; `nodes` is the graph's node list (graph order)."""
    order = {node: index for index, node in enumerate(nodes)}
    derived = {source}
    pending = sorted({order[user] for user in source.users})
    seen: set[int] = set()
    while pending:  # in graph order: a node's inputs are decided before it is
        index = heapq.heappop(pending)
        if index in seen:
            continue
        seen.add(index)
        node = nodes[index]
        inputs = node.all_input_nodes
        if node.op == "call_function" and all(item in derived or _constant(item) for item in inputs):
            derived.add(node)
            for user in node.users:
                heapq.heappush(pending, order[user])
    return derived


def gate_up_problem(match: Match) -> str | None:
    """Why the matched linear is not a gated MLP's gate (None when its output feeds act(gate) * up, up a sibling)."""
    gate = match.root
    nodes = list(gate.graph.nodes)
    gated = _function_of(gate, nodes) - {gate}
    ups = [member for member in siblings(gate) if member is not gate]
    if not ups:
        return "not a gated MLP's gate: no other linear reads its input in its module"
    multiplied = set().union(*(_function_of(member, nodes) for member in ups))
    for node in (node for node in nodes if node in gated):
        for user in node.users:
            if user.op == "call_function" and user.target == aten.mul.Tensor and len(user.args) == 2:
                other = user.args[1] if user.args[0] is node else user.args[0]
                if isinstance(other, torch.fx.Node) and other in multiplied:
                    return None
    names = ", ".join(module_of(member)[0] or member.name for member in ups)
    return (f"not a gated MLP's gate: no product act(gate) * up where up is one of its siblings ({names}) "
            f"(an attention gate multiplies the attention output)")


def fusion_problem(members: list[torch.fx.Node]) -> str | None:
    """Why `members` cannot (or need not) be fused into one GEMM, or None when they can."""
    if len(members) < 2:
        return "no other linear reads the same input in the same module: nothing to fuse"
    graph = members[0].graph
    readers: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers[str(node.target)] = readers.get(str(node.target), 0) + len(node.users)
    biased = set()
    kinds: set[tuple[torch.dtype, int, torch.dtype | None]] = set()
    for member in members:
        _, weight, bias = _operands(member)
        name = module_of(member)[0] or member.name
        for role, tensor in (("weight", weight), ("bias", bias)):
            if tensor is None:
                continue
            if _parameter(tensor) is None:
                return f"{name}: its {role} is not a parameter ({tensor})"
            if readers[str(tensor.target)] != 1:
                return f"{name}: its {role} {tensor.target} is read by other nodes too"
        if weight.meta["val"].dim() != 2:
            return f"{name}: weight {weight.target} is not 2-D"
        if bias is not None:
            biased.add(member)
        kinds.add((weight.meta["val"].dtype, int(weight.meta["val"].shape[1]),
                   bias.meta["val"].dtype if bias is not None else None))
    if biased and len(biased) != len(members):
        return "some of the linears have a bias and some do not"
    if len(kinds) != 1:
        return f"the linears differ in weight dtype, input width or bias dtype ({sorted(map(str, kinds))})"
    return None


def _attribute(graph_module: torch.fx.GraphModule, name: str) -> torch.Tensor:
    owner_path, _, leaf = name.rpartition(".")
    owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    return getattr(owner, leaf)


def _drop_attribute(graph_module: torch.fx.GraphModule, name: str) -> None:
    """Remove parameter (or buffer) `name` from the module, so nothing loads it under its own name."""
    owner_path, _, leaf = name.rpartition(".")
    owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)


def fused_name(names: list[str]) -> str:
    """'a.q_proj.weight', 'a.k_proj.weight' -> 'a.fused_q_proj_k_proj.weight' (in the first member's parent)."""
    owners = [name.rpartition(".")[0] for name in names]
    leaf = names[0].rpartition(".")[2]
    parent = _parent(owners[0])
    joined = FUSED_PREFIX + "_".join(owner.rpartition(".")[2] for owner in owners)
    return f"{parent}.{joined}.{leaf}" if parent else f"{joined}.{leaf}"


def _fuse_parameters(ctx: RewriteContext, nodes: list[torch.fx.Node]) -> torch.fx.Node:
    """One derived parameter concatenating the parameters behind `nodes` (dim 0: output features)."""
    names = [str(node.target) for node in nodes]
    values = [_attribute(ctx.graph_module, name) for name in names]
    derived = DerivedParameter(fused_name(names), tuple(names), tuple(tuple(int(d) for d in v.shape) for v in values),
                               values[0].dtype, dim=0)
    if held_tensor(ctx.graph_module, derived.name) is not None:
        raise RewriteError(f"fused weight name {derived.name} is taken already")
    record_derived(ctx.state, derived)
    local = torch.empty(derived.shape, dtype=derived.dtype, device=values[0].device)  # meta, as captured
    # as its sources (HF's parameters require grad): torch 2.11's fake matmul takes a fold path for a weight that
    # does not, which calls numel() on the symbolic token count and fails; nothing runs with autograd anyway
    local.requires_grad_(values[0].requires_grad)
    return ctx.add_attribute(derived.name, local)


def _fuse(ctx: RewriteContext, match: Match) -> None:
    """The matched linear and its siblings (same input, same parent module) become one GEMM and slices of it."""
    members = siblings(match.root)
    problem = fusion_problem(members)
    if problem is not None:
        warnings.warn(f"{match.rule.name} at {match.module_path}: not fused: {problem}", FusionSkippedWarning,
                      stacklevel=2)
        return
    operands = [_operands(member) for member in members]
    x = operands[0][0]
    weights = [weight for _, weight, _ in operands]
    biases = [bias for _, _, bias in operands if bias is not None]
    weight = _fuse_parameters(ctx, weights)
    bias = _fuse_parameters(ctx, biases) if biases else None
    first = members[0]
    fused = ctx.insert_call(aten.linear.default, (x, weight, bias) if bias is not None else (x, weight), like=first)
    sizes = [int(w.meta["val"].shape[0]) for w in weights]
    outputs = []
    start = 0
    staged = bool(ctx.state.get(GRAPH_CUT, int(ctx.options.get("pp", 1)) > 1))
    for member, size in zip(members, sizes):
        item = ctx.insert_call(aten.slice.Tensor, (fused, -1, start, start + size), like=member)
        start += size
        if staged and any(user.target == aten.view.default for user in member.users):
            # a view of a strided slice guards on the token count, which a pipeline stage's input leaves
            # unbacked (a graph break per stage); a contiguous copy views freely. One graph needs no copy
            # (one frame, tested): the copies were 3 kernels per layer of a batch-1 GPU decode step
            item = ctx.insert_call(aten.clone.default, (item,), {"memory_format": torch.contiguous_format},
                                   like=member)
        outputs.append(item)
        if member is not match.root:
            member.replace_all_uses_with(item)
            ctx.graph.erase_node(member)
    ctx.replace(match, outputs[members.index(match.root)])
    for parameter in weights + biases:
        if not parameter.users:
            ctx.graph.erase_node(parameter)
        _drop_attribute(ctx.graph_module, str(parameter.target))
    ctx.state.setdefault(FUSED, []).append({
        "site": _parent(module_of(first)[0]),
        "members": [module_of(member)[0] for member in members],
        "weight": str(weight.target),
        "bias": str(bias.target) if bias is not None else None,
        "sizes": sizes,
    })


EQUATION = ("(x @ cat_i(W_i)^T + cat_i(b_i))[..., o_i:o_i + out_i] == x @ W_i^T + b_i for the linears reading x in "
            "one module")
fuse_sibling_linears = template("fuse_sibling_linears", equation=EQUATION)(_fuse)
fuse_gate_up = template("fuse_gate_up", equation=EQUATION + ", where one feeds act(gate) * up", guard=gate_up_problem)(
    _fuse)

TEMPLATES: list[Template] = [fuse_sibling_linears, fuse_gate_up]
