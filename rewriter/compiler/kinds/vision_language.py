"""The vision-language kind: a vision tower feeding image features into a paged language model.

Two graphs. The language model is the HF image-text-to-text model exported with `inputs_embeds`
[1, T, H] (text embeddings with the image features scattered at the image tokens, made by the
runtime, hfrewrite.runtime.multimodal) and `position_ids` ([1, T], or [3, 1, T] for M-RoPE models);
it goes through the same rules as any LM (paged attention, logits rows, TP). The vision tower
(hfrewrite.compiler.vision) is compiled on its own, with non-paged, non-causal SDPA attention.

Deepstack models (Qwen3-VL) also add features of intermediate vision layers to the outputs of the
first L decoder layers at the image tokens. Their graph takes two more inputs: `visual_index` [N]
(the packed rows of the image tokens in the step, ascending) and `deepstack_embeds` [L, N, H] (the
features of those tokens), N dynamic and 0 for a step without image tokens. During capture the
language model's own forward gets them as its `visual_pos_masks` / `deepstack_visual_embeds`, and
its `_deepstack_process` (HF: hidden[mask] += features, a data-dependent boolean index) becomes the
same addition at the given rows (index_add), so the graph needs no nonzero and no host sync.
After export each such addition is filed under the decoder layer whose output it changes
(`file_deepstack_under_layers`), so layer-wise compile and pipeline stages keep the layers in order.

Image-block models (Gemma 3: its forward takes token_type_ids and its modeling module has HF's
`get_block_sequence_ids_for_mask`) let an image's tokens attend to every token of the image. Their graph
takes `key_limit` [T] int32, each token's key end (hfrewrite.runtime.image_blocks); during capture it goes
into HF's forward as an attention kwarg, which transformers hands to every attention call, and the marker
becomes hfrewrite::attention_key_limit there (paged: paged_attention_key_limit). HF's mask (built from
token_type_ids, which the graph never sees) is not traced at all; `require_key_limits` checks that every
attention call of the graph took the limits. PaliGemma (its whole prefix one block, built inline) is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Collection, Iterator

import torch
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from hfrewrite.compiler.kinds.base import EXAMPLE_TOKENS, MAX_TOKENS, ModelKind
from hfrewrite.errors import UnsupportedKindError


def claims(config: PretrainedConfig) -> bool:
    """Whether transformers has an image-text-to-text model for this type."""
    return config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def position_rows(config: PretrainedConfig) -> int:
    """3 for M-RoPE models (temporal, height, width positions per token), else 1 (plain positions)."""
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    return 3 if isinstance(rope, dict) and rope.get("mrope_section") else 1


@dataclass(frozen=True)
class VisionLanguageKind(ModelKind):
    """The LM graph of a VLM: embeddings and (3-D) positions in, logits out."""

    hidden_size: int = 0
    rows: int = 1  # position rows: 3 for M-RoPE
    deepstack: int = 0  # decoder layers that get deepstack vision features added (Qwen3-VL), else 0
    key_limit: bool = False  # image tokens see their whole image (Gemma 3): the graph takes key_limit [T]

    def example_inputs(self, device: torch.device | str, parameters: Collection[str] | None = None,
                       max_tokens: int = MAX_TOKENS) -> tuple[dict[str, Any], dict[str, Any]]:
        tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
        positions = torch.arange(EXAMPLE_TOKENS, device=device)[None]
        kwargs: dict[str, Any] = {
            "inputs_embeds": torch.zeros(1, EXAMPLE_TOKENS, self.hidden_size, device=device),
            "position_ids": positions.expand(self.rows, 1, EXAMPLE_TOKENS).clone() if self.rows > 1 else positions}
        dynamic: dict[str, Any] = {"inputs_embeds": {1: tokens},
                                   "position_ids": {2: tokens} if self.rows > 1 else {1: tokens}}
        if self.deepstack:
            visual = torch.export.Dim("image_tokens", min=0, max=max_tokens)
            kwargs["visual_index"] = torch.tensor([1, 3], device=device)
            kwargs["deepstack_embeds"] = torch.zeros(self.deepstack, 2, self.hidden_size, device=device)
            dynamic["visual_index"], dynamic["deepstack_embeds"] = {0: visual}, {1: visual}
        if self.key_limit:
            kwargs["key_limit"] = torch.arange(1, EXAMPLE_TOKENS + 1, dtype=torch.int32, device=device)
            dynamic["key_limit"] = {0: tokens}
        if parameters is None or "use_cache" in parameters:
            kwargs["use_cache"], dynamic["use_cache"] = False, None
        return kwargs, dynamic

    def capturing(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return deepstack_inputs(model) if self.deepstack else contextlib.nullcontext()

    def attach(self, model: Any, config: PretrainedConfig, weights: Any, backend: str | None) -> None:
        """Build the vision tower on the same weights and keep it on the compiled LM (`model.vision`)."""
        from hfrewrite.compiler.vision import VisionTower

        model.vision = VisionTower(config, lambda specs: weights(specs, {}, model.device, model.dtype),
                                   model.device, model.dtype, backend)

    def warmup(self, model: Any) -> None:
        """Compile the LM graph now: one packed step (a prefill chunk and a decode token) of random embeddings."""
        from hfrewrite.runtime.kv_cache import CacheConfig
        from hfrewrite.runtime.multimodal import forward_embeds
        from hfrewrite.runtime.step import Chunk, pack

        cache = model.new_cache(CacheConfig(block_size=4, num_blocks=4))
        step = pack([Chunk([1, 2, 3], 0, [0]), Chunk([4], 2, [1])], 4, model.device)
        positions = step.position_ids.expand(self.rows, -1)[:, None] if self.rows > 1 else step.position_ids
        embeds = torch.randn(1, 4, self.hidden_size, device=model.device, dtype=model.dtype)
        visual: dict[str, torch.Tensor] = {}
        if self.deepstack:  # two image tokens in the prefill chunk
            visual = {"visual_index": torch.tensor([1, 2], device=model.device),
                      "deepstack_embeds": torch.randn(self.deepstack, 2, self.hidden_size, device=model.device,
                                                      dtype=model.dtype)}
        if self.key_limit:  # the prefill chunk's tokens 1 and 2 an image
            visual["key_limit"] = torch.tensor([1, 3, 3, 3], dtype=torch.int32, device=model.device)
        forward_embeds(model, dataclasses.replace(step, position_ids=positions.contiguous()), cache, embeds,
                       visual=visual or None)


@contextlib.contextmanager
def deepstack_inputs(model: torch.nn.Module) -> Iterator[None]:
    """While exporting: the language model takes `visual_index` and `deepstack_embeds` (see module docstring)."""
    from hfrewrite.compiler.vision import language_prefix

    language = model.get_submodule(language_prefix(model))
    if not hasattr(language, "_deepstack_process"):
        raise UnsupportedKindError(f"{type(language).__name__} has deepstack vision layers but no _deepstack_process "
                                   f"for hfrewrite to feed them through (transformers changed it?)")
    forward = language.forward

    def fed(*args: Any, visual_index: torch.Tensor, deepstack_embeds: torch.Tensor, **kwargs: Any) -> Any:
        kwargs.update(visual_pos_masks=visual_index, deepstack_visual_embeds=list(deepstack_embeds.unbind(0)))
        return forward(*args, **kwargs)

    language.forward = fed
    language._deepstack_process = add_at_rows
    try:
        yield
    finally:
        del language.forward, language._deepstack_process


def file_deepstack_under_layers(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> None:
    """Give each deepstack addition (an index_add of features derived from the deepstack_embeds input) the
    module stack of the hidden states it adds to: the output of the decoder layer before it in HF's loop."""
    features = [n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == "deepstack_embeds"]
    if not features:
        return
    derived = {features[0]}  # the features and what is computed from them alone (select, to, unsqueeze)
    for node in graph_module.graph.nodes:  # topological order
        if node.op != "call_function" or not any(i in derived for i in node.all_input_nodes):
            continue
        if node.target is torch.ops.aten.index_add.default and node.args[0] not in derived:
            stack = node.args[0].meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = dict(stack)
        elif all(i in derived or i.op in ("placeholder", "get_attr") for i in node.all_input_nodes):
            derived.add(node)


