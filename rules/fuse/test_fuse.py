"""Fused projections (rules/fuse): structure, equivalence with HF eager, alone and under tensor parallelism.

Structure: in every layer of the dense architectures one linear computes q, k and v (on the derived
`fused_q_proj_k_proj_v_proj` weight, biases too where the model has them) and one computes gate and up;
no separate q/k/v/gate/up linear or parameter is left; explain lists the sites. Phi-3 (qkv_proj,
gate_up_proj) and GPT-2 (c_attn) already ship fused projections: the rules find nothing to do.
Equivalence: fp32 logits within 1e-4 of HF eager through the paged cache (tests/equivalence.py), on one
device and on two simulated ranks whose TP shards were fused afterwards (each rank's fused weight is the
concatenation of its own q, k, v slices: whole KV head groups), plus one real two-process gloo run.
The derived-parameter loader (hfrewrite.compiler.derived) is tested on its own too.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.build import CompileOptions, build_compiled, rewrite
from hfrewrite.compiler.capture import capture
from hfrewrite.compiler.derived import DerivedParameter, derived_parameters, load_with_derived, record_derived
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.compiler.verify import verify
from hfrewrite.engine.apply import explain
from hfrewrite.engine.loader import load_rules, shipped_rule_paths
from hfrewrite.errors import RewriteError, WeightError
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.sharding import shard_specs
from hfrewrite.rules.fuse.templates import FUSED, FusionSkippedWarning
from tests.equivalence import check_compiled, compile_tiny, simulated_run, state_dict_weights
from tests.tp_ranks import sliced_weights
from tests.test_equivalence import tiny_sizes

pytestmark = pytest.mark.timeout(600)

aten = torch.ops.aten
DENSE = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"]
PREFUSED = ["phi3", "gpt2"]  # ship their own fused projections
GATED_ATTENTION = ["afmoe", "beam"]  # self_attn.gate_proj: sigmoid(gate) * attention output, no MLP gate
QKV, GATE_UP = "fused_q_proj_k_proj_v_proj", "fused_gate_proj_up_proj"
SEPARATE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
BIASED = {"qwen2"}
FEW = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def linears(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in graph_module.graph.nodes
            if node.op == "call_function" and node.target == aten.linear.default]


def weight_of(node: torch.fx.Node) -> str:
    return str(node.args[1].target)


def assert_fused_structure(graph_module: torch.fx.GraphModule, config: Any, state: dict[str, Any]) -> None:
    """One fused q/k/v and one fused gate/up GEMM per layer, each sliced into its members; nothing left separate."""
    layers = int(config.num_hidden_layers)
    names = [weight_of(node) for node in linears(graph_module)]
    for fused, count in ((QKV, 3), (GATE_UP, 2)):
        sites = sorted(name for name in names if f".{fused}." in name)
        assert sites == sorted(f"model.layers.{i}.{'self_attn' if fused == QKV else 'mlp'}.{fused}.weight"
                               for i in range(layers)), names
        for node in linears(graph_module):
            if f".{fused}." not in weight_of(node):
                continue
            biased = len(node.args) > 2 and node.args[2] is not None
            assert biased == (fused == QKV and config.model_type in BIASED), node.args
            pieces = sorted(node.users, key=lambda user: user.args[2])  # (then a contiguous copy where viewed)
            assert [user.target for user in pieces] == [aten.slice.Tensor] * count
            bounds = [(user.args[1], user.args[2], user.args[3]) for user in pieces]
            assert bounds[0][1] == 0 and all(a[2] == b[1] for a, b in zip(bounds, bounds[1:])), bounds
            assert {dim for dim, _, _ in bounds} == {-1} and bounds[-1][2] == node.args[1].meta["val"].shape[0]
    leftover = [name for name in names if name.rsplit(".", 2)[-2] in SEPARATE]
    assert not leftover, leftover
    parameters = [name for name, _ in graph_module.named_parameters()]
    assert not [name for name in parameters if name.rsplit(".", 2)[-2] in SEPARATE]
    assert len(state[FUSED]) == 2 * layers
    derived = derived_parameters(state)
    assert sorted(derived) == sorted(name for name in parameters if ".fused_" in name)
    for entry in derived.values():
        members = [source.rsplit(".", 2)[-2] for source in entry.sources]
        assert members == (["q_proj", "k_proj", "v_proj"] if QKV in entry.name else ["gate_proj", "up_proj"])


# ----------------------------------------------------------------------------------------------
# one device


@pytest.mark.parametrize("model_type", DENSE)
def test_every_layer_has_one_qkv_and_one_gate_up_gemm(model_type: str) -> None:
    config = tiny_config(model_type, num_hidden_layers=2)
    captured = capture(config)
    context, report = rewrite(captured, shipped_rule_paths(model_type))
    assert report.applied["fuse-qkv"] == report.applied["fuse-gate-up"] == 2, report.applied
    assert_fused_structure(captured.graph_module, config, context.state)


@pytest.mark.parametrize("model_type", PREFUSED)
def test_prefused_models_have_nothing_to_fuse(model_type: str) -> None:
    config = tiny_config(model_type, num_hidden_layers=2)
    captured = capture(config)
    before = [weight_of(node) for node in linears(captured.graph_module)]
    context, report = rewrite(captured, shipped_rule_paths(model_type))
    assert {"fuse-qkv", "fuse-gate-up"} <= set(report.not_applicable), report.applied
    assert FUSED not in context.state and not derived_parameters(context.state)
    assert [weight_of(node) for node in linears(captured.graph_module)] == before


@pytest.mark.parametrize("model_type", GATED_ATTENTION)
def test_an_attention_gate_is_not_a_gate_up_site(model_type: str) -> None:
    """An attention block's gate_proj is a near miss of fuse-gate-up (dataflow: no act(gate) * up); fuse-qkv takes it
    with q, k and v; the MLPs' gate/up pairs still fuse; the model equals HF eager."""
    config = tiny_config(model_type, num_hidden_layers=2)
    captured = capture(config)
    context, report = rewrite(captured, shipped_rule_paths(model_type))
    attention = [f"model.layers.{i}.self_attn" for i in range(2)]
    assert report.sites["fuse-qkv"] == [f"{site}.q_proj" for site in attention], report.sites
    gate_up = report.sites["fuse-gate-up"]
    assert len(gate_up) == 2 and all(".mlp." in site for site in gate_up), gate_up
    refused = sorted(miss.module_path for miss in report.near_misses
                     if miss.rule == "fuse-gate-up" and miss.reason.startswith("not a gated MLP's gate"))
    assert refused == [f"{site}.gate_proj" for site in attention], report.near_misses
    members = {entry["site"]: [path.rsplit(".", 1)[1] for path in entry["members"]] for entry in context.state[FUSED]}
    assert all(members[site] == ["q_proj", "k_proj", "v_proj", "gate_proj"] for site in attention), members
    assert all(members[site.rpartition(".")[0]] == ["gate_proj", "up_proj"] for site in gate_up), members
    check_compiled(*compile_tiny(config, 7, backend=None), seed=7, atol=1e-4)


