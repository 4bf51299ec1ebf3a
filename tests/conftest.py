"""Shared fixtures: an isolated environment, a scratch home, and clean-up of host state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._util import REQUIRE_PRIVILEGED, can_set_immutable, clear_immutable_tree, is_root


def pytest_report_header() -> list[str]:
    return [
        f"cowlink: root={is_root()} immutable={can_set_immutable()} "
        f"fuse={os.path.exists('/dev/fuse')} require_privileged={REQUIRE_PRIVILEGED}"
    ]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("COWLINK_") and name != "COWLINK_REQUIRE_PRIVILEGED":
            monkeypatch.delenv(name)
    monkeypatch.setenv("COWLINK_HOME", str(tmp_path / "default-home"))


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A scratch cowlink home; immutable flags under it are cleared afterwards."""
    path = tmp_path / "home"
    path.mkdir()
    yield path
    clear_immutable_tree(path)


@pytest.fixture(autouse=True)
def _clear_flags(tmp_path: Path) -> Iterator[None]:
    yield
    clear_immutable_tree(tmp_path)
