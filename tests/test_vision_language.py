"""Vision-language models: compiled logits through the paged cache equal HF eager on the same images and
prompts (images of different sizes, two images in a prompt, a text-only prompt, prefill cut inside the image
tokens, decode steps), and greedy generation equals HF generate token for token."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image, random_prompts, verify_vision_language
from hfrewrite.runtime import multimodal

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
    sequences = [multimodal.prepare(model.vision, prompt) for prompt in prompts]
    ours = multimodal.generate_greedy(model, model.vision, sequences, new_tokens, block_size=4)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        theirs = out[0, prompt["input_ids"].shape[1]:].tolist()
        assert tokens == theirs


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


@pytest.mark.parametrize("model_type", ["gemma3", "paligemma"])
def test_bidirectional_image_attention_is_refused(model_type):
    """Gemma 3 / PaliGemma let an image's tokens attend both ways: refused before capture, never run causal."""
    from transformers import AutoConfig

    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.errors import UnsupportedKindError

    with pytest.raises(UnsupportedKindError, match="both directions"):
        kind_for(AutoConfig.for_model(model_type))
    assert kind_for(AutoConfig.for_model("qwen2_vl")).name == "vision-language"  # the others are not refused
