"""The mount table as this process sees it, read from /proc/self/mountinfo.

Kept apart from _linux (which loads ctypes) so that `cowlink du`, which needs the mount
points and nothing else from there, starts without it; _linux re-exports both functions.
"""

from __future__ import annotations

import os


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point this process sees, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def mount_point_of(path: str) -> str:
    """The mount point whose mount holds `path` (longest matching prefix)."""
    real = os.path.realpath(path)
    best = "/"
    for mp in mount_points():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best
