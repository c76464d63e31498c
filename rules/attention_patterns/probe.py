"""What a model's hand-built attention scores mean, found by evaluating their construction on probe inputs.

A model that computes attention itself builds `scores = f(q @ k^T, mask inputs)` before the softmax:
a scale, a causal (maybe windowed) mask as a boolean `where`, an additive mask, a 0/1 multiplier, an
ALiBi bias. Rather than pattern-match every spelling, the score construction between the `q @ k^T` node
and the softmax is cut out of the graph and run twice on one probe sequence (positions 0..P-1): with
`q @ k^T` = 0 (what is left is the mask and bias) and with it random (the difference is the scale). The
result says: scale, which keys each query may see (must be causal, optionally windowed), and the
bias on the allowed keys (must be zero, or ALiBi: per-head slope times key position).

The probe sees the graph's own buffers (the causal-mask tables models register); a 0-dim constant
lifted into the graph on the meta device (gpt_neo's `torch.tensor(finfo.min)` fill value) is unknown at
compile time and is taken as the dtype's lowest value, the only fill such code uses; verification
against HF eager checks the whole model afterwards anyway. A window wider than the probe cannot be seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from hfrewrite.compiler.capture import position_limit
from hfrewrite.kernels.attention.reference import allowed_mask

MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default)
BADDBMM = torch.ops.aten.baddbmm.default  # beta * bias + alpha * q @ k^T: bloom adds its ALiBi here
MASKED_BELOW = -5000.0  # a score this low after the mask is a masked key (HF fills use -10000, finfo.min, -inf)
MAX_PROBE = 1024


class ProbeFailure(Exception):
    """The scores do not mean attention the paged op can run; the message is the reason."""


@dataclass(frozen=True)
class ScoreMeaning:
    """scores == scaling * q @ k^T + alibi_slopes[h] * key_position, masked causally (window if > 0)."""

    qk: torch.fx.Node
    scaling: float
    sliding_window: int
    alibi_slopes: tuple[float, ...] | None
    mask_nodes: tuple[torch.fx.Node, ...]  # the nodes that built the scores (dead once attention is replaced)


def find_qk(scores: torch.fx.Node) -> torch.fx.Node:
    """The one q @ k^T (matmul or bmm) the scores are built from."""
    seen: set[torch.fx.Node] = set()
    stack, found = [scores], []
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, torch.fx.Node) or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in MATMULS:
            found.append(node)
            continue
        stack.extend(arg for arg in node.all_input_nodes)
    if len(found) != 1:
        raise ProbeFailure(f"scores {scores.name} are built from {len(found)} matmuls "
                           f"({', '.join(sorted(n.name for n in found)) or 'none'}), expected one q @ k^T")
    return found[0]


def construction(scores: torch.fx.Node, qk: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes computing the scores from q @ k^T and everything else, in graph order (qk excluded)."""
    needed: set[torch.fx.Node] = set()
    stack = [scores]
    if qk is not None and qk.target is BADDBMM:  # its bias input is part of the scores' construction
        needed.add(qk)
        stack.append(qk.args[0])
    while stack:
        node = stack.pop()
        if node in needed or node is qk:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    order = {node: index for index, node in enumerate(scores.graph.nodes)}
    return sorted(needed, key=order.__getitem__)


def _attribute(graph_module: torch.fx.GraphModule, node: torch.fx.Node, buffers: dict[str, torch.Tensor]
               ) -> torch.Tensor:
    target = str(node.target)
    if target in buffers:
        return buffers[target]
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    if value.device.type != "meta":
        return value
    if value.dim() == 0 and value.is_floating_point():
        if _kept_by_masking(node):
            return torch.tensor(0.0, dtype=value.dtype)
        return torch.tensor(torch.finfo(value.dtype).min, dtype=value.dtype)
    raise ProbeFailure(f"the mask reads {target}, whose values are not known at compile time (a weight?)")


