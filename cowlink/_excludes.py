"""Exclude rules: which paths of a guest root unification may touch.

A rule is one line: an optional prefix and a pattern. `+` includes, `-` (or no prefix)
excludes, `~` skips (never touched by any cowlink command). The first rule that matches
a path decides; a path no rule matches is included. A directory that is excluded or
skipped is not entered.

Patterns match the path relative to the guest root, written with a leading `/`
(`/etc/passwd`). A pattern that starts with `/` is anchored at the root; any other
pattern matches at any depth (`*.pyc` is `/**/*.pyc`). Unlike VServer's fnmatch, `*`
and `?` never cross `/`; `**` matches any number of directories, including none.
`[...]` classes work as in the shell; `\\` escapes the next character.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from pathlib import Path

from ._errors import UsageError


class Verdict(enum.Enum):
    INCLUDE = "+"
    EXCLUDE = "-"
    SKIP = "~"


#: VServer's distrib/misc/vunify-exclude, with `/*/ls-R` spelled `/**/ls-R` because our
#: `*` does not cross `/` (VServer's did, so the rule meant "ls-R at any depth").
DEFAULT_RULES: tuple[str, ...] = (
    "/.rpmdb",
    "/dev",
    "~/etc/shadow",
    "~/etc/passwd",
    "~/etc/group",
    "+/etc/termcap",
    "+/etc/gconf",
    "+/etc/gconf/schemas",
    "/etc/gconf/*",
    "/etc/*",
    "/home",
    "/proc",
    "/mnt",
    "+/root/.ssh",
    "~/root/.ssh/id*",
    "-/root/.ssh/*",
    "+/root/.gnupg",
    "~/root/.gnupg/secring*",
    "-/root/.gnupg/*",
    "-/root/*",
    "/selinux",
    "/sys",
    "~/tmp/*",
    "/tmp",
    "~/var/tmp/*",
    "/var",
    "/**/ls-R",
)


def _translate(pattern: str) -> str:
    """Turn one glob into a regular expression over '/'-separated paths."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                before_slash = i == 0 or pattern[i - 1] == "/"
                after = pattern[i + 2 : i + 3]
                if before_slash and after == "/":
                    out.append("(?:.*/)?")  # `**/` : zero or more whole directories
                    i += 3
                    continue
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\")
                out.append(f"(?!/)[{'^' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse_rule(line: str) -> tuple[Verdict, str] | None:
    """One rule line, or None for a blank line or a `#` comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    verdict = Verdict.EXCLUDE
    if text[0] in "+-~":
        verdict = Verdict(text[0])
        text = text[1:].strip()
    if not text:
        raise UsageError(f"exclude rule {line!r} has no pattern")
    text = text.rstrip("/") or "/"
    if not text.startswith("/"):
        text = "/**/" + text
    return verdict, text


class Rules:
    """An ordered rule list compiled into one regular expression; the first match wins."""

    def __init__(self, rules: Iterable[tuple[Verdict, str]]) -> None:
        self.rules = list(rules)
        if self.rules:
            alternatives = "|".join(
                f"(?P<r{i}>{_translate(pattern)})" for i, (_, pattern) in enumerate(self.rules)
            )
            self._regex: re.Pattern[str] | None = re.compile(alternatives, re.DOTALL)
        else:
            self._regex = None

    def verdict(self, path: str) -> Verdict:
        """The verdict for `path`, relative to the guest root with a leading '/'."""
        if self._regex is None:
            return Verdict.INCLUDE
        match = self._regex.fullmatch(path)
        if match is None or match.lastgroup is None:
            return Verdict.INCLUDE
        return self.rules[int(match.lastgroup[1:])][0]

    @classmethod
    def build(
        cls,
        *,
        command_line: Iterable[str] = (),
        files: Iterable[str | Path] = (),
        guest_file: Path | None = None,
        defaults: bool = True,
    ) -> Rules:
        """Rules in precedence order: --exclude, --exclude-from, the guest's file, defaults."""
        lines: list[str] = list(command_line)
        for path in files:
            lines += _read_rules(Path(path))
        if guest_file is not None and guest_file.is_file():
            lines += _read_rules(guest_file)
        if defaults:
            lines += DEFAULT_RULES
        return cls(rule for rule in map(parse_rule, lines) if rule is not None)


def _read_rules(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read exclude file {path}: {exc.strerror}") from None
