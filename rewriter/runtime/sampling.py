"""Sampling: greedy, or temperature with top-k / top-p, reproducible with a per-request seed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (HF `generate` semantics for the shared knobs)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None      # report the sampled token's log-probability and this many top alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()  # a fresh nondeterministic seed, without reseeding torch's global generator
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V] (float32 on the CPU for reproducibility across devices)."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False  # keep the first token always (top_p <= 0 included)
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def logprobs(logits: torch.Tensor, params: SamplingParams, token: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `params.logprobs` most likely (token, log-probability) pairs.

    The distribution is the one sampled from before top-k / top-p filtering: softmax(logits / temperature),
    or softmax(logits) when greedy (what OpenAI-style servers report).
    """
    scores = logits.float().cpu()
    if not params.greedy:
        scores = scores / params.temperature
    log_probs = torch.log_softmax(scores, dim=-1)
    count = min(params.logprobs or 0, log_probs.numel())
    top = torch.topk(log_probs, count) if count else None
    pairs = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
    return float(log_probs[token]), pairs
