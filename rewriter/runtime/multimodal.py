"""Running a vision-language model: prompts with images through the paged language-model graph.

A prompt's embeddings are made once: its token embeddings with the vision tower's features
scattered at the image tokens (in order, as HF's masked_scatter places them), and its positions (the
model's own M-RoPE positions, text after an image continuing from the image's largest position).
A step then slices each sequence's chunk out of those; generated tokens are embedded one by one,
at position + delta (the model's rope delta). The packing and attention metadata are the LM's.
A deepstack model (Qwen3-VL) also gets, per step, the packed rows of the image tokens and their
features of intermediate vision layers (`visual_inputs`; empty when a step has no image tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.runtime.step import Chunk, PackedStep, pack

IMAGE_KEYS_SKIPPED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class VisionSequence:
    """One sequence: its prompt's embeddings and positions, then the tokens generated after it."""

    ids: list[int]                 # prompt ids, then generated ids
    embeds: torch.Tensor           # [prompt, H]
    positions: torch.Tensor        # [rows, prompt]
    delta: int = 0                 # position of a generated token at index i: i + delta
    blocks: list[int] = field(default_factory=list)
    deepstack: torch.Tensor | None = None    # [L, image tokens, H] deepstack features (Qwen3-VL), else None
    visual_rows: torch.Tensor | None = None  # [image tokens] prompt indices of the image tokens (deepstack)

    def extra_inputs(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices of the image tokens among start..end-1, counted from start [n]; their deepstack features
        [L, n, H]), or None for a model without deepstack."""
        if self.deepstack is None or self.visual_rows is None:
            return None
        chosen = (self.visual_rows >= start) & (self.visual_rows < end)
        return self.visual_rows[chosen] - start, self.deepstack[:, chosen]

    def inputs(self, tower: Any, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [n, H], positions [rows, n]) of tokens start..end-1."""
        prompt = self.embeds.shape[0]
        embeds, positions = [self.embeds[start:min(end, prompt)]], [self.positions[:, start:min(end, prompt)]]
        if end > prompt:
            first = max(start, prompt)
            embeds.append(tower.embed(torch.tensor(self.ids[first:end], dtype=torch.long)))
            later = torch.arange(first, end, device=self.positions.device) + self.delta
            positions.append(later[None].expand(self.positions.shape[0], -1))
        return torch.cat(embeds), torch.cat(positions, dim=1)


def prepare(tower: Any, inputs: dict[str, torch.Tensor], row: int = 0) -> VisionSequence:
    """The sequence of one processor output (batch row `row`, unpadded; images of that row only)."""
    ids = inputs["input_ids"][row]
    if "attention_mask" in inputs:
        ids = ids[inputs["attention_mask"][row].bool()]
    ids = ids.to(tower.device)
    embeds = tower.embed(ids).clone()
    image_token = getattr(tower.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(tower.config, "image_token_index", None)
    mask = ids == image_token
    deepstack_layers = getattr(tower, "deepstack_layers", 0)
    deepstack = embeds.new_zeros(deepstack_layers, 0, embeds.shape[1]) if deepstack_layers else None
    grids = {key: value for key, value in inputs.items() if key not in IMAGE_KEYS_SKIPPED and value is not None}
    if bool(mask.any()):
        if "pixel_values" not in grids:
            raise ValueError("the prompt has image tokens but no pixel values were given")
        features, deep = tower.image_outputs(grids.pop("pixel_values"), **grids)
        if features.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} image tokens but the vision tower made {features.shape[0]} features")
        embeds[mask] = features.to(embeds.dtype)
        deepstack = deep.to(embeds.dtype) if deep is not None and deepstack is not None else deepstack
    rope = tower.rope_index(ids.cpu(), grids)
    if rope is None:
        positions, delta = torch.arange(len(ids))[None], 0
    else:
        positions, delta = rope
    visual_rows = torch.nonzero(mask).flatten() if deepstack is not None else None
    return VisionSequence(ids.tolist(), embeds, positions.to(tower.device), delta, deepstack=deepstack,
                          visual_rows=visual_rows)


