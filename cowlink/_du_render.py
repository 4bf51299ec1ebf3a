"""How a `cowlink du` report is shown: aligned table, JSON, CSV and a self-contained HTML page.

Each renderer takes a finished UsageReport and returns text; nothing here walks a tree.
Each imports what only it needs (json, csv, html) when called, so that the plain table,
what a monitoring job runs every few minutes, starts without them.
The JSON schema is documented in docs/du.md and versioned by its "schema" field.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._du import UsageReport
    from ._metrics import LastUnify

JSON_SCHEMA = "cowlink-du/1"

_GUEST_FIELDS = (
    "files",
    "dirs",
    "apparent_bytes",
    "allocated_bytes",
    "exclusive_bytes",
    "shared_bytes",
    "fair_share_bytes",
    "unlinked_bytes",
)
_TOTAL_FIELDS = (
    "files",
    "dirs",
    "apparent_bytes",
    "allocated_bytes",
    "unlinked_bytes",
    "saved_bytes",
    "saved_ratio",
    "store_objects",
    "store_bytes",
)
_DIR_FIELDS = ("files", "apparent_bytes", "allocated_bytes", "exclusive_bytes", "shared_bytes")


def _text(value: str) -> str:
    # Paths may hold undecodable bytes (surrogate escapes); show them, never crash on them.
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n")


def human(n: float) -> str:
    """Binary-prefixed size with one decimal, as `du -h` would round it (KiB, MiB, ...)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def _align(rows: list[list[str]], right_from: int = 1) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i >= right_from else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def table(report: UsageReport, *, exact: bool = False, last_unify: LastUnify | None = None) -> str:
    """The terminal view: one line per guest, the totals, then --top and --depth sections."""
    size = str if exact else human
    rows = [["GUEST", "FILES", "APPARENT", "ALLOCATED", "EXCLUSIVE", "SHARED", "FAIR SHARE"]]
    rows += [
        [
            _text(g.name),
            str(g.files),
            size(g.apparent_bytes),
            size(g.allocated_bytes),
            size(g.exclusive_bytes),
            size(g.shared_bytes),
            size(g.fair_share_bytes),
        ]
        for g in report.guests
    ]
    t = report.totals
    rows.append(
        ["TOTAL", str(t.files), size(t.apparent_bytes), size(t.allocated_bytes), "", "", ""]
    )
    lines = _align(rows)
    lines.append("")
    lines.append(
        f"without hardlinks {size(t.unlinked_bytes)}; saved {size(t.saved_bytes)}"
        f" ({t.saved_ratio:.1%})"
    )
    if report.store is not None:
        lines.append(f"store: {t.store_objects} objects, {size(t.store_bytes)}")
    if last_unify is not None:
        lines.append(
            f"last unify: finished {_when(last_unify.timestamp_s)}, took"
            f" {last_unify.duration_s:.1f} s, {last_unify.errors} errors,"
            f" exit {last_unify.exit_code}"
        )
    if report.top:
        lines.append("")
        top_rows = [["SAVES", "SIZE", "LINKS", "GUESTS", "PATH"]]
        top_rows += [
            [
                size(f.saved_bytes),
                size(f.allocated_bytes),
                str(f.links) + ("+store" if f.in_store else ""),
                ",".join(_text(n) for n in f.guests),
                _text(f.path),
            ]
            for f in report.top
        ]
        lines += _align(top_rows, right_from=0)
    if report.dirs:
        lines.append("")
        dir_rows = [["ALLOCATED", "EXCLUSIVE", "SHARED", "FILES", "GUEST", "DIRECTORY"]]
        dir_rows += [
            [
                size(d.allocated_bytes),
                size(d.exclusive_bytes),
                size(d.shared_bytes),
                str(d.files),
                _text(d.guest),
                _text(d.path),
            ]
            for d in report.dirs
        ]
        lines += _align(dir_rows, right_from=0)
    return "\n".join(lines) + "\n"


def as_dict(report: UsageReport, last_unify: LastUnify | None = None) -> dict[str, Any]:
    """The JSON document (schema cowlink-du/1, see docs/du.md)."""
    t = report.totals
    return {
        "schema": JSON_SCHEMA,
        "guests": [
            {"name": _text(g.name), "root": _text(g.root)}
            | {k: getattr(g, k) for k in _GUEST_FIELDS}
            for g in report.guests
        ],
        "totals": {k: getattr(t, k) for k in _TOTAL_FIELDS},
        "store": _text(report.store) if report.store is not None else None,
        "top": [
            {
                "path": _text(f.path),
                "guests": [_text(n) for n in f.guests],
                "links": f.links,
                "nlink": f.nlink,
                "in_store": f.in_store,
                "allocated_bytes": f.allocated_bytes,
                "saved_bytes": f.saved_bytes,
            }
            for f in report.top
        ],
        "dirs": [
            {"guest": _text(d.guest), "path": _text(d.path), "depth": d.depth}
            | {k: getattr(d, k) for k in _DIR_FIELDS}
            for d in report.dirs
        ],
        "last_unify": None
        if last_unify is None
        else {
            "timestamp_seconds": last_unify.timestamp_s,
            "duration_seconds": last_unify.duration_s,
            "errors": last_unify.errors,
            "exit_code": last_unify.exit_code,
        },
        "problems": [{"path": _text(p.path), "error": p.error} for p in report.problems],
    }


def as_json(report: UsageReport, last_unify: LastUnify | None = None) -> str:
    import json

    return json.dumps(as_dict(report, last_unify), indent=2) + "\n"


CSV_COLUMNS = (
    "kind",
    "guest",
    "path",
    "files",
    "dirs",
    "apparent_bytes",
    "allocated_bytes",
    "exclusive_bytes",
    "shared_bytes",
    "fair_share_bytes",
    "unlinked_bytes",
    "saved_bytes",
    "store_objects",
    "store_bytes",
)


