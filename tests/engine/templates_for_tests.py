"""Templates the engine tests bring in their own TemplateLibrary (the shipped ones belong to rules/*/templates.py).

Each is small enough to check by eye; the tests check them by numbers.
"""
from __future__ import annotations

import torch

from hfrewrite.engine import Match, RewriteContext, TemplateLibrary, template

aten = torch.ops.aten


@template("engine_test_silu_as_sigmoid", equation="silu(g) * u == (g * sigmoid(g)) * u")
def silu_as_sigmoid(ctx: RewriteContext, match: Match, variant: str = "exact") -> None:
    """The llama MLP product with silu spelled out; variant 'wrong' drops the factor g (a control)."""
    gate, up = match["gate"], match["up"]
    sigmoid = ctx.insert_call(aten.sigmoid.default, (gate,), like=match.root)
    activated = ctx.insert_call(aten.mul.Tensor, (gate, sigmoid), like=match.root) if variant == "exact" else sigmoid
    ctx.replace(match, ctx.insert_call(aten.mul.Tensor, (activated, up), like=match.root))


@template("engine_test_linear_as_matmul", equation="linear(x, W, b) == matmul(x, W^T) + b")
def linear_as_matmul(ctx: RewriteContext, match: Match) -> None:
    """aten.linear as matmul with the transposed weight (single-op rule: schema captures input/weight/bias)."""
    transposed = ctx.insert_call(aten.t.default, (match["weight"],), like=match.root)
    out = ctx.insert_call(aten.matmul.default, (match["input"], transposed), like=match.root)
    if match["bias"] is not None:
        out = ctx.insert_call(aten.add.Tensor, (out, match["bias"]), like=match.root)
    ctx.replace(match, out)


@template("engine_test_replace_by_input", equation="(deliberately false) linear(x, W) == x")
def replace_by_input(ctx: RewriteContext, match: Match) -> None:
    """Breaks shapes on purpose: the engine must catch it when it re-propagates fake values."""
    ctx.replace(match, match["input"])


@template("engine_test_record_site", equation="identity (records the site in ctx.state)")
def record_site(ctx: RewriteContext, match: Match, key: str = "sites") -> None:
    """Changes nothing; shows that template state lives on the context."""
    ctx.state.setdefault(key, []).append(match.module_path)


@template("engine_test_scale_silu", equation="silu(x) -> silu(x) * s, s a new graph input")
def scale_silu(ctx: RewriteContext, match: Match) -> None:
    """Adds one shared graph input (reused across sites) and multiplies the activation by it."""
    like = match.root.meta["val"]
    with ctx.fake_mode:
        fake = torch.empty(1, dtype=like.dtype, device=like.device)
    scale = ctx.add_placeholder("engine_scale", fake)
    silu = ctx.insert_call(aten.silu.default, tuple(match.root.args), like=match.root)
    ctx.replace(match, ctx.insert_call(aten.mul.Tensor, (silu, scale), like=match.root))


@template("engine_test_bad_insert", equation="(deliberately ill-typed) linear(x, W) -> mm(x, x)")
def bad_insert(ctx: RewriteContext, match: Match) -> None:
    """Inserts an op its inputs do not fit: insert_call must refuse it at once, naming the site."""
    ctx.replace(match, ctx.insert_call(aten.mm.default, (match["input"], match["input"]), like=match.root))


@template("engine_test_half_head", equation="(a new weight) linear(x, W) -> linear(x, W')")
def half_head(ctx: RewriteContext, match: Match) -> None:
    """Swaps the weight for a new parameter with half the rows, as a tp shard would."""
    rows, columns = match["weight"].meta["val"].shape
    weight = ctx.add_attribute("engine_test.head_shard", torch.empty(rows // 2, columns, device="meta"))
    ctx.replace(match, ctx.insert_call(aten.linear.default, (match["input"], weight), like=match.root))


def _only_layer(match: Match, key: str = "sites", layer: str = "model.layers.0.") -> str | None:
    """The guard of engine_test_record_guarded: refuses every site outside `layer`."""
    return None if match.module_path.startswith(layer) else f"guard: {match.module_path} is not in {layer}"


@template("engine_test_record_guarded", equation="identity (records the site), guarded", guard=_only_layer)
def record_guarded(ctx: RewriteContext, match: Match, key: str = "sites", layer: str = "model.layers.0.") -> None:
    """record_site behind a guard that takes only the sites of one layer (near misses elsewhere)."""
    ctx.state.setdefault(key, []).append(match.module_path)


TEMPLATES = [silu_as_sigmoid, linear_as_matmul, replace_by_input, record_site, scale_silu, bad_insert, half_head,
             record_guarded]
LIBRARY = TemplateLibrary(TEMPLATES)  # what the engine tests load their rules with
