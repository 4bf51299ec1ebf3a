"""What a command prints on a terminal: actions (-v), problems, progress, summaries.

Results go to stdout; actions, problems and progress go to stderr. Progress is drawn only
when stderr is a terminal, so cron mail stays clean.
"""

from __future__ import annotations

import os
import sys
import time

import click


def printable(path: bytes | str) -> str:
    """A path as text, with newlines and undecodable bytes escaped so one path is one line."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n")


class Console:
    """The engine's view of the terminal; the library calls it, it never calls the library."""

    def __init__(self, *, verbose: int = 0, quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self._progress_shown = False
        self._last_draw = 0.0
        self._tty = sys.stderr.isatty() and not quiet

    def action(self, path: bytes | str, what: str, reason: str, level: int = 1) -> None:
        if self.verbose >= level:
            self._clear_progress()
            click.echo(f"{what}: {printable(path)} ({reason})", err=True)

    def problem(self, path: bytes | str, error: str) -> None:
        self._clear_progress()
        click.echo(f"cowlink: {printable(path)}: {error}", err=True)

    def warning(self, message: str) -> None:
        self._clear_progress()
        click.echo(f"cowlink: warning: {message}", err=True)

    def progress(self, text: str) -> None:
        if not self._tty:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        import shutil  # only a terminal draws progress; `cowlink du` never does

        width = max(20, shutil.get_terminal_size().columns - 1)
        sys.stderr.write("\r" + text[:width].ljust(width))
        sys.stderr.flush()
        self._progress_shown = True

    def _clear_progress(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._progress_shown = False

    def summary(self, lines: list[str]) -> None:
        self._clear_progress()
        if not self.quiet:
            for line in lines:
                click.echo(line)
