"""attention_patterns: hand-written attention and raw SDPA become paged attention, and equal HF eager.

Equivalence: tiny models of the families that compute attention themselves, compiled with every shipped
rule (no torch.compile), verified on packed, chunked prefill and decode steps through the paged cache
against HF eager in fp32. Pattern tests: small exported modules with one attention each; the rule
matches the intended form, refuses a subtly different one with its reason, and leaves no mask behind.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import GPT2Config

from hfrewrite.compiler.tiny import tiny_config
from hfrewrite.engine.apply import apply_rules
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules
from hfrewrite.errors import RewriteError
from hfrewrite.compiler.verify import verify
from tests.equivalence import check_compiled, check_equivalent, compile_tiny

RULES = Path(__file__).with_name("rules.yaml")
TOKENS, WIDTH, HEADS = 12, 16, 2


@pytest.mark.parametrize("model_type, overrides", [
    ("gpt_neo", {}),                                  # global + local (window 8) layers, no 1/sqrt(d) scale
    ("xglm", {}),                                     # heads folded into the batch (bmm), q pre-scaled
    ("openai-gpt", {}),                               # 0/1 multiplier mask plus -1e4 fill
    ("gpt_neox_japanese", {}),                        # baddbmm(zeros, q, k^T), cast after dropout
    ("biogpt", {}), ("stablelm", {}),                 # eager attention written in the model file
    ("falcon", {"multi_query": False}),               # old decoder architecture, alibi=False, rotary
    ("falcon", {}),                                   # old architecture, multi-query (k/v split by [i] index)
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # new architecture, grouped kv heads
])
def test_family_equals_hf_eager(model_type: str, overrides: dict) -> None:
    config = tiny_config(model_type, **overrides)
    check_equivalent(config, seed=0, backend=None, atol=1e-4)


@pytest.mark.parametrize("model_type, overrides, rule", [
    ("bloom", {}, "attention-pattern-folded-upcast"),                              # baddbmm(alibi, q, k^T)
    ("falcon", {"alibi": True, "multi_query": False}, "attention-pattern-viewed-dropout"),  # (qk + alibi) * s
    ("mpt", {}, "attention-pattern-upcast-dropout"),                               # alibi table buffer
])
def test_alibi_family_pages_every_layer(model_type: str, overrides: dict, rule: str) -> None:
    """Every layer becomes paged_attention_alibi with the model's slopes, and equals HF eager."""
    config = tiny_config(model_type, **overrides)
    model, report, reference = compile_tiny(config, 0, None)
    assert report.applied[rule] == config.num_hidden_layers == len(model.kv_specs)
    targets = {str(node.target) for node in model.graph_module.graph.nodes if node.op == "call_function"}
    assert "aten.baddbmm.default" not in targets and "aten.softmax.int" not in targets
    assert "hfrewrite.paged_attention_alibi.default" in targets
    result = verify(model, reference, seed=0, sequences=3, atol=1e-4)
    assert result.passed, result


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), sequences=st.integers(1, 4))
def test_gpt_neo_local_and_global_layers(seed: int, sequences: int) -> None:
    config = tiny_config("gpt_neo")
    model, report, reference = compile_tiny(config, seed, None)
    assert report.applied["attention-pattern-upcast-dropout"] == 2
    assert sorted(spec.sliding_window for spec in model.kv_specs) == [0, config.window_size]
    check_compiled(model, report, reference, seed=seed, atol=1e-4, sequences=sequences)


