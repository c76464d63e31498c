"""Tests of the tensor-parallel templates (rules/tp.py) through the shipped rule files, in one process.

Each property exports a small block (an MLP, an attention block with GQA, GPT-2's packed Conv1D
attention, an embedding, an LM head), rewrites it once per rank with hypothesis-drawn sizes and
world size, loads each rank's slices of the real weights through the slicer, and runs all ranks in
threads whose collectives meet in `SimulatedGroup` (all-reduce = sum over ranks, all-gather =
concatenation). Every rank must end with exactly what the unsharded block computes. The structure
is checked too: one all-reduce per row-parallel site, no leftover input narrows where the producer
is column-parallel, and shards that partition the weights.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfrewrite.compiler import attention_marker  # noqa: F401  (registers hfrewrite::attention)
from hfrewrite.compiler.capture import retarget_devices
from hfrewrite.engine.apply import RULE_META, apply_rules, explain
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules, shipped_rules_dir
from hfrewrite.errors import RewriteError
from hfrewrite.rules.tp.sites import SPLIT_INPUT
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.sharding import SimulatedGroup, check_sharded, head_layout, make_slicer, shard_specs, split_range
from hfrewrite.parallel.layout import ParallelLayout

pytestmark = pytest.mark.timeout(300)

TP_RULES = shipped_rules_dir() / "tp" / "rules.yaml"
GPT2_RULES = shipped_rules_dir() / "arch" / "gpt2.yaml"
c10d = torch.ops._c10d_functional
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# blocks


class MLP(nn.Module):
    """up (colwise) -> act [* gate (colwise)] -> down (rowwise)."""

    def __init__(self, hidden: int, inner: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if gated else None
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.up_proj(x))
        if self.gate_proj is not None:
            h = torch.nn.functional.silu(self.gate_proj(x)) * h
        return self.down_proj(h)


class Attention(nn.Module):
    """q/k/v (colwise) -> hfrewrite.attention (GQA) -> o (rowwise); views with -1 or literal head counts."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool, literal: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.literal = heads, kv_heads, head_dim, literal
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, self.heads if self.literal else -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads if self.literal else -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
        out = torch.ops.hfrewrite.attention(q, k, v, self.head_dim ** -0.5, 0, 0.0, True, None)
        return self.o_proj(out.reshape(batch, tokens, self.heads * self.head_dim if self.literal else -1))


class PackedBlock(nn.Module):
    """Phi-3's layout: one qkv projection sliced into q, k, v; one gate_up projection chunked in two."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inner: int) -> None:
        super().__init__()
        self.sizes = (heads * head_dim, kv_heads * head_dim)
        self.head_dim = head_dim
        self.qkv_proj = nn.Linear(hidden, heads * head_dim + 2 * kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_width, kv_width = self.sizes
        parts = qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
        q, k, v = (t.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2) for t in parts)
        out = torch.ops.hfrewrite.attention(q, k, v, self.head_dim ** -0.5, 0, 0.0, True, None)
        h = x + self.o_proj(out.reshape(*x.shape[:-1], -1))
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return h + self.down_proj(torch.nn.functional.silu(gate) * up)


class GPT2Attention(nn.Module):
    """GPT-2's layout: one packed Conv1D (addmm) for q, k, v, split by a literal width; Conv1D output projection."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.width = heads, head_dim, heads * head_dim
        self.c_attn = Conv1D(3 * self.width, self.width)
        self.c_proj = Conv1D(self.width, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        out = torch.ops.hfrewrite.attention(q, k, v, self.head_dim ** -0.5, 0, 0.0, True, None)
        return self.c_proj(out.reshape(*out.shape[:-2], -1))


class GPT2Block(nn.Module):
    """Module paths as in GPT2LMHeadModel, so rules/arch/gpt2.yaml's scopes apply."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([nn.Module()])
        self.transformer.h[0].attn = GPT2Attention(heads, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.h[0].attn(x)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class Head(nn.Module):
    def __init__(self, hidden: int, vocab: int, bias: bool) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


# ----------------------------------------------------------------------------------------------
# harness


def export_block(module: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export (non-strict, dynamic token dim) to a plain graph, as capture does for whole models."""
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes=({1: tokens},), strict=False)
    graph_module = program.module()
    graph = graph_module.graph
    graph._codegen = torch.fx.graph.CodeGen()
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (output.args[0][0],)
    return torch.fx.GraphModule(graph_module, graph)


