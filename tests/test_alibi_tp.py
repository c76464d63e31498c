"""`--tp 2` on bloom and falcon (no tp_plan in transformers: rules/arch/bloom.yaml, falcon.yaml) equals one device.

Their fused query_key_value projections interleave the heads (bloom [B, T, H, 3, D]; falcon old
architecture [B, T, H, 3, D] or multi-query [B, T, H + 2, D]; new architecture per KV group), sharded by
rules/tp/fused.py's colwise_fused_qkv; ALiBi slopes are split with the heads. Simulated ranks (threads,
in one process) and real gloo processes against HF eager on one device, fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hfrewrite.compiler.tiny import tiny_config
from hfrewrite.engine.loader import shipped_rule_paths
from hfrewrite.errors import RewriteError
from hfrewrite.parallel.distributed import launch
from tests.equivalence import simulated_run
from tests.tp_ranks import check_case, load_case, record_case

pytestmark = pytest.mark.timeout(600)

CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (model type, config overrides, the attention pattern rule that pages it)
    "bloom": ("bloom", {}, "attention-pattern-folded-upcast"),
    "falcon-mqa": ("falcon", {}, "attention-pattern-plain"),                                # rotary, 1 KV head
    "falcon-old": ("falcon", {"multi_query": False}, "attention-pattern-plain"),            # rotary, [H, 3, D]
    "falcon-new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "attention-pattern-plain"),
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False}, "attention-pattern-viewed-dropout"),
}
ALIBI_CASES = ("bloom", "falcon-alibi")


def _slopes(run: Any, rank: int) -> list[list[float]]:
    graph = run.models[rank].graph_module.graph
    return [list(node.args[-1]) for node in graph.nodes
            if node.target is torch.ops.hfrewrite.paged_attention_alibi.default]


@pytest.mark.parametrize("name", sorted(CASES))
def test_simulated_tp2_equals_hf_eager(name: str) -> None:
    """Both ranks' compiled graphs (every layer's q/k/v, MLP, embedding and LM head sharded) equal HF eager."""
    model_type, overrides, pattern = CASES[name]
    config = tiny_config(model_type, **overrides)
    run = simulated_run(config, shipped_rule_paths(model_type), tp=2, atol=1e-4)
    assert run.result.passed, run.result
    applied = run.reports[0].applied
    layers = config.num_hidden_layers
    assert applied[pattern] == layers
    assert applied[f"{model_type}-tp-fused-qkv"] == layers and applied[f"{model_type}-tp-rowwise"] == 2 * layers
    assert applied[f"{model_type}-tp-vocab-embedding"] == applied[f"{model_type}-tp-lm-head"] == 1
    heads = config.num_attention_heads
    for rank, model in enumerate(run.models):
        kv_heads = [spec.kv_heads for spec in model.kv_specs]
        assert len(kv_heads) == layers and all(0 < count < heads or count == 1 for count in kv_heads), kv_heads
    if name in ALIBI_CASES:  # each rank's ops carry its own heads' slopes, and together all of them
        rank0, rank1 = _slopes(run, 0), _slopes(run, 1)
        assert len(rank0) == len(rank1) == layers
        for a, b in zip(rank0, rank1):
            assert len(a) == len(b) == heads // 2 and a != b
            assert all(x > y for x, y in zip(a + b, (a + b)[1:])), "slopes out of head order"


def test_falcon_new_architecture_with_fewer_kv_heads_than_ranks_is_refused() -> None:
    """k/v broadcast to the query heads' count by a literal shape: refused with the reason, not run wrong."""
    config = tiny_config("falcon", new_decoder_architecture=True, num_kv_heads=1)
    with pytest.raises(RewriteError, match="gets q/k/v heads"):
        simulated_run(config, shipped_rule_paths("falcon"), tp=2)


# ------------------------------------------------------------------ real processes (gloo)

def worker(out_dir: str, names: list[str]) -> int:
    """One rank: each case compiled sharded; rank 0 also on one device, and HF eager (tests/tp_ranks.py)."""
    for name in names:
        model_type, overrides, _ = CASES[name]
        record_case(out_dir, name, tiny_config(model_type, **overrides))
    return 0


def test_gloo_tp2_equals_one_device_and_hf(tmp_path: Path) -> None:
    """Two processes over gloo: logits equal on both ranks, equal to one device and HF eager; greedy tokens too."""
    names = ["bloom", "falcon-new", "falcon-alibi"]
    result = launch(2, worker, (str(tmp_path), names), limit=500)
    assert result.code == 0, result.message
    for name in names:
        check_case(load_case(tmp_path, name, 2), name)