def _kept_by_masking(node: torch.fx.Node) -> bool:
    """Whether a 0-dim constant is the value an additive mask keeps (`where(allowed, c, very negative)`, as
    transformers 5.17's masking_utils builds it with torch.tensor(0.0)): then it is 0, not a fill."""
    value = node
    while len(value.users) == 1 and next(iter(value.users)).target in (
            torch.ops.aten.detach_.default, torch.ops.aten.detach.default, torch.ops.aten.clone.default):
        value = next(iter(value.users))
    for user in value.users:
        if user.target is torch.ops.aten.where.ScalarOther and len(user.args) == 3 and user.args[1] is value:
            other = user.args[2]
            if isinstance(other, (int, float)) and other <= MASKED_BELOW:
                return True
    return False


def _probe_input(node: torch.fx.Node, tokens: int, token_dim: Any) -> torch.Tensor:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or str(value.shape[1]) != str(token_dim):
        raise ProbeFailure(f"the mask reads graph input {node.name}, which is not a [1, T] token input")
    if node.target == "position_ids":
        return torch.arange(tokens)[None]
    if value.dtype.is_floating_point:
        raise ProbeFailure(f"the mask reads the float graph input {node.name}")
    return torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(0)).to(value.dtype)


def _concrete(shape: Any, tokens: int, token_dim: Any, what: str) -> tuple[int, ...]:
    sizes = []
    for size in shape:
        if isinstance(size, int):
            sizes.append(size)
        elif str(size) == str(token_dim):
            sizes.append(tokens)
        else:
            raise ProbeFailure(f"{what} has size {size}, neither a constant nor the token count")
    return tuple(sizes)


def evaluate(nodes: list[torch.fx.Node], qk: torch.fx.Node, qk_value: torch.Tensor, inputs: dict[str, torch.Tensor],
         graph_module: torch.fx.GraphModule, buffers: dict[str, torch.Tensor], tokens: int, token_dim: Any) -> Any:
    env: dict[torch.fx.Node, Any] = {} if qk is None or qk.target is BADDBMM else {qk: qk_value}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = inputs.get(node.name) if node.name in inputs else _probe_input(node, tokens, token_dim)
        elif node.op == "get_attr":
            env[node] = _attribute(graph_module, node, buffers)
        elif node is qk:  # baddbmm: the probe stands for q @ k^T, its bias is evaluated
            beta, alpha = float(node.kwargs.get("beta", 1.0)), float(node.kwargs.get("alpha", 1.0))
            env[node] = beta * env[node.args[0]] + alpha * qk_value
        elif node.op == "call_function":
            args = _on_cpu(torch.fx.node.map_arg(node.args, env.__getitem__))
            kwargs = _on_cpu(torch.fx.node.map_arg(node.kwargs, env.__getitem__))
            if node.target is torch.ops.aten.dropout.default:
                env[node] = args[0]
                continue
            env[node] = node.target(*args, **kwargs)
        else:
            raise ProbeFailure(f"the mask is built by a {node.op} node ({node.name})")
    return env[nodes[-1]]


def _on_cpu(value: Any) -> Any:
    """Arguments with the capture's meta device replaced by the CPU (the probe runs there)."""
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    return value


def token_dim_of(graph: torch.fx.Graph) -> Any:
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in ("input_ids", "position_ids"):
            return node.meta["val"].shape[1]
    raise ProbeFailure("the graph has no input_ids/position_ids input to size the probe")


def probe_tokens(config: Any) -> int:
    """How long the probe sequence is: the longest the graph allows, at most MAX_PROBE."""
    return max(2, min(MAX_PROBE, position_limit(config) - 1))


def mask_meaning(allowed: torch.Tensor) -> int:
    """The sliding window (0: none) of a causal mask `allowed` [P, P]; ProbeFailure if it is not one."""
    tokens = allowed.shape[-1]
    if bool(torch.triu(allowed, 1).any()):
        query, key = torch.nonzero(torch.triu(allowed, 1))[0].tolist()
        raise ProbeFailure(f"the mask is not causal: query {query} sees the later key {key}")
    window = int(allowed[-1].sum())
    window = 0 if window >= tokens else window
    positions = torch.arange(tokens)[None]
    expected = allowed_mask(positions, positions, torch.ones(1, tokens, dtype=torch.bool), True, window)[0]
    if not torch.equal(expected, allowed):
        query = int(torch.nonzero((expected != allowed).any(-1))[0])
        raise ProbeFailure(f"the mask is not causal{f' with window {window}' if window else ''}: query {query} "
                           f"sees keys {torch.nonzero(allowed[query]).flatten().tolist()[:8]}...")
    return window


