"""Prometheus metrics for node_exporter's textfile collector: what guests cost, what unify did.

`write_metrics()` is shared by `cowlink du --metrics FILE` and `cowlink unify --metrics
FILE`, so both leave the same set of series behind. The file is replaced atomically (a
temporary file in the same directory, fsync, rename), because the collector may read it
at any moment; the temporary name does not end in `.prom`, so the collector skips it.

The last-unify series come from the newest `unify` row of the catalogue's `runs` table,
read through a read-only connection. With no catalogue or no recorded run they are left
out of the file (alert on `absent(cowlink_last_unify_timestamp_seconds)`), never
reported as zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._du import UsageReport
    from ._home import Home


@dataclass(frozen=True)
class LastUnify:
    """The newest recorded `cowlink unify` run."""

    timestamp_s: float  # when it finished, seconds since the epoch
    duration_s: float
    errors: int  # per-file problems it reported
    exit_code: int


def read_last_unify(home: Home) -> LastUnify | None:
    """The newest unify run in HOME/catalogue.sqlite, or None when there is none to read."""
    import sqlite3  # only the metrics and JSON outputs need it

    path = Path(home.catalogue_path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT started_ns, duration_s, exit_code, stats FROM runs"
                " WHERE command = 'unify' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None  # no runs table yet, or a catalogue we cannot read
    if row is None:
        return None
    started_ns, duration_s, exit_code, stats_text = row
    return LastUnify(
        timestamp_s=int(started_ns) / 1e9 + float(duration_s),
        duration_s=float(duration_s),
        errors=_error_count(stats_text),
        exit_code=int(exit_code),
    )


def _error_count(stats_text: object) -> int:
    import json

    try:
        stats = json.loads(str(stats_text))
    except ValueError:
        return 0
    errors = stats.get("errors", 0) if isinstance(stats, dict) else 0
    if isinstance(errors, list):
        return len(errors)
    return errors if isinstance(errors, int) else 0


def escape_label(value: str) -> str:
    """A label value as the text exposition format wants it: \\, " and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(
    name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return lines


def render_metrics(report: UsageReport, last_unify: LastUnify | None) -> str:
    """The exposition text for one report (and the last unify run, when known)."""
    guests = report.guests
    totals = report.totals
    lines: list[str] = []
    lines += _family(
        "cowlink_guest_exclusive_bytes",
        "Allocated bytes of inodes linked only from inside the guest's tree.",
        (({"guest": g.name}, g.exclusive_bytes) for g in guests),
    )
    lines += _family(
        "cowlink_guest_shared_bytes",
        "Allocated bytes of the guest's inodes that other guests or the store also link.",
        (({"guest": g.name}, g.shared_bytes) for g in guests),
    )
    lines += _family(
        "cowlink_guest_fair_share_bytes",
        "The guest's share of shared bytes, each inode split among the guests linking it.",
        (({"guest": g.name}, g.fair_share_bytes) for g in guests),
    )
    lines += _family(
        "cowlink_allocated_bytes",
        "Allocated bytes of all guest trees, each inode counted once.",
        [({}, totals.allocated_bytes)],
    )
    lines += _family(
        "cowlink_saved_bytes",
        "Bytes the guest trees would take more without hardlinks.",
        [({}, totals.saved_bytes)],
    )
    lines += _family("cowlink_store_objects", "Objects in the store.", [({}, totals.store_objects)])
    lines += _family(
        "cowlink_store_bytes", "Allocated bytes of the store's objects.", [({}, totals.store_bytes)]
    )
    if last_unify is not None:
        lines += _family(
            "cowlink_last_unify_timestamp_seconds",
            "When the last cowlink unify run finished, in seconds since the epoch.",
            [({}, last_unify.timestamp_s)],
        )
        lines += _family(
            "cowlink_last_unify_duration_seconds",
            "How long the last cowlink unify run took.",
            [({}, last_unify.duration_s)],
        )
        lines += _family(
            "cowlink_last_unify_errors",
            "Per-file problems the last cowlink unify run reported.",
            [({}, last_unify.errors)],
        )
        lines += _family(
            "cowlink_last_unify_exit_code",
            "Exit status of the last cowlink unify run (0 ok, 1 problems).",
            [({}, last_unify.exit_code)],
        )
    return "\n".join(lines) + "\n"


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new, whole."""
    import tempfile  # here: `cowlink du` without --metrics never needs it

    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # the collector usually runs as another user
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_metrics(
    home: Home,
    path: str | os.PathLike[str],
    *,
    report: UsageReport | None = None,
    last_unify: LastUnify | None = None,
) -> None:
    """Write the metrics file for `home`.

    Args:
        home: the home whose guests and store are measured.
        path: the `.prom` file to replace.
        report: a `cowlink du` report already made; measured now (every guest) when None.
        last_unify: the last unify run; read from the catalogue when None.

    Raises:
        OSError: the file cannot be written.
    """
    if report is None:
        from ._du import measure_home

        report = measure_home(home)
    if last_unify is None:
        last_unify = read_last_unify(home)
    write_atomically(path, render_metrics(report, last_unify))
