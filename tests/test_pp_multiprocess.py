"""Pipeline parallelism across real processes: gloo on the CPU, one stage per rank, tiny models.

One launch of two ranks runs each model of MODELS in turn (process start-up and imports paid once):
the driver (stage 0) checks the pipelined model against HF eager (`verify`), records the logits of
one packed step and greedy tokens from the micro-batched engine; the test compares them with the
single-device compiled model built here. Every rank records which weights it asked the loader for
and how many parameter elements its stage holds: its stage's share, nothing of the other stages.
Further tests: a failing stage (the driver's or a server's) ends every rank with its message, a
split that cannot be made is refused before any rank starts, TP=2 x PP=2 on four ranks, and the
CLI's `compile --pp 2 --json` and `generate --pp 2` end to end. Every launch has a time limit on top
of pytest-timeout; every receive waits at most HFREWRITE_TP_TIMEOUT seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hfrewrite.parallel.distributed import launch

pytestmark = pytest.mark.timeout(300)

# llama has a pp_plan, qwen3_moe experts inside its layers, gemma3_text a tied LM head; gpt2 has no
# pp_plan: its stages come from the module tree
MODELS = ["tiny:llama", "tiny:qwen3_moe", "tiny:gemma3_text", "tiny:gpt2"]
PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 200, 31], [250, 4]]
NEW_TOKENS = 6
LIMIT_S = 150.0


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models of MODELS, materialized once for the module (not racing in every rank)."""
    from hfrewrite.compiler.sources import resolve

    cache = tmp_path_factory.mktemp("cache")
    for model in MODELS:
        resolve(model, cache_dir=cache, progress=False)
    return cache


@pytest.fixture
def environment(model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder for the ranks' records; the model cache and short receive timeouts, inherited by the ranks."""
    monkeypatch.setenv("HFREWRITE_CACHE", str(model_cache))
    monkeypatch.setenv("HFREWRITE_TP_TIMEOUT", "60")
    return tmp_path


def _step(model: Any) -> tuple[Any, Any, torch.Tensor]:
    """(cache, packed prefill step of PROMPTS, rows of every token)."""
    from hfrewrite.runtime.step import Chunk, pack
    from hfrewrite.runtime.kv_cache import CacheConfig

    cache = model.new_cache(CacheConfig(block_size=4, num_blocks=8))
    step = pack([Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2]), Chunk(PROMPTS[2], 0, [3])], 4,
                model.device)
    return cache, step, torch.arange(step.input_ids.shape[1])


