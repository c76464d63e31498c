"""Text of a generated sequence, a few tokens at a time: incremental decoding and held-back stop-string prefixes.

Constant work per token: only a window of recent tokens is decoded and the text of the window's older part is
subtracted (the prefix-offset technique); the Engine searches stop strings only in the new text plus the few
characters before it a stop string can span, holding back a tail that may still grow into one.
"""
from __future__ import annotations

from typing import Callable, Sequence


class IncrementalText:
    """One sequence's generated text, decoded a few tokens at a time.

    `prefix` .. `read` is the window of tokens whose text is already stable; decoding tokens[prefix:]
    and dropping the text of tokens[prefix:read] gives the new text (the tokenizer sees a little left
    context, so merges and leading spaces come out as in a full decode). Text ending in U+FFFD (half
    a UTF-8 character) stays pending until a later token completes it, or the sequence ends.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.prefix = 0
        self.read = 0

    def add(self, tokens: list[int]) -> tuple[str, str]:
        """(newly stable text, pending text) after tokens[-1] was appended to `tokens`."""
        prefix_text = self.decode(tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.decode(tokens[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(tokens)
            return text[len(prefix_text):], ""
        return "", text[len(prefix_text):]


def stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of a stop string (not yet emitted)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
