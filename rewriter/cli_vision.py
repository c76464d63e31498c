"""`hfrewrite generate MODEL --image PATH --prompt TEXT`: prompts with local images through a compiled VLM.

The chat template and image preprocessing are the model's own processor's. Images pair with prompts:
with one prompt every image goes into it (in order, before the text); with several prompts, one image
per prompt (as many images as prompts).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hfrewrite.errors import HfRewriteError


class ImageInputError(HfRewriteError):
    """An --image that cannot be used (missing or unreadable file, or images that do not pair with prompts)."""


def open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ImageInputError(f"--image {path}: no such file (images are local files)")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ImageInputError(f"--image {path}: cannot read it as an image: {error}") from error


def pair_images(prompts: list[str], images: list[str]) -> list[list[str]]:
    if len(prompts) == 1:
        return [images]
    if len(images) not in (0, len(prompts)):
        raise ImageInputError(f"{len(images)} --image for {len(prompts)} --prompt: give one image per prompt, "
                              f"or one prompt with any number of images")
    return [[image] for image in images] if images else [[] for _ in prompts]


def cmd_generate_vision(args: argparse.Namespace, result: Any) -> int:
    """Greedy continuations of prompts with images (sampling options other than greedy are refused)."""
    from hfrewrite.compiler.vision import load_processor
    from hfrewrite.runtime import multimodal
    from hfrewrite.runtime.generation import eos_ids

    if args.temperature != 0.0:
        raise ImageInputError("generation with images is greedy only for now (--temperature 0)")
    model = result.model
    processor = load_processor(result.source.directory, result.source.config)
    sequences = []
    for text, paths in zip(args.prompt, pair_images(args.prompt, list(args.image or []))):
        images = [open_image(path) for path in paths]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        inputs = processor(text=[chat], images=images or None, return_tensors="pt")
        sequences.append(multimodal.prepare(model.vision, dict(inputs)))
    outputs = multimodal.generate_greedy(model, model.vision, sequences, args.max_new_tokens,
                                         eos=eos_ids(model, processor.tokenizer), block_size=args.block_size)
    for index, (text, tokens) in enumerate(zip(args.prompt, outputs)):
        decoded = processor.tokenizer.decode(tokens, skip_special_tokens=True)
        print(decoded if len(outputs) == 1 else f"[{index}] {text!r}\n{decoded}\n", flush=True)
    return 0
