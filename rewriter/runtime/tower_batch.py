"""One vision-tower call for the images of many prompts: what the prompts of a step share.

A prompt's images alone through the tower make small, badly used device calls; HF runs one tower over every
image of a batch. Here the media inputs (pixel values and the tensors the tower takes with them) of several
prompts are joined along their image dim and run as one call, and the features are split back per prompt by
its count of image (or video) tokens, in the order they were joined. The image dim is where images follow each
other: the patch rows of Qwen2-VL / Qwen2.5-VL / Qwen3-VL pixel values (2-D, with their `image_grid_thw` rows:
the tower's own cu_seqlens keeps the images apart, so every shape joins), the image dim of Llava / Mistral 3 /
Gemma 3 pixel values (4-D [images, C, H, W], with Mistral 3's `image_sizes` rows), and dim 1 of Idefics3 /
SmolVLM's 5-D [1, images, C, H, W] pixel values and pixel_attention_mask. Inputs join only where every tensor
but the image dim has the same shape and dtype: prompts are grouped by that (groups sorted, members in their
given order), one call per group.

A prompt the joined call cannot be split for (the group's features do not add up to its token counts, e.g. a
prompt with a wrong image-token count) gets None: its caller runs the tower for it alone, which raises that
prompt's own error. No family here needs the per-prompt path otherwise. Weak spot: the split trusts each
prompt's token count, so two wrong counts that cancel out within one group would pass (alone, each raises).
Mistral 3's pixel values keep each image's size, so images of different sizes go in separate calls (Pixtral
crops by image_sizes, so padding them to one size would be exact too; not done).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

IMAGE_KEYS_SKIPPED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")   # a video's frames (Qwen2-VL), apart from the images
Media = dict[str, torch.Tensor]            # one prompt's media inputs, by the tower's argument names
Outputs = tuple[torch.Tensor, torch.Tensor | None]   # (features [tokens, H], deepstack [L, tokens, H] or None)
TowerCall = Callable[..., Outputs]


def image_dim(pixels: torch.Tensor) -> int:
    """The dim along which a prompt's images (or patch rows) follow each other: 1 for [batch, images, C, H, W]
    pixel values (Idefics3 / SmolVLM), else 0."""
    return 1 if pixels.dim() == 5 else 0


def group_key(media: Media, pixels: str) -> tuple:
    """What must agree for prompts to join: each tensor's name, dtype, rank and shape but the image dim."""
    dim = image_dim(media[pixels])
    return tuple((name, str(t.dtype), t.dim(), tuple(s for i, s in enumerate(t.shape) if i != dim))
                 for name, t in sorted(media.items()))


def shape_groups(media: Sequence[Media], pixels: str) -> list[list[int]]:
    """Indices of `media` grouped by group_key, groups in sorted key order, members in index order."""
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(media):
        groups.setdefault(group_key(item, pixels), []).append(index)
    return [groups[key] for key in sorted(groups)]


def joined(members: Sequence[Media], pixels: str) -> Media:
    """The members' media joined along their image dim (one tensor per name)."""
    dim = image_dim(members[0][pixels])
    return {name: torch.cat([item[name] for item in members], dim=dim) for name in sorted(members[0])}


def batched_outputs(call: TowerCall, media: Sequence[Media], counts: Sequence[int],
                    pixels: str = "pixel_values") -> list[Outputs | None]:
    """Each prompt's tower outputs (its `counts[i]` feature rows, in its images' order), from one call of
    `call(pixels_tensor, **other tensors)` per shape group; None for the prompts of a group whose features do
    not add up to its token counts (see the module docstring)."""
    results: list[Outputs | None] = [None] * len(media)
    for group in shape_groups(media, pixels):
        inputs = joined([media[i] for i in group], pixels)
        features, deep = call(inputs.pop(pixels), **inputs)
        sizes = [counts[i] for i in group]
        if features.shape[0] != sum(sizes) or (deep is not None and deep.shape[1] != sum(sizes)):
            continue
        pieces = torch.split(features, sizes)
        deeps = torch.split(deep, sizes, dim=1) if deep is not None else [None] * len(group)
        for index, piece, deep_piece in zip(group, pieces, deeps):
            results[index] = (piece, deep_piece)
    return results


def token_id(config: Any, kind: str) -> int | None:
    """The config's image (`kind` "image") or video token id (HF names it *_token_id or, older, *_token_index)."""
    found = getattr(config, f"{kind}_token_id", None)
    return getattr(config, f"{kind}_token_index", None) if found is None else found


def media_inputs(inputs: dict[str, torch.Tensor]) -> tuple[Media, Media]:
    """(the image inputs the tower takes: pixel_values and its grids / sizes / masks; the video inputs) of a
    processor output."""
    grids = {key: value for key, value in inputs.items() if key not in IMAGE_KEYS_SKIPPED and value is not None}
    videos = {key: grids.pop(key) for key in VIDEO_KEYS if key in grids}
    return grids, videos


def prompt_outputs(tower: Any, prompts: Sequence[dict[str, torch.Tensor]], ids: Sequence[torch.Tensor],
                   kind: str) -> list[Outputs | None]:
    """Per processor output (prompt ids [n] each), its image (`kind` "image": tower.image_outputs) or video
    ("video": tower.video_features) outputs from the joined calls; None for a prompt without such tokens or
    pixels (its caller handles it as alone) or whose share could not be told."""
    which, pixels = (0, "pixel_values") if kind == "image" else (1, "pixel_values_videos")
    call: TowerCall = tower.image_outputs if kind == "image" else (
        lambda values, **grids: (tower.video_features(values, **grids), None))
    token = token_id(tower.config, kind)
    chosen, media, counts = [], [], []
    for index, (inputs, prompt) in enumerate(zip(prompts, ids)):
        found = media_inputs(inputs)[which]
        count = int((prompt == token).sum()) if token is not None else 0
        if count and pixels in found:
            chosen.append(index)
            media.append(found)
            counts.append(count)
    out: list[Outputs | None] = [None] * len(prompts)
    for index, outputs in zip(chosen, batched_outputs(call, media, counts, pixels)):
        out[index] = outputs
    return out
