"""Verification of a vision-language model against HF eager, on random images of several sizes.

One batch mixes prompts with images of different sizes (one with two images) and a text-only prompt;
each is fed through the paged LM in pieces (a prefill chunk cut inside the image tokens, the rest of
the prompt, then single decode tokens at position + rope delta), every step packing the next piece
of every sequence. Every token's logits are compared with HF's full forward on the same pixel values
and ids (HF computes the positions of the whole sequence itself). The tolerances are the LM's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from hfrewrite.compiler.verify import VerifyResult, tolerances
from hfrewrite.compiler.vision import load_processor
from hfrewrite.runtime import multimodal
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig

IMAGE_SIZES = ((16, 24), (32, 16), (24, 24))  # (height, width) of the random images, pixels


def random_image(generator: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray((generator.random((height, width, 3)) * 255).astype("uint8"))


def random_prompts(processor: Any, seed: int) -> list[dict[str, torch.Tensor]]:
    """Processor outputs (one prompt each): one image, two images of other sizes, text only."""
    generator = np.random.default_rng(seed)
    images = [random_image(generator, h, w) for h, w in IMAGE_SIZES]
    words = ["".join(chr(int(c)) for c in generator.integers(97, 123, 5)) for _ in range(6)]
    contents = [[{"type": "image"}, {"type": "text", "text": f"{words[0]} {words[1]}"}],
                [{"type": "text", "text": words[2]}, {"type": "image"}, {"type": "text", "text": words[3]},
                 {"type": "image"}],
                [{"type": "text", "text": f"{words[4]} {words[5]}"}]]
    per_prompt = [images[:1], images[1:], []]
    out = []
    for content, prompt_images in zip(contents, per_prompt):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        out.append(dict(processor(text=[text], images=prompt_images or None, return_tensors="pt")))
    return out


def _pieces(sequence: multimodal.VisionSequence, image_token: Any, decode: int,
            generator: torch.Generator, chunk: int | None = None) -> list[tuple[int, int]]:
    """A first chunk ending inside the image tokens (when there are any), the rest, then single tokens;
    or, given `chunk`, the prompt in chunks of that many tokens, then single tokens. A model whose image tokens
    see their whole image moves each end out of the images (VisionSequence.chunk_end), as the Engine does."""
    ids = torch.tensor(sequence.ids)
    where = torch.nonzero(ids == image_token).flatten()
    prompt = sequence.embeds.shape[0]
    if chunk is not None:
        pieces, start = [], 0
        while start < prompt:
            end = sequence.chunk_end(start, min(start + chunk, prompt))
            pieces.append((start, end))
            start = end
    else:
        if len(where) > 1:
            cut = int(where[len(where) // 2])
        else:
            cut = int(torch.randint(1, prompt, (1,), generator=generator))
        cut = sequence.chunk_end(0, cut)
        pieces = [(0, cut), (cut, prompt)] if 0 < cut < prompt else [(0, prompt)]
    pieces += [(prompt + i, prompt + i + 1) for i in range(decode)]
    return pieces


@torch.no_grad()
def verify_vision_language(compiled: Any, reference: torch.nn.Module | None, *, seed: int = 0, decode_steps: int = 3,
                           block_size: int = 4, atol: float | None = None,
                           chunk: int | None = None) -> VerifyResult | None:
    """Compare every token's logits (prefill chunks and decode steps, batched and paged) with HF eager;
    `chunk`: prefill in chunks of that many tokens instead of one cut inside the image tokens."""
    tower = compiled.vision
    processor = load_processor(tower.directory, compiled.config)
    generator = torch.Generator().manual_seed(seed)
    prompts = random_prompts(processor, seed)
    sequences = [multimodal.prepare(tower, prompt) for prompt in prompts]
    vocab = int(compiled.config.get_text_config().vocab_size)
    image_token = getattr(compiled.config, "image_token_id", getattr(compiled.config, "image_token_index", None))
    for sequence in sequences:  # the decode tokens: random text tokens (no image tokens)
        extra = torch.randint(0, min(vocab, 256), (decode_steps,), generator=generator)
        sequence.ids.extend(int(t) for t in extra)
    plans = [_pieces(s, image_token, decode_steps, generator, chunk) for s in sequences]
    config = CacheConfig(block_size=block_size,
                         num_blocks=sum(-(-len(s.ids) // block_size) for s in sequences) + 2)
    cache, allocator = compiled.new_cache(config), BlockAllocator(config.num_blocks)
    for sequence in sequences:
        sequence.blocks = allocator.allocate(config.blocks_for(len(sequence.ids)))
    got: list[list[torch.Tensor]] = [[] for _ in sequences]
    while any(plans):
        active = [i for i, plan in enumerate(plans) if plan]
        pieces = [plans[i].pop(0) for i in active]
        step, embeds = multimodal.vision_step(tower, [sequences[i] for i in active], pieces, block_size,
                                              compiled.device)
        rows = torch.arange(step.input_ids.shape[1], device=compiled.device)
        visual = multimodal.visual_inputs([sequences[i] for i in active], pieces, compiled.device)
        logits = multimodal.forward_embeds(compiled, step, cache, embeds, rows=rows, visual=visual).float().cpu()
        offset = 0
        for i, (start, end) in zip(active, pieces):
            got[i].append(logits[offset:offset + end - start])
            offset += end - start
    ours = [torch.cat(parts) for parts in got]
    if reference is None:
        return None
    theirs = []
    for prompt, sequence in zip(prompts, sequences):
        inputs = {k: v.to(compiled.device) for k, v in prompt.items() if k not in ("attention_mask",)}
        inputs["input_ids"] = torch.tensor([sequence.ids], device=compiled.device)
        if "mm_token_type_ids" in inputs:  # the appended decode tokens are text
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token).int()
        if "token_type_ids" in inputs:  # Gemma 3: its image blocks; the appended decode tokens are text (0)
            types = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat(
                [types, types.new_zeros(1, inputs["input_ids"].shape[1] - types.shape[1])], dim=1)
        theirs.append(reference(**inputs).logits[0].float().cpu())
    default_atol, min_top1 = tolerances(compiled.dtype)
    atol = default_atol if atol is None else atol
    errors = [float((o - t).abs().max()) for o, t in zip(ours, theirs)]
    top1 = float(torch.cat([(o.argmax(-1) == t.argmax(-1)).float() for o, t in zip(ours, theirs)]).mean())
    finite = all(bool(torch.isfinite(o).all()) for o in ours)
    max_err = max(errors)
    logprob = max(float((torch.log_softmax(o, -1) - torch.log_softmax(t, -1)).abs().max())
                  for o, t in zip(ours, theirs))
    passed = finite and max_err <= atol and top1 >= min_top1
    reason = None if passed else ("non-finite logits" if not finite else f"max |err| {max_err:.3g} > {atol:.3g}")
    return VerifyResult(passed, max_err, top1, logprob, sum(len(o) for o in ours), len(ours), atol, min_top1,
                        reason=reason, longest=max(len(s.ids) for s in sequences))
