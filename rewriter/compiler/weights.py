"""Weight loading from safetensors checkpoints (one file or sharded), the way transformers loads them.

The captured graph names each parameter by its HF module path (the runtime names). Checkpoints keep
transformers' on-disk layout (per-expert MoE tensors, older key names); conversion.py maps one to the
other with transformers' own conversion rules. This module reads the files: it opens the checkpoint,
reads exactly the tensors the parameters need, checks their shapes, and places them on the run
device in the run dtype. A `slicer` lets a tensor-parallel rank read only its slice of each tensor
(of each source tensor, for a converted one) without materializing the rest.
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

from hfrewrite.compiler.conversion import Layout, conversion_rules, identity_rules, materialize, plan, view
from hfrewrite.compiler.file_slices import FileSlice, read_header
from hfrewrite.errors import WeightError

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


def directory_config(directory: Path) -> Any | None:
    """The transformers config of a checkpoint directory (its config.json), None without one."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as error:
        raise WeightError(f"cannot read the config {path} (needed to convert the checkpoint's names): "
                          f"{str(error).splitlines()[0]}") from error


def checkpoint_layout(checkpoint: Checkpoint, config: Any | None) -> Layout:
    """Which checkpoint tensors make which runtime tensor, by transformers' conversion rules for `config`
    (no conversion without a config)."""
    rules = conversion_rules(config, checkpoint.directory) if config is not None else identity_rules()

    def meta(key: str) -> torch.Tensor:
        lazy = checkpoint.slice(key)
        return torch.empty(lazy.shape, dtype=lazy.dtype, device="meta")
    return plan(checkpoint.names(), rules, meta, str(checkpoint.directory))


def _target(name: str, layout: Layout, tied: dict[str, str], directory: Path) -> str:
    """The runtime tensor to read for parameter `name` (itself, or its tie source)."""
    if name in layout:
        return name
    source = tied.get(name)
    if source is not None and source in layout:
        return source
    on_disk = {key for group in layout.groups for key in group.keys()} | set(layout.unused)
    candidates = sorted(set(layout.names()) | on_disk)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    hint = f"; closest name in the checkpoint: {close[0]}" if close else ""
    via = f" (nor its tied source {source})" if source is not None else ""
    raise WeightError(f"weight {name}{via} is not in the checkpoint {directory}{hint}")


def _where(target: str, layout: Layout, checkpoint: Checkpoint) -> str:
    """Where a runtime tensor comes from, for an error message."""
    group = layout.by_target[target]
    if not layout.renamed(target):
        return f"in {checkpoint.file_of(target)}"
    how = "converted by transformers' checkpoint conversion" if group.converter is not None else "renamed"
    return f"in {checkpoint.directory} ({how} from {group.describe()})"


def unused_names(checkpoint: Checkpoint, specs: dict[str, Any], tied: dict[str, str],
                 config: Any | None = None) -> list[str]:
    """Checkpoint tensors no spec reads (e.g. rotary caches, MTP layers): worth a warning, not an error."""
    layout = checkpoint_layout(checkpoint, config)
    read = {name if name in layout else tied.get(name, name) for name in specs}
    used = {key for name in read if name in layout for key in layout.by_target[name].keys()}
    return [name for name in checkpoint.names() if name not in used]


def load_weights(directory: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], tied: dict[str, str],
                 device: torch.device, dtype: torch.dtype | None = None, slicer: Slicer | None = None,
                 progress: bool = False, config: Any | None = None) -> dict[str, torch.Tensor]:
    """Load every weight in `specs` (name -> (shape, dtype)) from `directory`, checked and placed.

    Checkpoint names are converted to the runtime names by transformers' rules for `config` (default:
    the directory's config.json; none without one). `tied` maps a parameter to the one it shares
    storage with, read when the parameter itself is not stored; without a slicer, tied parameters get
    one shared tensor (as in HF), not two copies. Floating tensors are cast to `dtype` (default: the
    spec's dtype); others keep the spec's. With `slicer`, each tensor comes from slicer(name, lazy)
    where indexing `lazy` reads only the indexed part of each source tensor, and `specs` holds
    sharded shapes.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    config = config if config is not None else directory_config(directory)
    with open_checkpoint(directory) as checkpoint:
        layout = checkpoint_layout(checkpoint, config)
        loaded: dict[str, torch.Tensor] = {}
        shared: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        made: dict[str, torch.Tensor] = {}  # a group's other outputs (a Chunk's q, k, v), until they are read
        for name in tqdm(sorted(specs), desc="loading weights", file=sys.stderr, disable=not progress):
            shape, spec_dtype = specs[name]
            target = _target(name, layout, tied, directory)
            cast = dtype if dtype is not None and spec_dtype.is_floating_point else spec_dtype
            if slicer is None and (target, cast) in shared and tuple(shared[target, cast].shape) == tuple(shape):
                loaded[name] = shared[target, cast]
                continue
            if slicer is None:
                if target not in made:
                    made.update(materialize(layout, target, checkpoint.tensor))
                tensor = made.pop(target)
            else:
                tensor = slicer(name, view(layout, target, checkpoint.slice))
                if not isinstance(tensor, torch.Tensor):
                    raise WeightError(f"the slicer returned {type(tensor).__name__} for weight {name}, not a tensor")
            if tuple(tensor.shape) != tuple(shape):
                via = f" (read as {target})" if target != name else ""
                raise WeightError(f"weight {name}{via} {_where(target, layout, checkpoint)} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(shape)}")
            loaded[name] = tensor.to(device=device, dtype=cast)
            shared[target, cast] = loaded[name]
        targets = {_target(name, layout, tied, directory) for name in specs}
        read = {key for target in targets for key in layout.by_target[target].keys()}
        unread = [key for key in checkpoint.names() if key not in read and key not in layout.unused]
    if layout.unused:
        logger.warning("%d tensors of the checkpoint %s are not used by the model and are skipped: %s%s",
                       len(layout.unused), directory, ", ".join(layout.unused[:6]),
                       ", ..." if len(layout.unused) > 6 else "")
    if unread:
        logger.info("%d checkpoint tensors in %s are not read here: %s%s", len(unread), directory,
                    ", ".join(unread[:5]), ", ..." if len(unread) > 5 else "")
    return loaded
