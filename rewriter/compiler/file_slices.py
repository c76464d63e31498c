"""Slices of safetensors tensors read with plain file reads, for tensor-parallel ranks.

safetensors' own lazy slices index a memory map of the file: a rank's slice of a row-parallel weight
(part of every row) stays a view of the mapping and faults in whole pages of every row, so a rank's
resident memory grows towards the whole checkpoint, not its 1/N (measured: bench/bench_tp_memory.py).
Here a slice is read with `os.preadv` straight into a fresh tensor of its own size: one read per
contiguous run of bytes (one in all for a block of rows; one per row for a block of columns). The
format is the documented one: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from hfrewrite.errors import WeightError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header entries by tensor name) of a safetensors file."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise WeightError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


class FileSlice:
    """A tensor of a safetensors file, indexable like safetensors' lazy slice: `slice_[:, a:b]` reads only that."""

    def __init__(self, path: Path, data_start: int, entry: dict[str, Any], name: str) -> None:
        if entry["dtype"] not in DTYPES:
            raise WeightError(f"weight {name} in {path} has dtype {entry['dtype']}, which hfrewrite cannot read")
        self.path, self.name = path, name
        self.dtype = DTYPES[entry["dtype"]]
        self.shape = tuple(int(size) for size in entry["shape"])
        self.offset = data_start + int(entry["data_offsets"][0])

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def _ranges(self, index: Any) -> list[tuple[int, int]]:
        """(start, stop) per dim from an index of `...` or leading step-1 slices."""
        if index is Ellipsis:
            index = ()
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(self.shape) or not all(isinstance(part, slice) and part.step in (None, 1)
                                                   for part in index):
            raise WeightError(f"weight {self.name}: unsupported slice {index!r} (step-1 slices of leading dims)")
        ranges = [part.indices(size)[:2] for part, size in zip(index, self.shape)]
        ranges += [(0, size) for size in self.shape[len(ranges):]]
        return [(start, max(start, stop)) for start, stop in ranges]

    def __getitem__(self, index: Any) -> torch.Tensor:
        ranges = self._ranges(index)
        out_shape = tuple(stop - start for start, stop in ranges)
        out = torch.empty(out_shape, dtype=self.dtype)
        if out.numel() == 0:
            return out
        # The last dim that is not read whole: every dim after it is whole, so each of its runs is contiguous.
        cut = max((dim for dim, (start, stop) in enumerate(ranges) if (start, stop) != (0, self.shape[dim])),
                  default=0)
        item = out.element_size()
        run = (ranges[cut][1] - ranges[cut][0]) * math.prod(self.shape[cut + 1:]) * item
        strides = [math.prod(self.shape[dim + 1:]) * item for dim in range(len(self.shape))]
        buffer = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        outer = [range(start, stop) for start, stop in ranges[:cut]]
        position = 0
        with open(self.path, "rb", buffering=0) as handle:
            for coords in _product(outer):
                where = self.offset + sum(c * s for c, s in zip(coords, strides)) + ranges[cut][0] * strides[cut]
                got = os.preadv(handle.fileno(), [buffer[position:position + run]], where)
                if got != run:
                    raise WeightError(f"weight {self.name}: {self.path} ended early (read {got} of {run} bytes)")
                position += run
        return out


def _product(ranges: list[range]) -> Any:
    """Every index tuple over `ranges`, last dim fastest (the file's order); one empty tuple for none."""
    if not ranges:
        yield ()
        return
    for first in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (first, *rest)
