"""Errors that end a command, each with its message and exit code, and per-file problems."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from dataclasses import dataclass

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_FATAL = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: cron may simply try again later
EXIT_NOT_RUNNING = 3  # as VServer's `vserver NAME status`
EXIT_MOUNT_FAILED = 39  # s3ql's code for "FUSE initialisation failed"


class CowlinkError(Exception):
    """A fatal error: the command stops, prints the message and exits with `exit_code`."""

    exit_code = EXIT_FATAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CowlinkError):
    """The command line or the configuration asks for something that cannot be done."""


class NotSameFilesystem(CowlinkError):
    """A root lies on another filesystem (or mount) than the store, so it cannot be linked."""


class FlagsNotPermitted(CowlinkError):
    """The immutable flag needs CAP_LINUX_IMMUTABLE, which this process lacks."""


class LockHeld(CowlinkError):
    """Another cowlink command holds the home's lock."""

    exit_code = EXIT_LOCKED


class Interrupted(CowlinkError):
    """A signal asked the command to stop; it stopped at a safe point."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; every path is intact")
        self.exit_code = 128 + signum


class LaneFailed(CowlinkError):
    """A worker process of a run ended on an error that ends the run; its exit code too."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MountFailed(CowlinkError):
    """The mount daemon could not mount, or a mount point could not be unmounted."""

    exit_code = EXIT_MOUNT_FAILED


class GuestNotRunning(CowlinkError):
    """The guest is not running (`guest status` and `stop` of a stopped guest exit 3)."""

    exit_code = EXIT_NOT_RUNNING


class GuestRunning(CowlinkError):
    """The guest is already running (or still stopping); stop it first."""


class GuestStartFailed(CowlinkError):
    """The guest did not come up; every step the start took has been undone."""


class GuestBuildFailed(CowlinkError):
    """debootstrap or the copy failed; the half-built guest was removed."""


class CgroupError(CowlinkError):
    """A guest's control group could not be created, limited or emptied."""


class NetworkError(CowlinkError):
    """A guest's network could not be set up."""


class ReportsProblems:
    """For a command's report: exit 1 when it recorded any per-file problem, else 0."""

    errors: list[Problem]

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.errors else EXIT_OK


@dataclass(frozen=True)
class Problem:
    """A per-file problem: recorded, reported, and turned into exit code 1; never a crash."""

    path: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


class NoSpace(CowlinkError):
    """The filesystem lacks the space or inodes a command needs; nothing was half-written."""


class ReadOnly(CowlinkError):
    """The filesystem is (or became) read-only; the command stopped, nothing was lost."""


def storage_fault(exc: BaseException, where: str) -> CowlinkError | None:
    """The clear error for a full or read-only filesystem behind `exc`, else None.

    Looks along the exception's context too: once a disk turns read-only, clean-up steps
    (SQLite's rollback, the lock's release) fail as well and hide the first cause.
    """
    seen: BaseException | None = exc
    while seen is not None:
        errno_ = getattr(seen, "errno", None)
        text = str(seen).lower()
        if errno_ in (errno.ENOSPC, errno.EDQUOT) or "database or disk is full" in text:
            return NoSpace(f"the filesystem of {where} is full; stopped, nothing was lost")
        if errno_ == errno.EROFS or "readonly database" in text:
            return ReadOnly(f"the filesystem of {where} is read-only; stopped, nothing was lost")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def storage_faults(where: str) -> Iterator[None]:
    """Turn a full or read-only filesystem met inside the block into its clear error."""
    import sqlite3  # here, not at the top: commands that never open SQLite start faster

    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        fault = storage_fault(exc, where)
        if fault is None:
            raise
        raise fault from exc
