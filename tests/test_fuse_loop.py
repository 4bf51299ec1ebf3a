"""The trio that pyfuse3's request loop runs on: its read lock and its wait, without a kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from cowlink_fuse._loop import _STREAK, RequestLoopTrio


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def test_everything_else_is_trio() -> None:
    loop = RequestLoopTrio()
    assert loop.open_nursery is trio.open_nursery
    assert loop.ClosedResourceError is trio.ClosedResourceError
    assert loop.lowlevel.current_task() is trio.lowlevel.current_task()
    assert loop.lowlevel.notify_closing is trio.lowlevel.notify_closing


async def test_read_lock_goes_back_to_its_holder_and_to_a_waiter_once_the_holder_waits() -> None:
    loop = RequestLoopTrio()
    lock = loop.Lock()
    got: list[str] = []

    async def standby() -> None:
        async with lock:
            got.append("standby")

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(standby)
        await trio.testing.wait_all_tasks_blocked()
        assert lock.standby
        await lock.__aexit__(None, None, None)
        await lock.__aenter__()  # no checkpoint since letting go: taken back at once
        await trio.testing.wait_all_tasks_blocked()  # the woken waiter looked, and waits on
        assert got == []
        assert lock.standby
        await lock.__aexit__(None, None, None)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["standby"]
        assert not lock.standby


async def test_wait_returns_at_once_only_with_a_request_queued_and_a_task_standing_by(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    loop = RequestLoopTrio()
    lock = loop.Lock()
    os.write(w, b"x")
    await loop.lowlevel.wait_readable(r)  # nobody stands by: pyfuse3 needs to start one
    assert (loop.quick_waits, loop.trio_waits) == (0, 1)

    async def standby() -> None:
        async with lock:
            pass

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(standby)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(_STREAK):
            await loop.lowlevel.wait_readable(r)
        assert (loop.quick_waits, loop.trio_waits) == (_STREAK, 1)
        await loop.lowlevel.wait_readable(r)  # a streak ends with trio's own wait
        assert (loop.quick_waits, loop.trio_waits) == (_STREAK, 2)
        await loop.lowlevel.wait_readable(r)
        assert (loop.quick_waits, loop.trio_waits) == (_STREAK + 1, 2)
        os.read(r, 1)
        with trio.move_on_after(0.05) as waited:  # nothing queued: trio's wait, which blocks
            await loop.lowlevel.wait_readable(r)
        assert waited.cancelled_caught
        assert (loop.quick_waits, loop.trio_waits) == (_STREAK + 1, 3)
        await lock.__aexit__(None, None, None)


async def test_closing_the_fd_ends_a_wait_in_trio(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    loop = RequestLoopTrio()
    ended: list[str] = []

    async def reader() -> None:
        try:
            await loop.lowlevel.wait_readable(r)
        except trio.ClosedResourceError:
            ended.append("closed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        loop.lowlevel.notify_closing(r)  # what pyfuse3.terminate() does
    assert ended == ["closed"]
