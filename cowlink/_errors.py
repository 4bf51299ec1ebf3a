"""Errors that end a command, each with its message and exit code, and per-file problems."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Problem:
    """A per-file problem: recorded, reported, and turned into exit code 1; never a crash."""

    path: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}
