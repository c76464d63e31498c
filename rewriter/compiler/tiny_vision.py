"""Seeded tiny vision-language models (tiny:qwen2_vl, ...) with a processor that works offline.

A VLM needs more than a config: the image tokens must be real tokens of a tokenizer and the image
processor's patch size must match the vision tower's. So a tiny VLM directory holds the model, a
byte-level tokenizer (256 byte tokens plus the model's special tokens) and the family's Pillow image
processor, saved as one HF processor; AutoProcessor.from_pretrained reads it back like a real one.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto

from hfrewrite.compiler.tiny import _perturb_constants, atomic_directory, config_hash, hf_progress_bars, save_model
from hfrewrite.errors import ModelSourceError

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>", "<image>", "<fake_token_around_image>", "<end_of_utterance>",
           "<global-img>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<start_of_image>", "<end_of_image>",
           "<image_soft_token>")
BYTES = 256
VOCAB = 320  # bytes + special tokens, rounded up
PATCH = 4

# A short Qwen-style chat template: content is a string or a list of {"type": "image"|"text"} parts.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
IDEFICS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)


def is_vision_language(model_type: str) -> bool:
    """Whether transformers has an image-text-to-text model for this type."""
    return model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _token(name: str) -> int:
    return BYTES + SPECIAL.index(name)


def _qwen2_vl(model_type: str) -> PretrainedConfig:
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=_token("<|endoftext|>"), eos_token_id=_token("<|im_end|>"),
                pad_token_id=_token("<|endoftext|>"), initializer_range=0.1)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.1)
    if model_type == "qwen2_5_vl":
        vision.update(out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[1], window_size=16)
        vision.pop("embed_dim"), vision.pop("mlp_ratio")
        vision["hidden_size"] = 32
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                image_token_id=_token("<|image_pad|>"), video_token_id=_token("<|video_pad|>"),
                                vision_start_token_id=_token("<|vision_start|>"),
                                vision_end_token_id=_token("<|vision_end|>"), tie_word_embeddings=False)


def _qwen3_vl(model_type: str) -> PretrainedConfig:
    """Qwen3-VL: interleaved M-RoPE, learned vision positions, deepstack features from vision blocks 0 and 1
    added to the outputs of decoder layers 0 and 1 (of 3, so one layer gets none)."""
    text = dict(_TEXT, num_hidden_layers=3, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                bos_token_id=_token("<|endoftext|>"), eos_token_id=_token("<|im_end|>"),
                pad_token_id=_token("<|endoftext|>"))
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], initializer_range=0.1)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                image_token_id=_token("<|image_pad|>"), video_token_id=_token("<|video_pad|>"),
                                vision_start_token_id=_token("<|vision_start|>"),
                                vision_end_token_id=_token("<|vision_end|>"), tie_word_embeddings=False)


def _qwen_processor(model_type: str, directory: Path) -> None:
    from transformers import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=2, merge_size=2,
                                      min_pixels=8 * 8, max_pixels=32 * 32)
    save_processor_parts(directory, images, byte_tokenizer(), QWEN_TEMPLATE)


def save_processor_parts(directory: Path, images: Any, tokenizer: Any, template: str) -> None:
    """The processor's parts as a hub checkpoint ships them (hfrewrite.compiler.vision.load_processor reads them)."""
    images.save_pretrained(directory)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(template)


def _llava(model_type: str) -> PretrainedConfig:
    text = dict(_TEXT, model_type="llama", bos_token_id=_token("<|endoftext|>"), eos_token_id=_token("<|im_end|>"),
                pad_token_id=_token("<|endoftext|>"))
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, patch_size=PATCH, projection_dim=32)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, image_token_index=_token("<image>"),
                                vision_feature_layer=-1, tie_word_embeddings=False)


def _llava_processor(model_type: str, directory: Path) -> None:
    import json

    from transformers import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    save_processor_parts(directory, images, byte_tokenizer(), LLAVA_TEMPLATE)
    options = {"patch_size": PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (directory / "processor_config.json").write_text(json.dumps(options))


def _idefics3(model_type: str) -> PretrainedConfig:
    """Idefics3 and SmolVLM (the same layout: SigLIP tower, pixel-shuffle connector, llama text model)."""
    text = dict(_TEXT, model_type="llama", bos_token_id=_token("<|endoftext|>"),
                eos_token_id=_token("<end_of_utterance>"), pad_token_id=_token("<|endoftext|>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=PATCH)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, scale_factor=2,
                                image_token_id=_token("<image>"), tie_word_embeddings=False)


def _idefics3_processor(model_type: str, directory: Path) -> None:
    import json

    import transformers

    # the family's Pillow image processor (Idefics3ImageProcessorPil, SmolVLMImageProcessorPil)
    images = getattr(transformers, _CLASS_PREFIX[model_type] + "ImageProcessorPil")(do_image_splitting=True, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 16})
    save_processor_parts(directory, images, byte_tokenizer(), IDEFICS_TEMPLATE)
    (directory / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))  # (16 / 4) ** 2 / 2 ** 2


MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}<|im_end|>{% endif %}{% endfor %}")