def score_meaning(graph_module: torch.fx.GraphModule, scores: torch.fx.Node, config: Any,
                  buffers: dict[str, torch.Tensor], allow_alibi: bool = False) -> ScoreMeaning:
    """Scale, mask and bias of `scores` (see the module docstring); ProbeFailure with the reason otherwise."""
    qk = find_qk(scores)
    nodes = construction(scores, qk)
    token_dim = token_dim_of(graph_module.graph)
    tokens = probe_tokens(config)
    shape = _concrete(qk.meta["val"].shape, tokens, token_dim, f"q @ k^T ({qk.name})")
    if shape[-1] != tokens or shape[-2] != tokens:
        raise ProbeFailure(f"q @ k^T ({qk.name}) is not [.., T, T] over the step's tokens")
    dtype = qk.meta["val"].dtype
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        zero = evaluate(nodes, qk, torch.zeros(shape, dtype=dtype), {}, graph_module, buffers, tokens, token_dim)
        full = evaluate(nodes, qk, noise.clone(), {}, graph_module, buffers, tokens, token_dim)
    zero = zero.float().reshape(-1, tokens, tokens)
    full = full.float().reshape(-1, tokens, tokens)
    noise = noise.float().reshape(-1, tokens, tokens).expand_as(full)
    allowed = zero > MASKED_BELOW
    if not bool((allowed == allowed[:1]).all()):
        raise ProbeFailure("the mask differs between heads")
    allowed = allowed[0]
    window = mask_meaning(allowed)
    change, drawn = (full - zero)[:, allowed], noise[:, allowed]
    scaling = float((change * drawn).sum() / (drawn * drawn).sum())  # least squares: change = scaling * drawn
    slack = 1e-5 * (1.0 + zero[:, allowed].abs())
    if not bool(((change - scaling * drawn).abs() <= slack).all()):
        raise ProbeFailure("the scores are not a constant scale times q @ k^T on the allowed keys")
    bias = zero[:, allowed]
    slopes = None
    if float(bias.abs().max()) > 1e-6:
        slopes = _alibi_slopes(zero, allowed)
        if not allow_alibi:
            raise ProbeFailure("the scores carry an ALiBi bias; this rule's paged op has none")
    return ScoreMeaning(qk, scaling, window, slopes, tuple(nodes))


def _alibi_slopes(zero: torch.Tensor, allowed: torch.Tensor) -> tuple[float, ...]:
    """Per-head slopes of a bias slope[h] * (key - c_q) on the allowed keys; ProbeFailure if it is not that."""
    tokens = allowed.shape[-1]
    last = zero[:, -1, :]                                  # the last query sees every key (no window) or a window
    seen = allowed[-1]
    keys = torch.arange(tokens, dtype=torch.float32)[seen]
    values = last[:, seen]
    slopes = (values[:, -1] - values[:, 0]) / max(float(keys[-1] - keys[0]), 1.0)
    positions = torch.arange(tokens, dtype=torch.float32)
    expected = slopes[:, None, None] * positions[None, None, :]
    relative = zero - expected
    row = torch.where(allowed, relative, 0.0).sum(-1, keepdim=True) / allowed.sum(-1, keepdim=True)
    # slack for slopes * positions rounded through bfloat16 (falcon builds its ALiBi table that way)
    slack = 1e-3 + 2.0 ** -7 * expected.abs()
    if not bool(((torch.where(allowed, relative, row) - row).abs() <= slack).all()):
        raise ProbeFailure("the scores carry a bias that is not ALiBi (per-head slope times key position)")
    return tuple(float(s) for s in slopes)
