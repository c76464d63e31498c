"""The vision-language families beyond qwen2_vl / llava / idefics3: Qwen3-VL (deepstack features added to the first
decoder layers at the image tokens), SmolVLM and Mistral 3 (processors that transformers builds only with torchvision,
built here from their Pillow image processors), Gemma 3 (an image's tokens attend to the whole image; more in
test_vision_gemma3.py). Compiled logits through the paged cache equal HF eager (images of
different sizes, two images in a prompt, a text-only prompt, prefill chunked across the image tokens, decode steps)
and greedy generation equals HF generate token for token."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import NoVideos, find_processor_class, load_processor
from hfrewrite.compiler.vision_verify import random_image, random_prompts, verify_vision_language
from hfrewrite.errors import ModelSourceError
from hfrewrite.runtime import multimodal
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

FAMILIES = ["qwen3_vl", "smolvlm", "mistral3", "gemma3"]
_BUILT: dict[str, tuple] = {}


def _built(model_type: str, cache_dir) -> tuple:
    """(source, compiled model (eager graph), HF eager reference) of tiny:<model_type>, built once per session."""
    if model_type not in _BUILT:
        source = resolve(f"tiny:{model_type}", cache_dir=cache_dir, progress=False)
        result = build(source, CompileOptions(verify=False, backend=None, dtype="float32", progress=False))
        reference = reference_model(source, result.model.device, result.model.dtype, progress=False)
        _BUILT[model_type] = (source, result.model, reference)
    return _BUILT[model_type]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    return _built("qwen3_vl", tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_equal_hf_eager(built, seed):
    _, model, reference = built
    result = verify_vision_language(model, reference, seed=seed, atol=1e-4)
    assert result.passed, result
    assert result.sequences == 3 and result.max_abs_err <= 1e-4


def test_greedy_generation_equals_hf_generate(built):
    source, model, reference = built
    processor = load_processor(source.directory, source.config)
    generator = np.random.default_rng(3)
    images = [random_image(generator, 24, 16), random_image(generator, 16, 32)]
    texts = []
    for words in ("describe it", "what is this"):
        content = [{"type": "image"}, {"type": "text", "text": words}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False))
    new_tokens = 8
    prompts = [dict(processor(text=[text], images=[image], return_tensors="pt")) for text, image in zip(texts, images)]
    engine = multimodal.vision_engine(model, CacheConfig(block_size=4, num_blocks=64), max_tokens_per_step=5)
    requests = [multimodal.vision_request(model.vision, prompt, SamplingParams(max_new_tokens=new_tokens))
                for prompt in prompts]
    out: dict[int, list[int]] = {}
    for event in engine.run(requests):   # both prompts at once, prefill in 5-token chunks across the image tokens
        assert event.error is None, event.error
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append(event.token_id)
    ours = [out[r.request_id] for r in requests]
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        assert tokens == out[0, prompt["input_ids"].shape[1]:].tolist()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(1, 11), seed=st.integers(0, 1000))
def test_deepstack_equals_hf_for_any_chunking(qwen3_vl, chunk, seed):
    """Prefill chunks of any size: a chunk may start, end or lie inside an image's tokens, or hold none."""
    _, model, reference = qwen3_vl
    result = verify_vision_language(model, reference, seed=seed, atol=1e-4, chunk=chunk, decode_steps=2)
    assert result.passed, result


def test_deepstack_graph_inputs(qwen3_vl):
    from hfrewrite.compiler.kinds import kind_for

    source, model, _ = qwen3_vl
    kind = kind_for(source.config)
    assert kind.deepstack == 2 and kind.inputs[2:] == ("visual_index", "deepstack_embeds")
    assert {"visual_index", "deepstack_embeds"} <= set(model.input_names)
    adds = [n for n in model.graph_module.graph.nodes if n.op == "call_function" and "index_add" in str(n.target)]
    assert len(adds) == 2  # one per deepstack layer; no boolean-mask indexing (nonzero) in the graph
    assert not any("nonzero" in str(n.target) for n in model.graph_module.graph.nodes)


