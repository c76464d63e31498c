"""`hfrewrite generate MODEL --image PATH --prompt TEXT`: prompts with local images through a compiled VLM.

The chat template and image preprocessing are the model's own processor's. Images pair with prompts:
with one prompt every image goes into it (in order, before the text); with several prompts, one image
per prompt (as many images as prompts). `--video` is a video as its frames (a directory of frame
images or a list of them; nothing is decoded), through the processor's `videos=`. Generation runs on
the Engine (sampling, stop strings) as text generate does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hfrewrite.errors import HfRewriteError


class ImageInputError(HfRewriteError):
    """An --image that cannot be used (missing or unreadable file, or images that do not pair with prompts)."""


def open_image(path: str, option: str = "--image") -> Any:
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ImageInputError(f"{option} {path}: no such file (images are local files)")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ImageInputError(f"{option} {path}: cannot read it as an image: {error}") from error


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def open_frames(spec: str) -> list[Any]:
    """A video's frames: the image files of a directory (in name order) or a comma-separated list of files."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        paths = sorted(str(f) for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ImageInputError(f"--video {spec}: the directory holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        paths = [part for part in spec.split(",") if part]
    frames = [open_image(path, "--video") for path in paths]
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ImageInputError(f"--video {spec}: the frames differ in size ({sizes[0]} and {sizes[1]})")
    return frames


def pair_images(prompts: list[str], images: list[str]) -> list[list[str]]:
    if len(prompts) == 1:
        return [images]
    if len(images) not in (0, len(prompts)):
        raise ImageInputError(f"{len(images)} --image for {len(prompts)} --prompt: give one image per prompt, "
                              f"or one prompt with any number of images")
    return [[image] for image in images] if images else [[] for _ in prompts]


def cmd_generate_vision(args: argparse.Namespace, result: Any) -> int:
    """Stream the continuations of prompts with images through the Engine (sampling and stop strings as for text)."""
    from hfrewrite.compiler.vision import load_processor, takes_videos
    from hfrewrite.runtime import multimodal
    from hfrewrite.runtime.generation import make_decode
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams

    model = result.model
    processor = load_processor(result.source.directory, result.source.config)
    if args.tp > 1 and args.seed is None:
        from hfrewrite.parallel import distributed

        args.seed = distributed.shared_seed()  # every rank must sample the same tokens
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    videos = [open_frames(spec) for spec in args.video or []]
    if videos and len(args.prompt) > 1:
        raise ImageInputError(f"--video goes with one --prompt ({len(args.prompt)} given)")
    if videos and not takes_videos(processor):
        raise ImageInputError(f"--video needs the video processor of model type {result.source.config.model_type!r}; "
                              f"transformers builds one only with torchvision installed (pip install torchvision)")
    requests = []
    for text, paths in zip(args.prompt, pair_images(args.prompt, list(args.image or []))):
        images = [open_image(path) for path in paths]
        content = ([{"type": "video"} for _ in videos] + [{"type": "image"} for _ in images]
                   + [{"type": "text", "text": text}])
        inputs = multimodal.processor_inputs(processor, [{"role": "user", "content": content}], images, videos)
        requests.append(multimodal.vision_request(model.vision, inputs, params))
    tokenizer = processor.tokenizer
    engine = multimodal.vision_engine(model, CacheConfig(args.block_size, args.num_blocks),
                                      multimodal.vision_eos_ids(model, tokenizer), make_decode(tokenizer))
    from hfrewrite.cli_stream import print_events

    return print_events(engine.run(requests), args.prompt)
