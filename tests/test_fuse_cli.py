"""`cowlink mount` and `cowlink umount` argument handling, without mounting anything."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cowlink.cli import main


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), *args])
    return result.exit_code, result.output


def test_mount_needs_root_and_mountpoint(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "mount", str(tmp_path))
    assert code == 2
    assert "give ROOT and MOUNTPOINT" in out


def test_mount_with_guest_takes_only_the_mountpoint(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "mount", "--guest", "web1", str(tmp_path), str(tmp_path))
    assert code == 2
    assert "only the MOUNTPOINT" in out


def test_mount_refuses_a_missing_root(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "mount", str(tmp_path / "nope"), str(tmp_path))
    assert code == 2
    assert "not a directory" in out


def test_umount_of_nothing_mounted_is_exit_39(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "umount", str(tmp_path))
    assert code == 39
    assert "not mounted" in out
