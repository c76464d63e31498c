"""Where this process sits in the parallel run (tp, pp, ep, rank, device, groups): one ParallelLayout, made once.

Every consumer of the parallel setup reads this one object: the rewrite (its `when:` options and the
ranges each rank's shards cover), the collectives (the tp group's name), pipeline parallelism (this
rank's stage and its ring neighbours) and the command driver (the tp group stage 0's ranks agree in).
`join` makes it on launched ranks (one process-group join for --tp, --pp and both); `local` makes it
for one process (one device, or every pipeline stage in this process).

Rank (stage s, tensor-parallel index t) = s * tp + t: the tp ranks of one stage are consecutive, and
the ranks of one tp index form the pipeline ring (each receives from the previous stage, the last
stage sending back to stage 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hfrewrite.parallel.distributed import DistributedError, backend_for, env_rank, launched, rank_device, timeout


@dataclass(frozen=True)
class ParallelLayout:
    """This process's place: tp ranks per stage, pp stages, expert parallelism, its rank and device, its tp group.

    `joined` is False for one process (a single device, or all pipeline stages here); then rank is 0.
    """

    tp: int = 1
    pp: int = 1
    ep: bool = False          # split whole experts over the tp ranks instead of each expert's width
    rank: int = 0             # global rank: stage * tp + tp_rank
    device: torch.device | None = None
    joined: bool = False
    tp_group_name: str | None = None  # the process-group name this stage's collectives use (None: one tp rank)
    tp_group: Any = field(default=None, compare=False, repr=False)  # its ProcessGroup

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def previous(self) -> int:
        """The rank this one receives from (the last stage's rank of the same tp index for stage 0)."""
        return ((self.stage - 1) % self.pp) * self.tp + self.tp_rank

    @property
    def next(self) -> int:
        """The rank this one sends to (the driver of the same tp index for the last stage)."""
        return ((self.stage + 1) % self.pp) * self.tp + self.tp_rank

    @property
    def driver(self) -> bool:
        """Whether this rank runs stage 0 (schedules, samples, runs the command)."""
        return self.stage == 0

    def agree(self, value: Any) -> Any:
        """`value` as the first rank of this stage's tp group has it (identity without one): what the tp ranks
        of a stage must share (a verification, a sampling seed) without the other stages taking part."""
        if self.tp_group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.tp_group, group_src=0)
        return box[0]


def _flags(tp: int, pp: int) -> str:
    return " x ".join(part for part in (f"--pp {pp}" if pp > 1 else "", f"--tp {tp}" if tp > 1 else "") if part)


def join(device: torch.device, *, tp: int = 1, pp: int = 1, ep: bool = False) -> ParallelLayout:
    """Join (or reuse) the default process group of the pp x tp launched ranks; one tp group per stage.

    The device becomes this rank's own (one accelerator per local rank).
    """
    what, world_wanted = _flags(tp, pp), tp * pp
    if not dist.is_available():
        raise DistributedError(f"this torch build has no torch.distributed; {what} needs it")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env_rank()[2] if launched() else rank
    elif not launched():
        raise DistributedError(f"{what} needs {world_wanted} processes: run it through the hfrewrite command (which "
                               f"spawns them) or under `torchrun --nproc-per-node {world_wanted}`")
    else:
        rank, world, local = env_rank()
    if world != world_wanted:
        advice = f"; give --tp {world} (or --pp and --tp whose product is {world})" if pp == 1 else ""
        raise DistributedError(f"{what} needs {world_wanted} ranks but the launcher started {world}{advice}")
    device = rank_device(device, local)
    if not dist.is_initialized():
        if device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.set_device_index(device.index)
        try:
            dist.init_process_group(backend_for(device), init_method="env://", rank=rank, world_size=world,
                                    timeout=timeout())
        except (RuntimeError, ValueError) as error:  # DistStoreError/DistNetworkError are RuntimeErrors
            raise DistributedError(f"rank {rank} could not join the {world}-rank group at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                                   f"{timeout().total_seconds():.0f}s: {str(error).splitlines()[0]}") from error
    group = None
    if tp > 1 and pp == 1:
        group = dist.group.WORLD
    elif tp > 1:
        for stage in range(pp):  # every rank creates every group, in the same order
            made = dist.new_group([stage * tp + t for t in range(tp)])
            if stage == rank // tp:
                group = made
    name = str(group.group_name) if group is not None else None
    return ParallelLayout(tp, pp, ep, rank, device, True, name, group)


def place(asked: ParallelLayout) -> ParallelLayout:
    """This process's layout for a build asking for `asked` (on its device): joined when it needs other ranks
    (tp > 1, or pp > 1 on launched ranks), else as asked (one device, or every pipeline stage in this process)."""
    if asked.tp > 1 or (asked.pp > 1 and launched()):
        assert asked.device is not None
        return join(asked.device, tp=asked.tp, pp=asked.pp, ep=asked.ep)
    return asked
