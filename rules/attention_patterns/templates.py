"""Templates of the attention_patterns family (rules/attention_patterns/rules.yaml).

attention_from_scores: matmul(softmax(scores), v) whose scores are proven (probe.py) to be
scale * q @ k^T under a causal, optionally windowed mask -> hfrewrite::attention(q, k, v, scale,
window, causal=True), which the attention family's paged-attention rule then pages. The matched nodes
and the mask construction that only they used are erased.
attention_from_sdpa: aten.scaled_dot_product_attention(q, k, v, mask | is_causal) likewise.

The probe reads the captured model's real non-persistent buffers (causal-mask tables) from
ctx.state[CAPTURED_BUFFERS] when the compiler put them there; a refusal is a RewriteError with the reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from hfrewrite.compiler import attention_marker  # noqa: F401  (registers hfrewrite::attention)
from hfrewrite.engine.context import RewriteContext, erase_dead
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.templates import Template, template
from hfrewrite.errors import RewriteError
from hfrewrite.rules.attention.templates import add_cache_site
from hfrewrite.rules.attention_patterns import probe
from hfrewrite.rules.attention_patterns.marker import ATTENTION_ALIBI
from hfrewrite.rules.attention_patterns.probe import ProbeFailure, find_qk, mask_meaning, score_meaning

CAPTURED_BUFFERS = "captured_buffers"
aten = torch.ops.aten


def _call(ctx: RewriteContext, op: Any, args: tuple[Any, ...], like: torch.fx.Node) -> torch.fx.Node:
    return ctx.insert_call(op, args, {}, like=like)


def _as_heads(ctx: RewriteContext, value: torch.fx.Node, dtype: torch.dtype, like: torch.fx.Node) -> torch.fx.Node:
    """[B, H, T, D] in `dtype` from [B, H, T, D] or heads folded [B*H, T, D] (B = 1: one packed row)."""
    if value.meta["val"].dim() == 3:
        value = _call(ctx, aten.unsqueeze.default, (value, 0), like)
    if value.meta["val"].dtype != dtype:
        value = _call(ctx, aten.to.dtype, (value, dtype), like)
    return value


def _to_marker_layout(ctx: RewriteContext, match: Match, q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node
                      ) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    root = match.root
    out_val = root.meta["val"]
    if out_val.dim() == 4 and int(out_val.shape[0]) != 1:
        raise RewriteError(f"attention at {match.module_path}: batch {out_val.shape[0]} != 1 (one packed row)")
    dtype = v.meta["val"].dtype
    q4, k4, v4 = (_as_heads(ctx, value, dtype, root) for value in (q, k, v))
    heads, kv_heads = int(q4.meta["val"].shape[1]), int(k4.meta["val"].shape[1])
    if heads % kv_heads:
        raise RewriteError(f"attention at {match.module_path}: {heads} query heads, {kv_heads} kv heads")
    return q4, k4, v4


def _finish(ctx: RewriteContext, match: Match, attended: torch.fx.Node, dead: tuple[torch.fx.Node, ...]) -> None:
    """[1, T, H, Dv] attention output in the matched matmul's layout; the match and its dead mask erased."""
    root = match.root
    out_val = root.meta["val"]
    out = _call(ctx, aten.transpose.int, (attended, 1, 2), root)          # [1, H, T, Dv] like the matmul
    if out_val.dim() == 3:
        out = _call(ctx, aten.squeeze.dim, (out, 0), root)
    if out.meta["val"].dtype != out_val.dtype:
        out = _call(ctx, aten.to.dtype, (out, out_val.dtype), root)
    ctx.replace(match, out)
    _erase_dead(ctx.graph, [*match.nodes.values(), *dead])


def _alibi_marker(ctx: RewriteContext, match: Match, q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node,
                  scaling: float, window: int, slopes: tuple[float, ...], dead: tuple[torch.fx.Node, ...]) -> None:
    """ALiBi attention -> the hfrewrite::attention_alibi marker (paged by paged_attention_alibi below, after the
    tensor-parallel rules have had their say)."""
    q4, k4, v4 = _to_marker_layout(ctx, match, q, k, v)
    if len(slopes) != int(q4.meta["val"].shape[1]):
        raise RewriteError(f"attention at {match.module_path}: {len(slopes)} ALiBi slopes for "
                           f"{q4.meta['val'].shape[1]} heads")
    marker = _call(ctx, ATTENTION_ALIBI, (q4, k4, v4, float(scaling), int(window), [float(s) for s in slopes]),
                   match.root)
    _finish(ctx, match, marker, dead)


@template("paged_attention_alibi",
          equation="paged_attention_alibi(q, k, v; cache) == attention_alibi(q, k, v) per sequence, cache holds k, v")
def paged_attention_alibi(ctx: RewriteContext, match: Match) -> None:
    """The ALiBi marker -> hfrewrite::paged_attention_alibi, with the cache and metadata inputs the attention
    family's paged_attention template makes for every other site."""
    node = match.root
    q, k, v, scaling, window, slopes = node.args
    metadata, k_cache, v_cache = add_cache_site(ctx, match.module_path, k, v, int(window))
    new = _call(ctx, torch.ops.hfrewrite.paged_attention_alibi.default,
                (q, k, v, k_cache, v_cache, *metadata, float(scaling), int(window), list(slopes)), node)
    ctx.replace(match, new)


def _replace_with_marker(ctx: RewriteContext, match: Match, q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node,
                         scaling: float, window: int, dead: tuple[torch.fx.Node, ...]) -> None:
    q4, k4, v4 = _to_marker_layout(ctx, match, q, k, v)
    marker = _call(ctx, torch.ops.hfrewrite.attention.default,
                   (q4, k4, v4, float(scaling), int(window), 0.0, True, None), match.root)
    _finish(ctx, match, marker, dead)


