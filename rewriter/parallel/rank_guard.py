"""The first thing a spawned rank runs: tie its life to the launcher's, before the slow imports (torch).

A rank that is still importing when its launcher dies must not live on, so this module imports
nothing heavy: it arms the parent-death signal (Linux) or a watchdog thread (elsewhere), then hands
over to `distributed._rank_entry`.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import threading
import time
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_S = 1.0  # where there is no parent-death signal: how often a rank checks that its launcher lives


def die_with_launcher(launcher: int) -> None:
    """Make this process end when `launcher` (its parent) does, however it ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(WATCHDOG_S)
            os._exit(1)

        threading.Thread(target=watch, name="hfrewrite-launcher-watchdog", daemon=True).start()
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)


def run_rank(launcher: int, entry: str, *args: Any) -> None:
    """Spawned ranks' target: guard first, then the rank proper, `entry` ("module:function", imported only
    now, after the guard: the launcher's module imports torch)."""
    die_with_launcher(launcher)
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(*args)
