"""Templates of the attention rule family (rules/attention/rules.yaml).

paged_attention: hfrewrite::attention(q, k, v, ...) -> hfrewrite::paged_attention(q, k, v, k_cache_i,
v_cache_i, <step metadata>, ...); paged_attention_key_limit the same for hfrewrite::attention_key_limit
(the step's key_limit input passed on). The caches and metadata become graph inputs; what each cache must
look like is recorded in ctx.state["kv_caches"] (on the compiled model, never in a global).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.templates import Template, template
from hfrewrite.kernels.attention import op as paged  # noqa: F401  (registers the op)
from hfrewrite.kernels.attention.op import METADATA_EXAMPLES, METADATA_FIELDS
from hfrewrite.runtime.signature import Role, input_name

KV_CACHES = "kv_caches"
EXAMPLE_SLOTS, EXAMPLE_SEQS = 32, 2


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention site needs from the KV cache."""

    site: int
    module_path: str
    kv_heads: int
    head_dim: int
    value_dim: int
    sliding_window: int


def _fake(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A fake example value for a new graph input (sizes are examples; compile traces real ones)."""
    return like.fake_mode.from_tensor(torch.empty(shape, dtype=dtype, device=like.device))


def _metadata_inputs(ctx: RewriteContext, like: torch.Tensor) -> list[torch.fx.Node]:
    """The shared per-step metadata inputs (created by the first attention site, reused by the others)."""
    return [ctx.add_placeholder(input_name(Role.ATTENTION, name), _fake(*METADATA_EXAMPLES[name], like))
            for name in METADATA_FIELDS]


def add_cache_site(ctx: RewriteContext, module_path: str, k: torch.fx.Node, v: torch.fx.Node, window: int
                   ) -> tuple[list[torch.fx.Node], torch.fx.Node, torch.fx.Node]:
    """Record a new attention site's KV-cache spec (k, v [1, Hkv, T, D]) and add its cache inputs: (the step's
    metadata inputs, key cache, value cache). Every paged attention op (plain or ALiBi) gets its site here."""
    k_val, v_val = k.meta["val"], v.meta["val"]
    specs = ctx.state.setdefault(KV_CACHES, [])
    site = len(specs)
    kv_heads, head_dim, value_dim = int(k_val.shape[1]), int(k_val.shape[3]), int(v_val.shape[3])
    specs.append(KVCacheSpec(site, module_path, kv_heads, head_dim, value_dim, window))
    metadata = _metadata_inputs(ctx, k_val)
    k_cache = ctx.add_placeholder(input_name(Role.KEY_CACHE, site=site),
                                  _fake((EXAMPLE_SLOTS, kv_heads, head_dim), k_val.dtype, k_val))
    v_cache = ctx.add_placeholder(input_name(Role.VALUE_CACHE, site=site),
                                  _fake((EXAMPLE_SLOTS, kv_heads, value_dim), v_val.dtype, v_val))
    return metadata, k_cache, v_cache


@template("paged_attention",
          equation="paged_attention(q, k, v; cache) == attention(q, k, v) per sequence, cache holds k, v")
def paged_attention(ctx: RewriteContext, match: Match) -> None:
    node = match.root
    q, k, v, scaling, sliding_window, softcap, causal, sinks = node.args
    metadata, k_cache, v_cache = add_cache_site(ctx, match.module_path, k, v, int(sliding_window))
    new = ctx.insert_call(torch.ops.hfrewrite.paged_attention.default,
                          (q, k, v, k_cache, v_cache, *metadata, scaling, sliding_window, softcap, causal, sinks),
                          {}, like=node)
    ctx.replace(match, new)


@template("paged_attention_key_limit",
          equation="paged_attention_key_limit(q, k, v, key_limit; cache) == attention_key_limit(q, k, v, key_limit) "
                   "per sequence, cache holds k, v")
def paged_attention_key_limit(ctx: RewriteContext, match: Match) -> None:
    node = match.root
    q, k, v, key_limit, scaling, sliding_window, softcap, sinks = node.args
    metadata, k_cache, v_cache = add_cache_site(ctx, match.module_path, k, v, int(sliding_window))
    new = ctx.insert_call(torch.ops.hfrewrite.paged_attention_key_limit.default,
                          (q, k, v, k_cache, v_cache, *metadata, key_limit, scaling, sliding_window, softcap, sinks),
                          {}, like=node)
    ctx.replace(match, new)


# The templates this family ships (the shipped TemplateLibrary is built from every family's list).
TEMPLATES: list[Template] = [paged_attention, paged_attention_key_limit]
