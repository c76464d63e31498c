"""Printing a generate run's events: one prompt streams its text as it comes, several print each at its end."""
from __future__ import annotations

import sys
from typing import Iterable, Sequence

from hfrewrite.runtime.engine import Event


def print_events(events: Iterable[Event], prompts: Sequence[str]) -> int:
    """Print the events of `prompts` (request i is prompts[i]); 2 if any request failed, else 0."""
    texts: dict[int, str] = {}
    failed, single = False, len(prompts) == 1
    for event in events:
        if event.error is not None:
            print(f"error: {event.error}", file=sys.stderr)
            failed = True
            continue
        texts[event.request_id] = texts.get(event.request_id, "") + event.text
        if single:
            print(event.text, end="", flush=True)
        elif event.finished:
            print(f"[{event.request_id}] {prompts[event.request_id]!r}\n{texts[event.request_id]}\n", flush=True)
    if single:
        print()
    return 2 if failed else 0
