"""The one ParallelLayout: rank arithmetic of pp x tp, what the rewrite reads from it, and place/join in one process.

Multi-rank behaviour (the join itself, stage groups, the ring) is covered by test_tp_multiprocess.py and
test_pp_multiprocess.py; these are the cheap checks of what every consumer derives from the layout.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hfrewrite.compiler.options import CompileOptions
from hfrewrite.parallel.distributed import DistributedError
from hfrewrite.parallel.layout import ParallelLayout, join, place
from hfrewrite.parallel.plans import rewrite_context

from .engine.graphs import capture_tiny

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def not_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process is no rank of a launched group (whatever the environment running the tests says)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_rank_arithmetic_of_two_stages_of_two_tp_ranks() -> None:
    places = {rank: ParallelLayout(tp=2, pp=2, rank=rank, device=CPU, joined=True) for rank in range(4)}
    assert [(p.stage, p.tp_rank, p.driver) for p in places.values()] == \
        [(0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False)]
    # the ranks of one tp index form the ring: 0 -> 2 -> 0 and 1 -> 3 -> 1
    assert [(p.previous, p.next) for p in places.values()] == [(2, 2), (3, 3), (0, 0), (1, 1)]
    assert places[3].world == 4


def test_the_rewrite_reads_tp_ep_pp_rank_and_device_from_the_layout() -> None:
    captured = capture_tiny()
    layout = ParallelLayout(tp=2, pp=2, ep=True, rank=3, device=CPU, joined=True, tp_group_name="stage1")
    ctx = rewrite_context(captured.graph_module, captured.config, layout, dtype=torch.float32)
    # rank is the index within the stage's tp group (what a shard's range depends on), not the global rank
    assert ctx.options == {"tp": 2, "ep": True, "pp": 2, "rank": 1, "device": "cpu", "dtype": "float32", "logits": True}
    assert (ctx.tp, ctx.rank) == (2, 1)  # views of the options, never a second copy
    assert ctx.state == {"tp_group": "stage1"}
    one = rewrite_context(captured.graph_module, captured.config)
    assert (one.tp, one.rank, one.options["pp"], one.state) == (1, 0, 1, {})


def test_compile_options_ask_for_a_layout() -> None:
    asked = CompileOptions(tp=2, ep=True, pp_layers=(3, 1)).layout(CPU)
    assert asked == ParallelLayout(tp=2, pp=2, ep=True, rank=0, device=CPU, joined=False)


def test_place_keeps_a_one_process_pipeline_local_and_needs_ranks_for_tp() -> None:
    local = ParallelLayout(pp=3, device=CPU)
    assert place(local) is local
    with pytest.raises(DistributedError, match=r"--pp 2 x --tp 2 needs 4 processes: .*--nproc-per-node 4"):
        place(ParallelLayout(tp=2, pp=2, device=CPU))
    with pytest.raises(DistributedError, match=r"^--tp 2 needs 2 processes"):
        join(CPU, tp=2)


def test_join_refuses_a_launcher_with_another_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DistributedError, match=r"--tp 2 needs 2 ranks but the launcher started 3; give --tp 3"):
        join(CPU, tp=2)
    with pytest.raises(DistributedError, match=r"--pp 2 x --tp 2 needs 4 ranks but the launcher started 3$"):
        join(CPU, tp=2, pp=2)


def test_agree_is_the_identity_without_a_tp_group() -> None:
    value = SimpleNamespace(passed=True)
    assert ParallelLayout(pp=2, rank=1, device=CPU, joined=True).agree(value) is value
