"""A vision-language model's decode steps replayed from device graphs (runtime/vision_graphs.py).

On the CPU: what a bucket's static inputs hold after staging a VLM decode step (token ids, M-RoPE positions
shifted by each source's rope delta, attention metadata, Gemma 3's key limits, Qwen3-VL's empty deepstack inputs)
equals what VisionRunner.prepare builds for the same step padded to the bucket, step after step, and the
captured region's function (ids embedded, then the LM graph) run uncaptured on them gives VisionRunner's logits.
On an accelerator (skipped elsewhere; run: `pytest tests/test_vision_graphs.py`): captured decode logits equal
the uncaptured VisionRunner's for every bucket, the Engine's greedy tokens with graphs equal those without,
and nothing recompiles or is re-captured during a run.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.build import build
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.runtime import multimodal
from hfrewrite.runtime.engine import Engine, SourcedChunk
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.runner import CapturedGraph, StagedDecode, padded_decode_chunks
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.runtime.signature import Role
from hfrewrite.runtime.step import Chunk
from hfrewrite.runtime.vision_graphs import VisionGraphRunner, captures_graphs, vision_serving

# M-RoPE (qwen2_vl), key limits (gemma3), M-RoPE and deepstack (qwen3_vl)
FAMILIES = ["qwen2_vl", "gemma3", "qwen3_vl"]
BLOCK, SCRATCH, BUCKET = 4, 40, 4


@functools.lru_cache(maxsize=None)
def built(family: str, backend: str | None = None, device: str | None = None):
    source = resolve(f"tiny:{family}", cache_dir=Path(tempfile.mkdtemp(prefix="vgraphs-")), progress=False)
    options = CompileOptions(verify=False, backend=backend, dtype="float32", progress=False, device=device,
                             device_graphs=backend is not None, max_graph_batch=8)
    return source, build(source, options).model


def random_source(model, prompt: int, rng: torch.Generator) -> multimodal.VisionSequence:
    """A prefilled prompt's sequence as VisionRunner reads it for a decode step: random prompt rows, and the
    family's extras (a rope delta for M-RoPE, key limits with an image span, deepstack features)."""
    hidden = model.vision.embed(torch.tensor([0])).shape[-1]
    runner = multimodal.VisionRunner(model, model.new_cache(CacheConfig(BLOCK, 2)))
    delta = int(torch.randint(-prompt + 1, 4, (1,), generator=rng)) if runner.rows > 1 else 0
    positions = torch.arange(prompt)[None].expand(runner.rows, -1).clone()
    ids = torch.randint(1, 50, (prompt,), generator=rng).tolist()
    sequence = multimodal.VisionSequence(ids, torch.randn(prompt, hidden, generator=rng), positions, delta)
    if runner.key_limit:
        sequence.spans = ((1, prompt - 1),)
        sequence.key_limits = torch.arange(1, prompt + 1, dtype=torch.int32)
        sequence.key_limits[1:prompt - 1] = prompt - 1
    layers = getattr(model.vision, "deepstack_layers", 0)
    if layers:
        sequence.visual_rows = torch.tensor([0, prompt - 1])
        sequence.deepstack = torch.randn(layers, 2, hidden, generator=rng)
    return sequence


