"""Cache directories written all at once: a crash or a lost race never leaves half a cache behind.

Its own module because the tiny-model cache and the checkpoint-conversion cache both write through it, and
neither should import the other (the tiny models' builder picks a model kind; the kinds verify through
sources, which checks caches).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside `target`, renamed to `target` only if the block finishes.

    An interrupted write never leaves a half cache; if another process won the race, its copy is
    kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(temp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        yield temp
        try:
            os.rename(temp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
