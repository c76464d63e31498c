"""Pipeline parallelism across real processes: gloo on the CPU, one stage per rank, tiny models.

One launch of two ranks runs each model of MODELS in turn (process start-up and imports paid once):
the driver (stage 0) checks the pipelined model against HF eager (`verify`), records the logits of
one packed step and greedy tokens from the micro-batched engine; the test compares them with the
single-device compiled model built here. Further tests: a failing stage ends every rank with its
message, a split that cannot be made is refused before any rank starts, and TP=2 x PP=2 on four
ranks. Every launch has a time limit on top of pytest-timeout; every receive waits at most
HFREWRITE_TP_TIMEOUT seconds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hfrewrite.distributed import launch

pytestmark = pytest.mark.timeout(300)

MODELS = ["tiny:llama", "tiny:gpt2"]   # gpt2 has no pp_plan: its stages come from the module tree
PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 200, 31], [250, 4]]
NEW_TOKENS = 6
LIMIT_S = 150.0


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model cache and short receive timeouts, inherited by the spawned ranks."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HFREWRITE_CACHE", str(cache))
    monkeypatch.setenv("HFREWRITE_TP_TIMEOUT", "60")
    from hfrewrite.sources import resolve

    for model in MODELS:  # materialize once here, not racing in every rank
        resolve(model, progress=False)
    return tmp_path


def _step(model: Any) -> tuple[Any, Any, torch.Tensor]:
    """(cache, packed prefill step of PROMPTS, rows of every token)."""
    from hfrewrite.runtime.batch import Chunk, pack
    from hfrewrite.runtime.kv_cache import CacheConfig

    cache = model.new_cache(CacheConfig(block_size=4, num_blocks=8))
    step = pack([Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2]), Chunk(PROMPTS[2], 0, [3])], 4,
                model.device)
    return cache, step, torch.arange(step.input_ids.shape[1])


def pp_worker(out_dir: str, models: list[str], pp: int, tp: int, fail_stage: int) -> int:
    """One rank: build its stage of each model; the driver verifies, records logits and greedy tokens.

    `fail_stage` >= 0 makes that stage raise on its first step. Errors are reported as the CLI does
    (a file per rank, printed once by the launcher)."""
    from hfrewrite import distributed
    from hfrewrite.errors import HfRewriteError
    from hfrewrite.pipeline import CompileOptions, reference_model
    from hfrewrite.pipeline_runtime import build_pipeline
    from hfrewrite.pp_command import PipelinedGenerator
    from hfrewrite.pp_link import join_pipeline
    from hfrewrite.pp_serve import PipelineServer
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams
    from hfrewrite.sources import resolve
    from hfrewrite.verify import verify
    from hfrewrite.weights import load_weights

    try:
        options = CompileOptions(backend=None, verify=False, progress=False, device="cpu", pp=pp, tp=tp)
        layout, _ = join_pipeline(pp, tp, torch.device("cpu"))
        for model_id in models:
            source = resolve(model_id, progress=False)

            def weights(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype, slicer: Any = None,
                        directory: Path = source.directory) -> dict:
                return load_weights(directory, specs, tied, device, dtype, slicer=slicer)

            model, _ = build_pipeline(source.config, weights, options, {}, layout)
            if isinstance(model, PipelineServer):
                if model.layout.stage == fail_stage:
                    def broken(*args: Any, **kwargs: Any) -> None:
                        raise RuntimeError("injected failure")
                    model.stage.run = broken  # type: ignore[method-assign]
                model.serve()
                continue
            code = 2
            try:
                reference = reference_model(source, model.device, model.dtype, progress=False)
                result = verify(model, reference, seed=1, atol=1e-4)
                cache, step, rows = _step(model)
                logits = model.forward(step, cache, rows=rows)
                generator = PipelinedGenerator(model, None, CacheConfig(block_size=4, num_blocks=32))
                tokens = generator.generate_ids(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
                record = {"verify": result.to_dict(), "logits": logits.tolist(), "tokens": tokens,
                          "peak_in_flight": generator.engine.peak_in_flight, "layer_counts": model.split.layer_counts}
                if layout.rank == 0:
                    name = model_id.replace(":", "_")
                    (Path(out_dir) / f"{name}.json").write_text(json.dumps(record))
                code = 0
            finally:
                model.close(code)
        distributed.finish()
        return 0
    except HfRewriteError as error:
        rank, world, _ = distributed.env_rank()
        distributed.report_error(f"rank {rank} of {world}: {type(error).__name__}: {error}")
        return 2  # no finish(): the other ranks may be gone; the process group ends with the process


def _one_device(model_id: str) -> tuple[torch.Tensor, list[list[int]]]:
    """The single-device compiled model's logits of the same step and greedy tokens."""
    from hfrewrite.generation import Generator
    from hfrewrite.pipeline import CompileOptions, build
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams
    from hfrewrite.sources import resolve

    model = build(resolve(model_id, progress=False),
                  CompileOptions(backend=None, verify=False, progress=False, device="cpu")).model
    cache, step, rows = _step(model)
    logits = model.forward(step, cache, rows=rows)
    generator = Generator(model, None, CacheConfig(block_size=4, num_blocks=32))
    return logits, generator.generate_ids(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def test_pp2_matches_one_device(environment: Path) -> None:
    """PP=2 (llama with a pp_plan, gpt2 without): HF eager's logits, the single-device model's logits of
    the same step and its greedy tokens; micro-batches were in flight together."""
    result = launch(2, pp_worker, (str(environment), MODELS, 2, 1, -1), limit=LIMIT_S)
    assert result.code == 0, result.message
    for model_id in MODELS:
        record = json.loads((environment / f"{model_id.replace(':', '_')}.json").read_text())
        assert record["verify"]["passed"], record["verify"]
        assert record["layer_counts"] == [1, 1]
        logits, tokens = _one_device(model_id)
        torch.testing.assert_close(torch.tensor(record["logits"]), logits, rtol=0, atol=1e-5)
        assert record["tokens"] == tokens
        assert record["peak_in_flight"] == 2


def test_failing_stage_ends_every_rank(environment: Path) -> None:
    """Stage 1 raising: the driver gets its message, both ranks exit non-zero, well within the limit."""
    result = launch(2, pp_worker, (str(environment), MODELS[:1], 2, 1, 1), limit=LIMIT_S)
    assert result.code == 2, result
    assert "pipeline stage 1 (rank 1, layers 1) failed on step" in str(result.message)
    assert "injected failure" in str(result.message)


def test_cli_refuses_impossible_splits_before_spawning(environment: Path, capsys: pytest.CaptureFixture) -> None:
    """More stages than layers, or --pp-layers that do not add up: one message, exit 2, no rank started."""
    from hfrewrite.cli import main

    code = main(["compile", "tiny:llama", "--pp", "3", "--backend", "none", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("more pipeline stages than the model has decoder layers (2)") == 1, err
    code = main(["generate", "tiny:llama", "--pp-layers", "1,2", "--prompt", "x", "--quiet"])
    assert code == 2 and "--pp-layers 1,2 adds up to 3 layers; the model has 2" in capsys.readouterr().err


def test_tp2_x_pp2(environment: Path) -> None:
    """Four ranks: two pipeline stages, each sharded over two tensor-parallel ranks."""
    pytest.importorskip("hfrewrite.sharding")
    result = launch(4, pp_worker, (str(environment), MODELS[:1], 2, 2, -1), limit=2 * LIMIT_S)
    assert result.code == 0, result.message
    record = json.loads((environment / "tiny_llama.json").read_text())
    assert record["verify"]["passed"], record["verify"]
    logits, tokens = _one_device("tiny:llama")
    torch.testing.assert_close(torch.tensor(record["logits"]), logits, rtol=0, atol=1e-4)
    assert record["tokens"] == tokens
