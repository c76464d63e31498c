"""The routed experts split over tensor-parallel ranks: TP inside the experts (default) and --ep.

Every rank's graph is rewritten with the shipped rules (tp = 2 or 3), loads only its slices of the HF
weights, and all ranks run in threads whose collectives meet in SimulatedGroup; rank 0's logits must equal
HF eager (fp32, 1e-4 abs) on packed, chunked batches over hypothesis-drawn tiny configs of every MoE
type. Structure: one split per experts module on every rank, each followed by one all-reduce; the ranks'
shards of each experts weight partition it (whole experts under --ep, each expert's intermediate width
otherwise), so no rank loads another's experts. The multi-process (gloo) runs are in
tests/test_tp_multiprocess.py.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.capture import capture
from hfrewrite.engine.loader import shipped_rule_paths
from hfrewrite.errors import RewriteError
from hfrewrite.compiler.rewrite import rewrite
from hfrewrite.parallel.sharding import ShardSpec, shard_specs, split_range
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.rules.moe.test_moe import MOE_TYPES, experts_paths, moe_sizes
from hfrewrite.parallel.layout import ParallelLayout
from tests.equivalence import SimulatedRun, simulated_run

pytestmark = pytest.mark.timeout(300)

FUSED = torch.ops.hfrewrite.fused_moe.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
MODES = [(model_type, ep) for model_type in MOE_TYPES for ep in (False, True)]


def experts_weights(run: SimulatedRun, rank: int) -> dict[str, ShardSpec]:
    """Rank's shard specs of the experts' 3-D weights and their biases."""
    return {name: spec for name, spec in shard_specs(run.contexts[rank]).items() if ".experts." in name}


def assert_split_structure(run: SimulatedRun, paths: list[str], ep: bool, tp: int) -> None:
    rule = "moe-ep-experts" if ep else "moe-tp-experts"
    for rank, (report, model) in enumerate(zip(run.reports, run.models)):
        assert sorted(report.sites.get(rule, [])) == paths, (rank, report.applied)
        assert ("moe-tp-experts" if ep else "moe-ep-experts") not in report.applied
        fused = [node for node in model.graph_module.graph.nodes if node.target is FUSED]
        assert len(fused) == len(paths)
        for node in fused:
            users = list(node.users)
            assert [user.target for user in users] == [ALL_REDUCE], f"rank {rank}: {node.name} is not all-reduced"
            assert node.kwargs.get("expert_parallel", False) is ep
    # The ranks' shards of every experts weight partition it, along experts (--ep) or the intermediate width.
    names = sorted(experts_weights(run, 0))
    assert names and all(sorted(experts_weights(run, rank)) == names for rank in range(tp))
    for name in names:
        specs = [experts_weights(run, rank)[name] for rank in range(tp)]
        covered = sorted(piece for spec in specs for piece in spec.pieces)
        full = specs[0].full_shape[specs[0].dim]
        if ep:
            assert specs[0].dim == 0 and covered == [split_range(full, tp, rank) for rank in range(tp)], name
        else:
            assert specs[0].dim != 0, name
            assert sum(stop - start for start, stop in covered) == full, (name, covered)
            assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:])), (name, covered)


@pytest.mark.parametrize(("model_type", "ep"), MODES)
# derandomize: CI runs the examples every local run does (one CI run failed once here on a first call and
# passed on hypothesis' replay; not reproduced in 8-example local runs, not explained yet)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_split_experts_equal_hf_eager(model_type: str, ep: bool, data: st.DataObject) -> None:
    sizes: dict[str, Any] = data.draw(moe_sizes(model_type), label="sizes")
    sizes["num_hidden_layers"] = 2
    tp = data.draw(st.sampled_from([2, 3]) if ep else st.just(2), label="tp")
    if ep:  # at least one expert per rank, and an uneven split sometimes
        experts = data.draw(st.sampled_from([3, 4, 6]), label="experts")
        sizes.update(num_local_experts=experts, num_experts=experts, n_routed_experts=experts,
                     num_experts_per_tok=min(sizes["num_experts_per_tok"], 2), n_group=1, topk_group=1)
    if tp == 3:  # attention is tp-split too: whole KV groups, at least one query head per rank
        sizes["num_key_value_heads"] = 1
    sizes["num_attention_heads"] = sizes["num_key_value_heads"] * tp
    sizes["hidden_size"] = sizes["num_attention_heads"] * sizes["head_dim"]
    config = tiny_config(model_type, **sizes)
    if model_type == "gpt_oss" and not ep:  # its config has an ep_plan only: give its biased experts a tp plan
        config.base_model_tp_plan = {"layers.*.mlp.experts": "moe_tp_experts"}
    seed = data.draw(st.integers(0, 10_000), label="seed")
    run = simulated_run(config, list(shipped_rule_paths(model_type)), tp=tp, seed=seed, ep=ep)
    assert run.result.passed, (model_type, ep, run.result)
    assert_split_structure(run, experts_paths(tiny_model(config, seed)), ep, tp)


def test_ep_needs_tp() -> None:
    config = tiny_config("qwen3_moe")
    with pytest.raises(RewriteError, match="needs --tp"):
        rewrite(capture(config), list(shipped_rule_paths("qwen3_moe")), ParallelLayout(ep=True))


def test_ep_on_a_dense_model_says_nothing_was_split() -> None:
    config = tiny_config("llama")
    with pytest.raises(RewriteError, match="no rule split the experts"):
        rewrite(capture(config), list(shipped_rule_paths("llama")), ParallelLayout(tp=2, ep=True))


def test_more_ranks_than_experts_names_the_module() -> None:
    config = tiny_config("qwen3_moe", num_experts=2, num_experts_per_tok=1, num_attention_heads=4,
                         num_key_value_heads=4)
    with pytest.raises(RewriteError, match=r"moe-ep-experts.*model\.layers\.0\.mlp\.experts: 2 experts.*cannot be split"):
        rewrite(capture(config), list(shipped_rule_paths("qwen3_moe")), ParallelLayout(tp=4, ep=True))


def test_explain_shows_the_sites_of_rules_chained_on_the_fused_op() -> None:
    """moe-tp-experts matches the fused op fused-moe-experts makes: explain applies the rules in order on a copy
    of the graph (as compile does), so it reports those sites instead of 0; moe-ep-experts says why it does not run."""
    from hfrewrite.compiler.build import CompileOptions, explain_model

    text = explain_model("tiny:qwen3_moe", CompileOptions(tp=2, device="cpu", progress=False))
    paths = experts_paths(tiny_model(tiny_config("qwen3_moe"), 0))
    section = text.split("rule moe-tp-experts ")[1].split("\nrule ")[0]
    assert f"matched {len(paths)} sites:" in section and all(f"    {path}\n" in section + "\n" for path in paths)
    section = text.split("rule moe-ep-experts ")[1].split("\nrule ")[0]
    assert "not applicable: when {equals: [ep, True]} is false: False != True (ep vs True)" in section
