"""What a compile was asked for (CompileOptions), what it produced (CompileResult), and stage timing."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from hfrewrite.compiler.sources import ModelSource
from hfrewrite.compiler.verify import VerifyResult
from hfrewrite.engine.apply import RewriteReport
from hfrewrite.engine.templates import TemplateLibrary
from hfrewrite.parallel.layout import ParallelLayout
from hfrewrite.parallel.pp.plan import stage_count


GRANULARITIES = ("auto", "graph", "layer")


@dataclass
class CompileOptions:
    """What `hfrewrite compile` and friends were asked for."""

    rules: Sequence[Path] = ()
    dtype: str | None = None
    device: str | None = None
    verify: bool = True
    backend: str | None = "inductor"
    progress: bool = True
    verify_seed: int = 0
    tp: int = 1
    ep: bool = False                     # split whole experts over the tp ranks instead of each expert's width
    pp: int = 1                          # pipeline stages (hfrewrite.parallel.pp.split cuts the graph)
    pp_layers: tuple[int, ...] = ()      # layers per stage; empty: near-even
    templates: TemplateLibrary | None = None  # the templates the rules name; None: the shipped library
    device_graphs: bool = True           # decode steps replayed from CUDA graphs (accelerators only)
    max_graph_batch: int = 64            # the largest decode batch captured
    granularity: str = "auto"            # "graph": one compiled graph; "layer": one per group of identical layers;
                                         # "auto": see `granularity_on`

    def layout(self, device: torch.device | None = None) -> ParallelLayout:
        """The parallel layout asked for (tp, stages, ep), not yet joined: `parallel.layout.place` makes this
        process's own from it, the one every later stage reads."""
        return ParallelLayout(tp=self.tp, pp=stage_count(self.pp, self.pp_layers), ep=self.ep, device=device)


@dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    source: ModelSource
    model: Any  # CompiledModel, or a pipeline stage / client (the StepModel protocol)
    rewrite: RewriteReport
    timings: dict[str, float] = field(default_factory=dict)
    verification: VerifyResult | None = None
    ep: bool = False


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def granularity_on(granularity: str, device: torch.device, tp: int = 1) -> str:
    """What "auto" compiles on `device`: layer-wise on one accelerator, where it compiles the llama-8b shape in
    31 s instead of 148 s at the same decode speed within 1 % (H200, BENCHMARKS.md); the whole graph on the CPU,
    where inductor's freezing prepacks every layer's weights (layer-wise decode there is 0.93x at batch 16), and
    under tensor parallelism (layer-wise TP has not run on GPUs)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"compile granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if granularity != "auto":
        return granularity
    return "graph" if device.type == "cpu" or tp > 1 else "layer"
