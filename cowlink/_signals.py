"""SIGINT and SIGTERM as requests to stop at the next safe point, for changing commands."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from . import _linux


class StopRequest:
    """Records a stop signal; the command checks `signum` where every path is whole."""

    def __init__(self) -> None:
        self.signum = 0

    @contextmanager
    def catching(self) -> Iterator[None]:
        """Catch SIGINT and SIGTERM (and ignore lease-break notices) for the block."""

        def handler(signum: int, frame: object) -> None:
            self.signum = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        _linux.ignore_lease_breaks()
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
