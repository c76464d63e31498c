"""The causal-LM kind: a text decoder with an LM head, [1, T] packed tokens in, logits out, sampled.

Verification feeds packed, chunked, paged prefill and decode steps and compares every token's
logits with HF eager's full-sequence forward (hfrewrite.compiler.verify).
"""
from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from hfrewrite.compiler.kinds.base import ModelKind


def claims(config: PretrainedConfig) -> bool:
    """Whether transformers has a causal LM for this model type."""
    return config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def recurrent_layers(config: PretrainedConfig) -> str | None:
    """The causal-LM class name when transformers marks it stateful (mamba, rwkv, xlstm, hybrids), else None.

    transformers sets `_is_stateful` on models that carry a recurrent state instead of (or beside) a KV cache.
    """
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    name = name[0] if isinstance(name, (list, tuple)) else name
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    return name if model_class is not None and getattr(model_class, "_is_stateful", False) else None


def _verify_logits(compiled: Any, reference: torch.nn.Module | None, kind: ModelKind, seed: int) -> Any:
    from hfrewrite.compiler.verify import verify

    return verify(compiled, reference, seed=seed)


def kind(config: PretrainedConfig) -> ModelKind:
    del config
    return ModelKind(name="causal-lm", auto_class="AutoModelForCausalLM", output="logits", head="sample",
                     verifier=_verify_logits)
