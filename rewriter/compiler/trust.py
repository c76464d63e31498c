"""The trust boundary: what a model directory may make us run or unpickle.

A model directory is data. transformers can import Python files named by a config's (or tokenizer
config's) `auto_map`, asking on the terminal when not told; and its loaders fall back to pickle
checkpoints. Every transformers call that reads a directory takes `trust_remote_code` from
`remote_code_allowed()` (False unless the user passed `--trust-remote-code`, which sets the
environment variable below so spawned ranks inherit the choice), and HF loaders read weights through
`safetensors_view`, a directory that holds nothing but the config and the safetensors files.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfrewrite.errors import ModelSourceError, RemoteCodeError

TRUST_ENV = "HFREWRITE_TRUST_REMOTE_CODE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
VIEW_FILES = ("config.json", "generation_config.json")


def allow_remote_code(allowed: bool) -> None:
    """Record the user's choice (the CLI's --trust-remote-code) for this process and the ranks it spawns."""
    if allowed:
        os.environ[TRUST_ENV] = "1"
    else:
        os.environ.pop(TRUST_ENV, None)


def remote_code_allowed() -> bool:
    """Whether Python files from model directories may run: only when the user said so."""
    return os.environ.get(TRUST_ENV, "") == "1"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def remote_code_refusal(path: Path, needs: str) -> RemoteCodeError:
    """The one error for a model that needs code from its directory while that is not allowed."""
    return RemoteCodeError(
        f"{path} needs custom Python code from the model directory to load its {needs} (auto_map); that code is "
        f"not run unless you pass --trust-remote-code (only do so for a model whose files you have read)")


def load_config(directory: Path) -> Any:
    """AutoConfig of `directory` under the trust boundary; the auto_map is dropped when code is not allowed,
    so no later from_config/from_pretrained can reach the directory's Python files."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = directory / "config.json"
    data = _json(path)
    trusted = remote_code_allowed()
    if not trusted and "auto_map" in data and data.get("model_type") not in CONFIG_MAPPING:
        raise remote_code_refusal(path, "configuration")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trusted)
    except (ValueError, KeyError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        raise ModelSourceError(f"cannot read {path}: {first_line}") from error
    if not trusted and hasattr(config, "auto_map"):
        del config.auto_map
    return config


def load_tokenizer(directory: Path) -> Any:
    """AutoTokenizer of `directory` under the trust boundary (a tokenizer needing its own code is refused)."""
    from transformers import AutoTokenizer

    trusted = remote_code_allowed()
    config_path = directory / "tokenizer_config.json"
    if not trusted and config_path.is_file() and "auto_map" in _json(config_path):
        try:  # a tokenizer class transformers ships loads without the directory's code
            return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        except ValueError as error:
            raise remote_code_refusal(config_path, "tokenizer") from error
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trusted)
    except (ValueError, OSError) as error:
        raise ModelSourceError(f"cannot load the tokenizer of {directory}: {str(error).splitlines()[0]}") from error


def pickle_files(directory: Path) -> list[str]:
    """Pickle checkpoints in `directory` (never loaded: unpickling can run code)."""
    return sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def warn_ignored_pickles(directory: Path, pickles: list[str]) -> None:
    """Say (once per process: the CLI resolves a model twice) that pickle files beside the safetensors were
    left alone."""
    _note_pickles(str(directory), tuple(pickles))


@functools.lru_cache(maxsize=None)
def _note_pickles(directory: str, pickles: tuple[str, ...]) -> None:
    shown = ", ".join(pickles[:4]) + (", ..." if len(pickles) > 4 else "")
    print(f"hfrewrite: note: ignoring pickle checkpoint(s) {shown} in {directory}; only its *.safetensors "
          f"weights are read", file=sys.stderr)


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors weight files of `directory`, sorted."""
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file())


@contextlib.contextmanager
def safetensors_view(directory: Path) -> Iterator[Path]:
    """A temporary directory with only the config, the safetensors files (linked) and an index naming them.

    transformers' from_pretrained on it can only read safetensors, whatever else the model directory
    holds (a pickle checkpoint, Python files), and whatever the safetensors files are called.
    """
    from safetensors import safe_open

    temp = Path(tempfile.mkdtemp(prefix="hfrewrite-view-"))
    try:
        for name in VIEW_FILES:
            if (directory / name).is_file():
                os.symlink((directory / name).resolve(), temp / name)
        weight_map: dict[str, str] = {}
        for path in safetensors_files(directory):
            os.symlink(path.resolve(), temp / path.name)
            with safe_open(str(path), framework="pt") as handle:
                weight_map.update({key: path.name for key in handle.keys()})
        if remote_code_allowed():  # the user allowed the directory's code: the reference may need it
            for path in sorted(directory.glob("*.py")):
                os.symlink(path.resolve(), temp / path.name)
        (temp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)
