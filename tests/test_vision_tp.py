"""A vision-language model under tensor parallelism: two gloo ranks on the CPU.

The language model is sharded by its tp_plan (the same rules as any LM); the vision tower is replicated
(every rank runs it on the same pixels). Qwen2-VL, and Gemma 3 (its key limits: image tokens see their whole
image). Each rank runs the same batch through the Engine (an image prompt,
a text-only prompt, prefill in small chunks) and the whole image prompt's logits; rank 0 also builds the model
on one device. Sharded equals one device.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hfrewrite.parallel.distributed import launch

pytestmark = pytest.mark.timeout(600)
MODELS = ["tiny:qwen2_vl", "tiny:gemma3"]


def _run(model: Any, processor: Any) -> dict[str, Any]:
    from hfrewrite.compiler.vision_verify import random_image
    from hfrewrite.runtime import multimodal
    from hfrewrite.runtime.engine import SourcedChunk
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams

    image = random_image(np.random.default_rng(0), 24, 16)
    prompts = [multimodal.processor_inputs(processor, [{"role": "user", "content": [
                   {"type": "image"}, {"type": "text", "text": "describe it"}]}], [image]),
               multimodal.processor_inputs(processor, [{"role": "user", "content": "only text"}])]
    engine = multimodal.vision_engine(model, CacheConfig(block_size=4, num_blocks=64), max_tokens_per_step=5)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    tokens: dict[int, list[int]] = {}
    for event in engine.run([multimodal.vision_request(model.vision, prompt, params) for prompt in prompts]):
        assert event.error is None, event.error
        tokens.setdefault(event.request_id, []).append(event.token_id)
    runner = multimodal.VisionRunner(model, model.new_cache(CacheConfig(block_size=4, num_blocks=32)))
    ids = prompts[0]["input_ids"][0].tolist()
    sequence = multimodal.prepare(model.vision, prompts[0])
    prepared = runner.prepare([SourcedChunk(ids, 0, list(range(len(ids) // 4 + 1)), sequence)])
    logits = multimodal.forward_embeds(model, prepared.step, runner.cache, prepared.embeds,
                                       rows=torch.arange(len(ids)), visual=prepared.visual)
    return {"tokens": [tokens[i] for i in sorted(tokens)], "logits": logits, "steps": engine.steps}


def tp_vision_worker(out_dir: str, cache: str, model_name: str) -> int:
    from hfrewrite.compiler.build import CompileOptions, build
    from hfrewrite.compiler.sources import resolve
    from hfrewrite.compiler.vision import load_processor

    os.environ["HFREWRITE_CACHE"] = cache
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    source = resolve(model_name, progress=False)
    processor = load_processor(source.directory, source.config)
    options = dict(device="cpu", dtype="float32", backend=None, verify=False, progress=False)
    sharded = build(source, CompileOptions(tp=world, **options))
    result = {"applied": sharded.rewrite.applied, "parameters": sharded.model.parameter_count(),
              **_run(sharded.model, processor)}
    if rank == 0:
        single = build(source, CompileOptions(**options))
        result["single"] = _run(single.model, processor)
        result["single_parameters"] = single.model.parameter_count()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    return 0


@pytest.mark.parametrize("model_name", MODELS)
def test_tp2_vlm_equals_one_device(tmp_path: Path, model_name: str) -> None:
    os.environ.setdefault("HFREWRITE_TP_TIMEOUT", "150")
    result = launch(2, tp_vision_worker, (str(tmp_path), str(tmp_path / "cache"), model_name), limit=540)
    assert result.code == 0, result.message
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert any("tp" in name and count for name, count in first["applied"].items()), first["applied"]
    assert first["parameters"] < first["single_parameters"]   # each rank holds its shard of the LM
    assert first["tokens"] == second["tokens"], "the ranks disagree"
    single = first["single"]
    assert first["tokens"] == single["tokens"]
    assert first["steps"] > 6   # the prefill went in chunks
    assert (first["logits"] - single["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(first["logits"], second["logits"])
