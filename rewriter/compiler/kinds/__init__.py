"""Model kinds: what a model is (causal LM, embedding) decides how it is captured, verified and run.

A ModelKind says which transformers auto class builds the module, which inputs the graph takes
(with their dynamic token dim), which output it returns, how verification calls HF eager, and the
runtime head (sample tokens, or pool hidden states). `kind_for` picks the kind from the config (and
the model directory, for a sentence-transformers pooling config) through transformers' own auto
mappings and the config's `architectures`, never by model type names.
"""
from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from hfrewrite.compiler.kinds import causal_lm, embedding, vision_language
from hfrewrite.compiler.kinds.base import ModelKind
from hfrewrite.errors import UnsupportedKindError

__all__ = ["ModelKind", "kind_for", "unsupported_kind"]


# Speech models are refused before any kind is asked (several ship a causal-LM class too, e.g.
# WhisperForCausalLM, which is only their decoder); the transformers mappings that list them:
_SPEECH = (modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, modeling_auto.MODEL_FOR_CTC_MAPPING_NAMES,
           modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES)
# What a model is that no kind claims, asked in this order, for the error message.
_UNCLAIMED = (("encoder-decoder", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),)
SUPPORTED = ("causal-lm (AutoModelForCausalLM: text decoders)",
             "embedding (AutoModel: encoder-only models such as BERT, or a decoder body with last-token or "
             "mean pooling)",
             "vision-language (AutoModelForImageTextToText: a vision tower feeding a paged language model)")


def unsupported_kind(config: PretrainedConfig) -> str | None:
    """The kind of a model hfrewrite refuses before asking the supported kinds (speech, encoder-decoder)."""
    if any(config.model_type in mapping for mapping in _SPEECH):
        return "speech"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    return None


def _describe(config: PretrainedConfig) -> str:
    for label, mapping in _UNCLAIMED:
        if config.model_type in mapping:
            return label
    return "unknown (no causal-LM or base-model class in transformers)"


def kind_for(config: PretrainedConfig, directory: Path | None = None) -> ModelKind:
    """The kind of the model of `config` (its files in `directory`, if known), or UnsupportedKindError.

    Order matters: speech and encoder-decoder models are refused first (several ship a decoder-only
    causal-LM class too, e.g. WhisperForCausalLM, which is not the model); then a model is an
    embedding model when it ships a sentence-transformers config, names only base-model classes in
    `architectures`, or is an encoder-only type; otherwise a causal LM when transformers has one.
    """
    refused = unsupported_kind(config)
    recurrent = causal_lm.recurrent_layers(config) if refused is None else None
    if recurrent is not None:
        raise UnsupportedKindError(
            f"model type {config.model_type!r} ({recurrent}) has state-space / recurrent layers, which hfrewrite "
            f"does not support yet: only attention layers get a paged KV cache")
    if refused is None:
        if vision_language.claims(config):
            return vision_language.kind(config)
        if embedding.claims(config, directory):
            return embedding.kind(config, directory)
        if causal_lm.claims(config):
            return causal_lm.kind(config)
    label = refused or _describe(config)
    raise UnsupportedKindError(
        f"model type {config.model_type!r} (architectures {list(config.architectures or [])}) is of the {label} kind, "
        f"which hfrewrite does not support yet; supported kinds: {'; '.join(SUPPORTED)}")
