"""Launched ranks: their environment, spawning local ranks, collective helpers, and shutting them down.

`hfrewrite compile|generate|bench MODEL --tp N` spawns N local ranks itself (`launch`), each of
which runs the same command and joins the group through env:// rendezvous, exactly as under
`torchrun --nproc-per-node N` (which sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for us). The
backend follows the device (gloo on the CPU, NCCL on CUDA, ...), one accelerator per local rank;
joining the group and this rank's place in it are parallel/layout.py's (`join`, `ParallelLayout`).

Nothing may hang: process-group init and collectives time out (HFREWRITE_TP_TIMEOUT seconds), and
the launcher ends every rank as soon as one fails or the user presses Ctrl-C. A failing rank writes
its error message to a file the launcher prints once, instead of N ranks printing it N times.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
import torch.distributed as dist

from hfrewrite.errors import HfRewriteError
from hfrewrite.parallel import rank_guard

RANK_ENTRY = f"{__name__}:_rank_entry"  # what a spawned rank runs once rank_guard has tied it to the launcher

TIMEOUT_ENV = "HFREWRITE_TP_TIMEOUT"
ERRORS_ENV = "HFREWRITE_TP_ERRORS"
DEFAULT_TIMEOUT_S = 300.0
GRACE_S = 5.0  # how long the other ranks get to finish on their own once one has exited non-zero


class DistributedError(HfRewriteError):
    """Tensor-parallel ranks cannot be started or joined, or one of them failed."""


def launched() -> bool:
    """Whether this process is one rank of a launched group (torchrun, or `launch` below)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def spawned() -> bool:
    """Whether this process is a rank `launch` started (the launcher reports errors and interrupts for it)."""
    return bool(os.environ.get(ERRORS_ENV)) and launched()


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) outside one."""
    if not launched():
        return 0, 1, 0
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {error}") from error
    return rank, world, local


def rank() -> int:
    """This process's rank (0 outside a group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()[0]


def timeout() -> datetime.timedelta:
    """How long init and every collective may wait for the other ranks."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError as error:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from error
    return datetime.timedelta(seconds=seconds)


def backend_for(device: torch.device) -> str:
    """The collective backend torch pairs with the device type (gloo for cpu, nccl for cuda, ...)."""
    backends = dist.Backend.default_device_backend_map
    if device.type not in backends:
        raise DistributedError(f"torch.distributed has no backend for device type {device.type!r} "
                               f"(known: {', '.join(sorted(backends))})")
    return backends[device.type]


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One accelerator per local rank; every rank on the CPU shares it."""
    if device.type == "cpu":
        return device
    return torch.device(device.type, local_rank)


def broadcast(value: Any, source: int = 0) -> Any:
    """`value` as rank `source` has it, on every rank (identity outside a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def shared_seed() -> int:
    """A random seed every rank agrees on (sampling must pick the same tokens everywhere)."""
    return int(broadcast(int(torch.randint(0, 2**31 - 1, (1,)).item())))


def finish() -> None:
    """Normal end of a command: wait for every rank (rank 0 may still be printing), then leave the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report_error(text: str) -> bool:
    """Hand an error message to the launcher (printed once, by it); False when there is no launcher to tell."""
    directory = os.environ.get(ERRORS_ENV)
    if not directory or not Path(directory).is_dir():
        return False
    (Path(directory) / f"rank-{env_rank()[0]:05d}.txt").write_text(text)
    return True


@contextlib.contextmanager
def rank_zero_output() -> Iterator[None]:
    """Inside a launched group only rank 0 prints (output, progress, warnings): the ranks would say the same.

    An error leaving the block is reported as usual (the redirection ends with the block).
    """
    if not launched() or env_rank()[0] == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------
# Spawning local ranks


@dataclass(frozen=True)
class LaunchResult:
    """How the ranks ended: an exit code for the command, and the message to print (None if there is none)."""

    code: int
    message: str | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LauncherTerminated(Exception):
    """The launcher got SIGTERM: its ranks are stopped before it exits."""


def _rank_entry(rank: int, world: int, port: int, errors: str, target: Callable[..., int],
                args: tuple[Any, ...]) -> None:
    """A spawned rank (after rank_guard tied it to its launcher): the launcher's environment, a fair share
    of the CPU threads, then target(*args).

    A RuntimeError (what a collective raises when a peer vanished or timed out) leaves its traceback in
    the errors folder instead of on the terminal: the launcher prints it only when no other rank's
    death explains it, so a killed rank gives a one-line summary and a real bug keeps its traceback.
    """
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       ERRORS_ENV: errors})
    share = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(share)
    # Ranks of one host share its cores: inductor compiles in-process when a rank's share is one core,
    # rather than each rank starting its own pool of compile workers on the same cores.
    torch._inductor.config.compile_threads = share
    try:
        code = int(target(*args) or 0)
    except RuntimeError:
        (Path(errors) / f"traceback-{rank:05d}.txt").write_text(traceback.format_exc())
        code = 1
    sys.exit(code)


