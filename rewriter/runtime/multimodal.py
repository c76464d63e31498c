"""Running a vision-language model: prompts with images through the paged language-model graph.

A prompt's embeddings are made once: its token embeddings with the vision tower's features
scattered at the image tokens, and a video's at the video tokens (in order, as HF's masked_scatter
places them), and its positions (the model's own M-RoPE positions, text after an image continuing
from the image's largest position).
A step then slices each sequence's chunk out of those; generated tokens are embedded one by one,
at position + delta (the model's rope delta). The packing and attention metadata are the LM's.

Generation runs on the ordinary Engine: a request carries its processor output as input source
(PendingSequence: the tower runs on first use, on the thread that steps), and VisionRunner, the
Engine's forward, builds each step's embeddings and positions from its chunks' sources; the pending
sources of a step are resolved together (resolve_all: one tower call over all their images per shape
group, as HF runs one tower for a batch), and scheduling reads a pending source's image spans from its
token types, never running the tower. Decode steps that fit a captured bucket replay from device graphs
(runtime/vision_graphs.py, on an accelerator); everything else runs the LM graph uncaptured.
A deepstack model (Qwen3-VL) also gets, per step, the packed rows of the image tokens and their
features of intermediate vision layers (`visual_inputs`; empty when a step has no image tokens).
A model whose image tokens see their whole image (Gemma 3) gets each step token's key limit
(hfrewrite.runtime.image_blocks), and its prefill chunks end only at image boundaries (VisionRunner's
`chunk_end`, which the Engine asks before it schedules a chunk of a request with a source: the runner has
the model, so any source, the CLI's or the server's, is held to its images).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from hfrewrite.runtime import image_blocks, tower_batch
from hfrewrite.runtime.engine import Engine, Request
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.runner import StagedDecode
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.runtime.step import Chunk, PackedStep, pack
from hfrewrite.runtime.tower_batch import media_inputs, token_id
from hfrewrite.runtime.vision_graphs import vision_serving


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
    spans: tuple[tuple[int, int], ...] = ()  # images whose tokens see the whole image (Gemma 3), [start, end)
    key_limits: torch.Tensor | None = None   # [prompt] int32 key end of each prompt token (those models), else None

    def key_limit(self, start: int, end: int) -> torch.Tensor:
        """[end - start] int32 key ends of tokens start..end-1 (generated tokens: position + 1)."""
        limits = torch.arange(start + 1, end + 1, dtype=torch.int32)
        if self.key_limits is not None and start < len(self.key_limits):
            stop = min(end, len(self.key_limits))
            limits[:stop - start] = self.key_limits[start:stop]
        return limits

    def chunk_end(self, start: int, end: int) -> int:
        """A prefill chunk's end moved out of any image (image_blocks.legal_end)."""
        return image_blocks.legal_end(self.spans, start, end)

    def extra_inputs(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices of the image tokens among start..end-1, counted from start [n]; their deepstack features
        [L, n, H]), or None for a model without deepstack."""
        if self.deepstack is None or self.visual_rows is None:
            return None
        chosen = (self.visual_rows >= start) & (self.visual_rows < end)
        return self.visual_rows[chosen] - start, self.deepstack[:, chosen]

    def inputs(self, tower: Any, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [n, H], positions [rows, n]) of tokens start..end-1 (what verification feeds piece by piece;
        the Engine's VisionRunner builds a whole step at once)."""
        prompt = self.embeds.shape[0]
        embeds, positions = [self.embeds[start:min(end, prompt)]], [self.positions[:, start:min(end, prompt)]]
        if end > prompt:
            first = max(start, prompt)
            embeds.append(tower.embed(torch.tensor(self.ids[first:end], dtype=torch.long)))
            later = torch.arange(first, end, device=self.positions.device) + self.delta
            positions.append(later[None].expand(self.positions.shape[0], -1))
        return torch.cat(embeds), torch.cat(positions, dim=1)


def prompt_ids(inputs: dict[str, torch.Tensor], row: int = 0) -> torch.Tensor:
    """The token ids of batch row `row` of a processor output, without padding."""
    ids = inputs["input_ids"][row]
    return ids[inputs["attention_mask"][row].bool()] if "attention_mask" in inputs else ids