def pp_worker(out_dir: str, models: list[str], pp: int, tp: int, fail_stage: int) -> int:
    """One rank: build its stage of each model; the driver verifies, records logits and greedy tokens.

    `fail_stage` >= 0 makes that stage raise on its first step. Errors are reported as the CLI does
    (a file per rank, printed once by the launcher)."""
    from hfrewrite.parallel import distributed
    from hfrewrite.errors import HfRewriteError
    from hfrewrite.compiler.build import CompileOptions, CompileResult, build_compiled, reference_model
    from hfrewrite.parallel.pp.command import PipelinedGenerator, bench_stages
    from hfrewrite.parallel.pp.ring import PipelineServer
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams
    from hfrewrite.compiler.sources import resolve
    from hfrewrite.compiler.verify import verify
    from hfrewrite.compiler.weights import load_weights

    try:
        options = CompileOptions(backend=None, verify=False, progress=False, device="cpu", pp=pp, tp=tp)
        for model_id in models:
            source = resolve(model_id, progress=False)
            requested: list[str] = []

            def weights(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype, slicer: Any = None,
                        directory: Path = source.directory) -> dict:
                requested.extend(specs)
                return load_weights(directory, specs, tied, device, dtype, slicer=slicer)

            model, report = build_compiled(source.config, weights, options, {})  # joins the pp x tp ranks
            layout = model.layout
            stage_module = model.stage.graph_module
            held = {"requested": sorted(requested), "elements": model.stage.stage.parameter_count(),
                    "parameters": sorted(name for name, _ in stage_module.named_parameters(remove_duplicate=False)),
                    "on_meta": [name for name, p in stage_module.named_parameters() if p.device.type == "meta"]}
            name = model_id.replace(":", "_")
            (Path(out_dir) / f"{name}.rank{layout.rank}.json").write_text(json.dumps(held))
            if layout.stage == fail_stage:
                def broken(*args: Any, **kwargs: Any) -> None:
                    raise RuntimeError("injected failure")
                model.stage.run = broken  # type: ignore[method-assign]
            if isinstance(model, PipelineServer):
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
                if model_id == models[0]:  # the CLI's pipelined bench, on the same ranks
                    args = argparse.Namespace(model=model_id, batch_sizes="1,3", prompt_len=5, new_tokens=4, json=True)
                    with contextlib.redirect_stdout(io.StringIO()) as printed:
                        bench_stages(args, CompileResult(source, model, report))
                    record["bench"] = json.loads(printed.getvalue())
                if layout.rank == 0:
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
    from hfrewrite.runtime.generation import Generator
    from hfrewrite.compiler.build import CompileOptions, build
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams
    from hfrewrite.compiler.sources import resolve

    model = build(resolve(model_id, progress=False),
                  CompileOptions(backend=None, verify=False, progress=False, device="cpu")).model
    cache, step, rows = _step(model)
    logits = model.forward(step, cache, rows=rows)
    generator = Generator(model, None, CacheConfig(block_size=4, num_blocks=32))
    return logits, generator.generate_ids(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def _expected_split(model_id: str) -> Any:
    """The cut as one process makes it (on the meta device): what each rank's stage must hold."""
    from hfrewrite.compiler.build import CompileOptions
    from hfrewrite.parallel.pp.build import describe_split
    from hfrewrite.compiler.sources import resolve

    return describe_split(resolve(model_id, progress=False).config, CompileOptions(progress=False, device="cpu", pp=2))


def _as_loaded(model_id: str, names: list[str]) -> set[str]:
    """What the loader is asked for to make `names`: a fused projection (rules/fuse) as its source weights."""
    from hfrewrite.compiler.capture import capture
    from hfrewrite.compiler.derived import derived_parameters
    from hfrewrite.compiler.rewrite import rewrite, rule_paths
    from hfrewrite.compiler.sources import resolve

    config = resolve(model_id, progress=False).config
    context, _ = rewrite(capture(config), rule_paths([], config.model_type))
    derived = derived_parameters(context.state)
    return {source for name in names for source in (derived[name].sources if name in derived else (name,))}


def _check_stage_shares(environment: Path, model_id: str, pp: int, tp: int) -> None:
    """Every rank asked the loader for its own stage's weights only and holds its stage's share."""
    split = _expected_split(model_id)
    layer = re.compile(rf"{re.escape(split.plan.layers_path)}\.(\d+)\.")
    for rank in range(pp * tp):
        stage = split.stages[rank // tp]
        held = json.loads((environment / f"{model_id.replace(':', '_')}.rank{rank}.json").read_text())
        assert held["parameters"] == stage.parameter_names(), rank
        assert not held["on_meta"], rank
        assert _as_loaded(model_id, stage.parameter_names()) <= set(held["requested"]), rank
        layers = {int(m.group(1)) for m in map(layer.match, held["requested"]) if m}
        assert layers == set(stage.layers), (rank, layers)
        if tp == 1:
            assert held["elements"] == stage.parameter_count(), rank
        else:  # sharded: less than the stage's share on each rank, at least all of it over the tp ranks
            assert held["elements"] < stage.parameter_count(), rank
    if tp > 1:
        totals = [sum(json.loads((environment / f"{model_id.replace(':', '_')}.rank{s * tp + t}.json").read_text())
                      ["elements"] for t in range(tp)) for s in range(pp)]
        assert all(total >= stage.parameter_count() for total, stage in zip(totals, split.stages)), totals


def test_pp2_matches_one_device(environment: Path) -> None:
    """PP=2 (llama, qwen3_moe, gemma3_text with a pp_plan; gpt2 without): HF eager's logits, the
    single-device model's logits of the same step and its greedy tokens; micro-batches were in flight
    together; each rank loaded and holds its stage's share of the weights."""
    result = launch(2, pp_worker, (str(environment), MODELS, 2, 1, -1), limit=2 * LIMIT_S)
    assert result.code == 0, result.message
    for model_id in MODELS:
        record = json.loads((environment / f"{model_id.replace(':', '_')}.json").read_text())
        assert record["verify"]["passed"], (model_id, record["verify"])
        assert record["layer_counts"] == [1, 1]
        logits, tokens = _one_device(model_id)
        torch.testing.assert_close(torch.tensor(record["logits"]), logits, rtol=0, atol=1e-5)
        assert record["tokens"] == tokens, model_id
        assert record["peak_in_flight"] == 2
        _check_stage_shares(environment, model_id, 2, 1)
    bench = json.loads((environment / "tiny_llama.json").read_text())["bench"]
    assert (bench["pp"], bench["layer_counts"]) == (2, [1, 1])
    assert [(row["system"], row["batch"]) for row in bench["rows"]] == [("hfrewrite", 1), ("hfrewrite", 3)]
    assert all(row["decode_tok_s"] > 0 for row in bench["rows"])


@pytest.mark.parametrize("stage", [0, 1])
def test_failing_stage_ends_every_rank(environment: Path, stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage raising (the driver's own or a server's): every rank ends with its message, exit 2, well
    within the limit (the receive timeout is 240 s, beyond the launch limit: nothing waits for it; the margin
    leaves room for the ranks' start-up on a loaded machine)."""
    monkeypatch.setenv("HFREWRITE_TP_TIMEOUT", "240")
    started = time.monotonic()
    result = launch(2, pp_worker, (str(environment), MODELS[:1], 2, 1, stage), limit=LIMIT_S)
    assert result.code == 2, result
    assert f"pipeline stage {stage} (rank {stage}, layers {stage}) failed on step" in str(result.message)
    assert "RuntimeError: injected failure" in str(result.message)
    assert time.monotonic() - started < 120


def test_cli_refuses_impossible_splits_before_spawning(environment: Path, capsys: pytest.CaptureFixture) -> None:
    """More stages than layers, or --pp-layers that do not add up: one message, exit 2, no rank started."""
    from hfrewrite.cli import main

    code = main(["compile", "tiny:llama", "--pp", "3", "--backend", "none", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("more pipeline stages than the model has decoder layers (2)") == 1, err
    code = main(["generate", "tiny:llama", "--pp-layers", "1,2", "--prompt", "x", "--quiet"])
    assert code == 2 and "--pp-layers 1,2 adds up to 3 layers; the model has 2" in capsys.readouterr().err


TP_PP_MODELS = ["tiny:llama", "tiny:qwen3_moe", "tiny:gpt2"]


def test_tp2_x_pp2(environment: Path) -> None:
    """Four ranks: two pipeline stages, each sharded over two tensor-parallel ranks; the same logits and
    greedy tokens as one device, each rank holding a slice of its stage's weights."""
    result = launch(4, pp_worker, (str(environment), TP_PP_MODELS, 2, 2, -1), limit=240)  # below pytest-timeout
    assert result.code == 0, result.message
    for model_id in TP_PP_MODELS:
        record = json.loads((environment / f"{model_id.replace(':', '_')}.json").read_text())
        assert record["verify"]["passed"], (model_id, record["verify"])
        logits, tokens = _one_device(model_id)
        torch.testing.assert_close(torch.tensor(record["logits"]), logits, rtol=0, atol=1e-4)
        assert record["tokens"] == tokens, model_id
        _check_stage_shares(environment, model_id, 2, 2)


def test_cli_compile_and_generate_pp2(environment: Path, capfd: pytest.CaptureFixture) -> None:
    """`compile --pp 2 --json` verifies and reports the cut; `generate --pp 2` prints what one device prints."""
    from hfrewrite.cli import main

    assert main(["compile", "tiny:llama", "--pp", "2", "--json", "--backend", "none", "--quiet"]) == 0
    report = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert report["verify"]["passed"] and report["pp"]["stages"] == 2, report
    assert [stage["layers"] for stage in report["pp"]["per_stage"]] == [[0, 0], [1, 1]]
    assert report["pp"]["per_stage"][0]["sends"] and not report["pp"]["per_stage"][1]["sends"]
    one_device = json.loads(_cli_stdout(main, capfd, ["compile", "tiny:llama", "--json", "--backend", "none",
                                                      "--quiet"]))
    assert report["parameters"] == one_device["parameters"] and one_device["pp"] is None
    prompt = ["generate", "tiny:llama", "--prompt", "the pipeline", "--max-new-tokens", "8", "--backend", "none",
              "--quiet"]
    assert _cli_stdout(main, capfd, prompt + ["--pp", "2"]) == _cli_stdout(main, capfd, prompt)


def _cli_stdout(main: Any, capfd: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 0, capfd.readouterr().err
    return capfd.readouterr().out
