"""The ModelKind record: what capture, verification and the runtime need to know about a kind."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import torch
import torch.fx
import transformers
from transformers.models.auto import modeling_auto

from hfrewrite.runtime.embedding import Pooling

EXAMPLE_TOKENS = 7
MAX_TOKENS = 1 << 16


@dataclass(frozen=True)
class ModelKind:
    """One kind of model, as capture, verification and the runtime see it."""

    name: str                               # "causal-lm" | "embedding"
    auto_class: str                         # the transformers auto class that builds the module
    output: str                             # the field of the HF output that the graph returns
    head: str                               # runtime head: "sample" (generate) or "pool" (embed)
    verifier: Callable[..., Any]            # (compiled, reference, kind, seed) -> result with .passed
    inputs: tuple[str, ...] = ("input_ids", "position_ids")  # graph inputs, [1, T] each
    pooling: Pooling | None = None          # embedding kinds: how hidden states become one vector
    # after export: (HF module, graph) -> None, for what the kind changes in the captured graph
    finish_graph: Callable[[torch.nn.Module, torch.fx.GraphModule], None] | None = None

    def hf_class(self) -> type:
        return getattr(transformers, self.auto_class)

    def example_inputs(self, device: torch.device | str,
                       parameters: Collection[str] | None = None,
                       max_tokens: int = MAX_TOKENS) -> tuple[dict[str, Any], dict[str, Any]]:
        """(kwargs, dynamic_shapes) for torch.export: every input [1, T], T one shared dynamic dim.

        `parameters`: the names the module's forward takes; use_cache=False goes only to one that
        takes it (always, when not given). `max_tokens`: a smaller bound for models whose graph slices a
        fixed-size table by T (gpt_neo's causal-mask buffer)."""
        tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
        example = {"input_ids": torch.zeros(1, EXAMPLE_TOKENS, dtype=torch.long, device=device),
                   "position_ids": torch.arange(EXAMPLE_TOKENS, device=device)[None],
                   "token_type_ids": torch.zeros(1, EXAMPLE_TOKENS, dtype=torch.long, device=device)}
        kwargs: dict[str, Any] = {name: example[name] for name in self.inputs}
        dynamic: dict[str, Any] = {name: {1: tokens} for name in self.inputs}
        if parameters is None or "use_cache" in parameters:
            kwargs["use_cache"], dynamic["use_cache"] = False, None
        return kwargs, dynamic

    def capturing(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """What the kind changes in the HF module while it is exported (nothing, unless a kind says)."""
        return contextlib.nullcontext()

    def reference(self, directory: Path, dtype: torch.dtype, config: Any = None) -> torch.nn.Module:
        """HF's own eager model of this kind on the checkpoint in `directory` (safetensors only; remote code
        only when the user allowed it)."""
        from hfrewrite.compiler import trust

        return self.hf_class().from_pretrained(directory, config=config, dtype=dtype, attn_implementation="eager",
                                               use_safetensors=True,
                                               trust_remote_code=trust.remote_code_allowed()).eval()

    def verify(self, compiled: Any, reference: torch.nn.Module | None, seed: int = 0) -> Any:
        return self.verifier(compiled, reference, self, seed)


def _classes(mapping: dict[str, Any]) -> set[str]:
    """The class names a transformers auto mapping lists (a value may be one name or several)."""
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def base_model_classes() -> set[str]:
    """Class names of transformers' base models (AutoModel), e.g. BertModel, Qwen3Model."""
    return _classes(modeling_auto.MODEL_MAPPING_NAMES)


def causal_lm_classes() -> set[str]:
    return _classes(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
