"""Self-checking cache directories: a manifest of every file's size and sha256, written after the build.

A converted model in the cache is trusted only when its files match the manifest written right after
the directory was atomically renamed into place. A zeroed, truncated or half-written cache (no
manifest: the writer died before writing it) is rebuilt from its source, saying so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from hfrewrite.compiler.atomic import atomic_directory

MANIFEST = "hfrewrite-manifest.json"
_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file (atomically: temp file, then rename)."""
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)} for p in _listing(directory)}
    handle, temp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=directory)
    with os.fdopen(handle, "w") as out:
        json.dump({"files": entries}, out, indent=1, sort_keys=True)
    os.replace(temp, directory / MANIFEST)


def manifest_problem(directory: Path) -> str | None:
    """None when every file matches the manifest; else what is wrong, in words."""
    path = directory / MANIFEST
    try:
        entries = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an older or interrupted build)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable ({error})"
    present = {p.name for p in _listing(directory)}
    missing = sorted(set(entries) - present)
    if missing:
        return f"{missing[0]} is missing"
    for name, entry in sorted(entries.items()):
        file = directory / name
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if file_digest(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (changed on disk)"
    return None


def checked_directory(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """`target`, built by build(temp dir) when absent or when it fails its manifest (then rebuilt, saying so)."""
    if target.is_dir():
        problem = manifest_problem(target)
        if problem is None:
            return target
        print(f"hfrewrite: the cached {what} at {target} cannot be trusted: {problem}; rebuilding it", file=sys.stderr)
        _discard(target)
    with atomic_directory(target) as temp:
        build(temp)
    if not (target / MANIFEST).is_file():  # ours (or another process's copy that won the rename, still unsigned)
        write_manifest(target)
    return target


def _discard(target: Path) -> None:
    """Move a damaged directory aside (one rename, so readers never see it half deleted), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.damaged-", dir=target.parent))
    try:
        os.rename(target, trash / target.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(trash, ignore_errors=True)
