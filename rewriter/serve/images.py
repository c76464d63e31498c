"""Chat messages with images for a served vision-language model: OpenAI's content parts to the model's processor.

An `image_url` part is a `data:image/...;base64,` URL or a local file (a path, or a file:// URL); the
server never fetches from the network. The conversation goes through the model's own processor (its
chat template and image preprocessing); the vision tower runs later, on the engine's thread. A part
that cannot be used is a 400 naming it (`messages.0.content.1.image_url`).
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

from hfrewrite.serve import protocol as p
from hfrewrite.serve.api_errors import ApiError

DATA_PREFIX = "data:"


def open_image(url: str, field: str) -> Any:
    """The RGB image an image_url names: base64 data or a local file."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith(DATA_PREFIX):
        header, comma, payload = url[len(DATA_PREFIX):].partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{field}: a data URL must be 'data:image/<type>;base64,<data>'", field)
        try:
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, f"{field}: the base64 data does not decode: {error}", field) from error
        what = "the base64 data"
    else:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise ApiError(400, f"{field}: {parsed.scheme}:// URLs are not fetched (no network); send the image as "
                                f"a data:image/...;base64 URL or a local file path", field)
        source = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
        if not source.is_file():
            raise ApiError(400, f"{field}: no such local file {str(source)!r}", field)
        what = f"the file {str(source)!r}"
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ApiError(400, f"{field}: {what} is not an image: {error}", field) from error


def _url(part: p.ImagePart, field: str) -> str:
    value = (part.model_extra or {}).get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{field}: an image_url part needs image_url.url (a data URL or a local file path)",
                       field)
    return url


def vision_chat(processor: Any, messages: Sequence[p.ChatMessage], lock: Any) -> dict[str, Any]:
    """The processor's tensors of a conversation whose turns may hold image_url parts (the processor's tokenizer
    is the engine's too: it runs under `lock`)."""
    from hfrewrite.runtime.multimodal import processor_inputs

    turns, images = [], []
    for i, message in enumerate(messages):
        content = message.content or ""
        if isinstance(content, str):
            turns.append({"role": message.role, "content": content})
            continue
        parts: list[dict] = []
        for j, part in enumerate(content):
            if isinstance(part, p.TextPart):
                parts.append({"type": "text", "text": part.text})
            elif part.type != "image_url":
                raise ApiError(400, f"messages.{i}.content.{j}: {part.type} parts are not supported (text and "
                                    f"image_url are)", f"messages.{i}.content.{j}.type")
            else:
                field = f"messages.{i}.content.{j}.image_url"
                images.append(open_image(_url(part, field), field))
                parts.append({"type": "image"})
        turns.append({"role": message.role, "content": parts})
    try:
        with lock:
            return processor_inputs(processor, turns, images)
    except ValueError as error:  # the processor refuses these messages or images
        raise ApiError(400, f"messages: the model's processor refused them: {error}", "messages") from error
