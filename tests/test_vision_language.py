"""Vision-language models: compiled logits through the paged cache equal HF eager on the same images and
prompts (images of different sizes, two images in a prompt, a text-only prompt, prefill cut inside the image
tokens, decode steps), and greedy generation equals HF generate token for token."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image, random_prompts, verify_vision_language
from hfrewrite.runtime import multimodal
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "idefics3"]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    source = resolve(f"tiny:{request.param}", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    result = build(source, CompileOptions(verify=False, backend=None, dtype="float32", progress=False))
    reference = reference_model(source, result.model.device, result.model.dtype, progress=False)
    return source, result.model, reference


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_equal_hf_eager(built, seed):
    _, model, reference = built
    result = verify_vision_language(model, reference, seed=seed, atol=1e-4)
    assert result.passed, result
    assert result.sequences == 3 and result.max_abs_err <= 1e-4


def test_layerwise_cut_equals_hf_eager(built):
    """Cut per layer as the GPU's default layer-wise compile does (the token embedding runs outside the LM
    graph, so the pp_plan's embed_tokens is not in it): the pieces in a loop equal HF eager."""
    from hfrewrite.runtime.layers import LayeredGraph

    _, model, reference = built
    whole = model._fn
    model._fn = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs).compile(lambda piece: piece)
    try:
        result = verify_vision_language(model, reference, seed=0, atol=1e-4)
    finally:
        model._fn = whole
    assert result.passed, result


def _batch(processor, seed=3):
    """Processor outputs: an image prompt, an image of another size, and a text-only prompt."""
    generator = np.random.default_rng(seed)
    images = [random_image(generator, 24, 16), random_image(generator, 16, 32), None]
    prompts = []
    for words, image in zip(("describe it", "what is this", "just text here"), images):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": words}]
        prompts.append(multimodal.processor_inputs(processor, [{"role": "user", "content": content}],
                                                   [image] if image is not None else []))
    return prompts


def _engine_tokens(model, prompts, params, max_tokens_per_step=5, eos=()):
    """Tokens per prompt through the Engine: all submitted at once, chunked prefill of `max_tokens_per_step`."""
    engine = multimodal.vision_engine(model, CacheConfig(block_size=4, num_blocks=64), eos,
                                      max_tokens_per_step=max_tokens_per_step)
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [multimodal.vision_request(model.vision, prompt, p) for prompt, p in zip(prompts, params)]
    out = {}
    for event in engine.run(requests):
        assert event.error is None, event.error
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append(event.token_id)
    if max_tokens_per_step < 8:
        assert engine.steps > 8  # prefill went in chunks, several per prompt
    return [out[r.request_id] for r in requests]


def test_greedy_generation_through_the_engine_equals_hf_generate(built):
    """Two image sizes and a text-only prompt in one continuous batch, prefill chunks of 5 tokens crossing the
    image tokens, then batched decode: token for token what HF generate makes of each prompt alone."""
    source, model, reference = built
    processor = load_processor(source.directory, source.config)
    prompts = _batch(processor)
    image_token = getattr(source.config, "image_token_id", getattr(source.config, "image_token_index", None))
    assert int((prompts[0]["input_ids"] == image_token).sum()) > 5  # a 5-token chunk cuts through the image
    new_tokens = 8
    eos = multimodal.vision_eos_ids(model, processor.tokenizer)
    assert set(eos) >= {int(t) for t in np.atleast_1d(reference.generation_config.eos_token_id)}
    ours = _engine_tokens(model, prompts, SamplingParams(max_new_tokens=new_tokens), eos=eos)
    assert max(len(tokens) for tokens in ours) == new_tokens
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
        assert tokens == out[0, prompt["input_ids"].shape[1]:].tolist()