def test_extra_inputs_of_a_chunk(qwen3_vl):
    """extra_inputs(start, end): the chunk's image tokens counted from start, and their deepstack features."""
    source, model, _ = qwen3_vl
    prompt = random_prompts(load_processor(source.directory, source.config), 0)[1]  # two images
    sequence = multimodal.prepare(model.vision, prompt)
    image = torch.tensor(sequence.ids) == source.config.image_token_id
    where = torch.nonzero(image).flatten()
    assert sequence.deepstack.shape == (2, len(where), source.config.text_config.hidden_size)
    start, end = int(where[3]), int(where[-1])  # from inside the first image to inside the last
    rows, features = sequence.extra_inputs(start, end)
    inside = where[(where >= start) & (where < end)]
    assert rows.tolist() == (inside - start).tolist()
    assert torch.equal(features, sequence.deepstack[:, 3:3 + len(inside)])
    rows, features = sequence.extra_inputs(0, int(where[0]))  # text before the first image: empty, not zeros
    assert rows.shape == (0,) and features.shape == (2, 0, source.config.text_config.hidden_size)
    packed = multimodal.visual_inputs([sequence, sequence], [(0, 5), (start, end)], model.device)
    assert packed["visual_index"].tolist() == (inside - start + 5).tolist()


def test_deepstack_graph_without_visual_inputs_is_an_error(qwen3_vl):
    source, model, _ = qwen3_vl
    sequence = multimodal.prepare(model.vision, random_prompts(load_processor(source.directory, source.config), 0)[2])
    sequence.blocks = [0, 1, 2, 3, 4, 5, 6, 7]
    from hfrewrite.runtime.kv_cache import CacheConfig

    cache = model.new_cache(CacheConfig(block_size=4, num_blocks=8))
    step, embeds = multimodal.vision_step(model.vision, [sequence], [(0, 4)], 4, model.device)
    with pytest.raises(ValueError, match="visual_index"):
        multimodal.forward_embeds(model, step, cache, embeds)


def test_processor_without_torchvision_refuses_videos(tmp_path):
    source = resolve("tiny:smolvlm", cache_dir=tmp_path, progress=False)
    processor = load_processor(source.directory, source.config)
    assert isinstance(processor.video_processor, NoVideos)
    with pytest.raises(ModelSourceError, match="torchvision"):
        processor.video_processor([np.zeros((2, 8, 8, 3), dtype=np.uint8)])


def test_pixtral_processor_class_is_the_real_one():
    """PixtralProcessor's module imports a helper from the torchvision image processor; found through its Pillow
    twin for that import only (no stand-in module is left in sys.modules)."""
    from transformers.utils.import_utils import DummyObject

    found = find_processor_class("PixtralProcessor")
    assert not isinstance(found, DummyObject) and found.__name__ == "PixtralProcessor"
    twin = sys.modules.get("transformers.models.pixtral.image_processing_pixtral")
    assert twin is None or "pil" not in twin.__name__


@pytest.mark.parametrize("share", [True, False])
def test_layerwise_cut_equals_hf(qwen3_vl, share):
    """Cut per layer, with the rotary values made once (layer-wise) or recomputed per piece (as pipeline stages
    do): HF's interleaved M-RoPE writes slices of its freqs in place (aten.copy_ nodes nothing reads), and those
    writes must come along with the freqs wherever they are computed."""
    from hfrewrite.runtime.layers import LayeredGraph

    _, model, reference = qwen3_vl
    whole = model._fn
    model._fn = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs,
                                  share_step_values=share).compile(lambda piece: piece)
    try:
        result = verify_vision_language(model, reference, seed=0, atol=1e-4)
    finally:
        model._fn = whole
    assert result.passed, result
