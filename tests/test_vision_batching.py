"""The vision towers of the prompts a step resolves run together (hfrewrite.runtime.tower_batch): one tower call per
shape group, the features split back per prompt. Batched resolution equals resolving each prompt alone (embeddings
with the features at the same tokens, positions, deepstack features, key limits) for every VLM family, on images of
several sizes across prompts, a prompt with two images and a text-only prompt; the Engine, given several image
prompts at once, makes one tower call (one per shape group) and its greedy tokens equal HF generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image, random_prompts
from hfrewrite.runtime import multimodal, tower_batch
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "mistral3", "idefics3", "smolvlm", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    source = resolve(f"tiny:{request.param}", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    model = build(source, CompileOptions(verify=False, backend=None, dtype="float32", progress=False)).model
    return source, model, load_processor(source.directory, source.config)


def _prompts(processor, seed=0):
    """One image (16x24), two images (32x16, 24x24), text only (random_prompts), then an image of 16x32 and one of
    16x24 again (a shape shared with the first prompt)."""
    prompts = random_prompts(processor, seed)
    generator = np.random.default_rng(seed + 11)
    for (height, width), words in (((16, 32), "and this one"), ((16, 24), "the same size")):
        content = [{"type": "image"}, {"type": "text", "text": words}]
        prompts.append(multimodal.processor_inputs(processor, [{"role": "user", "content": content}],
                                                   [random_image(generator, height, width)]))
    return prompts


class Counting:
    """Counts the tower's image calls (and the shapes of their pixel values) on one tower instance."""

    def __init__(self, tower, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        original = tower.image_outputs

        def counted(pixel_values, **extra):
            self.shapes.append(tuple(pixel_values.shape))
            return original(pixel_values, **extra)

        monkeypatch.setattr(tower, "image_outputs", counted)


def _expected_calls(model_type, prompts):
    """One call for every family but Mistral 3, whose pixel values keep each image's size: one per distinct size."""
    if model_type != "mistral3":
        return 1
    return len({tuple(p["pixel_values"].shape[1:]) for p in prompts if "pixel_values" in p})


def _assert_same(alone, batched):
    assert alone.ids == batched.ids and alone.delta == batched.delta and alone.spans == batched.spans
    torch.testing.assert_close(batched.embeds, alone.embeds, atol=1e-5, rtol=0)
    assert torch.equal(batched.positions, alone.positions)
    for name in ("deepstack", "visual_rows", "key_limits"):
        mine, theirs = getattr(batched, name), getattr(alone, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_batched_resolution_equals_per_request(built, monkeypatch):
    source, model, processor = built
    prompts = _prompts(processor)
    alone = [multimodal.prepare(model.vision, prompt) for prompt in prompts]
    counting = Counting(model.vision, monkeypatch)
    pending = [multimodal.PendingSequence(dict(prompt)) for prompt in prompts]
    batched = multimodal.resolve_all(model.vision, pending)
    assert len(counting.shapes) == _expected_calls(source.config.model_type, prompts) >= 1
    for one, many, item in zip(alone, batched, pending):
        _assert_same(one, many)
        assert item.sequence is many and item.inputs == {}
    image = int((torch.tensor(alone[0].ids) == tower_batch.token_id(source.config, "image")).sum())
    text = model.vision.embed(torch.tensor(alone[0].ids))
    assert image > 0 and not torch.allclose(batched[0].embeds, text)   # the features are in place
    calls = len(counting.shapes)
    again = multimodal.resolve_all(model.vision, pending)   # resolved already: no tower call
    assert all(a is b for a, b in zip(again, batched)) and len(counting.shapes) == calls
    if source.config.model_type == "qwen3_vl":
        assert batched[1].deepstack.shape[1] == int(batched[1].visual_rows.numel()) > 0
    if source.config.model_type == "gemma3":
        assert batched[1].key_limits is not None and len(batched[1].spans) == 2


def test_engine_with_image_requests_submitted_together_equals_hf_generate(built, monkeypatch):
    """Five prompts (three image sizes, two images in one, a text-only one) submitted at once, all their prefill in
    the first step: one tower call there (none while scheduling), and each prompt's greedy tokens are what HF
    generate makes of it alone."""
    source, model, processor = built
    if source.config.model_type in ("qwen2_5_vl", "smolvlm"):
        pytest.skip("their tower joins as qwen2_vl's / idefics3's do (the resolution test covers them)")
    prompts = _prompts(processor, seed=1)
    reference = reference_model(source, model.device, model.dtype, progress=False)
    counting = Counting(model.vision, monkeypatch)
    budget = sum(int(p["input_ids"].shape[1]) for p in prompts)
    engine = multimodal.vision_engine(model, CacheConfig(block_size=4, num_blocks=256), max_tokens_per_step=budget)
    new_tokens = 6
    requests = [multimodal.vision_request(model.vision, p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                for p in prompts]
    for request in requests:
        engine.submit(request)
    out: dict[int, list[int]] = {}
    first = True
    while engine.has_work:
        for event in engine.step():
            assert event.error is None, event.error
            if event.token_id is not None:
                out.setdefault(event.request_id, []).append(event.token_id)
        if first:
            assert len(counting.shapes) == _expected_calls(source.config.model_type, prompts)
            first = False
    assert len(counting.shapes) == _expected_calls(source.config.model_type, prompts)
    for prompt, request in zip(prompts, requests):
        with torch.no_grad():
            theirs = reference.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False)
        assert out[request.request_id] == theirs[0, prompt["input_ids"].shape[1]:].tolist()


def test_a_prompt_with_a_wrong_token_count_gets_its_own_error(built):
    """The joined features do not add up: the group falls back to one call per prompt, and the bad prompt raises
    the error it raises alone (the others of the group still resolve)."""
    source, model, processor = built
    if source.config.model_type != "llava":
        pytest.skip("one family is enough")
    prompts = _prompts(processor)
    bad = dict(prompts[0])
    ids = bad["input_ids"].clone()
    token = source.config.image_token_index
    ids[0, int(torch.nonzero(ids[0] == token)[0])] = 97   # one image token fewer than the image's features
    bad["input_ids"] = ids
    good = multimodal.PendingSequence(dict(prompts[3]))
    with pytest.raises(ValueError, match="image tokens but the vision tower made"):
        multimodal.resolve_all(model.vision, [good, multimodal.PendingSequence(bad)])
    assert good.sequence is not None
    _assert_same(multimodal.prepare(model.vision, prompts[3]), good.sequence)


def test_shape_groups_are_sorted_and_keep_order():
    """Groups by every tensor's shape but the image dim (dim 1 of 5-D pixel values), in sorted key order."""
    def media(h, w, n=1):
        return {"pixel_values": torch.randn(n, 3, h, w), "image_sizes": torch.tensor([[h, w]] * n)}

    items = [media(24, 16), media(16, 32), media(24, 16, 2), media(16, 32)]
    assert tower_batch.shape_groups(items, "pixel_values") == [[1, 3], [0, 2]]
    tiles = [{"pixel_values": torch.randn(1, n, 3, 8, 8), "pixel_attention_mask": torch.ones(1, n, 8, 8)}
             for n in (3, 5)]
    assert tower_batch.shape_groups(tiles, "pixel_values") == [[0, 1]]
    assert tower_batch.joined(tiles, "pixel_values")["pixel_values"].shape == (1, 8, 3, 8, 8)
    patches = [{"pixel_values": torch.randn(n, 6), "image_grid_thw": torch.tensor([[1, 2, n // 2]])} for n in (4, 8)]
    split = tower_batch.batched_outputs(lambda pixels, image_grid_thw: (pixels * 2, None), patches, [4, 8])
    assert [torch.equal(piece, p["pixel_values"] * 2) for (piece, _), p in zip(split, patches)] == [True, True]
    assert tower_batch.batched_outputs(lambda pixels, **_: (pixels, None), patches, [4, 7]) == [None, None]
