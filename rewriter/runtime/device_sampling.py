"""Sampling on the model's device for a whole step at once: one device-to-host copy of the chosen tokens.

Per-row knobs (temperature, top-k, top-p) are tensors, so a batch mixing greedy and sampled requests is one
sequence of kernels. Randomness is counter-based: the noise of request r's n-th token is a hash of (seed_r,
n, vocab index), turned into Gumbel noise (argmax of logits / T + Gumbel is an exact draw from the softmax).
So a seeded request gets the same tokens whatever else is in its batch, on any device, and no generator
state lives anywhere but in the request's own (seed, count).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

from hfrewrite.runtime.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijective 64-bit mix (int64 multiplication wraps in torch)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of (seed, counter, vocab index) per row."""
    row = _splitmix(_splitmix(seeds) ^ counters)
    columns = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    bits = _splitmix(row[:, None] + columns[None, :] * _GOLDEN)
    top24 = _shift_right(bits, 40).to(torch.float32)          # 24 random bits: exact in float32
    return (top24 + 0.5) * (1.0 / (1 << 24))


def new_seed() -> int:
    """A fresh nondeterministic seed for an unseeded request (leaves every torch RNG alone)."""
    return secrets.randbits(62)


@dataclass(frozen=True)
class SamplingBatch:
    """The per-row sampling knobs of one step, as tensors on the logits' device."""

    temperature: torch.Tensor   # [S] float32; 0 = greedy
    top_k: torch.Tensor         # [S] long; 0 = off
    top_p: torch.Tensor         # [S] float32; 1 = off
    seeds: torch.Tensor         # [S] long
    counters: torch.Tensor      # [S] long: how many tokens the request has drawn so far
    any_sampled: bool
    any_filtered: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
              device: torch.device) -> "SamplingBatch":
        """Pack per-request knobs (built on the host, copied once)."""
        temperature = [0.0 if p.greedy else float(p.temperature) for p in params]
        top_k = [max(int(p.top_k), 0) for p in params]
        top_p = [float(p.top_p) for p in params]
        sampled = [not p.greedy for p in params]
        filtered = any(s and (k > 0 or q < 1.0) for s, k, q in zip(sampled, top_k, top_p))

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            tensor = torch.tensor(values, dtype=dtype)
            if device.type != "cpu":
                tensor = tensor.pin_memory().to(device, non_blocking=True)
            return tensor

        return cls(put(temperature, torch.float32), put(top_k, torch.long), put(top_p, torch.float32),
                   put([_signed(s) for s in seeds], torch.long), put(list(counters), torch.long), any(sampled),
                   filtered)


def _filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k, then outside its nucleus (the smallest prefix with mass >= top_p;
    the best token always stays). HF order: temperature, top-k, top-p."""
    vocab = scores.shape[-1]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device)[None, :]
    drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (ranks > 0)
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


ARGMAX_CHUNK = 128


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [S, V], ties to the lowest index, as torch.argmax.

    torch's argmax of a few long rows runs one block per row (28 us for 1 x 128256 on an H200, 2% of a batch-1
    step); reducing chunks of 128 first, then the chunk maxima, spreads a row over the whole device.
    """
    rows, vocab = scores.shape
    if vocab % ARGMAX_CHUNK or vocab < 64 * ARGMAX_CHUNK:
        return torch.argmax(scores, dim=-1)
    best, inner = scores.view(rows, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK).max(dim=-1)   # first max of each chunk
    chunk = torch.argmax(best, dim=-1)                                                 # first chunk holding the max
    return chunk * ARGMAX_CHUNK + inner.gather(1, chunk[:, None])[:, 0]


def sample_batch(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids [S] (on the logits' device) for logits [S, V]: greedy rows argmax, the others a draw."""
    greedy = argmax_rows(logits)
    if not batch.any_sampled:
        return greedy
    temperature = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scores = logits.float() / temperature[:, None]
    if batch.any_filtered:
        scores = _filter_top_k_top_p(scores, batch.top_k, batch.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(batch.seeds, batch.counters, logits.shape[-1])))
    drawn = torch.argmax(scores + gumbel, dim=-1)
    return torch.where(batch.temperature > 0, drawn, greedy)


@dataclass
class DrawState:
    """A sampled request's randomness: its seed and how many tokens it has drawn (the counter of its noise)."""

    seed: int
    drawn: int = 0


def make_generator(params: SamplingParams) -> DrawState | None:
    """The draw state of a request: None when greedy; a fresh nondeterministic seed when none is given."""
    if params.greedy:
        return None
    return DrawState(params.seed if params.seed is not None else new_seed())


def draw_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
              states: Sequence[DrawState | None]) -> torch.Tensor:
    """One token per row of logits [S, V], all rows at once, left on the device [S]; advances the states."""
    if all(state is None for state in states) and all(p.greedy for p in params):
        return argmax_rows(logits)   # all greedy: no knob tensors to build and copy
    seeds = [state.seed if state is not None else 0 for state in states]
    counters = [state.drawn if state is not None else 0 for state in states]
    tokens = sample_batch(logits, SamplingBatch.build(params, seeds, counters, logits.device))
    for state in states:
        if state is not None:
            state.drawn += 1
    return tokens


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                states: Sequence[DrawState | None]) -> list[int]:
    """One token per row of logits [S, V], all rows at once, one device-to-host copy; advances the states."""
    return draw_rows(logits, params, states).tolist()


@dataclass
class PendingTokens:
    """Tokens drawn on the device whose copy to the host has been started but not waited for.

    The copy is queued right after the draw, so waiting for it (`tolist`) waits for this step only, not for
    work queued after it: a next step launched in between runs on the device while the host reads these.
    """

    device: torch.Tensor                # [S] long, where they were drawn
    host: torch.Tensor                  # [S] long, pinned when the device is not the CPU
    event: object | None = None         # recorded after the copy (None on the CPU: the copy is done)

    @classmethod
    def start(cls, tokens: torch.Tensor) -> "PendingTokens":
        if tokens.device.type == "cpu":
            return cls(tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.get_device_module(tokens.device).Event()
        event.record()
        return cls(tokens, host, event)

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def sample(logits: torch.Tensor, params: SamplingParams, state: DrawState | None) -> int:
    """The next token from one row of logits [V] (the batched path on one row: same draws, same seeds)."""
    return sample_rows(logits[None], [params], [state])[0]
