"""Shared by the bench scripts: each owns one marked section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

import contextlib
import re
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
