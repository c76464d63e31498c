"""`hfrewrite serve` of a vision-language model: a real server on 127.0.0.1 answering the `openai` client's chat
messages with image parts (base64 data URLs and local files) as HF generate does; bad image input is a 400 naming
the field."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image
from hfrewrite.runtime import multimodal

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(600)
MODEL = "tiny:qwen2_vl"
STARTUP_S = 240
NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hfrewrite-cache")


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory):
    port, log = _free_port(), tmp_path_factory.mktemp("log") / "server.log"
    command = [sys.executable, "-m", "hfrewrite.cli", "serve", MODEL, "--backend", "none", "--quiet", "--no-verify",
               "--port", str(port), "--block-size", "4", "--num-blocks", "128"]
    process = subprocess.Popen(command, env={**os.environ, "HFREWRITE_CACHE": str(cache)}, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no /health within {STARTUP_S}s:\n{log.read_text()}")
        try:
            if _raw(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    yield port
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(60) == 0, log.read_text()
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def _raw(port: int, method: str, path: str, body: object = None) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request(method, path, body=None if body is None else json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def _client(port: int) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def _png(seed: int, height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    random_image(np.random.default_rng(seed), height, width).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def hf(cache: Path):
    """HF eager's greedy continuation of a chat with images (the same tiny model the server compiled)."""
    from PIL import Image

    from hfrewrite.compiler.build import reference_model

    source = resolve(MODEL, cache_dir=cache, progress=False)
    processor = load_processor(source.directory, source.config)
    reference = reference_model(source, torch.device("cpu"), torch.float32, progress=False)

    def greedy(text: str, images: list[bytes]) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = multimodal.processor_inputs(processor, [{"role": "user", "content": content}], pictures)
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def greedy_text(text: str) -> str:
        ids = torch.tensor([processor.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                     do_sample=False)
        return processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    greedy.text = greedy_text
    return greedy


def test_chat_with_a_base64_image_equals_hf_generate(server, hf):
    image = _png(0, 24, 16)
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": "what is it"}]
    reply = _client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                    max_tokens=NEW_TOKENS, temperature=0)
    assert reply.choices[0].message.content == hf("what is it", [image])
    assert reply.usage.prompt_tokens > 20  # the image's tokens count


def test_two_images_streamed_and_a_local_file(server, hf, tmp_path):
    first, second = _png(1, 16, 32), _png(2, 32, 24)
    path = tmp_path / "second.png"
    path.write_bytes(second)
    content = [{"type": "text", "text": "compare"}, {"type": "image_url", "image_url": {"url": _data_url(first)}},
               {"type": "image_url", "image_url": {"url": str(path)}}]
    # the chat template puts the text after the images in `hf`: ask for the same order here
    content = content[1:] + content[:1]
    stream = _client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                     max_tokens=NEW_TOKENS, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == hf("compare", [first, second])


def test_text_only_chat_on_a_vlm(server, hf):
    reply = _client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "just text"}], max_tokens=NEW_TOKENS, temperature=0)
    assert reply.choices[0].message.content == hf("just text", [])


def test_text_completion_on_a_vlm(server, hf):
    """/v1/completions: plain token ids, no input source (the runner embeds them at 1-D positions)."""
    reply = _client(server).completions.create(model=MODEL, prompt="a plain prompt", max_tokens=NEW_TOKENS,
                                               temperature=0)
    assert reply.choices[0].text == hf.text("a plain prompt")


@pytest.mark.parametrize("image_url, words", [
    ({"url": "data:image/png;base64,@@not base64@@"}, "does not decode"),
    ({"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "is not an image"),
    ({"url": "data:image/png,rawbytes"}, "must be 'data:image/<type>;base64"),
    ({"url": "https://example.com/cat.png"}, "not fetched"),
    ({"url": "/no/such/image.png"}, "no such local file"),
    ({"detail": "low"}, "needs image_url.url"),
])
def test_bad_image_input_is_a_400_naming_the_field(server, image_url, words):
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": image_url}]
    status, body = _raw(server, "POST", "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert status == 400, body
    assert body["error"]["param"] == "messages.0.content.1.image_url"
    assert words in body["error"]["message"]
    assert _raw(server, "GET", "/health")[0] == 200  # the server goes on


def test_audio_parts_are_a_400(server):
    content = [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]
    status, body = _raw(server, "POST", "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages.0.content.0.type", body
