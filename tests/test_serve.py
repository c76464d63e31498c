"""`hfrewrite serve` end to end: real server processes on 127.0.0.1, the official `openai` client and raw
HTTP (http.client, what curl sends), compared with the offline engine on the same seeded tiny model.

Also the engine pieces the server relies on, in-process: abort, logprobs, incremental detokenization
and per-request error isolation.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from hfrewrite.runtime.engine import Engine, Request
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams, logprobs

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(600)
MODEL = "tiny:llama"
STARTUP_S = 240
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# servers and the offline reference


@dataclass
class Server:
    process: subprocess.Popen
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, api_key: str = "unused", **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def raw(self, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict | str]:
        """One request as curl would send it: (status, parsed JSON body or text)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
        connection.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text

    def metrics(self) -> dict[str, float]:
        status, text = self.raw("GET", "/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache: Path, log: Path, *extra: str, model: str = MODEL) -> Server:
    port = free_port()
    env = {**os.environ, "HFREWRITE_CACHE": str(cache)}
    command = [sys.executable, "-m", "hfrewrite.cli", "serve", model, "--backend", "none", "--quiet", "--no-verify",
               "--port", str(port), *extra]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(process, "127.0.0.1", port, log)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if server.raw("GET", "/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the server did not answer /health within {STARTUP_S}s:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hfrewrite-cache")


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(cache, tmp_path_factory.mktemp("log") / "server.log", "--max-running", "64")
    yield s
    assert stop_server(s) == 0, s.log.read_text()


class Offline:
    """The offline Generator on the same model: what `hfrewrite generate` prints."""

    def __init__(self, cache: Path) -> None:
        from hfrewrite.compiler.build import CompileOptions, compile_model
        from hfrewrite.runtime.generation import ByteTokenizer, Generator

        os.environ["HFREWRITE_CACHE"] = str(cache)
        result = compile_model(MODEL, CompileOptions(verify=False, backend=None, progress=False))
        self.tokenizer = ByteTokenizer(int(result.model.config.vocab_size))
        self.generator = Generator(result.model, self.tokenizer, CacheConfig(16, 512))

    def run(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        tokens, text, reason = [], "", None
        for event in self.generator.stream([prompt_ids], params):
            assert event.error is None, event.error
            tokens += [] if event.token_id is None else [event.token_id]
            text += event.text
            reason = event.finish_reason or reason
        return tokens, text, reason

    def text(self, prompt: str, max_tokens: int, **kwargs) -> str:
        return self.run(self.tokenizer.encode(prompt), SamplingParams(max_new_tokens=max_tokens, **kwargs))[1]

    def answer(self, prompt: str, max_tokens: int, **kwargs) -> tuple[str, str, int]:
        """(text, OpenAI finish reason, tokens) of a greedy completion."""
        return self.answers([(prompt, max_tokens)], **kwargs)[0]

    def answers(self, requests: list[tuple[str, int]], **kwargs) -> list[tuple[str, str, int]]:
        """answer() of each (prompt, max_tokens), batched offline (the runtime tests show batching changes nothing)."""
        prompts = [self.tokenizer.encode(prompt) for prompt, _ in requests]
        params = [SamplingParams(max_new_tokens=n, **kwargs) for _, n in requests]
        first = self.generator.engine._next_id
        out = {first + i: ["", None, 0] for i in range(len(requests))}
        for event in self.generator.stream(prompts, params):
            assert event.error is None, event.error
            entry = out[event.request_id]
            entry[0] += event.text
            entry[1] = {"eos": "stop"}.get(event.finish_reason, event.finish_reason) or entry[1]
            entry[2] += event.token_id is not None
        return [tuple(out[first + i]) for i in range(len(requests))]

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[list[int], str]:
        from hfrewrite.runtime.generation import encode_chat

        ids = encode_chat(self.tokenizer, messages)
        return ids, self.run(ids, SamplingParams(max_new_tokens=max_tokens))[1]


@pytest.fixture(scope="module")
def offline(cache: Path) -> Offline:
    return Offline(cache)


def prompt_of(rng: np.random.Generator, length: int) -> str:
    return "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, size=length))


# --------------------------------------------------------------------------------------------------
# the openai client


def test_completions_greedy_equal_offline_with_usage(server: Server, offline: Offline) -> None:
    rng = np.random.default_rng()
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = prompt_of(rng, int(rng.integers(3, 30)))
    max_tokens = int(rng.integers(4, 24))
    expected, reason, count = offline.answer(prompt, max_tokens)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, reason)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt.encode()), count)
    assert out.usage.total_tokens == len(prompt.encode()) + count
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices]) == count, "one chunk per token"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count
    assert chunks[-2].choices[0].finish_reason == reason
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_lists_token_ids_and_n(server: Server, offline: Offline) -> None:
    rng = np.random.default_rng()
    client = server.client()
    prompts = [prompt_of(rng, int(rng.integers(2, 20))) for _ in range(3)]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in out.choices] == [offline.text(p, 6) for p in prompts]
    assert out.usage.prompt_tokens == sum(len(p) for p in prompts)
    ids = [int(t) for t in rng.integers(0, 256, size=7)]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, n=2)
    expected = offline.run(ids, SamplingParams(max_new_tokens=5))[1]
    assert [c.text for c in out.choices] == [expected, expected]
    assert out.usage.completion_tokens == 10
    sampled = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=1.0, seed=123,
                                        top_p=0.9, n=1, extra_body={"top_k": 50})
    again = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=1.0, seed=123,
                                      top_p=0.9, extra_body={"top_k": 50})
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123, top_k=50, top_p=0.9)
    assert sampled.choices[0].text == again.choices[0].text == offline.run(ids, params)[1]