class LearnableGatedMLP(torch.nn.Module):
    """down(act(gate(x) * scale) * up(x)): a gated MLP whose activation reads a parameter besides the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
        self.scale = torch.nn.Parameter(torch.rand(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x) * self.scale) * self.up_proj(x))


class GatedAttention(torch.nn.Module):
    """softmax(q k^T) v * sigmoid(gate(x)): an attention gate, whose product partner is no single sibling's."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.gate_proj = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v * torch.sigmoid(self.gate_proj(x))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = GatedAttention(), LearnableGatedMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.self_attn(x))


def test_the_gate_up_guard_reads_the_dataflow() -> None:
    """On an exported block: the MLP's gate (its activation reads a parameter too) is a site; the attention's is not."""
    from hfrewrite.engine.matcher import Match
    from hfrewrite.rules.fuse.templates import gate_up_problem

    graph_module = torch.export.export(Block(), (torch.randn(2, 3, 8),)).module()
    rule = load_rules([Path(__file__).with_name("rules.yaml")]).get("fuse-gate-up")
    problems = {}
    for node in linears(graph_module):
        path = list(node.meta["nn_module_stack"].values())[-1][0]
        if path.endswith("gate_proj"):
            problems[path] = gate_up_problem(Match(rule, node, {"root": node}, {}, path, ""))
    assert problems["mlp.gate_proj"] is None, problems
    assert problems["self_attn.gate_proj"].startswith("not a gated MLP's gate: no product act(gate) * up where up is "
                                                     "one of its siblings (self_attn.q_proj, "), problems


def test_explain_lists_the_sites() -> None:
    config = tiny_config("qwen2", num_hidden_layers=2)
    captured = capture(config)
    context = rewrite_context(captured.graph_module, config)
    text = explain(context, load_rules(shipped_rule_paths("qwen2"))).to_text()
    for rule, leader in (("fuse-qkv", "self_attn.q_proj"), ("fuse-gate-up", "mlp.gate_proj")):
        block = text.split(f"rule {rule} ")[1].split("\nrule ")[0]
        assert "matched 2 sites:" in block, block
        assert "claims: (x @ cat_i(W_i)^T + cat_i(b_i))[..., o_i:o_i + out_i]" in block, block
        assert all(f"model.layers.{i}.{leader}" in block for i in range(2)), block