def prepare(tower: Any, inputs: dict[str, torch.Tensor], row: int = 0,
            image: tuple[torch.Tensor, torch.Tensor | None] | None = None,
            video: torch.Tensor | None = None) -> VisionSequence:
    """The sequence of one processor output (batch row `row`, unpadded; images of that row only). `image` /
    `video`: the tower's outputs for its images / videos where they were made already (resolve_all's batched
    call), else the tower runs here."""
    ids = prompt_ids(inputs, row).to(tower.device)
    embeds = tower.embed(ids).clone()
    mask = ids == token_id(tower.config, "image")
    deepstack_layers = getattr(tower, "deepstack_layers", 0)
    deepstack = embeds.new_zeros(deepstack_layers, 0, embeds.shape[1]) if deepstack_layers else None
    grids, videos = media_inputs(inputs)
    video_token = token_id(tower.config, "video")
    video_mask = ids == video_token if video_token is not None else torch.zeros_like(mask)
    if bool(video_mask.any()):
        if "pixel_values_videos" not in videos or "video_grid_thw" not in videos:
            raise ValueError("the prompt has video tokens but no pixel_values_videos / video_grid_thw were given")
        features = video if video is not None else tower.video_features(videos["pixel_values_videos"],
                                                                        videos["video_grid_thw"])
        if features.shape[0] != int(video_mask.sum()):
            raise ValueError(f"{int(video_mask.sum())} video tokens but the vision tower made {features.shape[0]} "
                             f"features")
        embeds[video_mask] = features.to(embeds.dtype)
    if bool(mask.any()):
        if "pixel_values" not in grids:
            raise ValueError("the prompt has image tokens but no pixel values were given")
        pixels = grids.pop("pixel_values")
        features, deep = image if image is not None else tower.image_outputs(pixels, **grids)
        if features.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} image tokens but the vision tower made {features.shape[0]} features")
        embeds[mask] = features.to(embeds.dtype)
        deepstack = deep.to(embeds.dtype) if deep is not None and deepstack is not None else deepstack
    rope = tower.rope_index(ids.cpu(), {**grids, **videos})
    if rope is None:
        positions, delta = torch.arange(len(ids))[None], 0
    else:
        positions, delta = rope
    visual_rows = torch.nonzero(mask).flatten() if deepstack is not None else None
    block_ids = getattr(tower, "block_ids", None)
    spans = image_blocks.prompt_spans(block_ids, inputs, row)
    limits = image_blocks.key_limits(len(ids), spans) if block_ids is not None else None
    return VisionSequence(ids.tolist(), embeds, positions.to(tower.device), delta, deepstack=deepstack,
                          visual_rows=visual_rows, spans=spans, key_limits=limits)


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
    [L, N, H], and an image-block model's key_limit [T], for the pieces packed in vision_step's order; None for
    other models."""
    rows, features, offset = [], [], 0
    for sequence, (start, end) in zip(sequences, pieces):
        extra = sequence.extra_inputs(start, end)
        if extra is not None:
            rows.append(extra[0] + offset)
            features.append(extra[1])
        offset += end - start
    out = {}
    if features:
        out = {"visual_index": torch.cat(rows).to(device), "deepstack_embeds": torch.cat(features, dim=1).to(device)}
    if any(sequence.key_limits is not None for sequence in sequences):
        limits = [sequence.key_limit(start, end) for sequence, (start, end) in zip(sequences, pieces)]
        out["key_limit"] = torch.cat(limits).to(device)
    return out or None


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


@dataclass
class VisionStep:
    """A packed step of the LM graph and its input embeddings [1, T, H] (what VisionRunner runs)."""

    step: PackedStep
    embeds: torch.Tensor
    visual: dict[str, torch.Tensor] | None = None   # a deepstack model's visual_index / deepstack_embeds


@dataclass
class VisionRunner:
    """The Engine's forward for a vision-language model: `prepare` builds a step's embeddings and positions from
    each chunk's source (a VisionSequence; a chunk without one is plain text at positions start..end-1), and
    calling it runs the LM graph on them. With `graphs` (a VisionGraphRunner on `cache`) decode steps that fit a
    captured bucket are staged into its graphs and replayed instead."""

    model: Any
    cache: Any
    graphs: Any = None   # a VisionGraphRunner (runtime/vision_graphs.py) whose graphs run decode steps, or None

    def __post_init__(self) -> None:
        tower = self.model.vision
        inner = getattr(tower.model, "model", tower.model)
        self.rows = 3 if hasattr(inner, "get_rope_index") else 1   # M-RoPE models: (temporal, height, width) rows
        self.key_limit = "key_limit" in self.model.signature.names   # image-block models (Gemma 3)
        self.block_size = self.cache.config.block_size

    def prepare(self, chunks: Sequence[Chunk]) -> VisionStep | StagedDecode:
        """Every token of the step embedded as text in one lookup, then each source's prompt rows (image and video
        features in place) copied over; positions from the sources, generated tokens' on the host (i + delta).
        A decode step a captured graph runs is staged there instead."""
        staged = None if self.graphs is None else self.graphs.stage(chunks, self.resolved)
        if staged is not None:
            return staged
        tower, device = self.model.vision, self.model.device
        step = pack(chunks, self.block_size, device)
        embeds = tower.embed(step.input_ids[0])
        resolve_all(tower, [chunk.source for chunk in chunks if isinstance(getattr(chunk, "source", None),
                                                                           PendingSequence)])
        parts: list[torch.Tensor | list[int]] = []   # prompt positions [rows, n] of sources, or 1-D runs
        rows, features = [], []                        # deepstack: the step's image-token rows and features
        limits = []                                    # image-block models: each token's key end
        offset = 0
        for chunk in chunks:
            start, end = chunk.start, chunk.start + len(chunk.tokens)
            source = getattr(chunk, "source", None)
            if isinstance(source, PendingSequence):
                source = source.resolve(tower)   # resolved above, with the step's other sources
            prompt = 0 if source is None else source.embeds.shape[0]
            if start < prompt:
                stop = min(end, prompt)
                embeds[offset:offset + stop - start] = source.embeds[start:stop]
                parts.append(source.positions[:, start:stop])
            extra = None if source is None else source.extra_inputs(start, end)
            if extra is not None:
                rows.append(extra[0] + offset)
                features.append(extra[1])
            if self.key_limit:
                limits.append(torch.arange(start + 1, end + 1, dtype=torch.int32) if source is None
                              else source.key_limit(start, end))
            delta = 0 if source is None else source.delta
            first = max(start, prompt)
            if end > first:
                parts.append(list(range(first + delta, end + delta)))
            offset += end - start
        position_ids = self._positions(parts, device)
        position_ids = position_ids[:, None].contiguous() if self.rows > 1 else position_ids
        visual = None
        if getattr(tower, "deepstack_layers", 0):   # fed on every step, empty when it has no image tokens
            visual = {"visual_index": torch.cat(rows).to(device) if rows else
                      torch.zeros(0, dtype=torch.long, device=device),
                      "deepstack_embeds": torch.cat(features, dim=1).to(device) if features else
                      embeds.new_zeros(tower.deepstack_layers, 0, embeds.shape[-1])}
        if self.key_limit:
            visual = {**(visual or {}), "key_limit": torch.cat(limits).to(device)}
        return VisionStep(dataclasses.replace(step, position_ids=position_ids), embeds[None], visual)

    def chunk_end(self, source: Any, start: int, end: int) -> int:
        """The end of a prefill chunk [start, end) of `source`'s sequence moved out of its images (the Engine asks
        while it schedules; a pending source's spans come from its token types, its tower runs later, in
        `prepare`, with the step's other sources)."""
        if isinstance(source, PendingSequence):
            return image_blocks.legal_end(source.spans(self.model.vision), start, end)
        return source.chunk_end(start, end)

    def _positions(self, parts: list[torch.Tensor | list[int]], device: torch.device) -> torch.Tensor:
        """[rows, T]: runs of 1-D positions (the same in every row) joined into one tensor each."""
        out: list[torch.Tensor] = []
        run: list[int] = []
        for part in parts + [None]:
            if isinstance(part, list):
                run.extend(part)
                continue
            if run:
                out.append(torch.tensor(run, dtype=torch.long).to(device)[None].expand(self.rows, -1))
                run = []
            if part is not None:
                out.append(part.to(device))
        return torch.cat(out, dim=1)

    def prepare_fed(self, chunks: Sequence[Chunk], tokens: torch.Tensor) -> StagedDecode | None:
        """A decode step staged into a captured graph with its ids copied from `tokens` [S] (drawn on the device, not
        read yet: the Engine's lookahead), or None when no graph runs it (the Engine then waits for the tokens)."""
        return None if self.graphs is None else self.graphs.stage(chunks, self.resolved, tokens)

    def resolved(self, source: Any) -> Any:
        """A chunk's source as its VisionSequence (a pending one resolved here, on the thread that steps)."""
        return source.resolve(self.model.vision) if isinstance(source, PendingSequence) else source

    def __call__(self, prepared: VisionStep | StagedDecode) -> torch.Tensor:
        if isinstance(prepared, StagedDecode):
            return self.graphs.replay(prepared)
        return forward_embeds(self.model, prepared.step, self.cache, prepared.embeds, visual=prepared.visual)