def test_chat_stream_and_not(server: Server, offline: Offline) -> None:
    rng = np.random.default_rng()
    client = server.client()
    messages = [{"role": "system", "content": prompt_of(rng, 5)}, {"role": "user", "content": prompt_of(rng, 9)}]
    prompt_ids, expected = offline.chat(messages, 10)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids) and chunks[-1].usage.completion_tokens == 10
    parts = [{"type": "text", "text": messages[1]["content"]}]
    out = client.chat.completions.create(model=MODEL, messages=[messages[0], {"role": "user", "content": parts}],
                                         max_completion_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected


def test_stop_and_max_tokens_honoured(server: Server, offline: Offline) -> None:
    rng = np.random.default_rng()
    client = server.client()
    prompt = prompt_of(rng, 12)
    full = offline.text(prompt, 20, ignore_eos=True)
    words = full.split()
    stop = f" {words[5]} "  # the sixth token's text (tokens decode as "id "), so the text ends before it
    expected = full[:full.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zz"],
                                        stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(out)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")
        assert stop not in text
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].text == offline.text(prompt, 3)
    long = client.completions.create(model=MODEL, prompt=prompt, max_tokens=300, temperature=0,   # several seconds
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 300 and long.choices[0].finish_reason == "length"
    assert long.choices[0].text == offline.text(prompt, 300, ignore_eos=True)


def test_logprobs_are_the_models(server: Server, offline: Offline) -> None:
    client = server.client()
    prompt = prompt_of(np.random.default_rng(), 8)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == out.choices[0].text.split()
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value) and top[chosen] == pytest.approx(value)
        assert sorted(top.values(), reverse=True) == list(top.values())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == chat.choices[0].message.content.split()
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_32_streams_batched_and_equal_offline(server: Server, offline: Offline) -> None:
    rng = np.random.default_rng()
    count = 32
    prompts = [prompt_of(rng, int(rng.integers(2, 40))) for _ in range(count)]
    lengths = [int(rng.integers(8, 64)) for _ in range(count)]
    expected = offline.answers(list(zip(prompts, lengths)))
    before = server.metrics()
    barrier = threading.Barrier(count)
    results: list[tuple[str, str | None, int] | BaseException | None] = [None] * count

    def one(i: int) -> None:
        try:
            client = server.client()
            barrier.wait(30)
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                               stream=True)
            chunks = [c for c in stream if c.choices]
            results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason,
                          len(chunks))
        except (openai.OpenAIError, threading.BrokenBarrierError, IndexError) as error:  # reported with its index
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for i in range(count):
        assert results[i] == expected[i], f"request {i}: {results[i]!r}"
    after = server.metrics()
    steps = after["hfrewrite_engine_steps_total"] - before["hfrewrite_engine_steps_total"]
    tokens = after["hfrewrite_generation_tokens_total"] - before["hfrewrite_generation_tokens_total"]
    assert tokens == sum(count for _, _, count in expected)
    assert steps < tokens / 4, f"{steps} steps for {tokens} tokens: the requests were not batched"
    assert after["hfrewrite_peak_running_sequences"] >= 8
    assert after["hfrewrite_kv_blocks_used"] == 0 and after["hfrewrite_requests_running"] == 0


