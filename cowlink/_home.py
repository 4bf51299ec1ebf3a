"""The home directory: where guests, the store, the catalogue and the lock live.

Layout::

    HOME/guests/NAME/root/       one guest's root tree
    HOME/guests/NAME/exclude     optional per-guest exclude patterns
    HOME/store/                  content-addressed objects, HOME/store/ab/... (see _store)
    HOME/catalogue.sqlite        digest cache, store index, link groups, run history
    HOME/lock                    held by every command that changes trees or store
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ._errors import LockHeld, UsageError

DEFAULT_HOME = "/var/lib/cowlink"
_GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_guest_name(name: str) -> str:
    if not _GUEST_NAME.fullmatch(name) or name in {".", ".."}:
        raise UsageError(
            f"invalid guest name {name!r}: use letters, digits, '.', '_' and '-' (at most 63)"
        )
    return name


class Home:
    """One cowlink home. Creating the object touches nothing on disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(path))
        self.guests_dir = self.path / "guests"
        self.store_dir = self.path / "store"
        self.catalogue_path = self.path / "catalogue.sqlite"
        self.lock_path = self.path / "lock"
        self.log_dir = self.path / "log"
        self.run_dir = self.path / "run"

    @classmethod
    def resolve(cls, option: str | None) -> Home:
        """The home named by `--home`, else $COWLINK_HOME, else /var/lib/cowlink."""
        return cls(option or os.environ.get("COWLINK_HOME") or DEFAULT_HOME)

    def ensure(self) -> None:
        """Create the home's directories; the store is private to root (mode 0700)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.guests_dir.mkdir(exist_ok=True)
        self.store_dir.mkdir(mode=0o700, exist_ok=True)

    def guest_dir(self, name: str) -> Path:
        return self.guests_dir / check_guest_name(name)

    def guest_root(self, name: str) -> Path:
        return self.guest_dir(name) / "root"

    def guest_names(self) -> list[str]:
        """Guests that have a root directory, in name order."""
        try:
            entries = sorted(os.listdir(self.guests_dir))
        except FileNotFoundError:
            return []
        return [
            name
            for name in entries
            if _GUEST_NAME.fullmatch(name) and (self.guests_dir / name / "root").is_dir()
        ]

    def guest_of_root(self, root: str | os.PathLike[str]) -> str | None:
        """The guest name when `root` is HOME/guests/NAME/root, else None."""
        real = Path(os.path.realpath(root))
        if real.name == "root" and real.parent.parent == Path(os.path.realpath(self.guests_dir)):
            return real.parent.name
        return None

    def secret(self) -> bytes:
        """A per-home key: temporary names carry a MAC so a guest cannot forge one."""
        key_path = self.path / "secret"
        try:
            return key_path.read_bytes()
        except FileNotFoundError:
            pass
        import secrets  # hmac, hashlib and random: only the commands that create names need it

        self.path.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    @contextlib.contextmanager
    def lock(self, command: str, *, wait: bool = False) -> Iterator[None]:
        """Hold the home's lock for the duration of a changing command.

        Raises:
            LockHeld: another process holds it and `wait` is false.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                pid = holder[0] if holder else "?"
                what = holder[1] if len(holder) > 1 else "command"
                raise LockHeld(f"another cowlink {what} is running (pid {pid})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):  # a disk gone read-only; flock still ends
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the flock