@pytest.mark.parametrize("model_type", DENSE + PREFUSED)
@FEW
@given(data=st.data())
def test_fused_model_equals_hf_eager(model_type: str, data: st.DataObject) -> None:
    sizes = data.draw(tiny_sizes(model_type), label="sizes")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    config = tiny_config(model_type, **sizes)
    model, report, reference = compile_tiny(config, seed, backend=None)
    expected = 0 if model_type in PREFUSED else int(config.num_hidden_layers)
    assert report.applied.get("fuse-qkv", 0) == report.applied.get("fuse-gate-up", 0) == expected, report.applied
    result = verify(model, reference, seed=seed, atol=1e-4)
    assert result.passed, (model_type, result)


def test_fused_model_through_inductor_equals_hf_eager() -> None:
    config = tiny_config("qwen2", num_hidden_layers=2)
    model, report, reference = compile_tiny(config, 5, backend="inductor")
    assert report.applied["fuse-qkv"] == 2
    assert verify(model, reference, seed=5, atol=1e-4).passed


def test_an_unsafe_site_is_left_alone() -> None:
    """A k_proj weight read by another node too: that layer's q/k/v stay separate, with a warning; the rest fuse."""
    config = tiny_config("llama", num_hidden_layers=2)
    captured = capture(config)
    graph = captured.graph_module.graph
    weight = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "model.layers.1.self_attn.k_proj.weight")
    with graph.inserting_after(weight):
        extra = graph.call_function(aten.clone.default, (weight,))
    extra.meta["val"] = weight.meta["val"]
    with pytest.warns(FusionSkippedWarning, match=r"model.layers.1.self_attn.q_proj: not fused: .*k_proj.weight is "
                                                  r"read by other nodes"):
        context, _ = rewrite(captured, shipped_rule_paths("llama"))
    names = [weight_of(node) for node in linears(captured.graph_module)]
    assert "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.weight" in names
    assert {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")} <= set(names)
    assert len(context.state[FUSED]) == 3  # layer 0's q/k/v, both gate/up pairs


# ----------------------------------------------------------------------------------------------
# tensor parallelism: TP shards q, k, v (whole KV groups), fusion concatenates the rank's slices


def assert_rank_fused_its_shards(run: Any, rank: int, config: Any) -> None:
    context, model = run.contexts[rank], run.models[rank]
    assert_fused_structure(model.graph_module, config, context.state)
    shards = shard_specs(context)
    for entry in derived_parameters(context.state).values():
        assert all(source in shards for source in entry.sources), entry  # every member was sharded first
        assert entry.shapes == tuple(shards[source].local_shape for source in entry.sources)
        fused = dict(model.graph_module.named_parameters())[entry.name]
        assert tuple(fused.shape) == entry.shape and fused.device.type == "cpu"


TP_CASES = {
    "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}),
    "llama-kv1": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "hidden_size": 32}),
    "qwen2-bias": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
}


@pytest.mark.parametrize("name", sorted(TP_CASES))
def test_tp2_fused_shards_equal_hf_eager(name: str) -> None:
    model_type, sizes = TP_CASES[name]
    config = tiny_config(model_type, num_hidden_layers=2, **sizes)
    run = simulated_run(config, list(shipped_rule_paths(model_type)), tp=2, seed=11)
    assert run.result.passed, (name, run.result)
    for rank in range(2):
        assert_rank_fused_its_shards(run, rank, config)


@pytest.mark.parametrize("model_type", PREFUSED)
def test_tp2_prefused_models_equal_hf_eager(model_type: str) -> None:
    config = tiny_config(model_type, num_hidden_layers=2)
    run = simulated_run(config, list(shipped_rule_paths(model_type)), tp=2, seed=3)
    assert run.result.passed, run.result
    assert all(not derived_parameters(context.state) for context in run.contexts)


GLOO_CASES = {"llama-kv1": TP_CASES["llama-kv1"], "qwen2-bias": TP_CASES["qwen2-bias"]}


def gloo_worker(out_dir: str) -> int:
    """One rank of the gloo run: build through build_compiled (the real load step: slicer + derived), verify."""
    rank = int(os.environ["RANK"])
    for name, (model_type, sizes) in sorted(GLOO_CASES.items()):
        config = tiny_config(model_type, num_hidden_layers=2, **sizes)
        reference = tiny_model(config, seed=2)
        options = CompileOptions(backend=None, verify=False, progress=False, device="cpu", tp=2)
        provide = sliced_weights(reference)
        model, report = build_compiled(config, provide, options, {})
        result = verify(model, reference if rank == 0 else None, seed=4, atol=1e-4)
        fused = sorted(name for name, _ in model.graph_module.named_parameters() if ".fused_" in name)
        torch.save({"applied": report.applied, "verify": result, "fused": fused}, Path(out_dir) / f"{name}-{rank}.pt")
    return 0


