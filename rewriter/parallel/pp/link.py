"""The ring between pipeline ranks: the messages one rank sends the next.

Who sits where (rank s * tp + t, its previous and next rank) is the ParallelLayout's
(parallel/layout.py). A message is a fixed-size int64 header (kind, sequence number, descriptor
length, tensor count, each tensor's shape), an int64 descriptor and the tensors; the dtypes and ranks
of the tensors a link carries are fixed by the split, so no rank has to guess what comes next. The
descriptor of a step is the packed step itself (`encode_step`), so only stage 0 runs the scheduler.
Sends are non-blocking; every receive waits at most the distributed timeout, so a dead peer is an
error, never a hang.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hfrewrite.kernels.attention.op import METADATA_FIELDS, AttentionMetadata

from hfrewrite.parallel.distributed import DistributedError
from hfrewrite.runtime.step import PackedStep

STEP, CACHE, STOP, ERROR = 1, 2, 3, 4
KINDS = {STEP: "step", CACHE: "cache", STOP: "stop", ERROR: "error"}
HEADER = 4  # kind, sequence number, descriptor length, tensor count; then each tensor's shape
_CODES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Message:
    """What one rank sent another: a kind, a sequence number, an int64 descriptor and the activations."""

    kind: int
    sequence: int
    descriptor: torch.Tensor
    tensors: list[torch.Tensor]

    def text(self) -> str:
        """The descriptor of an error message, as the text it carries."""
        return vector_text(self.descriptor)


@dataclass
class Link:
    """One direction between two ranks; `specs` (dtype, ndim) of the tensors it carries are fixed by the split."""

    peer: int
    specs: list[tuple[torch.dtype, int]]
    device: torch.device
    timeout: datetime.timedelta
    what: str
    _pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def header_size(self) -> int:
        return HEADER + sum(ndim for _, ndim in self.specs)

    def send(self, kind: int, sequence: int, descriptor: torch.Tensor, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Queue the message (non-blocking sends; the buffers stay referenced until they are done)."""
        if len(tensors) not in (0, len(self.specs)):
            raise DistributedError(f"{self.what}: {len(tensors)} tensors to send, the link carries {len(self.specs)}")
        header = [kind, sequence, int(descriptor.numel()), len(tensors)]
        for tensor in tensors:
            header.extend(int(d) for d in tensor.shape)
        header.extend([0] * (self.header_size - len(header)))
        parts = [torch.tensor(header, dtype=torch.int64, device=self.device)]
        if descriptor.numel():
            parts.append(descriptor.to(self.device, torch.int64).contiguous())
        for tensor, (dtype, _) in zip(tensors, self.specs):
            parts.append(tensor.to(dtype).contiguous())
        self._pending = [(work, buf) for work, buf in self._pending if not work.is_completed()]
        for part in parts:
            self._pending.append((dist.isend(part, self.peer), part))

    def recv(self, timeout: datetime.timedelta | None = None) -> Message:
        """The next message from the peer; a DistributedError if nothing comes within the (link's) timeout."""
        header = torch.empty(self.header_size, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, self.peer), "the next message", timeout)
        values = header.tolist()
        kind, sequence, length, count = values[:4]
        if kind not in KINDS or count not in (0, len(self.specs)):
            raise DistributedError(f"{self.what}: malformed header from rank {self.peer}: {values[:4]}")
        descriptor = torch.empty(length, dtype=torch.int64, device=self.device)
        if length:
            self._wait(dist.irecv(descriptor, self.peer), f"the descriptor of {KINDS[kind]} {sequence}")
        tensors, offset = [], HEADER
        for dtype, ndim in self.specs[:count]:
            tensor = torch.empty(values[offset:offset + ndim], dtype=dtype, device=self.device)
            offset += ndim
            self._wait(dist.irecv(tensor, self.peer), f"the activations of step {sequence}")
            tensors.append(tensor)
        return Message(kind, sequence, descriptor, tensors)

    def _wait(self, work: Any, what: str, timeout: datetime.timedelta | None = None) -> None:
        timeout = timeout or self.timeout
        try:
            work.wait(timeout)
        except RuntimeError as error:
            raise DistributedError(f"{self.what}: waited {timeout.total_seconds():.0f}s for {what} with rank "
                                   f"{self.peer}, which failed or hangs ({str(error).splitlines()[0]})") from error

    def flush(self, timeout: datetime.timedelta | None = None) -> None:
        """Wait until every queued send has gone."""
        for work, _ in self._pending:
            self._wait(work, "a send to complete", timeout)
        self._pending.clear()


def encode_step(step: PackedStep, rows: torch.Tensor | None) -> torch.Tensor:
    """The packed step's tensors in one int64 vector: [count, (dtype code, ndim, *shape) ..., data ...]."""
    tensors = [step.input_ids, step.position_ids, *step.metadata.as_tuple(), step.logits_index]
    if rows is not None:
        tensors.append(rows)
    header = [len(tensors)]
    for tensor in tensors:
        header.extend([_CODES.index(tensor.dtype), tensor.dim(), *tensor.shape])
    body = [tensor.reshape(-1).to("cpu", torch.int64) for tensor in tensors]
    return torch.cat([torch.tensor(header, dtype=torch.int64), *body])


def decode_step(vector: torch.Tensor, device: torch.device) -> tuple[PackedStep, torch.Tensor | None]:
    """Inverse of `encode_step`, onto `device`."""
    values = vector.to("cpu")
    count = int(values[0])
    cursor, shapes = 1, []
    for _ in range(count):
        code, ndim = int(values[cursor]), int(values[cursor + 1])
        shapes.append((_CODES[code], [int(d) for d in values[cursor + 2:cursor + 2 + ndim]]))
        cursor += 2 + ndim
    tensors = []
    for dtype, shape in shapes:
        size = int(torch.Size(shape).numel())
        tensors.append(values[cursor:cursor + size].reshape(shape).to(device=device, dtype=dtype))
        cursor += size
    fields = len(METADATA_FIELDS)
    metadata = AttentionMetadata(*tensors[2:2 + fields])
    step = PackedStep(tensors[0], tensors[1], metadata, tensors[2 + fields])
    rows = tensors[3 + fields] if count > 3 + fields else None
    return step, rows


def text_vector(text: str) -> torch.Tensor:
    """A message text as an int64 descriptor (its UTF-8 bytes)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def vector_text(vector: torch.Tensor) -> str:
    return bytes(int(v) for v in vector.tolist()).decode("utf-8", errors="replace")
