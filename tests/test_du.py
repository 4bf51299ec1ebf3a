"""cowlink du: every figure against an independent inode count and against GNU du."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cowlink import _du
from cowlink._du import measure, measure_home
from cowlink._du_render import as_csv, as_html, as_json, human, table
from cowlink._home import Home
from cowlink._metrics import LastUnify, read_last_unify, render_metrics, write_metrics
from cowlink.cli import main
from tests._guests import cowlink, make_guests, write
from tests._util import need_immutable, need_root

BLOCK = 512


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)


@pytest.fixture
def corpus(home: Path, tmp_path: Path) -> Home:
    """Three guests and a store covering every case the report distinguishes.

    - a: a sparse file; a store object shared with b and c; a file hardlinked to a path
      outside every tree; symlinks, a fifo, a device node (as root), an empty directory.
    - b: the same store object; two names for one inode inside b only (exclusive).
    - c: the store object once, and a split copy of its content (a separate inode).
    - store: one object linked into a, b and c, one linked into a only, one orphan.
    """
    h = Home(home)
    h.ensure()
    for g in "abc":
        h.guest_root(g).mkdir(parents=True)
    a, b, c = (h.guest_root(g) for g in "abc")
    store = h.store_dir
    common = os.urandom(50_000)
    obj = _write(store / "ab" / "cd" / "obj-common", common)
    for root in (a, b, c):
        _link(obj, root / "usr" / "lib" / "libcommon.so")
    _link(obj, b / "usr" / "lib" / "libcommon-again.so")  # a second name in b
    only_a = _write(store / "12" / "34" / "obj-only-a", os.urandom(9000))
    _link(only_a, a / "bin" / "only-a")
    _write(store / "ff" / "obj-orphan", os.urandom(3000))  # any fan-out depth will do
    _write(store / ".tmp" / "partial", b"ignored")  # dot entries are not objects
    _write(store / "ab" / ".new" / "partial", b"ignored")

    with open(_write(a / "var" / "sparse.img", b""), "r+b") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    outside = _write(tmp_path / "outside" / "shared-with-host", os.urandom(20_000))
    _link(outside, a / "etc" / "from-host")
    (a / "etc" / "motd").symlink_to("/usr/share/" + "long-name/" * 20 + "motd")
    (a / "etc" / "short").symlink_to("x")
    (a / "run").mkdir()
    os.mkfifo(a / "run" / "fifo")
    if os.geteuid() == 0:
        (a / "dev").mkdir()
        os.mknod(a / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (a / "empty").mkdir()

    tool = _write(b / "bin" / "tool", os.urandom(30_000))
    _link(tool, b / "sbin" / "tool")
    _write(b / "etc" / "hostname", b"b\n")

    _write(c / "opt" / "libcommon-copy.so", common)  # split: same bytes, own inode
    _write(c / "etc" / "hostname", b"c\n")
    return h


# -- an independent computation: walk with os.walk and count inodes ---------------------


@dataclass
class Expected:
    files: int = 0
    dirs: int = 0
    apparent: int = 0
    allocated: int = 0
    exclusive: int = 0
    shared: int = 0
    unlinked: int = 0
    inodes: dict[tuple[int, int], os.stat_result] = field(default_factory=dict)
    links: dict[tuple[int, int], int] = field(default_factory=dict)


def _expected_guest(root: Path) -> Expected:
    e = Expected()
    entries = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        entries += [Path(dirpath) / n for n in dirnames + filenames]
    for p in entries:
        st = os.lstat(p)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            e.dirs += 1
        else:
            e.files += 1
        e.unlinked += st.st_blocks * BLOCK
        e.links[key] = e.links.get(key, 0) + 1
        e.inodes[key] = st
    for key, st in e.inodes.items():
        e.apparent += st.st_size
        e.allocated += st.st_blocks * BLOCK
        if stat.S_ISDIR(st.st_mode) or e.links[key] == st.st_nlink:
            e.exclusive += st.st_blocks * BLOCK
        else:
            e.shared += st.st_blocks * BLOCK
    return e


def _gnu_du(*args: str | Path) -> list[int]:
    out = subprocess.run(
        ["du", "-s", "-x", "-B1", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout
    return [int(line.split("\t")[0]) for line in out.splitlines()]


# -- figures --------------------------------------------------------------------------


def test_each_guest_matches_an_independent_count_and_gnu_du(corpus: Home) -> None:
    report = measure_home(corpus)
    assert [g.name for g in report.guests] == ["a", "b", "c"]
    for g in report.guests:
        root = corpus.guest_root(g.name)
        e = _expected_guest(root)
        assert (g.files, g.dirs) == (e.files, e.dirs)
        assert g.apparent_bytes == e.apparent == _gnu_du("--apparent-size", root)[0]
        assert g.allocated_bytes == e.allocated == _gnu_du(root)[0]
        assert g.unlinked_bytes == e.unlinked == _gnu_du("-l", root)[0]
        assert g.exclusive_bytes == e.exclusive
        assert g.shared_bytes == e.shared
        assert g.exclusive_bytes + g.shared_bytes == g.allocated_bytes


def test_totals_count_every_inode_once_like_du_total(corpus: Home) -> None:
    report = measure_home(corpus)
    roots = [corpus.guest_root(g) for g in "abc"]
    t = report.totals
    assert t.allocated_bytes == _gnu_du("--total", *roots)[-1]
    assert t.apparent_bytes == _gnu_du("--total", "--apparent-size", *roots)[-1]
    assert t.unlinked_bytes == _gnu_du("--total", "-l", *roots)[-1]
    assert t.saved_bytes == t.unlinked_bytes - t.allocated_bytes
    assert t.saved_ratio == pytest.approx(t.saved_bytes / t.unlinked_bytes)
    assert t.files == sum(g.files for g in report.guests)
    # What the links save here: libcommon in a, b (twice) and c, b's tool twice.
    common = os.lstat(corpus.store_dir / "ab" / "cd" / "obj-common").st_blocks * BLOCK
    tool = os.lstat(corpus.guest_root("b") / "bin" / "tool").st_blocks * BLOCK
    assert t.saved_bytes == 3 * common + tool


def test_classification_of_each_case(corpus: Home) -> None:
    report = measure_home(corpus)
    by = {g.name: g for g in report.guests}

    def blocks(path: Path) -> int:
        return os.lstat(path).st_blocks * BLOCK

    a, b, c = (corpus.guest_root(g) for g in "abc")
    common = blocks(a / "usr" / "lib" / "libcommon.so")
    # a shares the store object, its store-only object and the file linked from outside.
    assert by["a"].shared_bytes == common + blocks(a / "bin" / "only-a") + blocks(
        a / "etc" / "from-host"
    )
    # b's two names for `tool` stay exclusive; its two names for libcommon count once.
    assert by["b"].shared_bytes == common
    assert blocks(b / "bin" / "tool") <= by["b"].exclusive_bytes
    # c's split copy is its own inode: exclusive, although the bytes are the same.
    assert by["c"].shared_bytes == common
    assert blocks(c / "opt" / "libcommon-copy.so") <= by["c"].exclusive_bytes
    # The sparse file counts its allocated blocks, not its 8 MiB length.
    assert by["a"].apparent_bytes > 8 << 20 > by["a"].allocated_bytes


def test_fair_share_splits_shared_inodes_among_the_guests_linking_them(corpus: Home) -> None:
    report = measure_home(corpus)
    by = {g.name: g for g in report.guests}
    a = corpus.guest_root("a")
    common = os.lstat(a / "usr" / "lib" / "libcommon.so").st_blocks * BLOCK
    alone = sum(
        os.lstat(a / p).st_blocks * BLOCK for p in ("bin/only-a", "etc/from-host")
    )  # shared with the store or the host only: a bears all of it
    assert by["a"].fair_share_bytes == round(common / 3 + alone)
    assert by["b"].fair_share_bytes == round(common / 3)
    assert by["c"].fair_share_bytes == round(common / 3)
    # Exclusive plus fair share over all guests is the total, up to rounding.
    spread = sum(g.exclusive_bytes + g.fair_share_bytes for g in report.guests)
    assert abs(spread - report.totals.allocated_bytes) <= len(report.guests)


def test_store_objects_and_bytes(corpus: Home) -> None:
    report = measure_home(corpus)
    objects = [
        p
        for p in corpus.store_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(corpus.store_dir).parts)
    ]
    assert report.totals.store_objects == len(objects) == 3
    assert report.totals.store_bytes == sum(os.lstat(p).st_blocks * BLOCK for p in objects)


def test_top_lists_the_shared_files_that_save_most(corpus: Home) -> None:
    report = measure_home(corpus, top=2)
    first = report.top[0]
    common = os.lstat(corpus.store_dir / "ab" / "cd" / "obj-common").st_blocks * BLOCK
    assert first.guests == ("a", "b", "c")
    assert (first.links, first.nlink, first.in_store) == (4, 5, True)
    assert first.saved_bytes == 3 * common
    assert first.path.endswith("libcommon.so")
    # b's `tool` saves too, but all its links are inside b: exclusive, not shared.
    assert len(report.top) == 1


def test_depth_breaks_usage_down_per_directory(corpus: Home) -> None:
    report = measure_home(corpus, depth=1)
    rows = {(d.guest, d.path): d for d in report.dirs}
    assert all(d.depth <= 1 for d in report.dirs)
    crossing = {("b", "bin"), ("b", "sbin")}
    for g in report.guests:
        root = corpus.guest_root(g.name)
        top_row = rows[(g.name, ".")]
        assert top_row.allocated_bytes == g.allocated_bytes
        assert top_row.exclusive_bytes == g.exclusive_bytes
        assert top_row.shared_bytes == g.shared_bytes
        assert top_row.files == g.files
        for d in report.dirs:
            if d.guest == g.name and d.depth == 1 and (g.name, d.path) not in crossing:
                assert d.allocated_bytes == _gnu_du(root / d.path)[0], d.path
    # b's `tool` has a name in bin and one in sbin: it counts once, in one of them.
    b = corpus.guest_root("b")
    both = rows[("b", "bin")].allocated_bytes + rows[("b", "sbin")].allocated_bytes
    assert both == _gnu_du("--total", b / "bin", b / "sbin")[-1]
    usr = rows[("a", "usr")]
    assert usr.shared_bytes > 0
    assert usr.exclusive_bytes < usr.allocated_bytes


@pytest.mark.parametrize("parallel", [False, True])
def test_the_d_ino_shortcut_and_two_lanes_change_nothing(corpus: Home, parallel: bool) -> None:
    roots = [(g, str(corpus.guest_root(g))) for g in "abc"]
    store = str(corpus.store_dir)

    def report(trust: bool, parallel: bool) -> _du.UsageReport:
        guests = _guests(roots)
        scan = _du._run(guests, store, 1, trust_d_ino=trust, parallel=parallel)
        return _du._summarise(scan, guests, store, 3)

    assert report(True, parallel) == report(False, False)


def _guests(roots: list[tuple[str, str]]) -> list[_du.GuestUsage]:
    return [_du.GuestUsage(n, os.path.realpath(r)) for n, r in roots]


def _deep_links(corpus: Home) -> None:
    """Directories several levels deep, and inodes linked from far apart in the trees."""
    a, b, c = (corpus.guest_root(g) for g in "abc")
    for root in (a, b, c):
        for n in range(3):
            _write(root / "usr" / "share" / f"pkg{n}" / "doc" / "README", os.urandom(5000 + n))
    deep = _write(a / "usr" / "share" / "pkg0" / "doc" / "deep" / "data", os.urandom(12_000))
    _link(deep, a / "var" / "lib" / "data-again")  # one guest, two subtrees
    _link(deep, c / "opt" / "elsewhere" / "data")  # another guest, another relative path
    _link(deep, b / "usr" / "share" / "pkg0" / "doc" / "deep-data")


@pytest.mark.parametrize("parallel", [False, True])
def test_a_walk_cut_into_subtrees_changes_nothing(
    corpus: Home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, parallel: bool
) -> None:
    _deep_links(corpus)
    roots = [(g, str(corpus.guest_root(g))) for g in "abc"]
    store = str(corpus.store_dir)

    def report(trust: bool, parallel: bool) -> _du.UsageReport:
        guests = _guests(roots)
        lane = _du._run(guests, store, 2, trust_d_ino=trust, parallel=parallel)
        return _du._summarise(lane, guests, store, 3)

    whole = report(True, False)
    # Cut below the roots and the heaviest directory under them, into every subtree left;
    # each subtree walk is slowed down so that both lanes take turns at the queue: each
    # walks parts of every guest, and an inode's links fall into subtrees of both lanes.
    monkeypatch.setattr(_du, "_SPLIT_PARTS", 1 << 30)
    monkeypatch.setattr(_du, "_SPLIT_LISTINGS", 2)
    monkeypatch.setattr(_du, "_SPLIT_LEVELS", 1 << 30)
    walkers = tmp_path / "walkers"
    real_walk = _du._Lane.walk

    def walk(self: _du._Lane, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("children") is None and len(args) < 6:
            with open(walkers, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.002)
        real_walk(self, *args, **kwargs)

    monkeypatch.setattr(_du._Lane, "walk", walk)
    cut = report(True, parallel)
    assert len(set(walkers.read_text().split())) == (2 if parallel else 1)
    assert cut == report(False, False)
    # Against the walk in one piece, only which of an inode's paths comes first may differ
    # (the path --top shows, the directory row that counts it).
    assert (cut.guests, cut.totals) == (whole.guests, whole.totals)
    assert [(f.guests, f.links, f.saved_bytes) for f in cut.top] == [
        (f.guests, f.links, f.saved_bytes) for f in whole.top
    ]
    for g in cut.guests:
        e = _expected_guest(corpus.guest_root(g.name))
        assert (g.files, g.dirs, g.apparent_bytes) == (e.files, e.dirs, e.apparent)
        assert (g.allocated_bytes, g.exclusive_bytes, g.shared_bytes) == (
            e.allocated,
            e.exclusive,
            e.shared,
        )
    rows = {(d.guest, d.path): d for d in cut.dirs}
    a = corpus.guest_root("a")
    # a's deep data has a name below usr/share and one below var/lib: it counts in one.
    for pair in (("usr", "var"), ("usr/share", "var/lib")):
        both = sum(rows[("a", rel)].allocated_bytes for rel in pair)
        assert both == _gnu_du("--total", *(a / rel for rel in pair))[-1]
    assert rows[("a", "etc")].allocated_bytes == _gnu_du(a / "etc")[0]


def test_a_second_lane_only_for_big_trees_with_an_idle_cpu(
    corpus: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _du._runnable() >= 1  # this process, at least
    guests = _guests([(g, str(corpus.guest_root(g))) for g in "abc"])
    lane, _plan, _base = _du._start(guests, str(corpus.store_dir), None, True, False)
    monkeypatch.setattr(_du, "_runnable", lambda: 1)
    assert not _du._can_fork(lane)  # a small home: the fork would cost more than it saves
    monkeypatch.setattr(_du, "_FORK_MIN_DIRS", 1)
    assert _du._can_fork(lane) == (len(os.sched_getaffinity(0)) > 1)
    monkeypatch.setattr(_du, "_runnable", lambda: os.cpu_count())
    assert not _du._can_fork(lane)  # every CPU busy


@pytest.mark.parametrize("parallel", [False, True])
def test_each_run_sees_the_trees_as_they_are_now(corpus: Home, parallel: bool) -> None:
    _deep_links(corpus)
    measure_home(corpus, parallel=parallel)
    a, b, c = (corpus.guest_root(g) for g in "abc")
    with open(a / "var" / "sparse.img", "r+b") as f:  # more blocks, same length
        f.seek(3 << 20)
        f.write(b"y" * 65536)
    (a / "usr" / "share" / "pkg0" / "doc" / "deep" / "data").write_bytes(os.urandom(40_000))
    _link(b / "bin" / "tool", b / "usr" / "bin" / "tool-third-name")
    os.unlink(c / "opt" / "elsewhere" / "data")  # c no longer shares it
    _write(c / "opt" / "new", os.urandom(7000))
    after = measure_home(corpus, parallel=parallel)
    for g in after.guests:
        root = corpus.guest_root(g.name)
        e = _expected_guest(root)
        assert (g.files, g.dirs) == (e.files, e.dirs)
        assert g.allocated_bytes == e.allocated == _gnu_du(root)[0]
        assert g.apparent_bytes == e.apparent
        assert (g.exclusive_bytes, g.shared_bytes) == (e.exclusive, e.shared)
    assert after.totals.allocated_bytes == _gnu_du("--total", a, b, c)[-1]


@pytest.mark.parametrize("parallel", [False, True])
def test_mount_points_are_left_out_as_du_x_does(
    corpus: Home, tmp_path: Path, parallel: bool
) -> None:
    need_root()
    a = corpus.guest_root("a")
    before = measure_home(corpus, parallel=parallel)
    (a / "mnt").mkdir()
    (a / "bound").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(a / "mnt")], check=True)
    try:
        _write(a / "mnt" / "big", b"y" * 100_000)
        subprocess.run(["mount", "--bind", str(tmp_path / "outside"), str(a / "bound")], check=True)
        try:
            after = measure_home(corpus, parallel=parallel)
        finally:
            subprocess.run(["umount", str(a / "bound")], check=True)
        with_tmpfs = _gnu_du(a)[0]  # du -x skips the tmpfs; the bind mount is gone by now
    finally:
        subprocess.run(["umount", str(a / "mnt")], check=True)
    a_before, a_after = before.guests[0], after.guests[0]
    # Neither mount point is counted: not the tmpfs, not the same-filesystem bind mount.
    assert a_after.allocated_bytes == a_before.allocated_bytes
    assert a_after.allocated_bytes == with_tmpfs - os.lstat(a / "bound").st_blocks * BLOCK
    assert a_after.dirs == a_before.dirs


def test_explicit_roots_outside_the_home(tmp_path: Path, home: Path) -> None:
    x = tmp_path / "x"
    _write(x / "f", b"1" * 5000)
    _link(x / "f", x / "g")
    report = measure([("x", str(x))])
    assert report.guests[0].allocated_bytes == _gnu_du(x)[0]
    assert report.guests[0].exclusive_bytes == report.guests[0].allocated_bytes
    assert report.totals.saved_bytes == os.lstat(x / "f").st_blocks * BLOCK
    assert report.store is None


# -- outputs --------------------------------------------------------------------------


def _invoke(home: Home, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(home.path), "du", *args])
    return result.exit_code, result.output


def test_json_output_follows_the_documented_schema(corpus: Home) -> None:
    code, out = _invoke(corpus, "--json", "--top", "1", "--depth", "1")
    assert code == 0
    doc = json.loads(out)
    report = measure_home(corpus, top=1, depth=1)
    assert doc["schema"] == "cowlink-du/1"
    assert [g["name"] for g in doc["guests"]] == ["a", "b", "c"]
    for g, r in zip(doc["guests"], report.guests, strict=True):
        for k in ("files", "dirs", "apparent_bytes", "allocated_bytes", "exclusive_bytes"):
            assert g[k] == getattr(r, k)
        assert g["shared_bytes"] + g["exclusive_bytes"] == g["allocated_bytes"]
    assert doc["totals"]["allocated_bytes"] == report.totals.allocated_bytes
    assert doc["totals"]["store_objects"] == 3
    assert doc["top"][0]["in_store"] is True
    assert {d["path"] for d in doc["dirs"] if d["guest"] == "a"} >= {".", "usr", "etc"}
    assert doc["last_unify"] is None
    assert doc["problems"] == []


def test_csv_output_parses_and_agrees(corpus: Home) -> None:
    code, out = _invoke(corpus, "--csv", "--top", "1", "--depth", "1")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    report = measure_home(corpus)
    guests = [r for r in rows if r["kind"] == "guest"]
    assert [r["guest"] for r in guests] == ["a", "b", "c"]
    for r, g in zip(guests, report.guests, strict=True):
        assert int(r["allocated_bytes"]) == g.allocated_bytes
        assert int(r["exclusive_bytes"]) == g.exclusive_bytes
        assert int(r["fair_share_bytes"]) == g.fair_share_bytes
    (total,) = [r for r in rows if r["kind"] == "total"]
    assert int(total["allocated_bytes"]) == report.totals.allocated_bytes
    assert int(total["saved_bytes"]) == report.totals.saved_bytes
    assert int(total["store_objects"]) == 3
    assert len([r for r in rows if r["kind"] == "top"]) == 1
    assert any(r["kind"] == "dir" and r["path"] == "usr" for r in rows)


def test_table_shows_exact_bytes_with_bytes_option(corpus: Home) -> None:
    report = measure_home(corpus)
    code, out = _invoke(corpus, "--bytes")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["GUEST", "FILES", "APPARENT"]
    a_line = next(line for line in lines if line.startswith("a "))
    assert a_line.split()[1:5] == [
        str(report.guests[0].files),
        str(report.guests[0].apparent_bytes),
        str(report.guests[0].allocated_bytes),
        str(report.guests[0].exclusive_bytes),
    ]
    assert f"store: 3 objects, {report.totals.store_bytes}" in out
    human_out = table(report)
    assert human(report.totals.allocated_bytes) in human_out
    assert human(1536) == "1.5 KiB"
    assert human(12) == "12 B"


_SAMPLE = re.compile(
    r'^(?P<name>[a-z_]+)(?:\{(?P<labels>(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\})? (?P<value>\S+)$'
)
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def _parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A small parser for the text exposition format; fails on anything malformed."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4, line
            if parts[1] == "TYPE":
                assert parts[3] == "gauge"
                declared.add(parts[2])
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed sample: {line!r}"
        assert m["name"] in declared, f"no TYPE before {m['name']}"
        labels = tuple(
            (k, re.sub(r"\\(.)", lambda x: "\n" if x[1] == "n" else x[1], v))
            for k, v in _LABEL.findall(m["labels"] or "")
        )
        out.setdefault(m["name"], {})[labels] = float(m["value"])
    return out


def test_metrics_file_is_valid_exposition_and_agrees(corpus: Home, tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "cowlink.prom"
    prom.parent.mkdir()
    code, _ = _invoke(corpus, "--metrics", str(prom))
    assert code == 0
    metrics = _parse_metrics(prom.read_text())
    report = measure_home(corpus)
    for g in report.guests:
        assert metrics["cowlink_guest_exclusive_bytes"][(("guest", g.name),)] == g.exclusive_bytes
        assert metrics["cowlink_guest_shared_bytes"][(("guest", g.name),)] == g.shared_bytes
    assert metrics["cowlink_saved_bytes"][()] == report.totals.saved_bytes
    assert metrics["cowlink_store_objects"][()] == 3
    # No unify has run yet: the last-unify series are absent, not zero.
    assert "cowlink_last_unify_timestamp_seconds" not in metrics
    assert os.listdir(prom.parent) == ["cowlink.prom"]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644


def test_metrics_report_the_last_unify_run(corpus: Home, tmp_path: Path) -> None:
    db = sqlite3.connect(corpus.catalogue_path)
    db.execute(
        "CREATE TABLE runs(id INTEGER PRIMARY KEY, command TEXT, started_ns INTEGER,"
        " duration_s REAL, exit_code INTEGER, stats TEXT)"
    )
    rows = [
        ("unify", 1_700_000_000_000_000_000, 12.5, 0, json.dumps({"errors": []})),
        ("unify", 1_700_000_100_000_000_000, 3.25, 1, json.dumps({"errors": [{"p": 1}] * 2})),
        ("other", 1_700_000_200_000_000_000, 1.0, 0, "{}"),
    ]
    db.executemany(
        "INSERT INTO runs(command, started_ns, duration_s, exit_code, stats) VALUES (?,?,?,?,?)",
        rows,
    )
    db.commit()
    db.close()
    assert read_last_unify(corpus) == LastUnify(1_700_000_103.25, 3.25, 2, 1)
    prom = tmp_path / "u.prom"
    write_metrics(corpus, prom)
    metrics = _parse_metrics(prom.read_text())
    assert metrics["cowlink_last_unify_timestamp_seconds"][()] == 1_700_000_103.25
    assert metrics["cowlink_last_unify_duration_seconds"][()] == 3.25
    assert metrics["cowlink_last_unify_errors"][()] == 2
    code, out = _invoke(corpus)
    assert code == 0
    assert "last unify: finished 2023-11-14 22:15:03 UTC, took 3.2 s, 2 errors, exit 1" in out
    assert metrics["cowlink_guest_exclusive_bytes"].keys() == {(("guest", g),) for g in "abc"}


def test_metrics_without_a_runs_table(corpus: Home) -> None:
    sqlite3.connect(corpus.catalogue_path).close()  # an empty catalogue file
    assert read_last_unify(corpus) is None


def test_metric_labels_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird\\name\nx'
    _write(odd / "f", b"1")
    report = measure([(str(odd), str(odd))])
    text = render_metrics(report, None)
    metrics = _parse_metrics(text)
    assert (("guest", str(odd)),) in metrics["cowlink_guest_exclusive_bytes"]


class _Checker(HTMLParser):
    VOID = frozenset({"meta", "br", "img", "link", "input", "hr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        assert tag not in {"script", "link", "img"}, "the page must not load anything"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1:] == [tag], f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def test_html_report_is_well_formed_and_self_contained(corpus: Home, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    code, _ = _invoke(corpus, "--top", "2", "--html", str(page))
    assert code == 0
    text = page.read_text()
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == []
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", text, re.S)
    assert len(svgs) == 4  # one per guest, and the totals
    report = measure_home(corpus)
    for svg, g in zip(svgs, report.guests, strict=False):
        root = ET.fromstring(svg)
        rects = root.findall("{http://www.w3.org/2000/svg}rect")
        titles = [r.findtext("{http://www.w3.org/2000/svg}title") or "" for r in rects]
        assert f"({g.exclusive_bytes} bytes)" in titles[0]
        assert f"({g.shared_bytes} bytes)" in titles[1]
    assert as_html(report).startswith("<!DOCTYPE html>")


def test_renderers_agree_with_each_other(corpus: Home) -> None:
    report = measure_home(corpus, top=1, depth=0)
    doc = json.loads(as_json(report))
    rows = list(csv.DictReader(io.StringIO(as_csv(report))))
    assert [int(r["allocated_bytes"]) for r in rows if r["kind"] == "guest"] == [
        g["allocated_bytes"] for g in doc["guests"]
    ]


def test_no_guests_is_an_empty_report(home: Path) -> None:
    code, out = _invoke(Home(home), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["guests"] == []
    assert doc["totals"]["allocated_bytes"] == 0


def test_a_missing_root_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    code, _ = _invoke(Home(home), str(tmp_path / "nope"))
    assert code == 2


def test_unreadable_directories_are_problems_not_crashes(
    corpus: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = os.path.realpath(corpus.guest_root("b") / "etc")
    real_open = os.open

    def open_(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == bad:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    result = CliRunner().invoke(main, ["--home", str(corpus.path), "du", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["problems"] == [{"path": bad, "error": "Permission denied"}]
    assert f"cowlink: {bad}: Permission denied" in result.stderr
    assert [g["name"] for g in doc["guests"]] == ["a", "b", "c"]


def test_undecodable_names_are_escaped_in_every_output(corpus: Home, tmp_path: Path) -> None:
    a = corpus.guest_root("a")
    odd = os.path.join(os.fsencode(a), b"caf\xe9")
    with open(odd, "wb") as f:
        f.write(b"z" * 300_000)  # saves more than anything else here
    os.link(odd, os.path.join(os.fsencode(corpus.guest_root("b")), b"caf\xe9-2"))
    code, out = _invoke(corpus, "--json", "--top", "1")
    assert code == 0
    assert json.loads(out)["top"][0]["path"].endswith("caf\\udce9")
    code, out = _invoke(corpus, "--csv", "--top", "1")
    assert code == 0
    code, out = _invoke(corpus, "--top", "1", "--html", str(tmp_path / "r.html"))
    assert code == 0
    assert "caf\\udce9" in out


def test_a_root_named_twice_counts_once(corpus: Home) -> None:
    a = str(corpus.guest_root("a"))
    twice = measure_home(corpus, [a, a + "/"])
    once = measure_home(corpus, [a])
    assert [g.name for g in twice.guests] == ["a"]
    assert twice.totals == once.totals


def test_after_a_real_unify_the_report_matches_du_and_the_store(home: Path) -> None:
    need_immutable()
    files = {"usr/bin/tool": os.urandom(40_000), "usr/lib/libx.so": os.urandom(70_000)}
    a, b, c = make_guests(home, files, guests=("a", "b", "c"))
    write(c / "etc" / "own", os.urandom(10_000))
    result = cowlink(home, "unify", "-q")
    assert result.exit_code == 0, result.stderr
    h = Home(home)
    report = measure_home(h, top=1)
    assert report.totals.allocated_bytes == _gnu_du("--total", a, b, c)[-1]
    assert report.totals.store_objects == 2
    assert report.totals.store_bytes == _gnu_du(h.store_dir)[0] - _dir_blocks(h.store_dir)
    unified = sum(os.lstat(a / rel).st_blocks * BLOCK for rel in files)
    assert report.totals.saved_bytes == 2 * unified
    for g in report.guests:
        assert g.shared_bytes == unified
        assert g.fair_share_bytes == round(unified / 3)
    assert report.top[0].in_store
    assert report.top[0].links == 3


def _dir_blocks(top: Path) -> int:
    """Allocated bytes of the directories under `top`, itself included."""
    return sum(os.lstat(d).st_blocks * BLOCK for d, _dirs, _files in os.walk(top))


def test_a_filesystem_whose_d_ino_differs_is_walked_again_with_stats(
    corpus: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = _du._run
    calls: list[bool] = []

    def run(*args: Any, trust_d_ino: bool, **kwargs: Any) -> Any:
        calls.append(trust_d_ino)
        if trust_d_ino:
            raise _du._InodeMismatch
        return real_run(*args, trust_d_ino=trust_d_ino, **kwargs)

    expected = measure_home(corpus)
    monkeypatch.setattr(_du, "_run", run)
    assert measure_home(corpus).totals == expected.totals
    assert calls == [True, False]


def test_an_unwritable_output_file_is_a_usage_error(corpus: Home, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["--home", str(corpus.path), "du", "--metrics", str(tmp_path / "no" / "such" / "x.prom")],
    )
    assert result.exit_code == 2
    assert f"cannot write {tmp_path}/no/such/x.prom: No such file" in result.stderr


def test_depth_two_nests_rows_and_sums_them_up(corpus: Home) -> None:
    report = measure_home(corpus, depth=2)
    rows = {(d.guest, d.path): d for d in report.dirs}
    a = corpus.guest_root("a")
    lib = rows[("a", "usr/lib")]
    assert lib.depth == 2
    assert lib.allocated_bytes == _gnu_du(a / "usr" / "lib")[0]
    assert lib.shared_bytes == os.lstat(a / "usr" / "lib" / "libcommon.so").st_blocks * BLOCK
    usr = rows[("a", "usr")]
    assert usr.allocated_bytes == _gnu_du(a / "usr")[0]
    assert usr.allocated_bytes == lib.allocated_bytes + os.lstat(a / "usr").st_blocks * BLOCK
    # Rows come in guest order, each guest's root first, then by path.
    order = [(d.guest, d.path) for d in report.dirs if d.guest == "a"]
    assert order[0] == ("a", ".")
    assert order.index(("a", "usr")) < order.index(("a", "usr/lib"))
