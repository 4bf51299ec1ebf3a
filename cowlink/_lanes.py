"""Lanes: a run's size classes dealt out to forked worker processes, linked in parallel.

Files of different sizes never share a store object, so size classes can be linked
independently. Each lane is a forked copy of the engine (the walk's tables are shared
copy-on-write) that opens its own catalogue connection and takes size classes one at a
time from a queue the parent feeds (a pipe of 8-byte records, largest class first), so
the lanes stay busy to the end however uneven the classes are.
What a lane reports (actions, problems, progress) and its final counts come back to the
parent over a pipe, and the parent hands them to its reporter, so a lane prints nothing
itself. A lane dies with its parent (PR_SET_PDEATHSIG): killing unify kills all of it,
as with one process, and the next run recovers as from any interrupted run.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._errors import EXIT_FATAL, CowlinkError, Problem, storage_fault
from ._signals import StopRequest

#: Events a lane gathers before it writes them to the parent in one message.
_EVENTS_PER_MESSAGE = 256
_LENGTH = struct.Struct("!I")
#: One queued size class. Writes of whole records up to PIPE_BUF bytes are atomic, and
#: every read takes one record, so no lane ever gets part of one.
_RECORD = struct.Struct("!Q")
_RECORDS_PER_WRITE = 4096 // _RECORD.size

Event = tuple[Any, ...]


@dataclass
class LaneResult:
    """What one lane did, and how it ended."""

    files_linked: int = 0
    objects_created: int = 0
    bytes_saved: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    errors: list[Problem] = field(default_factory=list)
    #: The stop signal that ended the lane at a safe point, else 0.
    stopped: int = 0
    #: (exit code, message) of the error that ended the lane, else None.
    fatal: tuple[int, str] | None = None


class Channel:
    """A lane's way to its parent: events, gathered and written in batches."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[Event] = []

    def send(self, event: Event) -> None:
        self._pending.append(event)
        if len(self._pending) >= _EVENTS_PER_MESSAGE:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        payload = pickle.dumps(self._pending)
        self._pending = []
        view = memoryview(_LENGTH.pack(len(payload)) + payload)
        while view:
            view = view[os.write(self._fd, view) :]


def default_lanes() -> int:
    """One lane per CPU this process may run on, at most 8 (the disk is shared anyway).

    Not one more, though a lane often waits on the journal: each lane copies pages it
    shares with the parent as it goes, more the larger the trees. On two CPUs a third
    lane linked 200,000 files about a fifth faster, and made a million files cost 305 MB
    instead of 214 (bench/README.md); `--jobs` chooses otherwise.
    """
    return max(1, min(8, len(os.sched_getaffinity(0))))


def can_fork() -> bool:
    """fork() copies only the calling thread: a lock another thread held would stay
    locked in the child for ever, so lanes are only forked from a single-threaded process."""
    return threading.active_count() == 1


def run_lanes(
    lanes: int,
    sizes: Sequence[int],
    work: Callable[[Callable[[], int | None], Channel], LaneResult],
    stop: StopRequest,
    on_event: Callable[[int, Event], None],
    on_result: Callable[[int, LaneResult], None],
) -> None:
    """Fork `lanes` children running `work(next_size, channel)`; feed them `sizes` in order.

    `next_size()` returns the next size class to link, None when there are no more. Each
    event a lane sends reaches `on_event(lane index, event)`, its result
    `on_result(lane index, result)`. A stop signal this process gets is passed on to the
    lanes, which stop at their next safe point. A lane that dies without a result counts
    as failed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # The collector writes to the header of every object it examines: in a lane, that
    # would copy every page of the walk's tables. Frozen objects are never examined.
    gc.freeze()
    try:
        parent = os.getpid()
        queue_read, queue_write = os.pipe()
        os.set_blocking(queue_write, False)
        feed = _Feed(queue_write, sizes)
        children: dict[int, tuple[int, int]] = {}  # read end of its pipe -> (lane, pid)
        try:
            for lane in range(lanes):
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(read_fd)
                    os.close(queue_write)
                    _child(work, queue_read, write_fd, parent)
                os.close(write_fd)
                children[read_fd] = (lane, pid)
            os.close(queue_read)
        except BaseException:
            feed.close()
            for _, pid in children.values():
                _signal(pid, signal.SIGTERM)
            _collect(children, stop, feed, on_event, on_result)
            raise
        _collect(children, stop, feed, on_event, on_result)
    finally:
        gc.unfreeze()


class _Feed:
    """The parent's end of the queue: writes size classes as the pipe takes them."""

    def __init__(self, fd: int, sizes: Sequence[int]) -> None:
        self.fd = fd
        self._sizes = sizes
        self._next = 0
        if not sizes:
            self.close()

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def fill(self) -> None:
        """Write what the pipe takes now; close it after the last size class."""
        while self.open:
            batch = self._sizes[self._next : self._next + _RECORDS_PER_WRITE]
            data = b"".join(_RECORD.pack(size) for size in batch)
            try:
                os.write(self.fd, data)  # at most PIPE_BUF: all of it, or EAGAIN
            except BlockingIOError:
                return
            self._next += len(batch)
            if self._next >= len(self._sizes):
                self.close()

    def close(self) -> None:
        if self.open:
            os.close(self.fd)
            self.fd = -1