def staged_runner(model, cache) -> VisionGraphRunner:
    """A VisionGraphRunner whose bucket BUCKET has static inputs and staging but no graph (the CPU captures none)."""
    runner = VisionGraphRunner(model, cache, [BUCKET], scratch_block=SCRATCH,
                               rows=multimodal.VisionRunner(model, cache).rows)
    inputs, extra = runner.static_inputs(BUCKET)
    runner.graphs[BUCKET] = CapturedGraph(None, inputs, None, runner.staging(BUCKET, inputs, extra))
    runner.extra = extra
    return runner


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_staged_vlm_decode_equals_the_prepared_padded_step(family: str, data: st.DataObject) -> None:
    _, model = built(family)
    cache = model.new_cache(CacheConfig(BLOCK, SCRATCH + 1))
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for tensor in cache.keys + cache.values:   # context the decode tokens attend to
        tensor.copy_(torch.randn(tensor.shape, generator=rng))
    runner = staged_runner(model, cache)
    plain = multimodal.VisionRunner(model, cache)
    width = runner.width
    inputs = runner.graphs[BUCKET].inputs
    owned = [list(range(5 * i, 5 * i + data.draw(st.integers(2, 5)))) for i in range(8)]
    sources = [random_source(model, data.draw(st.integers(2, len(b) * BLOCK - 1)), rng) if i % 4 else None
               for i, b in enumerate(owned)]   # rows 0 and 4: text chunks without a source
    for _ in range(3):   # sequences join, leave and change rows between steps
        members = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=BUCKET, unique=True))
        chunks = []
        for m in members:
            prompt = 0 if sources[m] is None else sources[m].embeds.shape[0]
            start = data.draw(st.integers(prompt, len(owned[m]) * BLOCK - 1))
            chunks.append(SourcedChunk([data.draw(st.integers(1, 90))], start, owned[m], sources[m]))
        staged = runner.stage(chunks, plain.resolved)
        assert isinstance(staged, StagedDecode) and staged.bucket == BUCKET
        expected = plain.prepare(padded_decode_chunks(chunks, BUCKET, SCRATCH))
        assert not isinstance(expected, StagedDecode)
        want = model.signature.feeds(expected.step, cache, inputs_embeds=expected.embeds, visual=expected.visual)
        assert torch.equal(runner.extra[0], expected.step.input_ids)
        for spec, got, wanted in zip(model.signature.inputs, inputs, want):
            if spec.role is Role.EMBEDS:
                assert torch.equal(runner.embed(runner.extra[0]), wanted)
            elif spec.name == "attn_block_tables":   # columns past a row's context are never read
                assert got.shape[1] == width
                for row, chunk in enumerate(chunks):
                    need = chunk.start // BLOCK + 1
                    assert got[row, :need].tolist() == wanted[row, :need].tolist(), (spec.name, row)
                assert got[len(chunks):, 0].tolist() == wanted[len(chunks):, 0].tolist()
            else:
                assert got.dtype == wanted.dtype and torch.equal(got, wanted), (spec.name, got, wanted)
        # the captured region's function on the staged buffers: VisionRunner's logits for the real rows
        ours = runner.captured_call(inputs, runner.extra)[0, :len(chunks)]
        theirs = plain(plain.prepare(chunks))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_prompt_rows_and_uncaptured_shapes_are_not_staged() -> None:
    _, model = built("qwen2_vl")
    cache = model.new_cache(CacheConfig(BLOCK, SCRATCH + 1))
    runner = staged_runner(model, cache)
    resolve = multimodal.VisionRunner(model, cache).resolved
    source = random_source(model, 6, torch.Generator().manual_seed(0))
    blocks = list(range(4))
    assert runner.stage([SourcedChunk([5], 6, blocks, source)], resolve) is not None   # the first generated token
    assert runner.stage([SourcedChunk([5], 5, blocks, source)], resolve) is None       # the prompt's last row
    assert runner.stage([SourcedChunk([5, 6], 6, blocks, source)], resolve) is None    # not a decode step
    too_many = [SourcedChunk([5], 6, blocks, source)] * (BUCKET + 1)
    assert runner.stage(too_many, resolve) is None


def test_cpu_vision_engine_runs_uncaptured() -> None:
    _, model = built("qwen2_vl")
    model.device_graphs = True   # even when asked for: the CPU captures no graphs
    try:
        assert not captures_graphs(model)
        engine = multimodal.vision_engine(model, CacheConfig(BLOCK, 16))
        assert engine.executor.forward.graphs is None
    finally:
        model.device_graphs = False