def test_seeded_sampling_is_reproducible(built):
    source, model, _ = built
    if source.config.model_type not in ("qwen2_vl", "llava"):
        pytest.skip("one M-RoPE and one plain-position family are enough")
    prompts = _batch(load_processor(source.directory, source.config))
    params = [SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7 + i, ignore_eos=True)
              for i in range(len(prompts))]
    first = _engine_tokens(model, prompts, params)
    assert _engine_tokens(model, prompts, params, max_tokens_per_step=64) == first  # chunking does not matter
    other = _engine_tokens(model, prompts, [dataclasses.replace(p, seed=p.seed + 100) for p in params])
    assert other != first
    greedy = _engine_tokens(model, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert greedy != first


def test_stop_strings_and_abort(built):
    """The Engine's text side on a VLM: a stop string ends a request, an abort frees its blocks."""
    source, model, _ = built
    if source.config.model_type != "qwen2_vl":
        pytest.skip("one family is enough")
    processor = load_processor(source.directory, source.config)
    prompts = _batch(processor)
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    engine = multimodal.vision_engine(model, CacheConfig(block_size=4, num_blocks=64), decode=decode,
                                      max_tokens_per_step=5)
    full = {}
    for event in engine.run([multimodal.vision_request(model.vision, prompts[0], SamplingParams(max_new_tokens=10,
                                                                                              ignore_eos=True))]):
        full[event.request_id] = full.get(event.request_id, "") + event.text
    text = next(iter(full.values()))
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    requests = [multimodal.vision_request(model.vision, prompts[0], SamplingParams(max_new_tokens=10,
                                                                                 ignore_eos=True, stop=(stop,))),
                multimodal.vision_request(model.vision, prompts[1], SamplingParams(max_new_tokens=10))]
    for request in requests:
        engine.submit(request)
    events, steps = [], 0
    while engine.has_work:
        events += engine.step()
        steps += 1
        if steps == 3:  # mid-prefill of the second prompt
            assert engine.abort(requests[1].request_id)
    finished = {e.request_id: e for e in events if e.finished}
    assert finished[requests[0].request_id].finish_reason == "stop"
    got = "".join(e.text for e in events if e.request_id == requests[0].request_id)
    assert got == text[:text.index(stop)]
    assert finished[requests[1].request_id].finish_reason == "abort"
    assert engine.allocator.free_blocks == engine.allocator.num_blocks


def test_image_token_count_mismatch_is_an_error(built):
    source, model, _ = built
    processor = load_processor(source.directory, source.config)
    prompt = random_prompts(processor, 0)[0]
    ids = prompt["input_ids"].clone()
    image_token = getattr(source.config, "image_token_id", getattr(source.config, "image_token_index", None))
    ids[ids == image_token] = torch.where(torch.arange(int((ids == image_token).sum())) == 0, 97, image_token)
    prompt["input_ids"] = ids  # one image token fewer than the image has features
    with pytest.raises(ValueError, match="image tokens"):
        multimodal.prepare(model.vision, prompt)


def test_kind_of_a_vlm_is_vision_language():
    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.compiler.tiny_vision import tiny_vision_config

    kind = kind_for(tiny_vision_config("qwen2_vl"))
    assert (kind.name, kind.inputs, kind.rows) == ("vision-language", ("inputs_embeds", "position_ids"), 3)
    assert kind_for(tiny_vision_config("llava")).rows == 1


def test_cli_generate_with_an_image(tmp_path, monkeypatch, capsys):
    from hfrewrite.cli import main

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    random_image(np.random.default_rng(0), 20, 28).save(tmp_path / "img.png")
    code = main(["generate", "tiny:qwen2_vl", "--image", str(tmp_path / "img.png"), "--prompt", "what is it",
                 "--max-new-tokens", "4", "--backend", "none", "--quiet"])
    assert code == 0, capsys.readouterr().err
    code = main(["generate", "tiny:qwen2_vl", "--image", str(tmp_path / "missing.png"), "--prompt", "x",
                 "--backend", "none", "--quiet"])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_cli_refuses_an_image_for_a_text_model(tmp_path, monkeypatch, capsys):
    from hfrewrite.cli import main

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    random_image(np.random.default_rng(0), 8, 8).save(tmp_path / "img.png")
    code = main(["generate", "tiny:llama", "--image", str(tmp_path / "img.png"), "--prompt", "x", "--backend", "none",
                 "--quiet"])
    assert code == 2 and "not vision-language" in capsys.readouterr().err


def test_bfloat16_verifies(tmp_path):
    """The LM graph is captured with inputs_embeds in the model's dtype (HF norms cast back to the input's)."""
    source = resolve("tiny:qwen2_vl", cache_dir=tmp_path, progress=False)
    result = build(source, CompileOptions(verify=True, backend=None, dtype="bfloat16", progress=False))
    assert result.verification.passed and result.verification.top1_agreement >= 0.9, result.verification


def test_bidirectional_prefix_attention_is_refused():
    """PaliGemma lets its whole prefix attend both ways (not by image blocks): refused before capture, never run
    causal. Gemma 3's image blocks are supported (tests/test_vision_gemma3.py)."""
    from transformers import AutoConfig

    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.errors import UnsupportedKindError

    with pytest.raises(UnsupportedKindError, match="both directions.*PaliGemma's bidirectional prefix"):
        kind_for(AutoConfig.for_model("paligemma"))
    assert kind_for(AutoConfig.for_model("gemma3")).key_limit   # image blocks: per-query key limits
    assert not kind_for(AutoConfig.for_model("qwen2_vl")).key_limit


def _video_prompt(processor, config, grid=(2, 4, 6), seed=5, words="what happens"):
    """A prompt with one video as the processor lays it out (vision start, one pad per merged patch, vision end)
    and random frame patches [t*h*w, C*temporal*patch*patch]: transformers builds its video processor only
    with torchvision, which is not installed here, so the pixel values are made directly."""
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    t, h, w = grid
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pads = t * h * w // vision.spatial_merge_size ** 2
    text = (f"<|im_start|>user\n<|vision_start|>{'<|video_pad|>' * pads}<|vision_end|>{words}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    ids = torch.tensor([processor.tokenizer(text)["input_ids"]])
    assert int((ids == config.video_token_id).sum()) == pads
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(t * h * w, width, generator=generator),
            "video_grid_thw": torch.tensor([list(grid)]), "mm_token_type_ids": (ids == config.video_token_id).int() * 2}


def test_video_frames_equal_hf_eager(built):
    """Qwen2-VL video: its frames' features at the video tokens and its 3-D positions (temporal rows advance per
    temporal patch); logits of the whole prompt equal HF eager, and greedy tokens through the Engine (a video of
    two temporal patches and one of three, next to an image prompt, prefill in 5-token chunks) equal HF generate."""
    from hfrewrite.runtime.engine import SourcedChunk

    source, model, reference = built
    if not hasattr(reference.model, "get_video_features"):
        pytest.skip(f"{source.config.model_type} takes no videos")
    processor = load_processor(source.directory, source.config)
    videos = [_video_prompt(processor, source.config), _video_prompt(processor, source.config, (3, 4, 4), 6, "and")]
    sequence = multimodal.prepare(model.vision, videos[0])
    assert int(sequence.positions[0].max()) < int(sequence.positions[1:].max()) + 2  # not plain 1-D positions
    runner = multimodal.VisionRunner(model, model.new_cache(CacheConfig(block_size=4, num_blocks=32)))
    ids = videos[0]["input_ids"][0].tolist()
    prepared = runner.prepare([SourcedChunk(ids, 0, list(range(len(ids) // 4 + 1)), sequence)])
    rows = torch.arange(len(ids))
    ours = multimodal.forward_embeds(model, prepared.step, runner.cache, prepared.embeds, rows=rows)
    with torch.no_grad():
        theirs = reference(**videos[0]).logits[0]
    assert float((ours - theirs).abs().max()) <= 1e-4
    prompts = videos + _batch(processor)[:1]
    new_tokens = 8
    eos = multimodal.vision_eos_ids(model, processor.tokenizer)
    tokens = _engine_tokens(model, prompts, SamplingParams(max_new_tokens=new_tokens), eos=eos)
    for prompt, got in zip(prompts, tokens):
        with torch.no_grad():
            out = reference.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
        assert got == out[0, prompt["input_ids"].shape[1]:].tolist()


def test_cli_video_frames(tmp_path, monkeypatch, capsys):
    """--video reads a directory of frames (or a list); without torchvision the processor has no video part: a
    clear error naming it, never a traceback."""
    from hfrewrite.cli import main
    from hfrewrite.cli_vision import ImageInputError, open_frames

    generator = np.random.default_rng(0)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        random_image(generator, 16, 24).save(frames / f"{i:03d}.png")
    (frames / "notes.txt").write_text("not a frame")
    assert [f.size for f in open_frames(str(frames))] == [(24, 16)] * 3
    assert len(open_frames(f"{frames / '000.png'},{frames / '002.png'}")) == 2
    random_image(generator, 8, 8).save(tmp_path / "small.png")
    with pytest.raises(ImageInputError, match="differ in size"):
        open_frames(f"{frames / '000.png'},{tmp_path / 'small.png'}")
    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    code = main(["generate", "tiny:qwen2_vl", "--video", str(frames), "--prompt", "x", "--max-new-tokens", "2",
                 "--backend", "none", "--quiet"])
    err = capsys.readouterr().err
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        assert code == 2 and "torchvision" in err
    else:
        assert code == 0, err


def test_cli_generate_samples_with_a_seed(tmp_path, monkeypatch, capsys):
    """generate with images takes the text generate's sampling flags: a seed reproduces the text."""
    from hfrewrite.cli import main

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "cache"))
    random_image(np.random.default_rng(1), 20, 28).save(tmp_path / "img.png")
    texts = []
    for seed in (3, 3, 4):
        code = main(["generate", "tiny:qwen2_vl", "--image", str(tmp_path / "img.png"), "--prompt", "what is it",
                     "--max-new-tokens", "12", "--temperature", "1.5", "--top-p", "0.95", "--seed", str(seed),
                     "--backend", "none", "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.err
        texts.append(out.out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert texts[2] != texts[0]


def test_videos_and_images_resolved_together_equal_alone(built, monkeypatch):
    """resolve_all over two videos of different lengths and the image / text-only batch: one video tower call and
    one image tower call, and every prompt's embeddings and 3-D positions as when it is resolved alone."""
    source, model, _ = built
    if model.vision._video_features is None:
        pytest.skip(f"{source.config.model_type} takes no videos")
    processor = load_processor(source.directory, source.config)
    prompts = [_video_prompt(processor, source.config), _video_prompt(processor, source.config, (3, 4, 4), 6, "and")]
    prompts += _batch(processor)
    alone = [multimodal.prepare(model.vision, prompt) for prompt in prompts]
    calls = []
    for name in ("video_features", "image_outputs"):
        original = getattr(model.vision, name)
        monkeypatch.setattr(model.vision, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    batched = multimodal.resolve_all(model.vision, [multimodal.PendingSequence(dict(p)) for p in prompts])
    assert sorted(calls) == ["image_outputs", "video_features"]
    for one, many in zip(alone, batched):
        assert one.ids == many.ids and one.delta == many.delta and torch.equal(one.positions, many.positions)
        torch.testing.assert_close(many.embeds, one.embeds, atol=1e-5, rtol=0)
