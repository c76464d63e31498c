"""Weight loading by name from safetensors checkpoints (one file or sharded).

The captured graph names each parameter by its HF module path; this module reads exactly those
tensors, checks their shapes, and places them on the run device in the run dtype. A `slicer` lets a
tensor-parallel rank read only its slice of a tensor without materializing the rest.
"""
from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hfrewrite.errors import WeightError
from hfrewrite.compiler.file_slices import FileSlice, read_header

INDEX_FILE = "model.safetensors.index.json"
logger = logging.getLogger(__name__)

Slicer = Callable[[str, Any], torch.Tensor]


@dataclass
class Checkpoint:
    """Weight name -> (file, open safe_open handle) over every safetensors file of a directory."""

    directory: Path
    entries: dict[str, tuple[Path, Any]] = field(default_factory=dict)
    headers: dict[Path, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # file -> (data start, entries)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def file_of(self, name: str) -> Path:
        """The file holding `name`."""
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name`, read from the header only."""
        return tuple(self.entries[name][1].get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (on the CPU, stored dtype)."""
        return self.entries[name][1].get_tensor(name)

    def slice(self, name: str) -> FileSlice:
        """A lazy slice of `name`: index it to read only that part of the tensor, with file reads into memory of
        its own (a tensor-parallel rank's slices must not keep the whole file mapped; see file_slices)."""
        path = self.entries[name][0]
        if path not in self.headers:
            self.headers[path] = read_header(path)
        start, header = self.headers[path]
        return FileSlice(path, start, header[name], name)

    def close(self) -> None:
        """Drop the handles (safe_open memory-maps files; closing releases them)."""
        self.entries.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path) -> Any:
    """safe_open one file, as a WeightError if it is not a readable safetensors file."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise WeightError(f"cannot read safetensors file {path}: {error}") from error


def _shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to open (sorted) and, when sharded with an index, the index's name -> file map."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise WeightError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {error}") from error
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} names shard files that are missing: {', '.join(missing[:4])}")
        return files, weight_map
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{directory} has no *.safetensors files")
    return files, None


def open_checkpoint(directory: Path) -> Checkpoint:
    """Index every tensor of the directory's safetensors files (index json if present, else all files)."""
    directory = Path(directory)
    files, weight_map = _shard_files(directory)
    handles = {path: _open(path) for path in files}
    checkpoint = Checkpoint(directory=directory)
    if weight_map is not None:
        for name in sorted(weight_map):
            path = directory / weight_map[name]
            if name not in handles[path].keys():
                raise WeightError(f"{directory / INDEX_FILE} places {name} in {path.name}, which lacks it")
            checkpoint.entries[name] = (path, handles[path])
        return checkpoint
    for path in files:
        for name in sorted(handles[path].keys()):
            if name in checkpoint.entries:
                raise WeightError(f"weight {name} is in both {checkpoint.entries[name][0].name} and {path.name} "
                                  f"in {directory}; without {INDEX_FILE} the files must not overlap")
            checkpoint.entries[name] = (path, handles[path])
    return checkpoint


def _source_name(name: str, checkpoint: Checkpoint, tied: dict[str, str]) -> str:
    """The checkpoint tensor to read for parameter `name` (itself, or its tie source)."""
    if name in checkpoint:
        return name
    source = tied.get(name)
    if source is not None and source in checkpoint:
        return source
    close = difflib.get_close_matches(name, checkpoint.names(), n=1, cutoff=0.6)
    hint = f"; closest name in the checkpoint: {close[0]}" if close else ""
    via = f" (nor its tied source {source})" if source is not None else ""
    raise WeightError(f"weight {name}{via} is not in the checkpoint {checkpoint.directory}{hint}")


def _read(name: str, source: str, checkpoint: Checkpoint, slicer: Slicer | None) -> torch.Tensor:
    """Read the tensor for `name` from checkpoint tensor `source`, through the slicer if any."""
    if slicer is None:
        return checkpoint.tensor(source)
    tensor = slicer(name, checkpoint.slice(source))
    if not isinstance(tensor, torch.Tensor):
        raise WeightError(f"the slicer returned {type(tensor).__name__} for weight {name}, not a tensor")
    return tensor


def unused_names(checkpoint: Checkpoint, specs: dict[str, Any], tied: dict[str, str]) -> list[str]:
    """Checkpoint tensors no spec reads (e.g. rotary caches, MTP layers): worth a log line, not an error."""
    read = {name if name in checkpoint else tied.get(name, name) for name in specs}
    return [name for name in checkpoint.names() if name not in read]


def load_weights(directory: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], tied: dict[str, str],
                 device: torch.device, dtype: torch.dtype | None = None, slicer: Slicer | None = None,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Load every weight in `specs` (name -> (shape, dtype)) from `directory`, checked and placed.

    `tied` maps a parameter to the one it shares storage with, read when the parameter itself is not
    stored; without a slicer, tied parameters get one shared tensor (as in HF), not two copies.
    Floating tensors are cast to `dtype` (default: the spec's dtype); others keep the spec's.
    With `slicer`, each tensor comes from slicer(name, lazy_slice) and `specs` holds sharded shapes.
    """
    from tqdm.auto import tqdm

    with open_checkpoint(directory) as checkpoint:
        loaded: dict[str, torch.Tensor] = {}
        shared: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        for name in tqdm(sorted(specs), desc="loading weights", file=sys.stderr, disable=not progress):
            shape, spec_dtype = specs[name]
            source = _source_name(name, checkpoint, tied)
            target = dtype if dtype is not None and spec_dtype.is_floating_point else spec_dtype
            if slicer is None and (source, target) in shared and tuple(shared[source, target].shape) == tuple(shape):
                loaded[name] = shared[source, target]
                continue
            tensor = _read(name, source, checkpoint, slicer)
            if tuple(tensor.shape) != tuple(shape):
                via = f" (read from {source})" if source != name else ""
                raise WeightError(f"weight {name}{via} in {checkpoint.file_of(source)} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(shape)}")
            loaded[name] = tensor.to(device=device, dtype=target)
            shared[source, target] = loaded[name]
        unused = unused_names(checkpoint, specs, tied)
    if unused:
        logger.info("%d checkpoint tensors in %s are not used: %s%s", len(unused), directory,
                    ", ".join(unused[:5]), ", ..." if len(unused) > 5 else "")
    return loaded
