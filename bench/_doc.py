"""Shared by the bench scripts: each owns one marked section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import statistics
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(section: str, start_mark: str, end_mark: str, doc: Path = DOC) -> None:
    """Replace the text between ``start_mark`` and ``end_mark`` (both inside ``section``), or append it."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start_mark) + r".*?" + re.escape(end_mark), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def cpu_model() -> str:
    """The CPU's model name, for the machine line of each section."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def fsync_commit_times(path: Path, n: int) -> list[float]:
    """Seconds per commit of one small row (WAL, synchronous=FULL) into the SQLite file ``path``: what any durable
    write costs on that disk, right now, before keel does anything."""
    out = []
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x TEXT)")
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", ("x" * 200,))
            conn.execute("COMMIT")
            out.append(time.perf_counter() - t0)
    return out


def fsync_commit_ms(directory: Path, n: int = 100) -> float:
    """The median of :func:`fsync_commit_times` in ``directory``, in ms: the probe under a table of durable figures."""
    return 1000 * statistics.median(fsync_commit_times(directory / "fsync-probe.db", n))