def _stop(processes: list[Any], grace: float) -> None:
    """Terminate what is still running (after `grace` seconds to end on its own), then kill stragglers."""
    started = [process for process in processes if process.pid is not None]
    deadline = time.monotonic() + grace
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in started:
        if process.is_alive():
            process.terminate()
    for process in started:
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


def _outcome(errors: Path, codes: list[int | None]) -> LaunchResult:
    """The command's exit code and message, from how the ranks ended on their own (None: still running).

    Every rank ending with the same code is a normal end (a failed verification exits 1 everywhere).
    Otherwise the likely first failure speaks: a rank that reported an error, else one that did not
    die of an uncaught exception (code 1 is what the others get when a peer vanishes mid-collective).
    """
    reports = {int(path.stem.split("-")[1]): path.read_text() for path in sorted(errors.glob("rank-*.txt"))}
    tracebacks = {int(path.stem.split("-")[1]): path.read_text() for path in sorted(errors.glob("traceback-*.txt"))}
    failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
    if not failed:
        return LaunchResult(0, next(iter(reports.values()), None))
    if not reports and tracebacks and all(code == 1 for _, code in failed):  # no other rank's end explains it
        rank = min(tracebacks)
        return LaunchResult(1, f"rank {rank} failed:\n{tracebacks[rank]}")
    if len(set(codes)) == 1 and not reports:
        return LaunchResult(failed[0][1] if failed[0][1] > 0 else 1, None)
    rank, code = next((item for item in failed if item[0] in reports), None) or \
        next((item for item in failed if item[1] != 1), failed[0])
    exit_code = code if code > 0 else 1
    if rank in reports:
        return LaunchResult(exit_code, reports[rank])
    how = {r: f"was killed by signal {-c}" if c < 0 else f"exited with code {c}" for r, c in failed}
    others = "".join(f"; rank {r} {how[r]}" for r, _ in failed if r != rank)
    return LaunchResult(exit_code, f"rank {rank} {how[rank]}{' (out of memory?)' if code < 0 else ''}{others}; "
                                   f"the others were stopped")


def launch(world: int, target: Callable[..., int], args: tuple[Any, ...] = (),
           limit: float | None = None, drain_rank: int | None = None) -> LaunchResult:
    """Run target(*args) in `world` spawned local ranks; stop them all when one fails, on Ctrl-C or after `limit` s.

    SIGTERM to the launcher stops every rank, unless `drain_rank` is given: then that rank alone gets the
    SIGTERM (a server drains its requests, then ends the others) and the launcher waits for them as usual.

    `target` must be importable (spawn pickles it by name) and return an exit code.
    """
    context = multiprocessing.get_context("spawn")
    errors = Path(tempfile.mkdtemp(prefix="hfrewrite-tp-"))
    port = _free_port()
    processes = [context.Process(target=rank_guard.run_rank, args=(os.getpid(), RANK_ENTRY, rank, world, port,
                                                                   str(errors), target, args),
                                 name=f"hfrewrite-rank-{rank}") for rank in range(world)]
    deadline = None if limit is None else time.monotonic() + limit
    previous = _on_sigterm(None if drain_rank is None else processes[drain_rank])
    try:
        for process in processes:
            process.start()
        while True:
            # One reading of who is running: ranks ending between two readings must not leave an empty wait list
            # (waiting on nothing with no deadline never returns).
            running = [process.sentinel for process in processes if process.exitcode is None]
            if not running:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                _stop(processes, 0.0)
                return LaunchResult(124, f"the {world} ranks did not finish within {limit:.0f}s and were stopped")
            multiprocessing.connection.wait(running, timeout=remaining)
            if any(process.exitcode not in (None, 0) for process in processes):
                time.sleep(min(1.0, GRACE_S))  # ranks failing for the same reason end together
                ended = [process.exitcode for process in processes]
                _stop(processes, GRACE_S)
                return _outcome(errors, ended)
        return _outcome(errors, [process.exitcode for process in processes])
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the ranks too: give them a moment to end cleanly
        _stop(processes, GRACE_S / 2)
        return LaunchResult(130, "interrupted; all ranks were stopped")
    except LauncherTerminated:
        _stop(processes, 0.0)
        return LaunchResult(128 + int(signal.SIGTERM), "terminated (SIGTERM); all ranks were stopped")
    finally:
        _stop(processes, 0.0)
        shutil.rmtree(errors, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm(drain: Any = None) -> Any:
    """Turn SIGTERM into LauncherTerminated while the ranks run, or pass it on to the `drain` rank (main thread
    only); the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: Any) -> None:
        if drain is not None and drain.pid is not None and drain.exitcode is None:
            os.kill(drain.pid, signal.SIGTERM)
            return
        raise LauncherTerminated()

    return signal.signal(signal.SIGTERM, terminated)