def rewrite_rank(graph_module: torch.fx.GraphModule, module: nn.Module, rules: list[Path], plan: dict[str, str],
                 tp: int, rank: int, model_type: str = "block") -> tuple[torch.fx.GraphModule, RewriteContext]:
    """One rank's rewritten copy of the block, with that rank's slices of the block's real weights installed."""
    copied = copy.deepcopy(graph_module)
    ctx = rewrite_context(copied, SimpleNamespace(model_type=model_type), ParallelLayout(tp=tp, rank=rank),
                          tp_plan=dict(plan))
    apply_rules(ctx, load_rules(rules))
    slicer = make_slicer(shard_specs(ctx))
    for name, tensor in module.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        target = copied.get_submodule(owner) if owner else copied
        value = slicer(name, tensor.detach())
        if leaf in target._parameters:
            target._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            target._buffers[leaf] = value
    retarget_devices(copied, torch.device("cpu"))
    return copied, ctx


def run_sharded(module: nn.Module, example: torch.Tensor, rules: list[Path], plan: dict[str, str], tp: int,
                model_type: str = "block") -> tuple[list[torch.Tensor], list[RewriteContext]]:
    """Every rank's output on `example`, the ranks running together in threads (exported on 3 tokens)."""
    graph_module = export_block(module, _tokens(example, 3))
    ranks = [rewrite_rank(graph_module, module, rules, plan, tp, rank, model_type) for rank in range(tp)]
    group = SimulatedGroup(tp, timeout=60)
    outputs = group.run(lambda rank: group.forward(rank, ranks[rank][0])(example))
    return outputs, [ctx for _, ctx in ranks]


def _tokens(example: torch.Tensor, tokens: int) -> torch.Tensor:
    """An input like `example` with `tokens` tokens (export needs more than one to keep the dim dynamic)."""
    return example[:, :1].expand(example.shape[0], tokens, *example.shape[2:]).clone()


def count(graph_module: torch.fx.GraphModule, op: Any) -> int:
    return sum(1 for node in graph_module.graph.nodes if node.op == "call_function" and node.target == op)


def assert_all_equal(outputs: list[torch.Tensor], expected: torch.Tensor) -> None:
    for rank, output in enumerate(outputs):
        assert output.shape == expected.shape, (rank, output.shape, expected.shape)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank}: {m}")


def assert_partition(ctx_list: list[RewriteContext], name: str, dim: int, full: int) -> None:
    """The ranks' pieces of weight `name` along `dim` cover [0, full) exactly once."""
    covered = sorted(piece for ctx in ctx_list for piece in shard_specs(ctx)[name].pieces)
    assert covered[0][0] == 0 and covered[-1][1] == full and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert all(shard_specs(ctx)[name].dim == dim for ctx in ctx_list)


# ----------------------------------------------------------------------------------------------
# properties


