"""Shared fixtures of the engine tests."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[..., Path]:
    """write_rules(text, name='rules.yaml') -> path of a rule file holding `text`."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/engine/fixtures."""
    return FIXTURES
