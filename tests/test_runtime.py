"""The runtime without a model: block allocator, packing, and the continuous-batching Engine.

The Engine runs a fake forward that behaves like a real model with a KV cache: it writes each packed
token into a fake cache at `slot_mapping`, reads every sequence's context back through `block_tables` /
`seq_lens`, and returns logits that are a deterministic pseudo-random function of that whole context.
So a token comes out right only when packing, block tables, chunking and cache reuse are all right;
the expected tokens come from a plain loop over the context, with no engine, packing or cache.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hfrewrite.errors import RequestError
from hfrewrite.runtime.step import Chunk, pack
from hfrewrite.runtime.engine import Engine, Request
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

VOCAB = 256
CPU = torch.device("cpu")
pytestmark = pytest.mark.timeout(120)  # a scheduling bug shows up as an endless loop

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# the fake model and its independent reference
# --------------------------------------------------------------------------------------------------

def context_logits(context: list[int]) -> torch.Tensor:
    """Logits [VOCAB] that depend on every token of `context` and on its order (a rolling hash seed)."""
    seed = 17
    for token in context:
        seed = (seed * 1_000_003 + token + 1) % (2**61 - 1)
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3.0


def reference_greedy(prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    """What a correct engine must generate: argmax over the full context, token by token."""
    context, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(context_logits(context)))
        out.append(token)
        context.append(token)
        if token in eos:
            break
    return out


class FakeModel:
    """forward(step) -> logits [S, VOCAB]; keeps its own token cache indexed by cache slot."""

    def __init__(self, cache: CacheConfig) -> None:
        self.slots = torch.full((cache.capacity,), -1, dtype=torch.long)
        self.engine: Engine | None = None
        self.peak_running = 0
        self.step_sizes: list[tuple[int, int]] = []  # (tokens, sequences) per forward

    def __call__(self, step) -> torch.Tensor:
        ids, positions, md = step.input_ids[0], step.position_ids[0], step.metadata
        assert step.input_ids.shape == step.position_ids.shape
        assert md.slot_mapping.shape == ids.shape
        self.slots[md.slot_mapping] = ids
        sequences = step.logits_index.numel()
        self.step_sizes.append((ids.numel(), sequences))
        if self.engine is not None:
            self.peak_running = max(self.peak_running, len(self.engine.running))
        logits = torch.empty(sequences, VOCAB)
        block_size = int(md.block_size[0])
        for row in range(sequences):
            length = int(md.seq_lens[row])
            context = self.slots[[int(md.block_tables[row, p // block_size]) * block_size + p % block_size
                                  for p in range(length)]].tolist()
            last = int(step.logits_index[row])
            assert context[-1] == int(ids[last]), "the logits row is not the sequence's last token"
            assert int(positions[last]) == length - 1
            logits[row] = context_logits(context)
        return logits


@dataclass
class Outcome:
    """Everything the event stream said, per request id."""

    tokens: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    reason: dict[int, str | None] = field(default_factory=dict)
    errors: dict[int, RequestError] = field(default_factory=dict)


def make_engine(block_size: int = 4, num_blocks: int = 256, max_context: int = 512, eos=(), decode=None,
                max_tokens_per_step: int = 512) -> tuple[Engine, FakeModel]:
    cache = CacheConfig(block_size, num_blocks)
    model = FakeModel(cache)
    engine = Engine(model, cache, CPU, max_context, eos, decode, max_tokens_per_step)
    model.engine = engine
    return engine, model


def run(engine: Engine, requests: list[Request]) -> Outcome:
    """Drive the engine to the end; check the event protocol (one final event per request, none after)."""
    out = Outcome()
    for event in engine.run(requests):
        assert event.request_id not in out.reason, f"event for request {event.request_id} after it finished"
        if event.token_id is not None:
            out.tokens[event.request_id].append(event.token_id)
        out.text[event.request_id] += event.text
        if event.error is not None:
            assert isinstance(event.error, RequestError)
            assert event.finished and event.token_id is None
            out.errors[event.request_id] = event.error
        if event.finished:
            out.reason[event.request_id] = event.finish_reason
    assert set(out.reason) == {r.request_id for r in requests}, "some request never finished"
    assert not engine.running and not engine.waiting
    assert engine.allocator.free_blocks == engine.cache.num_blocks, "blocks leaked"
    return out


token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
request_specs = st.lists(st.tuples(token_lists, st.integers(1, 8)), min_size=1, max_size=5)


# --------------------------------------------------------------------------------------------------
# block allocator
# --------------------------------------------------------------------------------------------------

def test_allocator_hands_out_lowest_ids_first() -> None:
    allocator = BlockAllocator(10)
    assert allocator.allocate(3) == [0, 1, 2]
    assert allocator.allocate(2) == [3, 4]
    allocator.free([1, 0])
    assert allocator.free_blocks == 7
    assert allocator.allocate(3) == [0, 1, 5]


@SETTINGS
@given(num_blocks=st.integers(1, 24), data=st.data())
def test_allocator_matches_a_sorted_free_set(num_blocks: int, data: st.DataObject) -> None:
    """Random allocate/free sequences against a model: a set of free ids, lowest handed out first."""
    allocator = BlockAllocator(num_blocks)
    free, held = set(range(num_blocks)), []
    for _ in range(data.draw(st.integers(1, 30))):
        if held and data.draw(st.booleans()):
            blocks = held.pop(data.draw(st.integers(0, len(held) - 1)))
            allocator.free(blocks)
            free.update(blocks)
        else:
            count = data.draw(st.integers(0, num_blocks + 2))
            assert allocator.can_allocate(count) == (count <= len(free))
            if count > len(free):
                with pytest.raises(RequestError, match="KV cache full"):
                    allocator.allocate(count)
            else:
                blocks = allocator.allocate(count)
                assert blocks == sorted(free)[:count]
                free.difference_update(blocks)
                held.append(blocks)
        assert allocator.free_blocks == len(free)
    every = sorted(b for blocks in held for b in blocks) + sorted(free)
    assert sorted(every) == list(range(num_blocks)), "a block is held twice or lost"


def test_allocator_over_allocation_changes_nothing() -> None:
    allocator = BlockAllocator(4)
    allocator.allocate(3)
    with pytest.raises(RequestError, match="2 blocks wanted, 1 of 4 free"):
        allocator.allocate(2)
    assert allocator.free_blocks == 1
    assert allocator.allocate(1) == [3]


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_allocator_needs_a_block(num_blocks: int) -> None:
    with pytest.raises(RequestError, match="at least one block"):
        BlockAllocator(num_blocks)


@pytest.mark.parametrize("block_size", [0, -1])
def test_cache_config_rejects_empty_blocks(block_size: int) -> None:
    with pytest.raises(RequestError, match="block_size"):
        CacheConfig(block_size=block_size, num_blocks=4)


@given(block_size=st.integers(1, 64), tokens=st.integers(0, 5000))
def test_blocks_for_is_the_ceiling(block_size: int, tokens: int) -> None:
    blocks = CacheConfig(block_size, 8).blocks_for(tokens)
    assert blocks * block_size >= tokens and (blocks - 1) * block_size < max(tokens, 1)


# --------------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------------

@st.composite
def chunk_layouts(draw: st.DrawFn) -> tuple[int, list[Chunk]]:
    """Several sequences' chunks with disjoint, shuffled block tables (sometimes with spare blocks)."""
    block_size = draw(st.integers(1, 8))
    ends = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    needs = [-(-end // block_size) + draw(st.integers(0, 2)) for end in ends]
    ids = draw(st.permutations(range(sum(needs) + draw(st.integers(0, 5)))))
    chunks, taken = [], 0
    for end, need in zip(ends, needs):
        start = draw(st.integers(0, end - 1))
        tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=end - start, max_size=end - start))
        chunks.append(Chunk(tokens, start, list(ids[taken:taken + need])))
        taken += need
    return block_size, chunks


