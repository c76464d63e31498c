"""Tensor parallelism across real processes: gloo on the CPU, tiny models, world sizes 2 and 4.

One launch of two ranks runs every model of CASES (to pay process start-up and imports once): the
sharded model's logits must equal the single-device compiled model's and HF eager's, every rank
must hold the same logits, and greedy generation must give the same tokens as both. Further tests
run the CLI end to end (inductor, JSON, errors printed once), check that a dying rank or Ctrl-C
stops every rank, and that the command works under torchrun. Every launch has a time limit on top
of pytest-timeout, and the process group's own timeout (HFREWRITE_TP_TIMEOUT) bounds collectives.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hfrewrite.parallel.distributed import launch
from tests.tp_ranks import check_case, load_case, record_case

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[str, dict[str, int]]] = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "gemma3_text": ("gemma3_text", {}),
    "mistral": ("mistral", {}),
    "gpt2": ("gpt2", {}),  # no tp_plan: sharded by rules/arch/gpt2.yaml
    "gqa-kv1": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1}),  # fewer KV heads than ranks
    "gqa-tp4": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 128}),
    "qwen3_moe": ("qwen3_moe", {}),      # every expert's intermediate width split (the --tp default)
    "qwen3_moe-ep": ("qwen3_moe", {}),   # --ep: whole experts split over the ranks
}
EXPERTS_RULE = {"qwen3_moe": "moe-tp-experts", "qwen3_moe-ep": "moe-ep-experts"}


def equivalence_worker(out_dir: str, names: list[str], backend: str | None) -> int:
    """One rank: each case compiled sharded; rank 0 also on one device, and HF eager (tests/tp_ranks.py)."""
    from hfrewrite.compiler.tiny import tiny_config

    for name in names:
        model_type, sizes = CASES[name]
        record_case(out_dir, name, tiny_config(model_type, num_hidden_layers=2, **sizes), backend,
                    ep=name.endswith("-ep"))
    return 0


def _launch_cases(tmp_path: Path, world: int, names: list[str], backend: str | None) -> dict[str, list[dict]]:
    result = launch(world, equivalence_worker, (str(tmp_path), names, backend), limit=280)
    assert result.code == 0, result.message
    return {name: load_case(tmp_path, name, world) for name in names}


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every two-rank case, from one launch."""
    names = [name for name in CASES if name != "gqa-tp4"]
    return _launch_cases(tmp_path_factory.mktemp("tp2"), 2, names, None)


@pytest.mark.parametrize("name", [name for name in CASES if name != "gqa-tp4"])
def test_tp2_equals_single_device_and_hf_eager(tp2_results: dict[str, list[dict]], name: str) -> None:
    results = tp2_results[name]
    check_case(results, name)
    applied = results[0]["applied"]
    if name in EXPERTS_RULE:  # o_proj x 2 layers row-parallel; the experts of both layers split
        assert sum(count for rule, count in applied.items() if "rowwise" in rule) == 2
        assert applied[EXPERTS_RULE[name]] == 2 and set(EXPERTS_RULE.values()) & set(applied) == {EXPERTS_RULE[name]}
    else:
        assert sum(count for rule, count in applied.items() if "rowwise" in rule) == 4  # o/down x 2 layers
    assert any("embedding" in rule for rule in applied) and any("head" in rule or "gather" in rule for rule in applied)
    if name == "gqa-kv1":
        assert results[0]["kv_heads"] == results[1]["kv_heads"] == [1, 1]  # the one KV head on both ranks


def test_tp4_replicates_kv_heads(tmp_path: Path) -> None:
    results = _launch_cases(tmp_path, 4, ["gqa-tp4"], None)["gqa-tp4"]
    check_case(results, "gqa-tp4")
    assert all(result["kv_heads"] == [1, 1] for result in results)  # 2 KV heads, each on two of the four ranks


# ----------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("hfrewrite-cache")
    monkeypatch.setenv("HFREWRITE_CACHE", str(cache))
    monkeypatch.setenv("HFREWRITE_TP_TIMEOUT", "150")  # a stuck rank fails the collectives before pytest-timeout
    return cache


def test_cli_compile_gpt2_tp2_inductor_json(cache_dir: Path, capfd: pytest.CaptureFixture) -> None:
    from hfrewrite.cli import main

    assert main(["compile", "tiny:gpt2", "--backend", "none", "--quiet", "--json"]) == 0
    single = json.loads(capfd.readouterr().out)
    assert main(["compile", "tiny:gpt2", "--tp", "2", "--quiet", "--json"]) == 0  # inductor, two spawned ranks
    out = capfd.readouterr().out
    sharded = json.loads(out)  # rank 0 alone printed: one JSON object
    assert set(sharded) == set(single) and single["tp"] == 1 and sharded["tp"] == 2
    assert sharded["verify"]["passed"] and sharded["verify"]["max_abs_err"] < 1e-4
    assert sharded["rules_applied"]["gpt2-tp-colwise"] == 4 and sharded["rules_applied"]["gpt2-tp-rowwise"] == 4
    assert sharded["parameters"] < single["parameters"]


def test_cli_error_names_module_and_rule_once_and_every_rank_exits(cache_dir: Path, capfd: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hfrewrite import cli_checks
    from hfrewrite.cli import main
    from hfrewrite.compiler.tiny import materialize_tiny

    # the launcher's own --tp check would refuse this before spawning (tests/test_hardening.py); here the ranks must
    monkeypatch.setattr(cli_checks, "_check_heads", lambda config, tp: None)

    one_head = materialize_tiny("llama", 0, cache_dir, num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                                hidden_size=16)
    start = time.monotonic()
    code = main(["compile", str(one_head), "--tp", "2", "--backend", "none", "--quiet"])
    err = capfd.readouterr().err
    assert code == 2 and time.monotonic() - start < 120
    assert err.count("hfrewrite compile: error") == 1, err
    assert "tp-rowwise" in err and "model.layers.0.self_attn" in err and "larger than the model supports" in err


def dying_worker() -> int:
    """Rank 1 dies right after joining; rank 0 waits in a collective that would otherwise never finish."""
    from hfrewrite.parallel.layout import join

    layout = join(torch.device("cpu"), tp=2)
    if layout.rank == 1:
        os._exit(3)
    torch.distributed.all_reduce(torch.ones(1))
    return 0


def test_a_dying_rank_stops_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFREWRITE_TP_TIMEOUT", "120")
    start = time.monotonic()
    result = launch(2, dying_worker, limit=100)
    assert time.monotonic() - start < 60
    assert result.code == 3 and "rank 1 exited with code 3" in (result.message or ""), result


def sleeping_worker(directory: str) -> int:
    """Say we started, then sleep: only the launcher's Ctrl-C handling can end us early."""
    (Path(directory) / f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(120)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_ctrl_c_stops_every_rank(tmp_path: Path) -> None:
    # Ctrl-C as a terminal delivers it, even when this test runs in a background job (which ignores SIGINT).
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from hfrewrite.parallel.distributed import launch; from tests.test_tp_multiprocess import "
            f"sleeping_worker; sys.exit(launch(2, sleeping_worker, ({str(tmp_path)!r},)).code)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("rank-*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(path.read_text()) for path in tmp_path.glob("rank-*.pid")]
        assert len(pids) == 2
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=30) == 130
        time.sleep(0.5)
        assert not any(_alive(pid) for pid in pids)
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_same_command_under_torchrun(cache_dir: Path) -> None:
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "hfrewrite.cli", "compile",
               "tiny:qwen3", "--tp", "2", "--backend", "none", "--quiet", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tp"] == 2 and report["verify"]["passed"]
