"""Where an unexpected error came from: a note on it, its type and traceback left alone.

Our own errors (HfRewriteError) are the user's to fix and are reworded with the rule's name; anything
else raised by a template or a pipeline stage is a bug in our code, so it propagates as it is with a
note naming the rule (or stage) it came from (PEP 678 notes; Python 3.10 keeps them in __notes__).
"""
from __future__ import annotations

import copy
from types import TracebackType

from hfrewrite.errors import HfRewriteError


def add_note(error: BaseException, text: str) -> None:
    """`error.add_note(text)` (3.11+), or the same `__notes__` list by hand on 3.10."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), text]  # type: ignore[attr-defined]


def reworded(error: HfRewriteError, prefix: str) -> HfRewriteError:
    """A copy of our own error, of the same type, whose message starts with `prefix` (the rule, the site)."""
    copied = copy.copy(error)
    copied.args = (f"{prefix}: {error}",)
    return copied


class noted:  # noqa: N801  (used as a context manager: `with noted("rule x at y"):`)
    """A context manager adding `text` as a note to any error but ours passing through it; nothing is caught."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __enter__(self) -> noted:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        if isinstance(error, Exception) and not isinstance(error, HfRewriteError):
            add_note(error, self.text)
        return False