def add_at_rows(hidden_states: torch.Tensor, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """hidden_states [1, T, H] with `features` [N, H] added at `rows` [N]: HF's `hidden[mask] += features`
    (one addition per element, in the hidden states' dtype) with the mask's rows given instead."""
    return hidden_states.index_add(1, rows, features.to(hidden_states.dtype)[None])


def require_key_limits(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> None:
    """After export of an image-block model: every attention call took the key limits (a model whose attention
    does not receive HF's kwargs would otherwise be captured causal, silently)."""
    from hfrewrite.errors import CaptureError

    limit = next((n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == "key_limit"), None)
    plain = sorted(n.name for n in graph_module.graph.nodes
                   if n.op == "call_function" and n.target is torch.ops.hfrewrite.attention.default)
    if limit is None or not limit.users or plain:
        raise CaptureError(f"{type(model).__name__}: its image tokens attend to their whole image, but "
                           f"{'no attention call' if limit is None or not limit.users else ', '.join(plain)} took "
                           f"the key_limit input (transformers no longer passes attention kwargs through?)")


def _finish(deepstack: bool, key_limit: bool) -> Any:
    """The kind's after-export step: file deepstack additions under their layers, check the key limits."""
    if not (deepstack or key_limit):
        return None

    def finish(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> None:
        if deepstack:
            file_deepstack_under_layers(model, graph_module)
        if key_limit:
            require_key_limits(model, graph_module)

    return finish


def _verify(compiled: Any, reference: torch.nn.Module | None, kind: ModelKind, seed: int) -> Any:
    from hfrewrite.compiler.vision_verify import verify_vision_language

    return verify_vision_language(compiled, reference, seed=seed)


def marks_image_tokens(config: PretrainedConfig) -> bool:
    """Whether the model's forward takes token_type_ids: Gemma 3 and PaliGemma mark image tokens with them and
    let the tokens of one image (PaliGemma: of the prefix) attend to each other in both directions."""
    import inspect

    import transformers

    name = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    return model_class is not None and "token_type_ids" in inspect.signature(model_class.forward).parameters


def kind(config: PretrainedConfig) -> ModelKind:
    vision = getattr(config, "vision_config", None)
    from hfrewrite.compiler.vision import image_block_ids

    key_limit = marks_image_tokens(config)
    if key_limit and image_block_ids(config) is None:
        raise UnsupportedKindError(
            f"model type {config.model_type!r} lets tokens attend to each other in both directions (its forward "
            f"marks them with token_type_ids) by a rule hfrewrite does not know: its modeling module has no "
            f"get_block_sequence_ids_for_mask (Gemma 3's image blocks, which are supported; PaliGemma's "
            f"bidirectional prefix is not yet); hfrewrite's paged attention would compute a different function")
    deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
    inputs = (("inputs_embeds", "position_ids") + (("visual_index", "deepstack_embeds") if deepstack else ())
              + (("key_limit",) if key_limit else ()))
    return VisionLanguageKind(name="vision-language", auto_class="AutoModelForImageTextToText", output="logits",
                              head="sample", verifier=_verify, inputs=inputs,
                              hidden_size=int(config.get_text_config().hidden_size), rows=position_rows(config),
                              deepstack=deepstack, key_limit=key_limit,
                              finish_graph=_finish(bool(deepstack), key_limit))