def slot_of(chunk: Chunk, position: int, block_size: int) -> int:
    return chunk.blocks[position // block_size] * block_size + position % block_size


@SETTINGS
@given(layout=chunk_layouts())
def test_pack_against_block_tables(layout: tuple[int, list[Chunk]]) -> None:
    block_size, chunks = layout
    step = pack(chunks, block_size, CPU)
    md = step.metadata
    flat_ids, flat_pos, flat_slots, last = [], [], [], []
    for chunk in chunks:
        positions = range(chunk.start, chunk.start + len(chunk.tokens))
        flat_ids += list(chunk.tokens)
        flat_pos += list(positions)
        flat_slots += [slot_of(chunk, p, block_size) for p in positions]
        last.append(len(flat_ids) - 1)
    assert step.input_ids.tolist() == [flat_ids]
    assert step.position_ids.tolist() == [flat_pos]
    assert md.slot_mapping.tolist() == flat_slots
    assert step.logits_index.tolist() == last
    assert len(set(flat_slots)) == len(flat_slots), "two tokens write the same cache slot"
    assert int(md.block_size[0]) == block_size
    assert md.query_start_loc.tolist() == [0] + [i + 1 for i in last]
    offset = 0
    for row, chunk in enumerate(chunks):
        count, end = len(chunk.tokens), chunk.start + len(chunk.tokens)
        assert int(md.seq_lens[row]) == end
        need = -(-end // block_size)
        assert md.block_tables[row, :need].tolist() == list(chunk.blocks[:need])
        # the slots a chunk writes are exactly the tail of the context it reads
        context_slots = [slot_of(chunk, p, block_size) for p in range(end)]
        assert context_slots[chunk.start:end] == flat_slots[offset:offset + count]
        offset += count
    assert md.block_tables.shape[1] == max(-(-(c.start + len(c.tokens)) // block_size) for c in chunks)


@SETTINGS
@given(layout=chunk_layouts(), extra=st.integers(0, 3))
def test_pack_pads_block_tables_to_a_static_width(layout: tuple[int, list[Chunk]], extra: int) -> None:
    block_size, chunks = layout
    natural = pack(chunks, block_size, CPU).metadata.block_tables
    padded = pack(chunks, block_size, CPU, block_table_width=natural.shape[1] + extra).metadata.block_tables
    assert padded.shape == (natural.shape[0], natural.shape[1] + extra)
    assert torch.equal(padded[:, :natural.shape[1]], natural)
    if natural.shape[1] > 1:
        with pytest.raises(ValueError, match="narrower"):
            pack(chunks, block_size, CPU, block_table_width=natural.shape[1] - 1)


@given(block_size=st.integers(1, 8), end=st.integers(2, 40))
def test_pack_refuses_a_table_too_short(block_size: int, end: int) -> None:
    blocks = list(range(-(-end // block_size) - 1))
    with pytest.raises(ValueError, match="cache slots"):
        pack([Chunk([5] * end, 0, blocks)], block_size, CPU)


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------

@SETTINGS
@given(specs=request_specs, block_size=st.integers(1, 8))
def test_engine_generates_the_reference_tokens(specs, block_size: int) -> None:
    engine, _ = make_engine(block_size=block_size)
    requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new)
        assert len(out.tokens[request.request_id]) == max_new
        assert out.reason[request.request_id] == "length"


@SETTINGS
@given(specs=request_specs, data=st.data())
def test_engine_stops_at_eos(specs, data: st.DataObject) -> None:
    full = [reference_greedy(p, n) for p, n in specs]
    eos = data.draw(st.sampled_from(full[0]))
    engine, _ = make_engine(eos=[eos])
    requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        want = reference_greedy(prompt, max_new, {eos})
        assert out.tokens[request.request_id] == want
        assert out.reason[request.request_id] == ("eos" if want[-1] == eos else "length")
    first = requests[0].request_id
    assert out.reason[first] == "eos" and out.tokens[first][-1] == eos


@SETTINGS
@given(specs=request_specs)
def test_engine_ignore_eos(specs) -> None:
    eos = reference_greedy(specs[0][0], 1)[0]
    engine, _ = make_engine(eos=[eos])
    requests = [Request(list(p), SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new)


@SETTINGS
@given(block_size=st.integers(1, 6), blocks_each=st.integers(1, 4), fit=st.integers(1, 3),
       extra=st.integers(1, 4), data=st.data())
def test_engine_queues_requests_until_blocks_free(block_size: int, blocks_each: int, fit: int, extra: int,
                                                  data: st.DataObject) -> None:
    """Every request needs exactly `blocks_each` blocks; the cache holds `fit` of them (plus a remainder)."""
    total = data.draw(st.integers((blocks_each - 1) * block_size + 1, blocks_each * block_size))
    assume(total >= 2)
    specs = []
    for _ in range(fit + extra):
        prompt_len = data.draw(st.integers(1, total - 1))
        prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len, max_size=prompt_len))
        specs.append((prompt, total - prompt_len))
    engine, model = make_engine(block_size=block_size, num_blocks=fit * blocks_each + blocks_each - 1)
    requests = [Request(p, SamplingParams(max_new_tokens=n)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new)
    assert model.peak_running == fit


@SETTINGS
@given(specs=request_specs, budget=st.integers(1, 6))
def test_engine_prefill_chunking_changes_nothing(specs, budget: int) -> None:
    requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    whole = run(make_engine(block_size=3)[0], requests)
    engine, model = make_engine(block_size=3, max_tokens_per_step=budget)
    chunked_requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    chunked = run(engine, chunked_requests)
    for a, b, (prompt, max_new) in zip(requests, chunked_requests, specs):
        assert chunked.tokens[b.request_id] == whole.tokens[a.request_id] == reference_greedy(prompt, max_new)
    for tokens, sequences in model.step_sizes:
        assert tokens <= max(budget, sequences), "a step went over the token budget with prefill"


class DelayedExecutor:
    """A pipeline stand-in: steps are queued on submit and run only when collected, oldest first, so the
    engine must not read any result (or touch a sequence in flight) before collecting it."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.queue: list = []
        self.groups_seen: list[int] = []   # steps in flight after each submit

    def submit(self, step) -> None:
        self.queue.append(step)
        self.groups_seen.append(len(self.queue))

    def collect(self) -> torch.Tensor:
        return self.model(self.queue.pop(0))


@SETTINGS
@given(specs=request_specs, micro_batches=st.integers(2, 4), budget=st.integers(1, 8), block_size=st.integers(1, 6))
def test_micro_batches_in_flight_change_nothing(specs, micro_batches: int, budget: int, block_size: int) -> None:
    """Sequences dealt into groups with one step in flight each: the same tokens as one forward per step;
    with several sequences running, steps of different groups are in flight together."""
    cache = CacheConfig(block_size, 256)
    executor = DelayedExecutor(FakeModel(cache))
    engine = Engine(executor, cache, CPU, 512, (), None, budget, micro_batches=micro_batches)
    requests = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new)
    assert not executor.queue and not engine.in_flight
    assert max(executor.groups_seen) == engine.peak_in_flight <= micro_batches
    if len(specs) > 1:
        assert engine.peak_in_flight > 1


def test_engine_rejects_zero_micro_batches() -> None:
    cache = CacheConfig(4, 8)
    with pytest.raises(ValueError, match="micro_batches must be at least 1"):
        Engine(FakeModel(cache), cache, CPU, 64, micro_batches=0)


@SETTINGS
@given(specs=request_specs, data=st.data())
def test_engine_refuses_bad_requests_alone(specs, data: st.DataObject) -> None:
    block_size, num_blocks, max_context = 4, 8, 48  # the cache (32 slots) is smaller than the context
    engine, _ = make_engine(block_size=block_size, num_blocks=num_blocks, max_context=max_context)
    good = [Request(list(p), SamplingParams(max_new_tokens=n)) for p, n in specs]
    too_big_prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=33, max_size=40))
    bad = {
        "cache": Request(too_big_prompt, SamplingParams(max_new_tokens=max_context - len(too_big_prompt))),
        "empty": Request([], SamplingParams(max_new_tokens=3)),
        "context": Request(data.draw(token_lists), SamplingParams(max_new_tokens=max_context)),
        "zero": Request(data.draw(token_lists), SamplingParams(max_new_tokens=0)),
        "negative": Request(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=6, max_size=20)),
                            SamplingParams(max_new_tokens=-data.draw(st.integers(1, 5)))),
    }
    order = data.draw(st.permutations(good + list(bad.values())))
    out = run(engine, list(order))
    for request, (prompt, max_new) in zip(good, specs):
        assert request.request_id not in out.errors
        assert out.tokens[request.request_id] == reference_greedy(prompt, max_new)
    for why, request in bad.items():
        assert out.reason[request.request_id] == "error" and not out.tokens[request.request_id]
        message = str(out.errors[request.request_id])
        assert f"request {request.request_id}" in message
        expected = {"cache": f"only {num_blocks}", "empty": "empty", "context": f"context of {max_context}",
                    "zero": "max_new_tokens", "negative": "max_new_tokens"}[why]
        assert expected in message, message


def test_engine_rejects_a_zero_token_budget() -> None:
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        make_engine(max_tokens_per_step=0)


# --------------------------------------------------------------------------------------------------
# stop strings and streamed text
# --------------------------------------------------------------------------------------------------

LETTERS = "abcd"


def letter_decode(ids: list[int]) -> str:
    """Every token is one or two letters of a tiny alphabet, so stop strings occur often."""
    return "".join(LETTERS[t % 4] * (1 + (t // 4) % 2) for t in ids)


def byte_decode(ids: list[int]) -> str:
    """Tokens are UTF-8 bytes: incomplete characters decode to U+FFFD until they complete."""
    return bytes(ids).decode("utf-8", errors="replace")


def reference_stop(prompt: list[int], max_new: int, stops: tuple[str, ...], decode,
                   eos: set[int] = frozenset()) -> tuple[list[int], str, str]:
    """(tokens, final text, reason) by re-decoding every prefix of the reference tokens."""
    tokens = reference_greedy(prompt, max_new, eos)
    for n in range(1, len(tokens) + 1):
        text = decode(tokens[:n])
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return tokens[:n], text[:min(hits)], "stop"
    return tokens, decode(tokens), "eos" if tokens[-1] in eos else "length"


@SETTINGS
@given(specs=request_specs, data=st.data())
def test_stop_strings_end_and_truncate(specs, data: st.DataObject) -> None:
    specs = [(p, n + 6) for p, n in specs]
    texts = [letter_decode(reference_greedy(p, n)) for p, n in specs]
    stops_per_request = []
    for text in texts:
        start = data.draw(st.integers(0, len(text) - 1))
        found = text[start:start + data.draw(st.integers(1, 4))]
        other = data.draw(st.text(alphabet=LETTERS, min_size=1, max_size=4))
        stops_per_request.append((found, other) if data.draw(st.booleans()) else (other, found))
    engine, _ = make_engine(decode=letter_decode)
    requests = [Request(list(p), SamplingParams(max_new_tokens=n, stop=stops))
                for (p, n), stops in zip(specs, stops_per_request)]
    out = run(engine, requests)
    for request, (prompt, max_new), stops in zip(requests, specs, stops_per_request):
        tokens, text, reason = reference_stop(prompt, max_new, stops, letter_decode)
        assert reason == "stop"
        assert out.tokens[request.request_id] == tokens
        assert out.reason[request.request_id] == "stop"
        assert out.text[request.request_id] == text, "streamed deltas do not add up to the truncated text"
        assert not any(s in out.text[request.request_id] for s in stops)


@SETTINGS
@given(specs=request_specs, stop=st.binary(min_size=1, max_size=3), eos=st.booleans())
def test_streamed_bytes_add_up_to_the_final_text(specs, stop: bytes, eos: bool) -> None:
    """Byte tokens (half characters included): the deltas concatenate to the decoded, truncated text."""
    stop_text = stop.decode("utf-8", errors="replace")
    eos_ids = [reference_greedy(specs[0][0], specs[0][1])[-1]] if eos else []
    engine, _ = make_engine(decode=byte_decode, eos=eos_ids)
    requests = [Request(list(p), SamplingParams(max_new_tokens=n, stop=(stop_text,))) for p, n in specs]
    out = run(engine, requests)
    for request, (prompt, max_new) in zip(requests, specs):
        tokens, text, reason = reference_stop(prompt, max_new, (stop_text,), byte_decode, set(eos_ids))
        assert out.tokens[request.request_id] == tokens
        assert out.reason[request.request_id] == reason
        assert out.text[request.request_id] == text


# --------------------------------------------------------------------------------------------------
# sampling through the engine
# --------------------------------------------------------------------------------------------------

@SETTINGS
@given(specs=request_specs, seed=st.integers(0, 2**31), budget=st.integers(1, 8))
def test_seeded_request_does_not_depend_on_its_batch(specs, seed: int, budget: int) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
    prompt = specs[0][0]
    alone = run(make_engine()[0], [Request(list(prompt), params)])
    others = [Request(list(p), SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed + 1 + i))
              for i, (p, n) in enumerate(specs[1:])]
    target = Request(list(prompt), params)
    batched = run(make_engine(max_tokens_per_step=budget)[0], others + [target])
    assert batched.tokens[target.request_id] == alone.tokens[0]
    assert len(alone.tokens[0]) == 8
