"""Sampling parameters (HF generate semantics) and log-probabilities; the sampling itself is batched on the device
(hfrewrite.runtime.device_sampling)."""
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
