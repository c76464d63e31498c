"""Sampling: greedy, seeds, top-k, top-p and temperature, against float64 numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hfrewrite.runtime.device_sampling import make_generator, sample
from hfrewrite.runtime.sampling import SamplingParams

SETTINGS = settings(max_examples=60, deadline=None)

finite = st.floats(-20, 20, allow_nan=False, allow_infinity=False, width=32)
logit_arrays = st.integers(2, 64).flatmap(lambda v: arrays(np.float32, v, elements=finite))
temperatures = st.floats(0.2, 4.0)


def softmax64(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def draws(logits: np.ndarray, params: SamplingParams, n: int) -> list[int]:
    generator = make_generator(params)
    tensor = torch.from_numpy(logits)
    return [sample(tensor, params, generator) for _ in range(n)]


@SETTINGS
@given(logits=logit_arrays, temperature=st.sampled_from([0.0, -1.0]), top_k=st.integers(0, 5),
       top_p=st.floats(0.0, 1.0))
def test_greedy_is_argmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert params.greedy and make_generator(params) is None
    assert sample(torch.from_numpy(logits), params, None) == int(np.argmax(logits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_in_half_precision(dtype: torch.dtype) -> None:
    logits = (torch.randn(1000) * 4).to(dtype)
    assert sample(logits, SamplingParams(), None) == int(np.argmax(logits.float().numpy()))


def test_seed_reproduces_and_different_seeds_differ() -> None:
    logits = np.random.default_rng().normal(size=50).astype(np.float32)
    seed = int(np.random.default_rng().integers(0, 2**31))
    params = SamplingParams(temperature=1.0, seed=seed)
    first = draws(logits, params, 200)
    assert draws(logits, params, 200) == first
    others = [draws(logits, SamplingParams(temperature=1.0, seed=seed + d), 200) for d in (1, 2, 12345)]
    assert all(other != first for other in others)
    assert len(set(first)) > 5, "200 draws over 50 tokens at temperature 1 should not be this narrow"


def test_unseeded_sampling_leaves_the_global_rng_alone() -> None:
    """A request without a seed must not reseed torch's global generator (a user's manual_seed)."""
    seed = int(np.random.default_rng().integers(0, 2**31))
    torch.manual_seed(seed)
    expected = torch.rand(4)
    torch.manual_seed(seed)
    generator = make_generator(SamplingParams(temperature=1.0))
    sample(torch.randn(8, generator=torch.Generator().manual_seed(seed)), SamplingParams(temperature=1.0), generator)
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_generators_differ() -> None:
    params = SamplingParams(temperature=1.0)
    logits = np.random.default_rng().normal(size=100).astype(np.float32)
    assert draws(logits, params, 100) != draws(logits, params, 100)


@SETTINGS
@given(logits=logit_arrays, data=st.data(), temperature=temperatures, seed=st.integers(0, 2**31))
def test_top_k_never_leaves_the_k_best(logits: np.ndarray, data: st.DataObject, temperature: float,
                                       seed: int) -> None:
    k = data.draw(st.integers(1, logits.size))
    kth_best = np.sort(logits)[::-1][k - 1]
    picked = draws(logits, SamplingParams(temperature=temperature, top_k=k, seed=seed), 40)
    assert all(logits[t] >= kth_best for t in picked), (k, picked)


def nucleus(logits: np.ndarray, temperature: float, top_p: float) -> tuple[set[int], float]:
    """The smallest set of most likely tokens with mass >= top_p (ties at its edge included), and the
    distance of any cumulative mass from top_p (to skip cases float32 cannot decide)."""
    probs = softmax64(logits, temperature)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, top_p) + 1)
    edge = probs[order[min(size, len(order)) - 1]]
    return {int(t) for t in np.flatnonzero(probs >= edge)}, float(np.min(np.abs(cumulative - top_p)))


@SETTINGS
@given(logits=logit_arrays, top_p=st.floats(0.01, 0.99), temperature=temperatures, seed=st.integers(0, 2**31))
def test_top_p_never_leaves_the_nucleus(logits: np.ndarray, top_p: float, temperature: float, seed: int) -> None:
    allowed, margin = nucleus(logits, temperature, top_p)
    assume(margin > 1e-4)
    picked = draws(logits, SamplingParams(temperature=temperature, top_p=top_p, seed=seed), 40)
    assert set(picked) <= allowed, (sorted(allowed), picked)


@SETTINGS
@given(logits=logit_arrays, top_p=st.floats(0.05, 0.99), data=st.data(), seed=st.integers(0, 2**31))
def test_top_k_and_top_p_together(logits: np.ndarray, top_p: float, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, logits.size))
    kth_best = np.sort(logits)[::-1][k - 1]
    kept = np.where(logits >= kth_best, logits, -np.inf)
    allowed, margin = nucleus(kept, 1.0, top_p)
    assume(margin > 1e-4)
    picked = draws(logits, SamplingParams(temperature=1.0, top_k=k, top_p=top_p, seed=seed), 40)
    assert set(picked) <= allowed


@given(logits=logit_arrays, top_p=st.sampled_from([0.0, 1e-9]), seed=st.integers(0, 2**31))
@settings(max_examples=20, deadline=None)
def test_top_p_zero_keeps_the_best_token(logits: np.ndarray, top_p: float, seed: int) -> None:
    """Like HF (min_tokens_to_keep=1): a nucleus that small is the most likely token, not an error."""
    assume(np.sum(logits == logits.max()) == 1)
    picked = draws(logits, SamplingParams(temperature=1.0, top_p=top_p, seed=seed), 10)
    assert set(picked) == {int(np.argmax(logits))}


@SETTINGS
@given(logits=logit_arrays, seed=st.integers(0, 2**31))
def test_temperature_near_zero_is_argmax(logits: np.ndarray, seed: int) -> None:
    top_two = np.sort(logits)[::-1][:2]
    assume(top_two[0] - top_two[1] > 0.05)
    picked = draws(logits, SamplingParams(temperature=1e-4, seed=seed), 20)
    assert set(picked) == {int(np.argmax(logits))}


def test_high_temperature_spreads() -> None:
    rng = np.random.default_rng()
    logits = rng.normal(size=10).astype(np.float32)
    best = int(np.argmax(logits))
    logits[best] += 4.0  # a clear favourite: p >= e^4 / (e^4 + 9 e^(gap)) well above 1/2 at T=1
    seed = int(rng.integers(0, 2**31))
    cold = draws(logits, SamplingParams(temperature=0.5, seed=seed), 2000)
    hot = draws(logits, SamplingParams(temperature=100.0, seed=seed), 2000)
    assert cold.count(best) / 2000 > 0.8
    assert hot.count(best) / 2000 < 0.2  # uniform would be 0.1
    assert len(set(hot)) == 10


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.0, 0), (1.8, 3)])
def test_frequencies_follow_the_distribution(temperature: float, top_k: int) -> None:
    rng = np.random.default_rng()
    logits = rng.normal(size=6).astype(np.float32)
    kept = logits if top_k == 0 else np.where(logits >= np.sort(logits)[::-1][top_k - 1], logits, -np.inf)
    probs = softmax64(kept, temperature)
    n = 6000
    picked = draws(logits, SamplingParams(temperature=temperature, top_k=top_k, seed=int(rng.integers(2**31))), n)
    freqs = np.bincount(picked, minlength=6) / n
    # 5 sigma of a binomial proportion (sigma <= 0.5 / sqrt(n) ~ 0.0065)
    assert np.all(np.abs(freqs - probs) < 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3), (freqs, probs)
