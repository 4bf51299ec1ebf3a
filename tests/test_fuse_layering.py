"""Dependencies point one way: cowlink_fuse uses cowlink; pyfuse3 enters through two modules."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYFUSE3_MODULES = {"_ops.py", "_mount.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_cowlink_never_imports_cowlink_fuse_or_pyfuse3() -> None:
    for path in (REPO / "cowlink").rglob("*.py"):
        assert not _imports(path) & {"cowlink_fuse", "pyfuse3"}, path


def test_pyfuse3_enters_through_ops_and_mount_only() -> None:
    for path in (REPO / "fuse" / "cowlink_fuse").glob("*.py"):
        if "pyfuse3" in _imports(path):
            assert path.name in PYFUSE3_MODULES, path