def read_events(response: http.client.HTTPResponse, count: int) -> list[dict]:
    events = []
    while len(events) < count:
        line = response.readline().decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_aborts_and_frees_blocks(server: Server) -> None:
    aborted = server.metrics().get('hfrewrite_requests_finished_total{reason="abort"}', 0.0)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    read_events(response, 3)
    assert server.metrics()["hfrewrite_kv_blocks_used"] > 0, "the request should still be running"
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_for(lambda: server.metrics()["hfrewrite_kv_blocks_used"] == 0), "the blocks did not come back"
    metrics = server.metrics()
    assert metrics['hfrewrite_requests_finished_total{reason="abort"}'] == aborted + 1
    assert metrics["hfrewrite_requests_running"] == 0
    assert server.raw("GET", "/health")[0] == 200


BAD = [  # (path, body, status, param)
    ("/v1/completions", '{"model": "tiny:llama", "prompt": ', 400, "body"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 100, "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 600}]}, 400,
     "messages"),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}, 400, "model"),   # a causal LM makes no embeddings
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_error_body(server: Server, path: str, body, status: int, param: str) -> None:
    got, answer = server.raw("POST", path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]
    assert server.raw("GET", "/health")[0] == 200
    ok, reply = server.raw("POST", "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2,
                                                       "ignore_eos": True})  # sampled (temperature 1): no early EOS
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def test_openai_client_raises_on_bad_input(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="nope", prompt="x")
    assert caught.value.status_code == 400 and caught.value.param == "model"
    assert server.raw("GET", "/nowhere")[0] == 404


# --------------------------------------------------------------------------------------------------
# a strict server: API key, one running sequence, a queue of one; then SIGTERM while streaming