@PROPERTY
@given(hidden=st.integers(2, 24), inner=st.integers(4, 40), tp=st.integers(2, 4), tokens=st.integers(1, 6),
       gated=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_colwise_then_rowwise_mlp_equals_unsharded(hidden: int, inner: int, tp: int, tokens: int, gated: bool,
                                                   bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    module = MLP(hidden, inner, gated, bias).eval()
    x = torch.randn(1, tokens, hidden)
    plan = {"up_proj": "colwise", "gate_proj": "colwise", "down_proj": "rowwise"}
    outputs, contexts = run_sharded(module, x, [TP_RULES], plan, tp)
    assert_all_equal(outputs, module(x).detach())
    assert_partition(contexts, "up_proj.weight", 0, inner)
    assert_partition(contexts, "down_proj.weight", 1, inner)
    for ctx in contexts:
        graph_module = ctx.graph_module
        assert count(graph_module, c10d.all_reduce.default) == 1  # one reduce per row-parallel site, none else
        assert not any(SPLIT_INPUT in node.meta and node.users for node in graph_module.graph.nodes)
        assert all(RULE_META in node.meta for node in graph_module.graph.nodes
                   if node.op == "call_function" and node.target == c10d.all_reduce.default)


@PROPERTY
@given(kv_heads=st.integers(1, 4), group=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 8]),
       tp=st.integers(2, 4), tokens=st.integers(1, 6), bias=st.booleans(), literal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_attention_heads_split_by_groups_equals_unsharded(kv_heads: int, group: int, head_dim: int, tp: int,
                                                          tokens: int, bias: bool, literal: bool, seed: int) -> None:
    heads = kv_heads * group
    try:
        head_layout(heads, kv_heads, tp, 0)
    except ValueError:
        return  # no sound split (checked to fail loudly in test_impossible_head_splits_name_module_and_rule)
    torch.manual_seed(seed)
    hidden = 8
    module = Attention(hidden, heads, kv_heads, head_dim, bias, literal).eval()
    x = torch.randn(1, tokens, hidden)
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    outputs, contexts = run_sharded(module, x, [TP_RULES], plan, tp)
    assert_all_equal(outputs, module(x).detach())
    assert_partition(contexts, "q_proj.weight", 0, heads * head_dim)
    assert_partition(contexts, "o_proj.weight", 1, heads * head_dim)
    for rank, ctx in enumerate(contexts):
        layout = head_layout(heads, kv_heads, tp, rank)
        attention = next(n for n in ctx.graph.nodes if n.target == torch.ops.hfrewrite.attention.default)
        assert tuple(attention.args[0].meta["val"].shape[1:2]) == (layout.local_heads,)
        assert tuple(attention.args[1].meta["val"].shape[1:2]) == (layout.local_kv_heads,)
        assert count(ctx.graph_module, c10d.all_reduce.default) == 1


@pytest.mark.filterwarnings("ignore::hfrewrite.engine.report.UnmatchedRuleWarning")  # the block has no head/wte
@PROPERTY
@given(heads=st.integers(1, 6), head_dim=st.sampled_from([2, 4]), tp=st.integers(2, 4), tokens=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_gpt2_packed_conv1d_attention_equals_unsharded(heads: int, head_dim: int, tp: int, tokens: int,
                                                       seed: int) -> None:
    if heads < tp:
        return
    torch.manual_seed(seed)
    module = GPT2Block(heads, head_dim).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    x = torch.randn(1, tokens, heads * head_dim)
    outputs, contexts = run_sharded(module, x, [GPT2_RULES], {}, tp, model_type="gpt2")
    assert_all_equal(outputs, module(x).detach())
    width = heads * head_dim
    for rank, ctx in enumerate(contexts):
        spec = shard_specs(ctx)["transformer.h.0.attn.c_attn.weight"]
        q0, q1 = split_range(heads, tp, rank)
        assert spec.dim == 1 and spec.pieces == tuple((s * width + q0 * head_dim, s * width + q1 * head_dim)
                                                      for s in range(3))
        assert count(ctx.graph_module, torch.ops.aten.split_with_sizes.default) == 1


@PROPERTY
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), inner=st.integers(4, 20), tp=st.integers(2, 4),
       tokens=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_packed_slices_and_chunks_split_per_section(kv_heads: int, group: int, inner: int, tp: int, tokens: int,
                                                    seed: int) -> None:
    heads, head_dim, hidden = kv_heads * group, 4, 8
    try:
        head_layout(heads, kv_heads, tp, 0)
    except ValueError:
        return
    torch.manual_seed(seed)
    module = PackedBlock(hidden, heads, kv_heads, head_dim, inner).eval()
    x = torch.randn(1, tokens, hidden)
    plan = {"qkv_proj": "colwise", "gate_up_proj": "packed_colwise", "o_proj": "rowwise", "down_proj": "rowwise"}
    outputs, contexts = run_sharded(module, x, [TP_RULES], plan, tp)
    assert_all_equal(outputs, module(x).detach())
    for rank, ctx in enumerate(contexts):
        layout = head_layout(heads, kv_heads, tp, rank)
        q0, q1, k0, k1 = (head_dim * n for n in (layout.q_start, layout.q_stop, layout.kv_start, layout.kv_stop))
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        assert shard_specs(ctx)["qkv_proj.weight"].pieces == (
            (q0, q1), (q_width + k0, q_width + k1), (q_width + kv_width + k0, q_width + kv_width + k1))
        a, b = split_range(inner, tp, rank)
        assert shard_specs(ctx)["gate_up_proj.weight"].pieces == ((a, b), (inner + a, inner + b))


@PROPERTY
@given(vocab=st.integers(2, 50), hidden=st.integers(1, 8), tp=st.integers(2, 4), tokens=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_vocab_parallel_embedding_equals_lookup(vocab: int, hidden: int, tp: int, tokens: int, seed: int) -> None:
    torch.manual_seed(seed)
    module = Embedding(vocab, hidden).eval()
    ids = torch.randint(0, vocab, (1, tokens))
    outputs, contexts = run_sharded(module, ids, [TP_RULES], {"embed_tokens": "embedding_rowwise"}, tp)
    assert_all_equal(outputs, module(ids).detach())
    assert all(shard_specs(ctx)["embed_tokens.weight"].size == -(-vocab // tp) for ctx in contexts)


@PROPERTY
@given(vocab=st.integers(2, 50), hidden=st.integers(1, 8), tp=st.integers(2, 4), tokens=st.integers(1, 5),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gathered_lm_head_equals_linear(vocab: int, hidden: int, tp: int, tokens: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    module = Head(hidden, vocab, bias).eval()
    x = torch.randn(1, tokens, hidden)
    outputs, contexts = run_sharded(module, x, [TP_RULES], {"lm_head": "colwise_gather_output"}, tp)
    assert_all_equal(outputs, module(x).detach())
    assert all(count(ctx.graph_module, c10d.all_gather_into_tensor.default) == 1 for ctx in contexts)


def test_head_layout_replicates_kv_heads_and_splits_whole_groups() -> None:
    # fewer KV heads than ranks: each KV head serves tp/kv ranks, which split its query heads
    assert [(l.q_start, l.q_stop, l.kv_start, l.kv_stop) for l in (head_layout(8, 2, 4, r) for r in range(4))] == \
        [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]
    # SmolLM2: 9 heads in 3 KV groups over 2 ranks -> whole groups, 3 and 6 query heads
    assert [(l.local_heads, l.local_kv_heads) for l in (head_layout(9, 3, 2, r) for r in range(2))] == [(3, 1), (6, 2)]
    with pytest.raises(ValueError, match="not divisible by tp 2"):
        head_layout(9, 3, 2, 0, uneven=False)


# ----------------------------------------------------------------------------------------------
# errors


def _rewrite_error(module: nn.Module, example: torch.Tensor, rules: list[Path], plan: dict[str, str], tp: int) -> str:
    graph_module = export_block(module, example)
    with pytest.raises(RewriteError) as caught:
        rewrite_rank(graph_module, module, rules, plan, tp, 0)
    return str(caught.value)


@pytest.mark.parametrize(("heads", "kv_heads", "tp", "reason"), [
    (2, 2, 4, "tp 4 is larger than the model supports"),
    (6, 2, 3, "2 KV heads cannot be shared by tp 3"),
])
def test_impossible_head_splits_name_module_and_rule(heads: int, kv_heads: int, tp: int, reason: str) -> None:
    module = Attention(8, heads, kv_heads, 4, False, False)
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    message = _rewrite_error(module, torch.randn(1, 3, 8), [TP_RULES], plan, tp)
    assert message.startswith("rule tp-rowwise (") and "tp/rules.yaml" in message, message
    assert "at o_proj" in message and reason in message, message


def test_even_splits_can_be_demanded_by_a_rule(tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(TP_RULES.read_text().replace("template: colwise_linear",
                                                   "template: colwise_linear\n    args: {uneven: false}"))
    plan = {"up_proj": "colwise", "down_proj": "rowwise"}
    message = _rewrite_error(MLP(4, 10, False, False), torch.randn(1, 2, 4),
                             [strict], plan | {"down_proj": "replicate"}, 4)
    assert message.startswith("rule tp-colwise (") and "at up_proj" in message
    assert "10 output features are not divisible by tp 4" in message


def test_tp_without_any_sharded_layer_points_to_rules_suggest() -> None:
    module = MLP(4, 8, False, False)
    ctx = rewrite_context(export_block(module, torch.randn(1, 2, 4)), SimpleNamespace(model_type="block"),
                          ParallelLayout(tp=2))
    apply_rules(ctx, load_rules([TP_RULES]))
    with pytest.raises(RewriteError, match="hfrewrite rules suggest MODEL"):
        check_sharded(ctx)


def test_one_device_drops_the_tp_rules() -> None:
    ctx = rewrite_context(export_block(Head(2, 3, False), torch.randn(1, 2, 2)), SimpleNamespace(model_type="x"),
                          tp_plan={"lm_head": "colwise_gather_output"})
    ruleset = load_rules([TP_RULES])
    code = ctx.graph_module.code
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not applicable is not "matched nothing"
        report = apply_rules(ctx, ruleset)
    assert report.applied == {} and report.not_applicable == ruleset.names() and ctx.graph_module.code == code
    entry = next(entry for entry in explain(ctx, ruleset).rules if entry.rule == "tp-colwise-gather")
    assert entry.not_applicable == "when {gt: [tp, 1]} is false: 1 is not greater than 1 (tp > 1)"


# ----------------------------------------------------------------------------------------------
# sharded loading


class RecordingSlice:
    """A safetensors slice that records what is read through it."""

    def __init__(self, inner: Any, reads: list[tuple[str, Any]], name: str) -> None:
        self.inner, self.reads, self.name = inner, reads, name

    def __getitem__(self, index: Any) -> torch.Tensor:
        value = self.inner[index]
        self.reads.append((self.name, tuple(value.shape)))
        return value


def test_ranks_read_only_their_slices_from_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hfrewrite.compiler.weights import load_weights

    module = MLP(6, 10, gated=False, bias=True).eval()
    save_file({name: tensor.contiguous() for name, tensor in module.state_dict().items()}, tmp_path / "model.safetensors")
    plan = {"up_proj": "colwise", "down_proj": "rowwise"}
    graph_module = export_block(module, torch.randn(1, 3, 6))
    for rank in range(3):
        copied = copy.deepcopy(graph_module)
        ctx = rewrite_context(copied, SimpleNamespace(model_type="block"), ParallelLayout(tp=3, rank=rank),
                              tp_plan=plan)
        apply_rules(ctx, load_rules([TP_RULES]))
        specs = {name: (tuple(p.shape), p.dtype) for name, p in copied.named_parameters()}
        reads: list[tuple[str, Any]] = []
        slicer = make_slicer(shard_specs(ctx))
        tensors = load_weights(tmp_path, specs, {}, torch.device("cpu"),
                               slicer=lambda name, lazy: slicer(name, RecordingSlice(lazy, reads, name)))
        a, b = split_range(10, 3, rank)
        assert dict(reads) == {"up_proj.weight": (b - a, 6), "up_proj.bias": (b - a,), "down_proj.weight": (6, b - a),
                               "down_proj.bias": (6,)}  # the whole tensor only where nothing is sharded
        torch.testing.assert_close(tensors["down_proj.weight"], module.down_proj.weight.detach()[:, a:b])
