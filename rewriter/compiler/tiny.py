"""Seeded random tiny models of any transformers decoder type.

Tests and `tiny:<type>` model ids need every architecture at toy size: real enough that each code
path runs (MoE routing, sliding windows that actually bite, MLA, softcapping), small enough that a
forward takes milliseconds on a CPU.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hfrewrite.compiler.atomic import atomic_directory
from hfrewrite.errors import ModelSourceError

try:
    from huggingface_hub.errors import StrictDataclassError as _StrictConfigError
except ImportError:  # older huggingface_hub: configs are not strict dataclasses, errors are ValueErrors
    _StrictConfigError = ValueError

SLIDING, FULL = "sliding_attention", "full_attention"

# Generic size names -> small values; each is set only where the config has that attribute
# (after translating through the config's attribute_map, e.g. hidden_size -> n_embd for gpt2).
_SMALL: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "original_max_position_embeddings": 512,
    "initializer_range": 0.1,
    # MoE
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    # deepseek MLA: q/kv low-rank projections and split nope/rope head dims
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}
_SMALL_WINDOW = 8
_TOKEN_FALLBACK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def known_model_types() -> list[str]:
    """Every model type transformers can build a config for."""
    return sorted(CONFIG_MAPPING.keys())


def _base_config(model_type: str) -> PretrainedConfig:
    """The type's default (full-size) config, or a ModelSourceError with close names."""
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, known_model_types(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSourceError(f"unknown transformers model type {model_type!r} in 'tiny:{model_type}'{hint}")
    return AutoConfig.for_model(model_type)


def _canonical(base: PretrainedConfig, key: str) -> str:
    """Translate a generic name (hidden_size) to the config's own field (n_embd for gpt2)."""
    return base.attribute_map.get(key, key)


def _has(base: PretrainedConfig, key: str) -> bool:
    """Whether the config type has a field named `key` (directly or via attribute_map)."""
    return key in base.attribute_map or key in base.to_dict() or hasattr(base, key)


def _read_only(base: PretrainedConfig, key: str) -> bool:
    """A derived config property without a setter (falcon's head_dim): it cannot be passed."""
    attribute = getattr(type(base), key, None)
    return isinstance(attribute, property) and attribute.fset is None


def _fix_token(value: Any, fallback: int, vocab: int) -> Any:
    """Keep a token id (or list of ids) valid for a tiny vocabulary."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_fix_token(v, fallback + i, vocab) for i, v in enumerate(value)]
    return value if 0 <= value < vocab else min(fallback, vocab - 1)


def _layer_types(base: PretrainedConfig, made: PretrainedConfig, layers: int) -> list[str] | None:
    """layer_types for `layers` layers: the type's own pattern, with both kinds kept if it mixes them."""
    base_types = getattr(base, "layer_types", None)
    made_types = getattr(made, "layer_types", None)
    if not base_types:
        return None
    pattern = list(made_types) if made_types and len(made_types) == layers else \
        [base_types[i % len(base_types)] for i in range(layers)]
    mixes = SLIDING in base_types and FULL in base_types
    if mixes and layers >= 2 and not (SLIDING in pattern and FULL in pattern):
        pattern[0], pattern[-1] = SLIDING, FULL
    return pattern


def _defaults(base: PretrainedConfig) -> dict[str, Any]:
    """The small sizes for the fields this config type has, under its own field names."""
    values = {_canonical(base, key): value for key, value in _SMALL.items()
              if _has(base, key) and not _read_only(base, _canonical(base, key))}
    if getattr(base, "sliding_window", None):
        values["sliding_window"] = _SMALL_WINDOW
    if _rope_sized_heads(base):
        values["head_dim"] = values["qk_rope_head_dim"]
    return values


def _rope_sized_heads(base: PretrainedConfig) -> bool:
    """MLA configs whose head_dim is the rotary part of a head (DeepSeek-V3 and its kin): their rotary tables
    are sized by head_dim, so it must follow qk_rope_head_dim (some configs derive it, others take it as given)."""
    rope = getattr(base, "qk_rope_head_dim", None)
    return isinstance(rope, int) and "head_dim" in base.to_dict() and base.to_dict()["head_dim"] == rope


def _translate(base: PretrainedConfig, overrides: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Overrides under the type's own field names; fields the type lacks are dropped.

    One drawn set of sizes must fit every type. A head_dim for a type without that field (gpt2,
    qwen2, ...) sets hidden_size = heads * head_dim unless hidden_size is given too (it wins).
    """
    given = {_canonical(base, key): value for key, value in overrides.items()}
    if "head_dim" in given and _rope_sized_heads(base):
        head_dim = given.pop("head_dim")
        given.setdefault("qk_nope_head_dim", head_dim)
        given.setdefault("v_head_dim", head_dim)
        given.setdefault("qk_rope_head_dim", max(2, head_dim // 4 * 2))
        given["head_dim"] = given["qk_rope_head_dim"]
    elif "head_dim" in given and "head_dim" not in base.to_dict():
        head_dim = given.pop("head_dim")
        heads_key = _canonical(base, "num_attention_heads")
        given.setdefault(_canonical(base, "hidden_size"), head_dim * given.get(heads_key, values.get(heads_key, 4)))
    return {key: value for key, value in given.items() if _has(base, key)}


def _make_consistent(base: PretrainedConfig, values: dict[str, Any], given: dict[str, Any]) -> None:
    """Fix fields that depend on others: MLA heads, token ids, YaRN original length, query scale."""
    if "kv_lora_rank" in values:
        # MLA: keys and values are expanded per query head, there is no grouped-query sharing.
        values["num_key_value_heads"] = values["num_attention_heads"]
    vocab = values.get("vocab_size", 256)
    for name, fallback in _TOKEN_FALLBACK.items():
        if name not in given and _has(base, name):
            values[name] = _fix_token(getattr(base, name, None), fallback, vocab)
    rope = getattr(base, "rope_parameters", None)
    if isinstance(rope, dict) and "original_max_position_embeddings" in rope and "rope_parameters" not in given:
        # YaRN-style scaling: keep factor == max_positions / original so the config stays consistent.
        factor = float(rope.get("factor", 1.0)) or 1.0
        positions = values.get(_canonical(base, "max_position_embeddings"), 512)
        values["rope_parameters"] = {**rope, "original_max_position_embeddings": max(1, int(positions / factor))}
    if isinstance(getattr(base, "attention_types", None), list) and "attention_types" not in given:
        # gpt_neo: [[kinds, repeats]] must cover exactly num_layers; keep both kinds (global and local)
        kinds = list(base.attention_types[0][0])
        layers = values.get(_canonical(base, "num_hidden_layers"), 2)
        if layers % len(kinds) == 0:
            values["attention_types"] = [[kinds, layers // len(kinds)]]
    if "window_size" in base.to_dict() and "window_size" not in given:
        values["window_size"] = _SMALL_WINDOW  # local layers whose window bites at toy lengths
    if isinstance(getattr(base, "rotary_dim", None), int) and "rotary_dim" not in given:
        # gptj, codegen: rotary on the first rotary_dim channels of each head (64 of 256 in GPT-J 6B); the
        # default 64 exceeds a tiny head, which then fails in HF's own forward: keep it partial (half the head)
        heads = values.get(_canonical(base, "num_attention_heads"), 4)
        head_dim = values.get(_canonical(base, "hidden_size"), 64) // max(1, heads)
        values["rotary_dim"] = max(2, head_dim // 4 * 2)
    if "query_pre_attn_scalar" in base.to_dict() and "query_pre_attn_scalar" not in given:
        values["query_pre_attn_scalar"] = values.get("head_dim", 16)


def tiny_config(model_type: str, seed: int = 0, **overrides: Any) -> PretrainedConfig:
    """A small config of `model_type` (see module docstring); `overrides` (generic names ok) win.

    Overrides for fields the type does not have are ignored, so one set of sizes fits every type.

    `seed` does not change the config; it is accepted so callers can pass one spec everywhere.
    """
    del seed
    base = _base_config(model_type)
    values = _defaults(base)
    given = _translate(base, overrides, values)
    values.update(given)
    _make_consistent(base, values, given)
    config = _build_config(model_type, values)
    layers = getattr(config, "num_hidden_layers", None)
    if "layer_types" not in given and layers is not None:
        types = _layer_types(base, config, layers)
        if types is not None and list(getattr(config, "layer_types", None) or []) != types:
            config = _build_config(model_type, {**values, "layer_types": types})
    return config


def _build_config(model_type: str, values: dict[str, Any]) -> PretrainedConfig:
    """AutoConfig.for_model, with transformers' validation errors as ModelSourceError."""
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, _StrictConfigError) as error:
        raise ModelSourceError(f"cannot make a tiny {model_type!r} config: {str(error).splitlines()[0]}") from error


def _perturb_constants(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give constant checkpoint tensors (norms at 1, zero biases, sinks, router biases) random values.

    With a norm weight of exactly 1 a rewrite that drops the scale would still verify; with noise
    every tensor in the checkpoint matters (persistent buffers such as deepseek's
    e_score_correction_bias included).
    """
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict(keep_vars=True).items(), key=lambda item: item[0]):
            if tensor.is_floating_point() and tensor.numel() > 0 and bool((tensor == tensor.flatten()[0]).all()):
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.add_((0.1 * noise).to(tensor.dtype))


def tiny_class(config: PretrainedConfig) -> type:
    """The transformers auto class a tiny model of `config` is built with: its kind's (kinds.kind_for)."""
    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.errors import UnsupportedKindError

    try:
        return kind_for(config).hf_class()
    except UnsupportedKindError:
        return AutoModelForCausalLM


def tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """The HF model of `config`'s kind (a causal LM; the base model of an encoder such as BERT), fp32, eager
    attention, weights drawn from `seed`. A type no kind supports falls back to the causal LM (whose
    refusal names the problem)."""
    torch.manual_seed(seed)
    config = copy.deepcopy(config)  # from_config records the attention implementation on it
    auto_class = tiny_class(config)
    try:
        model = auto_class.from_config(config, dtype=torch.float32, attn_implementation="eager")
    except ValueError as error:
        raise ModelSourceError(f"transformers cannot build a {auto_class.__name__} for model type "
                               f"{config.model_type!r}: {str(error).splitlines()[0]}") from error
    _perturb_constants(model, torch.Generator().manual_seed(seed))
    return model.eval()


def config_hash(config: PretrainedConfig) -> str:
    """A short stable hash of the config contents (names the cache directory)."""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own tqdm bars ("Writing model shards") for one block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def save_model(model: PreTrainedModel, directory: Path, **kwargs: Any) -> None:
    """save_pretrained as safetensors, in the layout transformers writes (and the hub ships).

    transformers 5 converts some weights back to their original on-disk layout when it saves
    (per-expert MoE tensors, mixtral's block_sparse_moe names); the loader converts them again with
    transformers' own rules, so tiny models exercise the real checkpoint format. `kwargs` (e.g.
    max_shard_size) go to save_pretrained.
    """
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs.setdefault("safe_serialization", True)
    model.save_pretrained(directory, **kwargs)


def materialize_tiny(model_type: str, seed: int, cache_dir: Path, **overrides: Any) -> Path:
    """Build (once) and cache the tiny model; return its directory (config.json + safetensors)."""
    config = tiny_config(model_type, seed, **overrides)
    # "-hf": written by save_pretrained in transformers' on-disk layout (older caches kept the runtime names)
    kind = tiny_class(config).__name__
    kind = "" if kind == AutoModelForCausalLM.__name__ else f"-{kind}"   # older caches built every type as a causal LM
    target = Path(cache_dir) / "tiny" / f"{model_type}-{seed}-{config_hash(config)}{kind}-hf"
    if (target / "config.json").is_file():
        return target
    model = tiny_model(config, seed)
    with atomic_directory(target) as temp, hf_progress_bars(False):
        save_model(model, temp)
    return target