def _mistral3(model_type: str) -> PretrainedConfig:
    """Mistral 3: a Pixtral tower (2-D rotary patches, images padded to the batch's largest), a patch merger
    (spatial_merge_size 2) and a Mistral text model."""
    text = dict(_TEXT, model_type="mistral", bos_token_id=_token("<|endoftext|>"), eos_token_id=_token("<|im_end|>"),
                pad_token_id=_token("<|endoftext|>"), sliding_window=None)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=PATCH, initializer_range=0.1)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                image_token_index=_token("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
                                tie_word_embeddings=False)


def _mistral3_processor(model_type: str, directory: Path) -> None:
    import json

    from transformers import PixtralImageProcessorPil

    images = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": PATCH, "width": PATCH})
    save_processor_parts(directory, images, byte_tokenizer(), MISTRAL_TEMPLATE)
    (directory / "processor_config.json").write_text(json.dumps({"patch_size": PATCH, "spatial_merge_size": 2}))


GEMMA3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")
GEMMA3_IMAGE_TOKENS = 16  # per image (4 x 4 after the projector's 2 x 2 pooling of 8 x 8 patches)


def _gemma3(model_type: str) -> PretrainedConfig:
    """Gemma 3: a SigLIP tower, an average-pooling projector and a Gemma 3 text model whose local (sliding) layer
    has a window of 6, shorter than an image's 16 tokens and than every prompt, so that an image token's keys
    (its whole image, AND the window counted back from it) are really cut by the window."""
    text = dict(_TEXT, model_type="gemma3_text", head_dim=16, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                bos_token_id=_token("<|endoftext|>"), eos_token_id=_token("<|im_end|>"),
                pad_token_id=_token("<|endoftext|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=PATCH)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, boi_token_index=_token("<start_of_image>"),
                                eoi_token_index=_token("<end_of_image>"),
                                image_token_index=_token("<image_soft_token>"), tie_word_embeddings=True)


def _gemma3_processor(model_type: str, directory: Path) -> None:
    import json

    from transformers import Gemma3ImageProcessorPil

    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    tokenizer = byte_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"})
    save_processor_parts(directory, images, tokenizer, GEMMA3_TEMPLATE)
    (directory / "processor_config.json").write_text(json.dumps({"image_seq_length": GEMMA3_IMAGE_TOKENS}))


_CLASS_PREFIX = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}
_FAMILIES: dict[str, tuple[Callable[[str], PretrainedConfig], Callable[[str, Path], None]]] = {
    "qwen2_vl": (_qwen2_vl, _qwen_processor),
    "qwen2_5_vl": (_qwen2_vl, _qwen_processor),
    "qwen3_vl": (_qwen3_vl, _qwen_processor),
    "llava": (_llava, _llava_processor),
    "idefics3": (_idefics3, _idefics3_processor),
    "smolvlm": (_idefics3, _idefics3_processor),
    "mistral3": (_mistral3, _mistral3_processor),
    "gemma3": (_gemma3, _gemma3_processor),
}


def supported() -> list[str]:
    return sorted(_FAMILIES)


def _family(model_type: str) -> tuple[Callable[[str], PretrainedConfig], Callable[[str, Path], None]]:
    if model_type not in _FAMILIES:
        raise ModelSourceError(f"no tiny vision-language config for {model_type!r} yet (tiny VLMs: "
                               f"{', '.join(supported())})")
    return _FAMILIES[model_type]


def tiny_vision_config(model_type: str) -> PretrainedConfig:
    """The tiny config of a VLM family: a 2-layer text model and a 2-block vision tower."""
    return _family(model_type)[0](model_type)


def byte_tokenizer(named: dict[str, str] | None = None) -> Any:
    """A fast tokenizer: one token per byte (byte-level BPE without merges) plus the special tokens; `named`:
    special tokens a processor reads by attribute (Gemma 3's tokenizer.boi_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL))  # ids BYTES, BYTES + 1, ... in SPECIAL's order
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=list(SPECIAL[1:]),
                                        **({"extra_special_tokens": named} if named else {}))
    missing = [name for name in SPECIAL if tokenizer.convert_tokens_to_ids(name) != _token(name)]
    if missing:
        raise AssertionError(f"tiny tokenizer ids of {missing} are off")
    return tokenizer


def tiny_vision_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """The HF image-text-to-text model for `config`, fp32, eager attention, weights drawn from `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), dtype=torch.float32,
                                                    attn_implementation="eager")
    _perturb_constants(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_tiny_vision(model_type: str, seed: int, directory: Path) -> None:
    """Model (safetensors), tokenizer and image processor of the tiny VLM into `directory`."""
    config = tiny_vision_config(model_type)
    save_model(tiny_vision_model(config, seed), directory)
    _family(model_type)[1](model_type, directory)


def materialize_tiny_vision(model_type: str, seed: int, cache_dir: Path) -> Path:
    """Build (once) and cache the tiny VLM; its directory (config, safetensors, tokenizer, image processor)."""
    config = tiny_vision_config(model_type)
    target = Path(cache_dir) / "tiny" / f"{model_type}-{seed}-{config_hash(config)}-vlm"
    if not (target / "config.json").is_file():
        with atomic_directory(target) as temp, hf_progress_bars(False):
            write_tiny_vision(model_type, seed, temp)
    return target