def test_api_key_full_queue_and_sigterm_drain(cache: Path, tmp_path: Path) -> None:
    server = start_server(cache, tmp_path / "strict.log", "--api-key", "sesame", "--max-running", "1",
                          "--max-queue", "1", "--served-model-name", "tiny")
    try:
        status, answer = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert server.client(api_key="sesame").models.list().data[0].id == "tiny"

        def stream() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
            body = {"model": "tiny", "prompt": "drain me", "max_tokens": 480, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            connection.request("POST", "/v1/completions", body=json.dumps(body),
                               headers={"Content-Type": "application/json", "Authorization": "Bearer sesame"})
            return connection, connection.getresponse()

        first, running = stream()
        read_events(running, 1)
        waited: list = []   # a non-streaming request queued behind it (polled for disconnects while it waits)
        body = {"model": "tiny", "prompt": "queued", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        second = threading.Thread(target=lambda: waited.append(server.raw("POST", "/v1/completions", body, {
            "Authorization": "Bearer sesame"})))
        second.start()
        assert wait_for(lambda: server.metrics()["hfrewrite_requests_waiting"] == 1)
        status, answer = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x"},
                                    {"Authorization": "Bearer sesame"})
        assert status == 503 and answer["error"]["code"] == "queue_full", answer
        server.process.send_signal(signal.SIGTERM)   # drains the stream and the queued request, then exits
        rest = running.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        chunks = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert 1 + len(chunks) == 480
        second.join(120)
        status, answer = waited[0]
        assert status == 200 and answer["usage"]["completion_tokens"] == 200, answer
        first.close()
        assert server.process.wait(60) == 0, server.log.read_text()
        log = server.log.read_text()
        assert re.search(r"cmpl-[0-9a-f]+\[0\] finished: length, \d+ prompt \+ 480 generated", log), log
    finally:
        stop_server(server)


# --------------------------------------------------------------------------------------------------
# the engine pieces, in-process


def fake_forward(vocab: int = 64):
    """Logits that depend on the last token only (deterministic); enough for scheduling and text."""
    def forward(step) -> torch.Tensor:
        last = step.input_ids[0, step.logits_index]
        return torch.nn.functional.one_hot((last * 7 + 3) % vocab, vocab).float() * 5
    return forward


def test_abort_frees_blocks_and_reports_abort() -> None:
    cache = CacheConfig(block_size=4, num_blocks=64)
    engine = Engine(fake_forward(), cache, CPU, 512)
    ids = [engine.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=40))) for _ in range(3)]
    waiting = engine.submit(Request([5], SamplingParams(max_new_tokens=4)))
    engine.max_running = 3
    events = engine.step() + engine.step()
    assert all(e.token_id is not None for e in events) and engine.allocator.free_blocks < 64
    assert engine.abort(ids[1]) and engine.abort(waiting) and not engine.abort(999)
    assert len(engine.running) == 2 and not engine.waiting
    out = engine.step()
    assert {(e.request_id, e.finish_reason) for e in out if e.finished} == {(ids[1], "abort"), (waiting, "abort")}
    while engine.has_work:
        engine.step()
    assert engine.allocator.free_blocks == 64


def test_incremental_detokenization_is_constant_work_and_exact() -> None:
    """A long generation decodes windows of a few tokens only, and the deltas add up to the full decode."""
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")

    def forward(step) -> torch.Tensor:   # cycles through a 2-byte and a 3-byte character and ASCII
        stream = [0xC3, 0xA9, 0xE2, 0x82, 0xAC, ord("x")]
        rows = step.position_ids[0, step.logits_index]
        return torch.nn.functional.one_hot(torch.tensor([stream[int(p) % 6] for p in rows]), 256).float()

    engine = Engine(forward, CacheConfig(4, 128), CPU, 512, decode=decode)
    tokens, text = [], ""
    for event in engine.run([Request([0], SamplingParams(max_new_tokens=300, stop=("x€x",)))]):
        tokens += [event.token_id]
        text += event.text
    full = bytes(tokens).decode("utf-8", errors="replace")
    assert text == full and len(tokens) == 300
    assert max(seen) <= 6, f"decoded windows up to {max(seen)} tokens (two characters of up to 3 bytes)"


def test_one_failing_request_fails_alone() -> None:
    def decode(ids: list[int]) -> str:
        if 13 in ids:
            raise ValueError("this tokenizer cannot decode 13")
        return "".join(chr(97 + i % 26) for i in ids)

    engine = Engine(fake_forward(), CacheConfig(4, 64), CPU, 512, decode=decode, isolate_errors=True)
    bad = engine.submit(Request([38], SamplingParams(max_new_tokens=8)))    # 38 * 7 + 3 = 13 (mod 64)
    good = engine.submit(Request([1], SamplingParams(max_new_tokens=8)))
    ends = {e.request_id: e for e in engine.run([]) if e.finished}
    assert ends[bad].finish_reason == "error" and isinstance(ends[bad].error, ValueError)
    assert ends[good].finish_reason == "length" and ends[good].error is None
    assert engine.allocator.free_blocks == 64