def as_csv(report: UsageReport) -> str:
    """One header, then rows of kind guest, total, top (with --top) and dir (with --depth).

    Columns that do not apply to a kind are empty; sizes are always exact bytes.
    """
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", restval="")
    w.writeheader()
    for g in report.guests:
        w.writerow(
            {"kind": "guest", "guest": _text(g.name), "path": _text(g.root)}
            | {k: getattr(g, k) for k in _GUEST_FIELDS}
        )
    t = report.totals
    w.writerow(
        {"kind": "total"}
        | {
            k: getattr(t, k)
            for k in _TOTAL_FIELDS
            if k in CSV_COLUMNS  # saved_ratio is derived: saved / unlinked
        }
    )
    for f in report.top:
        w.writerow(
            {
                "kind": "top",
                "guest": ",".join(_text(n) for n in f.guests),
                "path": _text(f.path),
                "allocated_bytes": f.allocated_bytes,
                "saved_bytes": f.saved_bytes,
            }
        )
    for d in report.dirs:
        w.writerow(
            {"kind": "dir", "guest": _text(d.guest), "path": _text(d.path)}
            | {k: getattr(d, k) for k in _DIR_FIELDS}
        )
    return buf.getvalue()


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fff}
h1{font-size:1.4em}table{border-collapse:collapse;margin:1em 0}
td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.guest{margin:.6em 0}.legend span{display:inline-block;margin-right:1.5em}
.sw{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin-right:.3em}
"""
_EXCLUSIVE = "#3b7dd8"
_SHARED = "#f0a030"
_SAVED = "#8fc98f"


def _bar(label: str, parts: list[tuple[str, int, str]], scale: int, width: int = 640) -> str:
    """One SVG stacked horizontal bar: (name, bytes, colour) parts, scaled to `scale` bytes."""
    import html

    height = 28
    x = 0.0
    rects = []
    for name, value, colour in parts:
        w = width * value / scale if scale else 0.0
        title = html.escape(f"{name}: {human(value)} ({value} bytes)")
        rects.append(
            f'<rect x="{x:.2f}" y="0" width="{w:.2f}" height="{height}" fill="{colour}">'
            f"<title>{title}</title></rect>"
        )
        x += w
    total = sum(value for _, value, _ in parts)
    detail = ", ".join(f"{human(value)} {name}" for name, value, _ in parts)
    text = html.escape(f"{human(total)} ({detail})")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 380}" height="{height}"'
        f' role="img" aria-label="{html.escape(label)}: {text}">'
        + "".join(rects)
        + f'<text x="{width + 8}" y="19" font-size="13">{text}</text></svg>'
    )


def as_html(report: UsageReport, last_unify: LastUnify | None = None) -> str:
    """A single offline page: a stacked bar per guest (exclusive, shared) and the totals."""
    import html

    t = report.totals
    esc = html.escape
    scale = max([g.allocated_bytes for g in report.guests] + [1])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>cowlink du</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>cowlink du: what each guest costs</h1>",
        '<p class="legend">'
        f'<span><i class="sw" style="background:{_EXCLUSIVE}"></i>exclusive</span>'
        f'<span><i class="sw" style="background:{_SHARED}"></i>shared</span>'
        f'<span><i class="sw" style="background:{_SAVED}"></i>saved</span></p>',
    ]
    for g in report.guests:
        parts.append(f'<div class="guest"><div>{esc(_text(g.name))}</div>')
        parts.append(
            _bar(
                _text(g.name),
                [("exclusive", g.exclusive_bytes, _EXCLUSIVE), ("shared", g.shared_bytes, _SHARED)],
                scale,
            )
        )
        parts.append("</div>")
    parts.append("<h2>Totals</h2>")
    parts.append(
        _bar(
            "without hardlinks",
            [("allocated", t.allocated_bytes, _EXCLUSIVE), ("saved", t.saved_bytes, _SAVED)],
            max(t.unlinked_bytes, 1),
        )
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "guest",
            "files",
            "apparent",
            "allocated",
            "exclusive",
            "shared",
            "fair share",
        )
    )
    parts.append(f"<table><tr>{head}</tr>")
    for g in report.guests:
        cells = [
            esc(_text(g.name)),
            str(g.files),
            human(g.apparent_bytes),
            human(g.allocated_bytes),
            human(g.exclusive_bytes),
            human(g.shared_bytes),
            human(g.fair_share_bytes),
        ]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append(
        f"<tr><th>total</th><th>{t.files}</th><th>{human(t.apparent_bytes)}</th>"
        f"<th>{human(t.allocated_bytes)}</th><th></th><th></th><th></th></tr></table>"
    )
    facts = [
        ("allocated, each inode once", human(t.allocated_bytes)),
        ("without hardlinks", human(t.unlinked_bytes)),
        ("saved", f"{human(t.saved_bytes)} ({t.saved_ratio:.1%})"),
        ("store objects", f"{t.store_objects} ({human(t.store_bytes)})"),
    ]
    if last_unify is not None:
        facts.append(
            (
                "last unify",
                f"{last_unify.duration_s:.1f} s, {last_unify.errors} errors,"
                f" exit {last_unify.exit_code}",
            )
        )
    parts.append("<table>")
    parts += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts]
    parts.append("</table>")
    if report.top:
        parts.append("<h2>Shared files that save most</h2><table>")
        parts.append("<tr><th>path</th><th>saves</th><th>size</th><th>links</th></tr>")
        for f in report.top:
            parts.append(
                f"<tr><td>{esc(_text(f.path))}</td><td>{human(f.saved_bytes)}</td>"
                f"<td>{human(f.allocated_bytes)}</td><td>{f.links}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
