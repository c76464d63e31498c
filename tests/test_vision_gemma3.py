"""Gemma 3: an image's tokens attend to every token of their image (HF: AND(sliding window, OR(causal, same image))),
through per-query key limits (the key_limit graph input, paged_attention_key_limit). The tiny model's local layer
has a window of 6, shorter than its 16-token images and than every prompt. The families' shared checks (logits
equal HF eager, greedy equals HF generate) run in tests/test_vision_families.py; here: the graph, the image spans,
chunk ends that never fall inside an image (any chunk size, the Engine with a step budget smaller than an image),
greedy generation that would differ were the images causal, the Triton kernels, and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image, random_prompts, verify_vision_language
from hfrewrite.runtime import image_blocks, multimodal
from hfrewrite.runtime.engine import Engine
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    source = resolve("tiny:gemma3", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    result = build(source, CompileOptions(verify=False, backend=None, dtype="float32", progress=False))
    reference = reference_model(source, result.model.device, result.model.dtype, progress=False)
    return source, result.model, reference


def test_tiny_config_exercises_the_window(gemma3):
    source, _, _ = gemma3
    text = source.config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"] and text.sliding_window < IMAGE_TOKENS
    assert source.config.mm_tokens_per_image == IMAGE_TOKENS


def test_every_attention_takes_the_key_limits(gemma3):
    from hfrewrite.compiler.kinds import kind_for

    source, model, _ = gemma3
    kind = kind_for(source.config)
    assert kind.key_limit and kind.inputs == ("inputs_embeds", "position_ids", "key_limit")
    targets = [n.target for n in model.graph_module.graph.nodes if n.op == "call_function"]
    limited = [t for t in targets if t is torch.ops.hfrewrite.paged_attention_key_limit.default]
    assert len(limited) == source.config.text_config.num_hidden_layers
    assert torch.ops.hfrewrite.paged_attention.default not in targets
    assert "key_limit" in model.input_names


def test_spans_are_hf_image_blocks(gemma3):
    """The spans of a prompt are the runs of its image tokens (HF's block ids), one per image, 16 tokens each;
    the key limits are each image's end inside it and position + 1 elsewhere."""
    source, model, _ = gemma3
    prompt = random_prompts(load_processor(source.directory, source.config), 0)[1]   # two images
    sequence = multimodal.prepare(model.vision, prompt)
    ids = torch.tensor(sequence.ids)
    image = (ids == source.config.image_token_id).nonzero().flatten().tolist()
    assert len(sequence.spans) == 2 and [b - a for a, b in sequence.spans] == [IMAGE_TOKENS] * 2
    assert sorted(p for a, b in sequence.spans for p in range(a, b)) == image
    limits = sequence.key_limits.tolist()
    for p, limit in enumerate(limits):
        inside = [b for a, b in sequence.spans if a <= p < b]
        assert limit == (inside[0] if inside else p + 1)
    assert sequence.key_limit(len(ids) - 1, len(ids) + 2).tolist() == [len(ids), len(ids) + 1, len(ids) + 2]
    text_only = multimodal.prepare(model.vision, random_prompts(load_processor(source.directory, source.config),
                                                                0)[2])
    assert text_only.spans == () and text_only.key_limits.tolist() == list(range(1, len(text_only.ids) + 1))


def test_legal_end_and_spans_of():
    spans = ((4, 10), (12, 30))
    assert image_blocks.legal_end(spans, 0, 7) == 4         # back to the image's start
    assert image_blocks.legal_end(spans, 4, 7) == 10        # a chunk starting at an image takes all of it
    assert image_blocks.legal_end(spans, 10, 15) == 12
    assert image_blocks.legal_end(spans, 12, 17) == 30      # an image longer than the budget goes whole
    assert image_blocks.legal_end(spans, 0, 10) == 10 and image_blocks.legal_end(spans, 10, 12) == 12
    assert image_blocks.spans_of(torch.tensor([-1, 0, 0, -1, 1, 1, 1])) == ((1, 3), (4, 7))
    with pytest.raises(ValueError, match="not one contiguous span"):
        image_blocks.spans_of(torch.tensor([0, 0, -1, 0]))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(1, 23), seed=st.integers(0, 1000))
def test_logits_equal_hf_for_any_chunking(gemma3, chunk, seed):
    """Prefill chunks of any size (each end moved out of the images, as the Engine does), then decode steps."""
    _, model, reference = gemma3
    result = verify_vision_language(model, reference, seed=seed, atol=1e-4, chunk=chunk, decode_steps=2)
    assert result.passed, result