def _child(
    work: Callable[[Callable[[], int | None], Channel], LaneResult],
    queue_fd: int,
    write_fd: int,
    parent: int,
) -> None:
    """The body of a lane process; never returns."""
    code = EXIT_FATAL
    try:
        _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(code)
        channel = Channel(write_fd)

        def next_size() -> int | None:
            record = os.read(queue_fd, _RECORD.size)
            return _RECORD.unpack(record)[0] if record else None

        try:
            result = work(next_size, channel)
        except BaseException as exc:
            result = LaneResult(fatal=_as_fatal(exc))
        channel.send(("result", result))
        channel.flush()
        code = 0
    finally:
        os._exit(code)


def _as_fatal(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, CowlinkError):
        return exc.exit_code, exc.message
    if isinstance(exc, OSError):
        fault = storage_fault(exc, exc.filename or "the filesystem")
        if fault is not None:
            return fault.exit_code, fault.message
    return EXIT_FATAL, "".join(traceback.format_exception(exc)).rstrip()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _collect(
    children: dict[int, tuple[int, int]],
    stop: StopRequest,
    feed: _Feed,
    on_event: Callable[[int, Event], None],
    on_result: Callable[[int, LaneResult], None],
) -> None:
    """Feed the queue, hand on every lane's events and result, pass on stop signals;
    reap every lane."""
    buffers = {fd: bytearray() for fd in children}
    forwarded = 0
    try:
        while buffers:
            if stop.signum and stop.signum != forwarded:
                forwarded = stop.signum
                feed.close()  # nothing more to start
                for _, pid in children.values():
                    _signal(pid, forwarded)
            writable = [feed.fd] if feed.open else []
            try:
                ready, can_write, _ = select.select(list(buffers), writable, [], 0.2)
            except InterruptedError:
                continue
            if can_write:
                feed.fill()
            for fd in ready:
                lane, pid = children[fd]
                chunk = os.read(fd, 1 << 16)
                buffer = buffers[fd]
                if chunk:
                    buffer += chunk
                    _dispatch(lane, buffer, on_event, on_result)
                    continue
                del buffers[fd]
                os.close(fd)
                status = _reap(pid)
                if status is not None:
                    on_result(lane, LaneResult(fatal=(EXIT_FATAL, f"unify lane {pid} {status}")))
    finally:
        feed.close()


def _dispatch(
    lane: int,
    buffer: bytearray,
    on_event: Callable[[int, Event], None],
    on_result: Callable[[int, LaneResult], None],
) -> None:
    """Hand on each whole message in `buffer`, and drop it from there."""
    while len(buffer) >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buffer)
        end = _LENGTH.size + length
        if len(buffer) < end:
            return
        events: list[Event] = pickle.loads(bytes(buffer[_LENGTH.size : end]))
        del buffer[:end]
        for event in events:
            if event[0] == "result":
                on_result(lane, event[1])
            else:
                on_event(lane, event)


def _reap(pid: int) -> str | None:
    """Wait for a lane; None when it ended well, else how it ended."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return None
        if os.WIFSIGNALED(status):
            return f"was killed by signal {os.WTERMSIG(status)}"
        code = os.waitstatus_to_exitcode(status)
        return None if code == 0 else f"exited with status {code}"