def test_graphs_follow_the_device_graphs_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-cuda-graphs (device_graphs off), an eager backend or a model that keeps no runners: no graphs."""
    from types import SimpleNamespace

    from hfrewrite.runtime import vision_graphs

    monkeypatch.setattr(vision_graphs, "supports_device_graphs", lambda device: True)   # a device that captures
    device = torch.device("meta")   # nothing runs there
    base = dict(device=device, device_graphs=True, backend="inductor", served=lambda key, make: make())
    assert captures_graphs(SimpleNamespace(**base))
    assert not captures_graphs(SimpleNamespace(**{**base, "device_graphs": False}))
    assert not captures_graphs(SimpleNamespace(**{**base, "backend": None}))
    assert not captures_graphs(SimpleNamespace(**{k: v for k, v in base.items() if k != "served"}))
    assert not captures_graphs(SimpleNamespace(**base, signature=SimpleNamespace(names=("inputs_embeds", "key_limit"))))


def _prompts(source, model, count: int):
    from hfrewrite.compiler.vision import load_processor
    from hfrewrite.compiler.vision_verify import random_image

    processor = load_processor(source.directory, source.config)
    rng = np.random.default_rng(1)
    prompts = []
    for i in range(count):
        image = [random_image(rng, 16 + 8 * (i % 2), 16)] if i % 3 != 2 else []
        content = [{"type": "image"}] * len(image) + [{"type": "text", "text": f"prompt {i}"}]
        prompts.append(multimodal.processor_inputs(processor, [{"role": "user", "content": content}], image))
    return prompts


def _engine_tokens(engine: Engine, model, prompts, logprobs: list | None = None) -> list[list[int]]:
    """Greedy tokens per prompt; `logprobs` gets each token's top-3 log-probabilities (flat, in request order):
    finer than the tokens, which a small change of the logits rarely flips."""
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3)
    requests = [multimodal.vision_request(model.vision, p, params) for p in prompts]
    out: dict[int, list] = {}
    for event in engine.run(requests):
        assert event.error is None, event.error
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append((event.token_id, [v for _, v in event.top_logprobs]))
    if logprobs is not None:
        logprobs.extend(v for r in requests for _, top in out[r.request_id] for v in top)
    return [[token for token, _ in out[r.request_id]] for r in requests]


class Replayer:
    """A stand-in for a captured graph on the CPU: replaying runs the captured region's function again on the
    static buffers, into the same output tensor."""

    def __init__(self, runner: VisionGraphRunner, inputs: list, extra: list) -> None:
        self.run = lambda: runner.captured_call(inputs, extra)
        self.output = self.run()

    def replay(self) -> None:
        self.output.copy_(self.run())


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_through_staged_buckets_equals_the_uncaptured_engine(family: str) -> None:
    """The Engine with every decode step staged into a bucket's static buffers (padding rows in the scratch
    block, the cache shared with prefill) and replayed, with and without lookahead: the greedy tokens of the
    uncaptured Engine."""
    source, model = built(family)
    cache_config = CacheConfig(BLOCK, 64)
    cache = model.new_cache(CacheConfig(BLOCK, 65))
    graphs = VisionGraphRunner(model, cache, [1, 2, 4], scratch_block=64,
                               rows=multimodal.VisionRunner(model, cache).rows)
    for bucket in graphs.buckets:
        inputs, extra = graphs.static_inputs(bucket)
        replayer = Replayer(graphs, inputs, extra)
        graphs.graphs[bucket] = CapturedGraph(replayer, inputs, replayer.output,
                                              graphs.staging(bucket, inputs, extra))
    prompts = _prompts(source, model, 3)
    staged = Engine(multimodal.VisionRunner(model, cache, graphs), cache_config, model.device, model.max_context,
                    max_tokens_per_step=5)
    ours_lp: list[float] = []
    ours = _engine_tokens(staged, model, prompts, ours_lp)
    assert graphs.replays >= 5   # every sequence's 5 decode steps (6 new tokens, the first from prefill) were staged
    eager = Engine(multimodal.VisionRunner(model, model.new_cache(cache_config)), cache_config, model.device,
                   model.max_context, max_tokens_per_step=5)
    theirs_lp: list[float] = []
    assert _engine_tokens(eager, model, prompts, theirs_lp) == ours
    assert ours_lp == pytest.approx(theirs_lp, abs=1e-5)
    # lookahead: a decode step's successor staged with the tokens just drawn, before the host reads them (prefill
    # in few steps, so that every sequence, those with images too, decodes on together and is fed)
    fed = Engine(multimodal.VisionRunner(model, cache, graphs), cache_config, model.device, model.max_context,
                 max_tokens_per_step=128, lookahead=True)
    fed_lp: list[float] = []
    assert _engine_tokens(fed, model, prompts, fed_lp) == ours
    assert fed_lp == pytest.approx(theirs_lp, abs=1e-5)
    assert fed.lookahead_steps >= 4   # 6 new tokens: the first from prefill, the last staged after a fed one


@pytest.mark.skipif(not torch.accelerator.is_available(), reason="device graphs need an accelerator")
@pytest.mark.parametrize("family", ["qwen2_vl"])   # gemma3 and qwen3_vl failed on the H200: UNCAPTURED_INPUTS
def test_vlm_decode_graphs_equal_the_uncaptured_runner_and_are_not_recaptured(family: str) -> None:
    device = torch.accelerator.current_accelerator().type
    source, model = built(family, "inductor", device)
    assert model.graph_reports(), "compile captured the default cache's decode graphs"
    frames = model.counter.frames
    cache_config = CacheConfig(BLOCK, 64)
    cache, graphs = vision_serving(model, cache_config)
    assert isinstance(graphs, VisionGraphRunner) and sorted(graphs.graphs) == [1, 2, 4, 8]
    assert model.counter.frames == frames   # capturing compiled nothing new
    assert vision_serving(model, cache_config)[1] is graphs   # captured once per cache config
    rng = torch.Generator().manual_seed(0)
    for tensor in cache.keys + cache.values:
        tensor.copy_(torch.randn(tensor.shape, generator=rng).to(tensor))
    plain = multimodal.VisionRunner(model, cache)
    for count in range(1, 9):
        chunks = []
        for i in range(count):
            sequence = random_source(model, 3 + i, rng)
            sequence.embeds, sequence.positions = sequence.embeds.to(model.device), sequence.positions.to(model.device)
            if sequence.deepstack is not None:
                sequence.deepstack = sequence.deepstack.to(model.device)
                sequence.visual_rows = sequence.visual_rows.to(model.device)
            chunks.append(SourcedChunk([7 + i], 3 + i + count, list(range(8 * i, 8 * i + 8)), sequence))
        staged = graphs.stage(chunks, plain.resolved)
        assert staged is not None and staged.bucket == min(b for b in (1, 2, 4, 8) if b >= count)
        captured = graphs.replay(staged)
        uncaptured = plain(plain.prepare(chunks))
        torch.testing.assert_close(captured, uncaptured, atol=1e-4, rtol=1e-4)
    captures, replays = graphs.captures, graphs.replays
    prompts = _prompts(source, model, 3)
    with_graphs = multimodal.vision_engine(model, cache_config, max_tokens_per_step=64)
    assert with_graphs.executor.forward.graphs is graphs
    ours_lp: list[float] = []
    ours = _engine_tokens(with_graphs, model, prompts, ours_lp)
    assert graphs.replays > replays and graphs.captures == captures and model.counter.frames == frames
    assert with_graphs.lookahead and with_graphs.lookahead_steps > 0   # on by default on a device
    eager = Engine(multimodal.VisionRunner(model, model.new_cache(cache_config)), cache_config, model.device,
                   model.max_context, max_tokens_per_step=64)
    theirs_lp: list[float] = []
    assert _engine_tokens(eager, model, prompts, theirs_lp) == ours
    assert ours_lp == pytest.approx(theirs_lp, abs=1e-3)
    assert model.counter.frames == frames