def test_gloo_tp2_fused_equals_hf_eager(tmp_path: Path) -> None:
    from hfrewrite.parallel.distributed import launch
    from hfrewrite.rules.fuse import test_fuse  # spawn pickles the worker by its importable name

    outcome = launch(2, test_fuse.gloo_worker, (str(tmp_path),), limit=400)
    assert outcome.code == 0, outcome.message
    for name in GLOO_CASES:
        first, second = (torch.load(tmp_path / f"{name}-{rank}.pt", weights_only=False) for rank in range(2))
        assert first["verify"].passed, (name, first["verify"])
        assert first["applied"]["fuse-qkv"] == first["applied"]["fuse-gate-up"] == 2
        assert first["fused"] == second["fused"] and len(first["fused"]) == (6 if "bias" in name else 4)


# ----------------------------------------------------------------------------------------------
# derived parameters on their own


def test_derived_parameters_load_from_their_sources_and_drop_them() -> None:
    generator = torch.Generator().manual_seed(0)
    checkpoint = {name: torch.randn(shape, generator=generator) for name, shape in
                  (("a.weight", (3, 4)), ("b.weight", (2, 4)), ("c.weight", (5, 4)), ("d", (7,)))}
    state: dict[str, Any] = {}
    record_derived(state, DerivedParameter("ab.weight", ("a.weight", "b.weight"), ((3, 4), (2, 4)), torch.float32))
    asked: list[list[str]] = []

    def load(specs: dict) -> dict[str, torch.Tensor]:
        asked.append(sorted(specs))
        return {name: checkpoint[name].clone() for name in specs}

    specs = {"ab.weight": ((5, 4), torch.float32), "c.weight": ((5, 4), torch.float32), "d": ((7,), torch.float32)}
    tensors = load_with_derived(specs, derived_parameters(state), load)
    assert asked == [["a.weight", "b.weight", "c.weight", "d"]]
    assert sorted(tensors) == ["ab.weight", "c.weight", "d"]  # the sources are gone
    torch.testing.assert_close(tensors["ab.weight"], torch.cat([checkpoint["a.weight"], checkpoint["b.weight"]]))
    # a source the graph also reads by name stays
    both = load_with_derived({**specs, "a.weight": ((3, 4), torch.float32)}, derived_parameters(state), load)
    torch.testing.assert_close(both["a.weight"], checkpoint["a.weight"])


def test_derived_parameter_errors_name_the_weight() -> None:
    state: dict[str, Any] = {}
    entry = DerivedParameter("ab.weight", ("a.weight", "b.weight"), ((3, 4), (2, 4)), torch.float32)
    record_derived(state, entry)
    with pytest.raises(RewriteError, match="a.weight would feed two derived weights"):
        record_derived(state, DerivedParameter("ac.weight", ("a.weight", "c.weight"), ((3, 4), (1, 4)), torch.float32))
    with pytest.raises(WeightError, match=r"derived weight ab.weight: source b.weight has shape \(3, 4\)"):
        load_with_derived({"ab.weight": ((5, 4), torch.float32)}, derived_parameters(state),
                          lambda specs: {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(3, 4)})
    with pytest.raises(WeightError, match=r"graph holds shape \(6, 4\)"):
        load_with_derived({"ab.weight": ((6, 4), torch.float32)}, derived_parameters(state), dict)
    with pytest.raises(ValueError, match="differ off dim 0"):
        DerivedParameter("x", ("a", "b"), ((3, 4), (3, 5)), torch.float32)


def test_state_dict_provider_sees_only_checkpoint_names() -> None:
    """The one-device build asks its weight provider for q/k/v (never the fused name) and installs the fusion."""
    config = tiny_config("qwen2", num_hidden_layers=1)
    reference = tiny_model(config, seed=0)
    inner = state_dict_weights(reference)
    seen: list[str] = []

    def provide(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype) -> dict:
        seen.extend(specs)
        return inner(specs, tied, device, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionSkippedWarning)
        model, _ = build_compiled(config, provide, CompileOptions(backend=None, verify=False, progress=False,
                                                                   device="cpu"), {})
    assert set(seen) <= set(reference.state_dict()) and "model.layers.0.self_attn.k_proj.bias" in seen
    fused = dict(model.graph_module.named_parameters())["model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.bias"]
    attention = reference.model.layers[0].self_attn
    torch.testing.assert_close(fused, torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