def vision_engine(model: Any, cache_config: CacheConfig, eos_ids: Sequence[int] = (),
                  decode: Callable[[list[int]], str] | None = None, **engine_options: Any) -> Engine:
    """The Engine (continuous batching, chunked prefill, sampling, stop strings, abort) over a compiled VLM,
    with a cache of its own (with decode graphs: the cache they were captured on, kept on the model)."""
    cache, graphs = vision_serving(model, cache_config)
    runner = VisionRunner(model, cache, graphs)
    return Engine(runner, cache_config, model.device, model.max_context, eos_ids, decode, **engine_options)


def vision_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of a VLM: the model's and tokenizer's, and its language model config's (where VLM
    configs keep theirs)."""
    from hfrewrite.runtime.generation import eos_ids

    found = set(eos_ids(model, tokenizer))
    value = getattr(model.config.get_text_config(), "eos_token_id", None)
    found.update([value] if isinstance(value, int) else [int(v) for v in value or ()])
    return sorted(found)


def processor_inputs(processor: Any, messages: Sequence[dict], images: Sequence[Any] = (),
                     videos: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
    """The processor's tensors for a conversation (its chat template, ready for the assistant's turn)."""
    text = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    media: dict[str, Any] = {}
    if images:
        media["images"] = list(images)
    if videos:
        media["videos"] = list(videos)
    return dict(processor(text=[text], return_tensors="pt", **media))


@dataclass
class PendingSequence:
    """A processor output whose VisionSequence is made on first use: the vision tower then runs on the thread
    that runs the steps (a server's engine loop, not its HTTP handlers)."""

    inputs: dict[str, torch.Tensor]
    sequence: VisionSequence | None = None
    _spans: tuple[tuple[int, int], ...] | None = None

    def resolve(self, tower: Any) -> VisionSequence:
        if self.sequence is None:
            self.settle(prepare(tower, self.inputs))
        return self.sequence

    def settle(self, sequence: VisionSequence) -> None:
        """Keep `sequence` as this source's (made by `resolve` or by resolve_all's batched call)."""
        self.sequence, self.inputs = sequence, {}

    def spans(self, tower: Any) -> tuple[tuple[int, int], ...]:
        """Its images' token spans (image-block models, else none), without running the tower."""
        if self.sequence is not None:
            return self.sequence.spans
        if self._spans is None:
            self._spans = image_blocks.prompt_spans(getattr(tower, "block_ids", None), self.inputs)
        return self._spans


def resolve_all(tower: Any, pending: Sequence[PendingSequence]) -> list[VisionSequence]:
    """The sequences of `pending`: those not yet resolved made with one tower call over all their images (and one
    over all their videos) per shape group (hfrewrite.runtime.tower_batch), each prompt then built from its share
    of the features, the same sequences as `resolve` one by one. A prompt whose share cannot be told (see
    tower_batch) runs its tower alone, raising its own error. VisionRunner.prepare calls it for a step's sources."""
    todo = list({id(item): item for item in pending if item.sequence is None}.values())   # first-seen order
    ids = [prompt_ids(item.inputs) for item in todo]
    images = tower_batch.prompt_outputs(tower, [item.inputs for item in todo], ids, "image")
    videos = tower_batch.prompt_outputs(tower, [item.inputs for item in todo], ids, "video")
    for item, image, video in zip(todo, images, videos):
        item.settle(prepare(tower, item.inputs, image=image, video=None if video is None else video[0]))
    return [item.resolve(tower) for item in pending]


def vision_request(tower: Any, inputs: dict[str, torch.Tensor], params: SamplingParams) -> Request:
    """An Engine request of one processor output: its prompt ids, with its (pending) embeddings and positions as
    the request's input source."""
    return Request(prompt_ids(inputs).tolist(), params, source=PendingSequence(dict(inputs)))
