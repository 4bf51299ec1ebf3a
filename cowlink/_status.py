"""`status`: an overview of a home: guests, the store, the catalogue and the last unify run.

It reads only (the catalogue is opened read-only, the lock is not taken), so it answers
even while a long unify holds the lock, and then says who holds it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from ._catalogue import Catalogue, RunRow
from ._home import Home
from ._remove import running, running_pid
from ._storeindex import iter_object_names


@dataclass
class GuestStatus:
    name: str
    root: str
    running_pid: int | None
    linked_names: int


@dataclass
class Status:
    home: str
    guests: list[GuestStatus] = field(default_factory=list)
    objects: int = 0
    store_bytes: int = 0  # allocated
    store_apparent_bytes: int = 0
    links: int = 0  # names besides the store's own
    catalogue_age_s: float | None = None
    last_unify: RunRow | None = None
    lock_holder: str | None = None

    def as_dict(self) -> dict[str, Any]:
        run = self.last_unify
        return {
            "home": self.home,
            "guests": [
                {
                    "name": g.name,
                    "root": g.root,
                    "running_pid": g.running_pid,
                    "linked_names": g.linked_names,
                }
                for g in self.guests
            ],
            "store": {
                "objects": self.objects,
                "bytes": self.store_bytes,
                "apparent_bytes": self.store_apparent_bytes,
                "links": self.links,
            },
            "catalogue_age_s": None
            if self.catalogue_age_s is None
            else round(self.catalogue_age_s, 1),
            "last_unify": None
            if run is None
            else {
                "started": _iso(run.started_ns),
                "duration_s": round(run.duration_s, 3),
                "exit_code": run.exit_code,
                "files_linked": run.stats.get("files_linked"),
                "objects_created": run.stats.get("objects_created"),
                "bytes_saved": run.stats.get("bytes_saved"),
                "errors": len(run.stats.get("errors", [])),
            },
            "lock_holder": self.lock_holder,
        }

    def summary_lines(self) -> list[str]:
        lines = [f"home {self.home}"]
        lines.append(f"{len(self.guests)} guests")
        for g in self.guests:
            state = f"running (pid {g.running_pid})" if g.running_pid else "stopped"
            lines.append(f"  {g.name}: {state}, {g.linked_names} names linked to the store")
        lines.append(
            f"store: {self.objects} objects, {self.store_bytes} bytes "
            f"({self.store_apparent_bytes} apparent), {self.links} links"
        )
        if self.catalogue_age_s is None:
            lines.append("catalogue: none yet")
        else:
            lines.append(f"catalogue: last written {self.catalogue_age_s:.0f} s ago")
        run = self.last_unify
        if run is None:
            lines.append("last unify: never")
        else:
            s = run.stats
            lines.append(
                f"last unify: {_iso(run.started_ns)}, {run.duration_s:.1f} s, "
                f"exit {run.exit_code}: {s.get('files_linked', 0)} files linked, "
                f"{s.get('objects_created', 0)} new objects, "
                f"{s.get('bytes_saved', 0)} bytes saved, {len(s.get('errors', []))} problems"
            )
        if self.lock_holder:
            lines.append(f"running now: {self.lock_holder}")
        return lines


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def read_status(home: Home) -> Status:
    status = Status(home=str(home.path))
    for name in iter_object_names(home.store_dir):
        try:
            st = os.lstat(home.store_dir / name)
        except OSError:
            continue
        status.objects += 1
        status.store_bytes += st.st_blocks * 512
        status.store_apparent_bytes += st.st_size
        status.links += st.st_nlink - 1
    names: dict[str, int] = {}
    if home.catalogue_path.exists():
        status.catalogue_age_s = time.time() - max(
            os.stat(p).st_mtime
            for p in (home.catalogue_path, home.catalogue_path.with_name("catalogue.sqlite-wal"))
            if p.exists()
        )
        with contextlib.suppress(sqlite3.Error):
            catalogue = Catalogue.open(home.catalogue_path, readonly=True)
            try:
                status.last_unify = catalogue.last_run("unify")
                names = {root: len(catalogue.names(root)) for root in catalogue.roots()}
            finally:
                catalogue.close()
    for name in home.guest_names():
        root = os.path.realpath(home.guest_root(name))
        status.guests.append(GuestStatus(name, root, running_pid(home, name), names.get(root, 0)))
    with contextlib.suppress(OSError, ValueError):
        holder = home.lock_path.read_text().split()
        if holder and running(int(holder[0])):
            status.lock_holder = f"cowlink {' '.join(holder[1:2])} (pid {holder[0]})"
    return status
