"""Text in, text out: tokenizer and chat template around the runtime engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from hfrewrite.runtime.model import CompiledModel, StepModel
from hfrewrite.runtime.engine import Engine, Event, Request
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams


class ByteTokenizer:
    """Stand-in for models without a tokenizer (tiny:*): UTF-8 bytes modulo the vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids) + (" " if ids else "")


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn.

    Without a template (tiny models' ByteTokenizer) the turns are plain "role: content" lines.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return encode_prompt(tokenizer, text, chat=False)


def make_decode(tokenizer) -> Callable[[list[int]], str] | None:
    """The engine's decode function for a tokenizer (special tokens left out), or None without one."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def eos_ids(model: CompiledModel, tokenizer) -> list[int]:
    """End-of-sequence ids from the generation config, model config and tokenizer."""
    found: set[int] = set()
    for value in (getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return sorted(found)


@dataclass
class Generator:
    """A compiled model, its tokenizer and a paged cache, serving batches of prompts."""

    model: StepModel
    tokenizer: object
    cache_config: CacheConfig = CacheConfig()
    max_tokens_per_step: int = 512

    def __post_init__(self) -> None:
        serving = getattr(self.model, "serving", None)
        if serving is not None:  # one device: a cache and runner kept on the model (graphs captured once)
            self.cache, runner = serving(self.cache_config)
        else:                    # a pipeline: its stages keep their own caches
            self.cache = self.model.new_cache(self.cache_config)
            runner = lambda step: self.model.forward(step, self.cache)  # noqa: E731
        self.engine = Engine(runner, self.cache_config, self.model.device,
                             self.model.max_context, eos_ids(self.model, self.tokenizer), make_decode(self.tokenizer),
                             self.max_tokens_per_step)

    def stream(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Event]:
        """Events (token ids and text deltas) as they are produced, for all prompts at once."""
        per_prompt = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        requests = [Request(list(ids), p) for ids, p in zip(prompt_ids, per_prompt)]
        yield from self.engine.run(requests)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Generated token ids per prompt (errors raised)."""
        out: dict[int, list[int]] = {}
        first = self.engine._next_id
        for event in self.stream(prompt_ids, params):
            if event.error is not None:
                raise event.error
            out.setdefault(event.request_id, [])
            if event.token_id is not None:
                out[event.request_id].append(event.token_id)
        return [out.get(first + i, []) for i in range(len(prompt_ids))]


@torch.no_grad()
def hf_greedy(reference: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, for comparisons."""
    ids = torch.tensor([list(prompt_ids)])
    out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()
