"""Lookahead decoding: a decode step launched, fed the tokens drawn on the device, before the host reads them.

The fake model of test_runtime writes each fed token into its own slot cache and computes logits from the
whole context it reads back through the block tables, so a token fed at the wrong position, slot or row,
or a finished sequence's extra row spoiling a cache block that a later request reuses, changes the tokens.
Every run here must equal the same engine without lookahead (and the plain greedy reference), and must
actually have launched steps ahead (`lookahead_steps`), or the test proves nothing.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hfrewrite.runtime.engine import Engine, Request
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.runner import fed_step
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.runtime.step import Chunk, pack
from tests.test_runtime import CPU, SETTINGS, FakeModel, reference_greedy, request_specs, run

pytestmark = pytest.mark.timeout(120)


class FedFakeModel(FakeModel):
    """The fake model as a runner that can take a decode step's input ids from a device tensor."""

    def __init__(self, cache: CacheConfig) -> None:
        super().__init__(cache)
        self.block_size = cache.block_size
        self.fed = 0

    def prepare_fed(self, chunks: list[Chunk], tokens: torch.Tensor):
        self.fed += 1
        return fed_step(pack(chunks, self.block_size, CPU), tokens)


def make(lookahead: bool, block_size: int = 4, num_blocks: int = 256, eos=(), decode=None,
         max_tokens_per_step: int = 512) -> tuple[Engine, FedFakeModel]:
    cache = CacheConfig(block_size, num_blocks)
    model = FedFakeModel(cache)
    engine = Engine(model, cache, CPU, 512, eos, decode, max_tokens_per_step, lookahead=lookahead)
    model.engine = engine
    return engine, model


@SETTINGS
@given(specs=request_specs, block_size=st.integers(1, 8), data=st.data())
def test_lookahead_generates_the_reference_tokens(specs, block_size: int, data: st.DataObject) -> None:
    full = [reference_greedy(p, n) for p, n in specs]
    eos = data.draw(st.sampled_from(full[0] + [-1]))    # -1: no eos; otherwise a token that ends a sequence early
    engine, model = make(True, block_size, eos=[eos] if eos >= 0 else ())
    requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new, {eos})
    assert engine.lookahead_steps == model.fed
    if max(n for _, n in specs) > 2 and eos < 0:
        assert engine.lookahead_steps > 0, "no step was launched ahead: the test exercised nothing"


@SETTINGS
@given(specs=request_specs, seed=st.integers(0, 2**31), budget=st.integers(1, 8),
       blocks=st.integers(8, 40))
def test_lookahead_changes_no_token_of_sampled_queued_or_chunked_requests(specs, seed: int, budget: int,
                                                                        blocks: int) -> None:
    """Seeded sampling, a small cache (requests queue and reuse the blocks of finished ones) and prefill
    chunks: the same tokens with and without lookahead."""
    def requests() -> list[Request]:
        return [Request(list(p), SamplingParams(max_new_tokens=n, temperature=1.2, top_k=40, seed=seed + i))
                for i, (p, n) in enumerate(specs)]

    need = max(CacheConfig(4, 1).blocks_for(len(p) + n) for p, n in specs)
    plain_engine, _ = make(False, num_blocks=max(blocks, need), max_tokens_per_step=budget)
    ahead_engine, _ = make(True, num_blocks=max(blocks, need), max_tokens_per_step=budget)
    plain, ahead = run(plain_engine, requests()), run(ahead_engine, requests())
    assert plain_engine.lookahead_steps == 0
    assert dict(ahead.tokens) == dict(plain.tokens)
    assert ahead.reason == plain.reason


def test_lookahead_stops_at_a_stop_string_and_frees_every_block() -> None:
    """A stop string ends a sequence whose next step is already in flight: its row is dropped, its text cut."""
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)   # noqa: E731
    prompt = [3, 1, 4, 1, 5]
    full = reference_greedy(prompt, 12)
    stop = decode(full[4:6])
    want = decode(full)[:decode(full).find(stop)]
    engine, _ = make(True, decode=decode)
    out = run(engine, [Request(prompt, SamplingParams(max_new_tokens=12, stop=(stop,))),
                       Request([7, 7], SamplingParams(max_new_tokens=12))])
    assert out.reason[0] == "stop" and out.text[0] == want
    assert out.tokens[1] == reference_greedy([7, 7], 12)
    assert engine.lookahead_steps > 0


def test_lookahead_is_off_on_the_cpu_by_default() -> None:
    cache = CacheConfig(4, 16)
    assert not Engine(FedFakeModel(cache), cache, CPU, 64).lookahead


def test_a_request_arriving_mid_run_is_not_held_back_by_lookahead() -> None:
    """Lookahead keeps launching decode steps only while nobody waits: a request submitted mid-run gets its
    prefill into the next step, and its first token long before the running request ends."""
    engine, _ = make(True)
    first = engine.submit(Request([5, 6, 7], SamplingParams(max_new_tokens=40)))
    events = []
    for _ in range(5):
        events += engine.step()
    assert engine.lookahead_steps > 0
    second = engine.submit(Request([9, 9], SamplingParams(max_new_tokens=3)))
    order = []
    while engine.has_work:
        for event in engine.step():
            events.append(event)
            if event.finished:
                order.append(event.request_id)
    assert order == [second, first]
    tokens = {rid: [e.token_id for e in events if e.request_id == rid and e.token_id is not None]
              for rid in (first, second)}
    assert tokens[first] == reference_greedy([5, 6, 7], 40)
    assert tokens[second] == reference_greedy([9, 9], 3)
