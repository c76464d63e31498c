"""Block sizes for the fused-MoE kernels, measured once per shape bucket on the device that runs them.

The best tiles depend on how many rows each expert gets (M * K / E), on H and I, on the dtype and on the chip,
so an `Autotuner` times a few candidates the first time a (M bucket, E, H, I, K, dtype, device) key is seen and
keeps the winner. The caller owns the tuner (one per model or engine); `DEFAULT_TUNER` serves the custom op,
which cannot take Python objects. Under the Triton interpreter, or while a CUDA graph is being captured (no
timing possible then), a fixed config is used instead.
"""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hfrewrite.device import capturing_graph
from hfrewrite.device import device_name as accelerator_name


@dataclass(frozen=True)
class TileConfig:
    """One GEMM launch's tile (BLOCK_N x BLOCK_K per step) and its launch knobs."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeConfig:
    """BLOCK_M is shared by both GEMMs (it fixes the expert padding); each GEMM has its own tile."""

    block_m: int
    gate_up: TileConfig
    down: TileConfig


# Small tiles so the interpreter (numpy per program) stays quick and masks on partial tiles get exercised.
INTERPRETER_CONFIG = MoeConfig(16, TileConfig(32, 32, 1, 1), TileConfig(32, 32, 1, 1))
BLOCK_M_CHOICES = (16, 32, 64, 128)
# Few rows per expert: the weights dominate, so narrow N tiles (more programs in flight) and long K steps.
_NARROW_TILES = (TileConfig(32, 128, 4, 4), TileConfig(64, 128, 4, 4), TileConfig(64, 64, 4, 4),
                 TileConfig(128, 64, 4, 3), TileConfig(32, 256, 4, 3))
# Many rows per expert: compute bound, so wider tiles and more warps.
_WIDE_TILES = (TileConfig(64, 64, 4, 3), TileConfig(128, 64, 4, 3), TileConfig(128, 64, 8, 4),
               TileConfig(64, 128, 4, 3), TileConfig(128, 128, 8, 3))

ShapeKey = tuple[int, int, int, int, int, str, str, str]
# run(block_m, stage, tile): launch stage "gate_up" or "down" once with that config (alignment cached by caller).
Runner = Callable[[int, str, TileConfig], None]


@functools.cache
def device_name(device: torch.device) -> str:
    """The chip's name (configs do not carry over between chips); cached, it is asked on every call."""
    return accelerator_name(device)


def m_bucket(tokens: int) -> int:
    """Next power of two: configs tuned at one M serve every M up to twice as large."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


def rows_per_expert(tokens: int, top_k: int, experts: int) -> float:
    """Average routed rows each expert gets (uniform routing)."""
    return tokens * top_k / max(experts, 1)


def block_m_candidates(tokens: int, top_k: int, experts: int) -> tuple[int, ...]:
    """The BLOCK_M just above the expected rows per expert, and the one below it: bigger only pads more."""
    fit = m_bucket(math.ceil(rows_per_expert(tokens, top_k, experts)))
    fit = min(BLOCK_M_CHOICES[-1], max(BLOCK_M_CHOICES[0], fit))
    return tuple(b for b in BLOCK_M_CHOICES if fit // 2 <= b <= fit)


def tile_candidates(block_m: int) -> tuple[TileConfig, ...]:
    """Which tile family suits this many rows per block."""
    return _NARROW_TILES if block_m <= 32 else _WIDE_TILES


def heuristic_config(tokens: int, top_k: int, experts: int) -> MoeConfig:
    """An untimed guess, for when measuring is impossible (graph capture) or the device has no timer."""
    block_m = block_m_candidates(tokens, top_k, experts)[-1]
    tile = tile_candidates(block_m)[0]
    return MoeConfig(block_m, tile, tile)


@dataclass
class Autotuner:
    """Keeps the fastest MoeConfig per shape key; `reps` timed launches per candidate (median)."""

    reps: int = 10
    best: dict[ShapeKey, MoeConfig] = field(default_factory=dict)
    timings: dict[ShapeKey, float] = field(default_factory=dict)

    @staticmethod
    def key(tokens: int, experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
            device: torch.device, variant: str) -> ShapeKey:
        """variant names what changes the kernel beyond shapes (layout, bias, activation)."""
        return (m_bucket(tokens), experts, hidden, inter, top_k, str(dtype), device_name(device), variant)

    def config(self, key: ShapeKey, tokens: int, top_k: int, experts: int, device: torch.device, run: Runner,
               skip: tuple[type[Exception], ...] = ()) -> MoeConfig:
        """The stored winner for `key`, else measure the candidates now (configs raising `skip` are dropped)."""
        if key in self.best:
            return self.best[key]
        if device.type == "cpu" or capturing_graph(device):
            return heuristic_config(tokens, top_k, experts)
        winner: tuple[float, MoeConfig] | None = None
        for block_m in block_m_candidates(tokens, top_k, experts):
            stages: dict[str, tuple[float, TileConfig]] = {}
            for stage in ("gate_up", "down"):
                for tile in tile_candidates(block_m):
                    try:
                        ms = self._time(lambda: run(block_m, stage, tile), device)
                    except skip:
                        continue
                    if stage not in stages or ms < stages[stage][0]:
                        stages[stage] = (ms, tile)
            if len(stages) == 2:
                total = stages["gate_up"][0] + stages["down"][0]
                if winner is None or total < winner[0]:
                    winner = (total, MoeConfig(block_m, stages["gate_up"][1], stages["down"][1]))
        if winner is None:
            raise RuntimeError(f"no fused-MoE config ran for {key}")
        self.timings[key], self.best[key] = winner
        return winner[1]

    def _time(self, launch: Callable[[], None], device: torch.device) -> float:
        """Median milliseconds of `reps` launches after one untimed (compiling) launch."""
        launch()
        torch.accelerator.synchronize(device)
        times = []
        for _ in range(self.reps):
            start, end = torch.Event(device, enable_timing=True), torch.Event(device, enable_timing=True)
            start.record()
            launch()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


DEFAULT_TUNER = Autotuner()