def test_logprobs_match_log_softmax() -> None:
    logits = torch.randn(50) * 3
    for params in (SamplingParams(logprobs=4), SamplingParams(temperature=0.7, logprobs=4)):
        scale = 1.0 if params.greedy else params.temperature
        reference = torch.log_softmax(logits.double() / scale, -1)
        chosen, top = logprobs(logits, params, 7)
        assert chosen == pytest.approx(float(reference[7]), abs=1e-5)
        assert [t for t, _ in top] == torch.argsort(reference, descending=True)[:4].tolist()
        assert [v for _, v in top] == pytest.approx(reference.sort(descending=True).values[:4].tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# smollm2-135m: a real BPE tokenizer and chat template


def test_incremental_text_equals_full_decode_with_a_real_tokenizer(smollm2_cache: Path) -> None:
    """Multi-byte characters split over byte-level BPE tokens: the deltas add up to tokenizer.decode."""
    from hfrewrite.compiler.sources import resolve, load_tokenizer
    from hfrewrite.runtime.generation import make_decode

    tokenizer = load_tokenizer(resolve("smollm2-135m", cache_dir=smollm2_cache, progress=False))
    rng = np.random.default_rng()
    pieces = ["héllo", " wörld", " — ", "日本語", " 🙂🚀", "\n\n", " naïve", "  spaces", "x"]
    text = "".join(rng.choice(pieces, size=30))
    ids = tokenizer(text)["input_ids"] + [int(t) for t in rng.integers(0, tokenizer.vocab_size, size=20)]

    def forward(step) -> torch.Tensor:   # emits ids[position + 1 - 1]: the generated tokens are `ids` in order
        rows = step.position_ids[0, step.logits_index]
        return torch.nn.functional.one_hot(torch.tensor([ids[int(p)] for p in rows]), tokenizer.vocab_size).float()

    engine = Engine(forward, CacheConfig(16, 64), CPU, 1024, decode=make_decode(tokenizer))
    streamed = "".join(e.text for e in engine.run([Request([0], SamplingParams(max_new_tokens=len(ids)))]))
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_smollm2_chat_equals_hfrewrite_generate(smollm2_cache: Path, tmp_path: Path) -> None:
    prompt = "Name three colours."
    env = {**os.environ, "HFREWRITE_CACHE": str(smollm2_cache)}
    generated = subprocess.run([sys.executable, "-m", "hfrewrite.cli", "generate", "smollm2-135m", "--backend", "none",
                                "--quiet", "--prompt", prompt, "--max-new-tokens", "16"], env=env, capture_output=True,
                               text=True, timeout=400)
    assert generated.returncode == 0, generated.stderr
    server = start_server(smollm2_cache, tmp_path / "smollm2.log", model="smollm2-135m")
    try:
        client = server.client()
        out = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=16, temperature=0)
        assert out.choices[0].message.content == generated.stdout[:-1]   # generate ends with a newline
        chunks = list(client.chat.completions.create(model="smollm2-135m", max_tokens=16, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": prompt}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
        status, reply = server.raw("POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "The capital of "
                                   "France is", "max_tokens": 4, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] <= 4, reply
    finally:
        assert stop_server(server) == 0


# --------------------------------------------------------------------------------------------------
# --tp 2: rank 0 serves and drives, rank 1 follows its steps


def test_tp2_serve_answers_like_one_device(cache: Path, offline: Offline, tmp_path: Path) -> None:
    rng = np.random.default_rng()
    server = start_server(cache, tmp_path / "tp2.log", "--tp", "2")
    try:
        client = server.client()
        requests = [(prompt_of(rng, int(rng.integers(2, 30))), int(rng.integers(4, 24))) for _ in range(6)]
        expected = offline.answers(requests)
        results: list = [None] * len(requests)

        def one(i: int) -> None:
            prompt, max_tokens = requests[i]
            chunks = [c for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0, stream=True) if c.choices]
            results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, len(chunks))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == expected
        sampled = [client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=1.0).choices[0].text
                   for _ in range(2)]
        assert all(len(text.split()) <= 6 for text in sampled)   # unseeded sampling: the ranks agreed on a seed
        assert server.raw("GET", "/health")[0] == 200
    finally:
        code = stop_server(server)
    assert code == 0, server.log.read_text()