def vision_step(tower: Any, sequences: Sequence[VisionSequence], pieces: Sequence[tuple[int, int]],
                block_size: int, device: torch.device) -> tuple[PackedStep, torch.Tensor]:
    """The packed step of `pieces` ((start, end) of each sequence) and its input embeddings [1, T, H]."""
    chunks, embeds, positions = [], [], []
    for sequence, (start, end) in zip(sequences, pieces):
        chunks.append(Chunk(sequence.ids[start:end], start, sequence.blocks))
        e, p = sequence.inputs(tower, start, end)
        embeds.append(e)
        positions.append(p)
    step = pack(chunks, block_size, device)
    rows = torch.cat(positions, dim=1).to(device)
    position_ids = rows[:, None] if rows.shape[0] > 1 else rows
    return dataclasses.replace(step, position_ids=position_ids), torch.cat(embeds)[None].to(device)


def visual_inputs(sequences: Sequence[VisionSequence], pieces: Sequence[tuple[int, int]],
                  device: torch.device) -> dict[str, torch.Tensor] | None:
    """A deepstack model's visual_index [N] (packed rows of the step's image tokens) and deepstack_embeds
    [L, N, H], for the pieces packed in vision_step's order; None for other models."""
    rows, features, offset = [], [], 0
    for sequence, (start, end) in zip(sequences, pieces):
        extra = sequence.extra_inputs(start, end)
        if extra is not None:
            rows.append(extra[0] + offset)
            features.append(extra[1])
        offset += end - start
    if not features:
        return None
    return {"visual_index": torch.cat(rows).to(device), "deepstack_embeds": torch.cat(features, dim=1).to(device)}


@torch.no_grad()
def forward_embeds(compiled: Any, step: PackedStep, cache: Any, embeds: torch.Tensor,
                   rows: torch.Tensor | None = None, visual: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [len(rows), V] of the LM graph fed `embeds` (what CompiledModel.forward is for token ids) and, for a
    deepstack model, `visual` (visual_inputs)."""
    rows = step.logits_index if rows is None else rows
    logits = compiled.call(compiled.signature.feeds(step, cache, rows, inputs_embeds=embeds, visual=visual))
    if not compiled.selects_rows:
        logits = logits[:, rows]
    return logits[0]


@torch.no_grad()
def generate_greedy(compiled: Any, tower: Any, sequences: Sequence[VisionSequence], max_new_tokens: int,
                    eos: Sequence[int] = (), block_size: int = 16) -> list[list[int]]:
    """Greedy tokens per sequence: all prompts prefilled in one packed step, then batched decode steps."""
    total = [len(s.ids) + max_new_tokens for s in sequences]
    config = CacheConfig(block_size=block_size, num_blocks=sum(-(-n // block_size) for n in total) + 1)
    cache, allocator = compiled.new_cache(config), BlockAllocator(config.num_blocks)
    for sequence, need in zip(sequences, total):
        sequence.blocks = allocator.allocate(config.blocks_for(need))
    out: list[list[int]] = [[] for _ in sequences]
    active = list(range(len(sequences)))
    pieces = {i: (0, len(sequences[i].ids)) for i in active}
    while active:
        step, embeds = vision_step(tower, [sequences[i] for i in active], [pieces[i] for i in active],
                                   block_size, compiled.device)
        visual = visual_inputs([sequences[i] for i in active], [pieces[i] for i in active], compiled.device)
        tokens = forward_embeds(compiled, step, cache, embeds, visual=visual).argmax(-1).tolist()
        still = []
        for i, token in zip(active, tokens):
            out[i].append(int(token))
            sequences[i].ids.append(int(token))
            if len(out[i]) < max_new_tokens and int(token) not in eos:
                still.append(i)
                pieces[i] = (len(sequences[i].ids) - 1, len(sequences[i].ids))
        active = still
    return out
