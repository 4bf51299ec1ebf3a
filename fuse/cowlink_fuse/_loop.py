"""What pyfuse3's request loop sees as `trio`: trio itself, with a cheaper wait between requests.

pyfuse3 runs its request loop on its module attribute `trio` (its asyncio mode swaps a
stand-in in the same way), and each of its worker tasks does, per request: take the read
lock, wait until /dev/fuse is readable, let go of the lock, read the request, run the
handler. With trio's own Lock and wait, every request cost two passes of trio's
scheduler, more than most handlers: trio's Lock is fair, so the task that let go hands
the lock to a standby task that only parks again, and the wait parks in epoll even when
the next request is queued already. A guest's untar sends about fourteen requests per
file (bench/README.md, "cowlink mount", has the figures).

Two changes, both to that wait and nothing else:

- The read lock can be taken back by the task that just let go of it, at once; a task
  waiting for it is woken to look again. So one task serves request after request while
  a second stands by, and the second takes over whenever a handler awaits (a copy, an
  fsync in a worker thread): requests keep being served meanwhile, as before.
- The wait for /dev/fuse returns at once when a request is queued already (a poll with
  no timeout) and another task stands by on the lock (else pyfuse3 would start a new
  worker for each request). Every `_STREAK`-th wait, and every wait with nothing
  queued, is trio's own: other tasks run, and cancellation and unmounting work as before.

Only the task holding the lock reads /dev/fuse, and it does so right after the wait with
no await between, exactly as with trio's own lock. No pyfuse3 import: _mount installs it.
"""

from __future__ import annotations

import select
from typing import Any

import trio

#: Requests served back to back before trio's own wait lets every other task run.
_STREAK = 32


class _ReadLock:
    """pyfuse3's read lock: whoever finds it free takes it; release wakes one waiter to look."""

    def __init__(self) -> None:
        self._held = False
        self._waiters = 0  # parked, or woken and not yet back
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def standby(self) -> bool:
        """Some other task waits to read requests."""
        return self._waiters > 0

    async def __aenter__(self) -> None:
        if self._held:
            self._waiters += 1
            try:
                while self._held:
                    await self._lot.park()
            finally:
                self._waiters -= 1
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:  # a waiter woken before and not yet back will look anyway
            self._lot.unpark()


class _Lowlevel:
    """trio.lowlevel, with the request loop's wait_readable."""

    def __init__(self) -> None:
        self.lock: _ReadLock | None = None
        self._polls: dict[int, select.poll] = {}
        self._streak = 0
        self.quick_waits = 0
        self.trio_waits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    def _queued(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        return bool(poll.poll(0))

    async def wait_readable(self, fd: int) -> None:
        lock = self.lock
        if self._streak < _STREAK and lock is not None and lock.standby and self._queued(fd):
            self._streak += 1
            self.quick_waits += 1
            return
        self._streak = 0
        self.trio_waits += 1
        await trio.lowlevel.wait_readable(fd)


class RequestLoopTrio:
    """Stands in for the trio module inside pyfuse3 (`pyfuse3.trio`); see the module notes."""

    def __init__(self) -> None:
        self.lowlevel = _Lowlevel()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def Lock(self) -> _ReadLock:  # pyfuse3 calls trio.Lock()
        self.lowlevel.lock = _ReadLock()
        return self.lowlevel.lock

    @property
    def quick_waits(self) -> int:
        """Waits that returned at once, a request being queued already."""
        return self.lowlevel.quick_waits

    @property
    def trio_waits(self) -> int:
        """Waits that were trio's own."""
        return self.lowlevel.trio_waits
