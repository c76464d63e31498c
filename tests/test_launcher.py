"""The rank launcher's waiting loop, with stand-in processes (no real ranks, so the timing is exact).

Regression: ranks that end between two readings of their exit codes left the launcher waiting on an
empty list with no deadline, forever (the CI hang of `compile --tp 2`). Here the stand-in ranks are
running until the launcher first reads an exit code and have all exited (code 0) from then on, which
is exactly that interleaving.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any

import pytest

from hfrewrite.parallel import distributed

pytestmark = pytest.mark.timeout(60)


class EndsWhileLookedAt:
    """A rank of a group that is running at the first reading of any exit code and has ended ever after."""

    group_read = False  # per test: set on a fresh subclass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pid = 4_000_000  # never signalled: nothing here is alive
        read, write = os.pipe()
        os.close(write)  # an ended process's sentinel: readable (end of file) at once
        self.sentinel = read

    def start(self) -> None:
        pass

    @property
    def exitcode(self) -> int | None:
        if type(self).group_read:
            return 0
        type(self).group_read = True
        return None

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


class StandInContext:
    """multiprocessing's context API, as far as the launcher uses it; one group of ranks per context."""

    def __init__(self) -> None:
        self.Process = type("Rank", (EndsWhileLookedAt,), {"group_read": False})


def test_ranks_ending_between_two_readings_do_not_hang_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: StandInContext())
    outcome: list[distributed.LaunchResult] = []
    waiter = threading.Thread(target=lambda: outcome.append(distributed.launch(2, print)), daemon=True)
    waiter.start()
    waiter.join(timeout=20)  # no time limit on the launch itself, as the CLI calls it
    assert not waiter.is_alive(), "the launcher is still waiting for ranks that have all ended"
    assert outcome and outcome[0].code == 0, outcome