class HandWritten(torch.nn.Module):
    """Embedding -> softmax(q @ k^T * scale + mask [+ bias]) @ v, the mask a buffer like GPT-1's."""

    def __init__(self, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("bias", bias if bias is not None else torch.zeros(1), persistent=False)
        self.has_bias = bias is not None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        q, k, v = self.qkv(self.embed(input_ids)).view(1, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) / 2.0
        if self.has_bias:
            scores = scores + self.bias[:, :, :tokens, :tokens]
        scores = scores.masked_fill(~self.mask[:tokens, :tokens], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


class RawSdpa(torch.nn.Module):
    """Embedding -> F.scaled_dot_product_attention with a boolean mask buffer or is_causal."""

    def __init__(self, mask: torch.Tensor | None, causal: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.register_buffer("mask", mask if mask is not None else torch.ones(1, dtype=torch.bool), persistent=False)
        self.has_mask, self.causal = mask is not None, causal

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        q, k, v = self.qkv(self.embed(input_ids)).view(1, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        mask = self.mask[:tokens, :tokens] if self.has_mask else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)


def _rewrite(module: torch.nn.Module) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    ids = torch.randint(0, 64, (1, TOKENS))
    tokens = torch.export.Dim("tokens", min=2, max=63)
    program = torch.export.export(module, (ids,), dynamic_shapes=({1: tokens},), strict=False)
    graph_module = program.module()
    config = GPT2Config(n_positions=64)
    report = apply_rules(RewriteContext(graph_module, config), load_rules([RULES]))
    return graph_module, report.applied


def _targets(graph_module: torch.fx.GraphModule) -> set[str]:
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


def _window(tokens: int, window: int) -> torch.Tensor:
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    return causal & ~torch.ones(tokens, tokens, dtype=torch.bool).tril(-window) if window else causal


def _marker(graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    return next(node for node in graph_module.graph.nodes if node.target is torch.ops.hfrewrite.attention.default)


@pytest.mark.parametrize("window", [0, 5])
def test_hand_written_causal_mask_becomes_the_marker(window: int) -> None:
    module = HandWritten(_window(64, window))
    ids = torch.randint(0, 64, (1, TOKENS))
    want = module(ids)
    graph_module, applied = _rewrite(module)
    assert applied == {"attention-pattern-plain": 1}
    marker = _marker(graph_module)
    assert marker.args[3:7] == (0.5, window, 0.0, True)
    assert not _targets(graph_module) & {"aten.softmax.int", "aten.masked_fill.Scalar", "aten.logical_not.default"}
    assert not any(node.op == "get_attr" and node.target == "mask" for node in graph_module.graph.nodes)
    graph_module.recompile()
    torch.testing.assert_close(graph_module(ids), want, atol=1e-5, rtol=1e-5)


def test_hand_written_refuses_a_mask_that_is_not_causal() -> None:
    not_causal = _window(64, 0)
    not_causal[3, 7] = True  # one query sees a later key
    with pytest.raises(RewriteError, match="not causal: query 3 sees the later key 7"):
        _rewrite(HandWritten(not_causal))


def test_hand_written_refuses_a_bias_that_is_not_alibi() -> None:
    bias = torch.randn(1, HEADS, 64, 64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RewriteError, match="bias that is not ALiBi"):
        _rewrite(HandWritten(_window(64, 0), bias))


def test_hand_written_alibi_becomes_the_alibi_op() -> None:
    slopes = torch.tensor([0.5, 0.25]).view(1, HEADS, 1, 1)
    alibi = (slopes * torch.arange(64.0).view(1, 1, 1, 64)).expand(1, HEADS, 64, 64).contiguous()
    graph_module, applied = _rewrite(HandWritten(_window(64, 0), alibi))
    assert applied == {"attention-pattern-plain": 1, "paged-attention-alibi": 1}
    op = next(node for node in graph_module.graph.nodes
              if node.target is torch.ops.hfrewrite.paged_attention_alibi.default)
    assert op.args[10:] == (0.5, 0, [0.5, 0.25])
    assert not _targets(graph_module) & {"aten.softmax.int", "aten.masked_fill.Scalar", "aten.add.Tensor"}


@pytest.mark.parametrize("mask, causal, window", [(None, True, 0), (_window(64, 0), False, 0),
                                                  (_window(64, 4), False, 4)])
def test_sdpa_causal_becomes_the_marker(mask: torch.Tensor | None, causal: bool, window: int) -> None:
    module = RawSdpa(mask, causal)
    ids = torch.randint(0, 64, (1, TOKENS))
    want = module(ids)
    graph_module, applied = _rewrite(module)
    assert applied == {"attention-pattern-sdpa": 1}
    assert _marker(graph_module).args[4] == window
    assert "aten.scaled_dot_product_attention.default" not in _targets(graph_module)
    graph_module.recompile()
    torch.testing.assert_close(graph_module(ids), want, atol=1e-5, rtol=1e-5)


def test_sdpa_refuses_bidirectional_attention() -> None:
    with pytest.raises(RewriteError, match="bidirectional"):
        _rewrite(RawSdpa(None, False))


def test_alibi_marker_computes_causal_attention_with_the_slopes() -> None:
    """The marker's own implementation (what a graph holding it runs before paging) from the definition."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, 5, 4, generator=gen) for heads in (4, 2, 2))
    slopes = [0.5, -0.25, 0.125, 1.0]
    got = torch.ops.hfrewrite.attention_alibi(q, k, v, 0.3, 0, slopes)
    positions = torch.arange(5.0)
    bias = torch.tensor(slopes).view(4, 1, 1) * (positions[None, :] - positions[:, None])
    scores = (q[0] @ k[0].repeat_interleave(2, 0).transpose(-1, -2)) * 0.3 + bias
    scores = scores.masked_fill(positions[None, :] > positions[:, None], float("-inf"))
    want = (torch.softmax(scores, -1) @ v[0].repeat_interleave(2, 0)).transpose(0, 1)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


class KeptZeroMask(HandWritten):
    """transformers 5.17's additive mask: where(allowed, torch.tensor(0.0), finfo.min), the 0.0 a lifted constant."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        q, k, v = self.qkv(self.embed(input_ids)).view(1, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        keep = torch.tensor(0.0, device=input_ids.device)
        additive = torch.where(self.mask[:tokens, :tokens], keep, torch.finfo(torch.float32).min)
        scores = torch.matmul(q, k.transpose(-1, -2)) / 2.0 + additive
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def test_a_lifted_zero_kept_by_an_additive_mask_is_zero_on_the_meta_device() -> None:
    """Captured on the meta device the 0.0 of `where(allowed, tensor(0.0), min)` has no value: the probe reads it
    as what the mask keeps (0), not as a fill (which made every key masked and the rule refuse)."""
    from hfrewrite.rules.attention_patterns.templates import CAPTURED_BUFFERS

    mask = _window(64, 0)
    module = KeptZeroMask(mask).to("meta")
    ids = torch.randint(0, 64, (1, TOKENS), device="meta")
    tokens = torch.export.Dim("tokens", min=2, max=63)
    graph_module = torch.export.export(module, (ids,), dynamic_shapes=({1: tokens},), strict=False).module()
    lifted = [node for node in graph_module.graph.nodes if node.op == "get_attr" and "lifted" in str(node.target)]
    assert lifted, "the 0.0 was not lifted into the graph: the test would not exercise the meta path"
    context = RewriteContext(graph_module, GPT2Config(n_positions=64))
    context.state[CAPTURED_BUFFERS] = {"mask": mask}
    report = apply_rules(context, load_rules([RULES]))
    assert report.applied == {"attention-pattern-plain": 1}
    assert _marker(graph_module).args[3:7] == (0.5, 0, 0.0, True)