def _generation_prompts(processor):
    """Prompts whose HF greedy continuation changes when the images are made causal (checked in the test)."""
    generator = np.random.default_rng(3)
    contents = [[{"type": "text", "text": "hi"}, {"type": "image"}]] * 3 + [
        [{"type": "image"}, {"type": "image"}], [{"type": "image"}, {"type": "text", "text": "what is this"}]]
    prompts = []
    for content in contents:
        images = [random_image(generator, 24, 16) for part in content if part["type"] == "image"]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        prompts.append(dict(processor(text=[text], images=images, return_tensors="pt")))
    return prompts


def test_engine_greedy_equals_hf_generate_with_chunks_at_image_boundaries(gemma3):
    """Five prompts at once with a 5-token step budget (smaller than an image): no prefill chunk ends inside an
    image, an image goes whole into one chunk, and the tokens equal HF generate's; HF's own greedy tokens differ
    on some prompt when its image tokens are made causal (no token_type_ids), so this test can tell."""
    source, model, reference = gemma3
    processor = load_processor(source.directory, source.config)
    prompts = _generation_prompts(processor)
    new_tokens = 10
    runner = multimodal.VisionRunner(model, model.new_cache(CacheConfig(block_size=4, num_blocks=160)))
    chunks_seen = []
    prepare = runner.prepare

    def recording(chunks):
        chunks_seen.extend(chunks)
        return prepare(chunks)

    runner.prepare = recording
    engine = Engine(runner, CacheConfig(block_size=4, num_blocks=160), model.device, model.max_context,
                    max_tokens_per_step=5)
    requests = [multimodal.vision_request(model.vision, prompt, SamplingParams(max_new_tokens=new_tokens))
                for prompt in prompts]
    out: dict[int, list[int]] = {}
    for event in engine.run(requests):
        assert event.error is None, event.error
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append(event.token_id)
    whole = 0
    for chunk in chunks_seen:
        spans = chunk.source.resolve(model.vision).spans
        end = chunk.start + len(chunk.tokens)
        assert not any(a < end < b for a, b in spans), (chunk.start, end, spans)
        whole += any(chunk.start == a and end == b for a, b in spans)
    assert whole >= 1   # an image longer than the budget went whole in one chunk
    differs = False
    for prompt, request in zip(prompts, requests):
        with torch.no_grad():
            theirs = reference.generate(**prompt, max_new_tokens=new_tokens, do_sample=False,
                                        min_new_tokens=new_tokens)[0, prompt["input_ids"].shape[1]:].tolist()
            causal = {k: v for k, v in prompt.items() if k != "token_type_ids"}
            causal = reference.generate(**causal, max_new_tokens=new_tokens, do_sample=False,
                                        min_new_tokens=new_tokens)[0, prompt["input_ids"].shape[1]:].tolist()
        assert out[request.request_id] == theirs
        differs = differs or causal != theirs
    assert differs, "no prompt's greedy tokens depend on the image blocks: the test could not fail"


def test_through_the_triton_kernels(gemma3, monkeypatch):
    """HFREWRITE_ATTENTION=triton: every layer runs the prefill kernel's USE_KEY_LIMIT variant (interpreted here)."""
    from hfrewrite.kernels.attention import op
    from hfrewrite.kernels.attention import triton as triton_attention

    if not (triton_attention.available() and op.interpreting()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    _, model, reference = gemma3
    calls = []
    kernel = triton_attention.paged_attention_triton

    def counted(*args, **kwargs):
        calls.append(kwargs.get("key_limit") is not None)
        return kernel(*args, **kwargs)

    monkeypatch.setenv("HFREWRITE_ATTENTION", "triton")
    monkeypatch.setattr(triton_attention, "paged_attention_triton", counted)
    result = verify_vision_language(model, reference, seed=2, atol=1e-4, chunk=9, decode_steps=1)
    assert result.passed, result
    assert calls and all(calls)


def test_cli_compile_and_generate(tmp_path, monkeypatch, capsys):
    from hfrewrite.cli import main

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    assert main(["compile", "tiny:gemma3", "--backend", "none", "--quiet"]) == 0
    assert "PASSED" in capsys.readouterr().out
    random_image(np.random.default_rng(0), 20, 28).save(tmp_path / "img.png")
    code = main(["generate", "tiny:gemma3", "--image", str(tmp_path / "img.png"), "--prompt", "hi",
                 "--max-new-tokens", "4", "--backend", "none", "--quiet"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("share", [True, False])
def test_layerwise_cut_equals_hf(gemma3, share):
    """Cut per layer (layer-wise compile; per piece as pipeline stages do): every piece with an attention site
    gets the step's key_limit input."""
    from hfrewrite.runtime.layers import LayeredGraph

    _, model, reference = gemma3
    whole = model._fn
    model._fn = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs,
                                  share_step_values=share).compile(lambda piece: piece)
    try:
        result = verify_vision_language(model, reference, seed=0, atol=1e-4, chunk=6)
    finally:
        model._fn = whole
    assert result.passed, result
