"""The typed graph signature: what each input of a compiled graph is, which of its dims change per step, and
where its value comes from.

The one place that names graph inputs (`input_name`) and reads the names back (`GraphInput.parse`): the
capture's token and position inputs, the attention templates' step metadata and per-site KV caches, the
logits template's row index, and the activations a pipeline stage receives. Packing, dynamic-dim marking,
feeding a step and stage links go through it instead of string prefixes of their own.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.fx

from hfrewrite.kernels.attention.op import METADATA_FIELDS

if TYPE_CHECKING:
    from hfrewrite.runtime.kv_cache import KVCache
    from hfrewrite.runtime.step import PackedStep


class Role(enum.Enum):
    TOKENS = "tokens"              # [1, T] packed token ids
    POSITIONS = "positions"        # [1, T] their positions ([3, 1, T] M-RoPE positions of VLMs)
    EMBEDS = "embeds"              # [1, T, H] input embeddings (VLMs: image features at the image tokens)
    VISUAL_ROWS = "visual_rows"    # [N] packed rows of the image tokens (deepstack VLMs, e.g. Qwen3-VL)
    DEEPSTACK = "deepstack"        # [L, N, H] vision features added to the first L decoder layers' outputs
    KEY_LIMIT = "key_limit"        # [T] int32 each token's key end (Gemma 3: an image token sees its image)
    TOKEN_TYPES = "token_types"    # [1, T] segment ids of encoders (BERT's token_type_ids)
    ATTENTION = "attention"        # one field of the step's attention metadata (shared by every site)
    KEY_CACHE = "key_cache"        # the paged key cache of one attention site
    VALUE_CACHE = "value_cache"    # the paged value cache of one attention site
    LOGIT_ROWS = "logit_rows"      # [S] packed rows whose logits are wanted
    ACTIVATION = "activation"      # a value a pipeline stage receives from the stage before


_FIXED_NAMES = {Role.TOKENS: "input_ids", Role.POSITIONS: "position_ids", Role.TOKEN_TYPES: "token_type_ids",
                Role.EMBEDS: "inputs_embeds", Role.LOGIT_ROWS: "logits_index", Role.VISUAL_ROWS: "visual_index",
                Role.DEEPSTACK: "deepstack_embeds", Role.KEY_LIMIT: "key_limit"}
_PREFIXES = {Role.ATTENTION: "attn_", Role.KEY_CACHE: "k_cache_", Role.VALUE_CACHE: "v_cache_"}
CACHE_ROLES = (Role.KEY_CACHE, Role.VALUE_CACHE)


def input_name(role: Role, field: str = "", site: int = -1) -> str:
    """The placeholder name of an input (stable: saved artifacts and stage links carry it)."""
    if role in _FIXED_NAMES:
        return _FIXED_NAMES[role]
    if role is Role.ATTENTION:
        return _PREFIXES[role] + field
    if role in CACHE_ROLES:
        return f"{_PREFIXES[role]}{site}"
    return field


@dataclass(frozen=True)
class GraphInput:
    """One graph input: its name, role, metadata field (ATTENTION) or site (caches)."""

    name: str
    role: Role
    field: str = ""
    site: int = -1

    @classmethod
    def parse(cls, name: str) -> GraphInput:
        for role, fixed in _FIXED_NAMES.items():
            if name == fixed:
                return cls(name, role)
        if name.startswith(_PREFIXES[Role.ATTENTION]):
            return cls(name, Role.ATTENTION, field=name[len(_PREFIXES[Role.ATTENTION]):])
        for role in CACHE_ROLES:
            prefix = _PREFIXES[role]
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                return cls(name, role, site=int(name[len(prefix):]))
        return cls(name, Role.ACTIVATION, field=name)

    @property
    def is_cache(self) -> bool:
        return self.role in CACHE_ROLES

    def mark_dynamic(self, tensor: torch.Tensor) -> None:
        """Tell dynamo which dims change from step to step, so one compiled graph serves every step.

        Token, sequence and context dims are unbacked (no 0/1 specialisation: a batch-1 decode step and a
        64-token prefill share the graph); the cache's slot dim is dynamic; model widths stay static.
        """
        if self.role in (Role.TOKENS, Role.TOKEN_TYPES, Role.EMBEDS):
            torch._dynamo.decorators.mark_unbacked(tensor, 1)
        elif self.role is Role.POSITIONS:  # the token dim is the last ([1, T] or M-RoPE's [3, 1, T])
            torch._dynamo.decorators.mark_unbacked(tensor, tensor.dim() - 1)
        elif self.role in (Role.VISUAL_ROWS, Role.KEY_LIMIT):
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        elif self.role is Role.DEEPSTACK:
            torch._dynamo.decorators.mark_unbacked(tensor, 1)
        elif self.role in (Role.ATTENTION, Role.LOGIT_ROWS):
            for dim in range(tensor.dim()):
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
        elif self.is_cache:
            torch._dynamo.mark_dynamic(tensor, 0)


@dataclass(frozen=True)
class GraphSignature:
    """The inputs of one graph, in placeholder order."""

    inputs: tuple[GraphInput, ...]

    @classmethod
    def of(cls, graph_module: torch.fx.GraphModule) -> GraphSignature:
        return cls(tuple(GraphInput.parse(node.name) for node in graph_module.graph.nodes
                         if node.op == "placeholder"))

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def has(self, role: Role) -> bool:
        return any(spec.role is role for spec in self.inputs)

    def cache_sites(self) -> list[int]:
        return sorted({spec.site for spec in self.inputs if spec.is_cache})

    def feeds(self, step: PackedStep, cache: KVCache, rows: torch.Tensor | None = None,
              activations: Mapping[str, torch.Tensor] | None = None,
              token_type_ids: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None,
              visual: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The graph's inputs for one packed step, in order (token types default to the first segment;
        `visual`: a deepstack VLM's visual_index and deepstack_embeds, an image-block VLM's key_limit, by input
        name)."""
        metadata = dict(zip(METADATA_FIELDS, step.metadata.as_tuple()))
        values: list[torch.Tensor] = []
        for spec in self.inputs:
            if spec.role is Role.TOKENS:
                values.append(step.input_ids)
            elif spec.role is Role.POSITIONS:
                values.append(step.position_ids)
            elif spec.role is Role.TOKEN_TYPES:
                values.append(torch.zeros_like(step.input_ids) if token_type_ids is None else token_type_ids)
            elif spec.role is Role.EMBEDS:
                if inputs_embeds is None:
                    raise ValueError("this graph takes inputs_embeds (a vision-language model): feed them")
                values.append(inputs_embeds)
            elif spec.role in (Role.VISUAL_ROWS, Role.DEEPSTACK, Role.KEY_LIMIT):
                if visual is None or spec.name not in visual:
                    raise ValueError(f"this graph takes {spec.name} (a deepstack or image-block vision-language "
                                     f"model): feed it")
                values.append(visual[spec.name])
            elif spec.role is Role.LOGIT_ROWS:
                values.append(step.logits_index if rows is None else rows)
            elif spec.role is Role.ATTENTION:
                values.append(metadata[spec.field])
            elif spec.is_cache:
                values.append(cache.tensor(spec.role is Role.KEY_CACHE, spec.site))
            else:
                values.append((activations or {})[spec.name])
        return values

    def mark_dynamic(self, inputs: Sequence[torch.Tensor]) -> None:
        for spec, tensor in zip(self.inputs, inputs):
            spec.mark_dynamic(tensor)
