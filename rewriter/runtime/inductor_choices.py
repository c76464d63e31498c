"""Inductor's kernel choices for decoder graphs on a GPU: rows of a whole hidden state reduced in one kernel.

Inductor reduces a row in one pass with the row held in registers (a persistent reduction, fused with what
consumes it) only up to 1024 elements; past that it loops, and an RMSNorm over a 2048- or 4096-wide hidden
state becomes two kernels (residual add + sum of squares, then the scaled product). In a batch-1 decode step
every kernel is ~1.3 us of mostly latency, two norms per layer: one kernel each instead saves ~2.6 us a layer.
Hidden states up to `HFREWRITE_PERSISTENT_ROWS` elements (default 8192; 0 keeps inductor's own rule) are
reduced persistently. Inductor's hook for this is a choices handler (thread-local, set around compiling calls).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

ROWS_VARIABLE = "HFREWRITE_PERSISTENT_ROWS"
DEFAULT_ROWS = 8192


def persistent_row_limit() -> int:
    value = os.environ.get(ROWS_VARIABLE, str(DEFAULT_ROWS))
    if not value.isdigit():
        raise ValueError(f"{ROWS_VARIABLE}={value!r}: expected a number of elements (0 turns it off)")
    return int(value)


def wide_row_choices(limit: int) -> Any:
    """An InductorChoices that also reduces inner rows of up to `limit` elements persistently."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRowChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return (bool(config.triton.persistent_reductions) and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit))

    return WideRowChoices()


def gpu_choices(device_type: str) -> contextlib.AbstractContextManager:
    """Around compiling calls on a GPU: the wide-row choices (nothing on the CPU, whose C++ kernels it does not
    concern, or when turned off)."""
    limit = persistent_row_limit()
    if device_type == "cpu" or limit == 0:
        return contextlib.nullcontext()
    from torch._inductor.virtualized import V

    if not hasattr(V, "set_choices_handler"):
        return contextlib.nullcontext()
    return V.set_choices_handler(wide_row_choices(limit))