# eval-mode dropout (train=False), SDPA without dropout and detach_ of a lifted constant are pure here, though fx calls them impure
_DEAD_ANYWAY = (aten.dropout.default, aten.detach_.default, aten.scaled_dot_product_attention.default)


def _erase_dead(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase the score/mask nodes nothing uses anymore (users first), then every dead computation left in
    the graph: the scores' in-place scaling (falcon's `scores /= sqrt(d)`) and mask or ALiBi tables built
    once for all layers (dead after the last layer's rewrite) would otherwise stay, cost a T x T matmul per
    layer, and hold literal head counts that the tensor-parallel rules would have to keep consistent."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted({n for n in nodes if n in order}, key=order.__getitem__, reverse=True):
        if node.users or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "get_attr" or node.target in _DEAD_ANYWAY or not node.is_impure():
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # users come later in graph order: one reverse sweep suffices
        if node.users or node.op != "call_function":
            continue
        if node.target in _DEAD_ANYWAY or not node.is_impure() or _mutates_only_a_temporary(node):
            graph.erase_node(node)
    erase_dead(graph, [])


def _mutates_only_a_temporary(node: torch.fx.Node) -> bool:
    """An in-place op whose every mutated input is a call's result read by this node alone (nobody sees it)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    mutated = [node.args[i] for i, argument in enumerate(schema.arguments)
               if argument.alias_info is not None and argument.alias_info.is_write and i < len(node.args)]
    return bool(mutated) and all(isinstance(arg, torch.fx.Node) and arg.op == "call_function" and
                                 set(arg.users) == {node} for arg in mutated)


@template("attention_from_scores",
          equation="matmul(softmax(s * q@k^T masked causal[window]), v) == attention(q, k, v, s, window, causal)")
def attention_from_scores(ctx: RewriteContext, match: Match, alibi: bool = True) -> None:
    scores, v = match["scores"], match["v"]
    try:
        meaning = score_meaning(ctx.graph_module, scores, ctx.config, ctx.state.get(CAPTURED_BUFFERS, {}),
                                allow_alibi=alibi)
    except ProbeFailure as failure:
        raise RewriteError(f"rule {match.rule.name}: attention at {match.module_path} ({match.root.name}) "
                           f"refused: {failure}") from None
    q, k_t = (meaning.qk.args[1], meaning.qk.args[2]) if meaning.qk.target is aten.baddbmm.default else \
        (meaning.qk.args[0], meaning.qk.args[1])
    k = _call(ctx, aten.transpose.int, (k_t, -1, -2), match.root)
    dead = (meaning.qk, *meaning.mask_nodes)
    if meaning.alibi_slopes is not None:
        _alibi_marker(ctx, match, q, k, v, meaning.scaling, meaning.sliding_window, meaning.alibi_slopes, dead)
    else:
        _replace_with_marker(ctx, match, q, k, v, meaning.scaling, meaning.sliding_window, dead)


@template("attention_from_sdpa",
          equation="sdpa(q, k, v, causal mask[window] | is_causal, scale) == attention(q, k, v, scale, window, causal)")
def attention_from_sdpa(ctx: RewriteContext, match: Match) -> None:
    node = match.root
    q, k, v = node.args[:3]
    mask, dropout, is_causal, scale = match["attn_mask"], match["dropout_p"], match["is_causal"], match["scale"]
    where = f"rule {match.rule.name}: attention at {match.module_path} ({node.name}) refused"
    if dropout not in (0, 0.0):
        raise RewriteError(f"{where}: dropout {dropout}")
    scaling = float(scale) if scale is not None else float(q.meta["val"].shape[-1]) ** -0.5
    window, dead = 0, ()
    if mask is not None:
        if is_causal:
            raise RewriteError(f"{where}: both a mask and is_causal")
        window, dead = _sdpa_mask_window(ctx, mask, where)
    elif not is_causal:
        raise RewriteError(f"{where}: no mask and is_causal=False (bidirectional attention)")
    _replace_with_marker(ctx, match, q, k, v, scaling, window, dead)


def _sdpa_mask_window(ctx: RewriteContext, mask: torch.fx.Node, where: str) -> tuple[int, tuple[torch.fx.Node, ...]]:
    """Evaluate an SDPA mask on the probe (bool: True = allowed; float: additive) and read its window."""
    try:
        token_dim = probe.token_dim_of(ctx.graph)
        tokens = probe.probe_tokens(ctx.config)
        nodes = probe.construction(mask, None)  # type: ignore[arg-type]
        value = probe.evaluate(nodes, None, None, {}, ctx.graph_module,  # type: ignore[arg-type]
                           ctx.state.get(CAPTURED_BUFFERS, {}), tokens, token_dim)
        value = value.reshape(-1, tokens, tokens)
        allowed = value if value.dtype == torch.bool else value.float() > probe.MASKED_BELOW
        if value.dtype != torch.bool and float(value.float()[allowed].abs().max()) > 1e-6:
            raise ProbeFailure("the additive mask carries a bias on allowed keys")
        if not bool((allowed == allowed[:1]).all()):
            raise ProbeFailure("the mask differs between heads")
        return mask_meaning(allowed[0]), tuple(nodes)
    except ProbeFailure as failure:
        raise RewriteError(f"{where}: {failure}") from None


__all__ = ["CAPTURED_BUFFERS", "find_qk"]

# The templates this family ships.
TEMPLATES: list[Template] = [attention_from_scores, attention_from_sdpa, paged_attention_alibi]
