"""The embedding kind: an encoder (BERT and relatives) or a decoder body, hidden states pooled per text.

The graph is the base model (AutoModel): packed [1, T] token ids, positions restarting at 0 for each
sequence, token type ids where the config has token types; it returns the last hidden states
[1, T, H]. Attention goes through the same paged op as causal LMs (an encoder's marker carries
causal=False), so the attention rule, packing and kernel are shared; the runtime pools
(hfrewrite.runtime.embedding). Pooling comes from the model's sentence-transformers files
(modules.json, <pooling dir>/config.json, a Normalize module) when it ships them, read here as plain
JSON; otherwise mean pooling for encoders and last-token pooling for decoder bodies.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from hfrewrite.compiler.kinds.base import ModelKind, base_model_classes, causal_lm_classes
from hfrewrite.errors import CaptureError, ModelSourceError
from hfrewrite.runtime.embedding import Embedder, Pooling, pool

MODULES_FILE = "modules.json"
ST_MODULE = "sentence_transformers.models."
# sentence-transformers' Pooling config flags -> our pooling modes (the ones hfrewrite implements)
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max"}
_UNSUPPORTED_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def is_encoder_only(config: PretrainedConfig) -> bool:
    """A bidirectional encoder: transformers has a masked LM and a base model for it, and it is no decoder."""
    return (config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and config.model_type in modeling_auto.MODEL_MAPPING_NAMES and not getattr(config, "is_decoder", False))


def claims(config: PretrainedConfig, directory: Path | None) -> bool:
    """A sentence-transformers model, a checkpoint of a base model only, or an encoder-only type."""
    if directory is not None and (Path(directory) / MODULES_FILE).is_file():
        return True
    architectures = list(config.architectures or [])
    if architectures and all(name in base_model_classes() for name in architectures):
        return True
    if any(name in causal_lm_classes() for name in architectures):
        return False
    return is_encoder_only(config)


def kind(config: PretrainedConfig, directory: Path | None = None) -> ModelKind:
    default = Pooling("mean" if is_encoder_only(config) else "lasttoken")
    pooling = read_pooling(Path(directory), default) if directory is not None else default
    token_types = int(getattr(config, "type_vocab_size", 0) or 0) > 0
    inputs = ("input_ids", "position_ids") + (("token_type_ids",) if token_types else ())
    return ModelKind(name="embedding", auto_class="AutoModel", output="last_hidden_state", head="pool",
                     verifier=verify_embeddings, inputs=inputs, pooling=pooling, finish_graph=offset_positions)


def offset_positions(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> None:
    """Number positions as the model does: embeddings that make their own position ids from input ids
    (HF's `create_position_ids_from_input_ids`: RoBERTa and relatives) start at padding_idx + 1, so the
    graph adds that offset to its position_ids input (the runtime feeds 0, 1, ... per sequence)."""
    offsets = sorted({int(module.padding_idx) + 1 for _, module in model.named_modules()
                      if hasattr(module, "create_position_ids_from_input_ids")
                      and getattr(module, "padding_idx", None) is not None})
    if not offsets:
        return
    if len(offsets) > 1:
        raise CaptureError(f"{type(model).__name__} has embeddings with different position offsets {offsets}")
    graph = graph_module.graph
    placeholder = next(node for node in graph.nodes if node.op == "placeholder" and node.name == "position_ids")
    users = list(placeholder.users)
    with graph.inserting_after(placeholder):
        shifted = graph.call_function(torch.ops.aten.add.Tensor, (placeholder, offsets[0]))
    shifted.meta.update({key: users[0].meta[key] for key in ("nn_module_stack", "stack_trace") if key in users[0].meta})
    if "val" in placeholder.meta:
        shifted.meta["val"] = placeholder.meta["val"] + offsets[0]
    for user in users:
        user.replace_input_with(placeholder, shifted)
    graph_module.recompile()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"cannot read the sentence-transformers file {path}: {error}") from error


def read_pooling(directory: Path, default: Pooling) -> Pooling:
    """The pooling `modules.json` in `directory` describes (Transformer, Pooling, optional Normalize)."""
    path = directory / MODULES_FILE
    if not path.is_file():
        return default
    modules = sorted(_read_json(path), key=lambda module: int(module.get("idx", 0)))
    mode, normalize = default.mode, False
    for module in modules:
        name = str(module.get("type", "")).removeprefix(ST_MODULE)
        if name == "Transformer" and module.get("path", "") not in ("", "."):
            raise ModelSourceError(f"{path}: the Transformer module lives in {module['path']!r}; hfrewrite reads the "
                                   f"model from the directory itself (path \"\")")
        if name == "Pooling":
            mode = _pooling_mode(directory / module.get("path", "") / "config.json")
        elif name == "Normalize":
            normalize = True
        elif name != "Transformer":
            raise ModelSourceError(f"{path}: module {module.get('type')!r} is not supported (hfrewrite applies "
                                   f"Transformer, Pooling and Normalize only)")
    return Pooling(mode, normalize)


def _pooling_mode(path: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config.json turns on."""
    config = _read_json(path)
    if isinstance(config.get("pooling_mode"), str):
        named = {"mean": "mean", "cls": "cls", "lasttoken": "lasttoken", "max": "max"}
        if config["pooling_mode"] in named:
            return named[config["pooling_mode"]]
        raise ModelSourceError(f"{path}: pooling_mode {config['pooling_mode']!r} is not supported "
                               f"(supported: {', '.join(named)})")
    unsupported = [flag for flag in _UNSUPPORTED_FLAGS if config.get(flag)]
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    if unsupported or len(modes) != 1:
        raise ModelSourceError(f"{path}: exactly one of {', '.join(_POOLING_FLAGS)} must be true (got "
                               f"{', '.join(unsupported + modes) or 'none'}); concatenated or weighted pooling is "
                               f"not supported")
    return modes[0]


def max_seq_length(directory: Path | None) -> int | None:
    """sentence-transformers' truncation length (sentence_bert_config.json), if the model ships one."""
    path = Path(directory) / "sentence_bert_config.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    value = _read_json(path).get("max_seq_length")
    return int(value) if value else None


@dataclass
class EmbeddingVerifyResult:
    """How close the compiled embedding model came to HF eager (per-token hidden states and pooled vectors)."""

    passed: bool
    max_abs_err: float          # per-token last hidden states
    max_embedding_err: float    # pooled (and normalized) embeddings
    min_cosine: float
    tokens_compared: int
    sequences: int
    atol: float
    min_cosine_required: float
    pooling: str

    def to_dict(self) -> dict:
        return asdict(self)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(absolute hidden-state tolerance, minimum cosine): tight in fp32, cosine based in half precision."""
    if dtype == torch.float32:
        return 1e-3, 0.99999
    return float("inf"), 0.99


@torch.no_grad()
def verify_embeddings(compiled: Any, reference: torch.nn.Module | None, kind: ModelKind, seed: int = 0,
                      sequences: int = 4, min_len: int = 1, max_len: int = 24,
                      atol: float | None = None) -> EmbeddingVerifyResult | None:
    """Random sequences of mixed lengths packed into one forward, against HF eager one sequence at a time."""
    generator = torch.Generator().manual_seed(seed)
    config = compiled.config
    lengths = [int(n) for n in torch.randint(min_len, max_len + 1, (sequences,), generator=generator)]
    ids = [torch.randint(0, int(config.vocab_size), (n,), generator=generator) for n in lengths]
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int):  # a pad token is no real input (RoBERTa-style models give it no position)
        ids = [torch.where(row == pad, (pad + 1) % int(config.vocab_size), row) for row in ids]
    types = None
    if "token_type_ids" in kind.inputs:
        types = [torch.randint(0, int(config.type_vocab_size), (n,), generator=generator) for n in lengths]
    pooling = kind.pooling or Pooling()
    embedder = Embedder(compiled, pooling, block_size=4)
    hidden = embedder.hidden_states([row.tolist() for row in ids],
                                    [row.tolist() for row in types] if types is not None else None).float().cpu()
    if reference is None:
        return None
    theirs = []
    for i, row in enumerate(ids):
        extra = {"token_type_ids": types[i][None].to(compiled.device)} if types is not None else {}
        out = reference(input_ids=row[None].to(compiled.device), **extra)
        theirs.append(out.last_hidden_state[0].float().cpu())
    expected = torch.cat(theirs)
    ours_pooled, theirs_pooled = pool(hidden, lengths, pooling), pool(expected, lengths, pooling)
    max_err = (hidden - expected).abs().max().item()
    embedding_err = (ours_pooled - theirs_pooled).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(ours_pooled, theirs_pooled, dim=-1).min().item()
    default_atol, min_cosine = tolerances(compiled.dtype)
    atol = default_atol if atol is None else atol
    passed = max_err <= atol and cosine >= min_cosine
    return EmbeddingVerifyResult(passed, max_err, embedding_err, cosine, len(expected), sequences, atol, min_cosine,
                                 f"{pooling.mode}{'+normalize' if pooling.normalize else ''}")
