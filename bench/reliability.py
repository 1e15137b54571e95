"""The outside battery of issue 21 at full size, against real ``keel serve`` processes on loopback (SQLite):
Schemathesis over the whole OpenAPI with every check, the BOLA matrix, SSE cut and resume x200, a kill -9 loop of
over 100 tasks with long ones that must survive, idempotency races, hostile bodies and PDFs, slow clients and SSRF
with a canary. The families live in ``tests/reliability.py`` (``tests/test_reliability.py`` runs a few cases of
each); this script runs them and writes their figures into docs/reliability.md.

Run: ``make reliability`` or ``.venv/bin/python bench/reliability.py`` (about 9 minutes on 2 cores; ``--only
sse,kill`` for some families, ``--no-doc``). Exits 1 when a gate fails: a server error, a lost task, a duplicate,
a cross-tenant leak or a canary hit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _doc import cpu_model, write_section  # noqa: E402

from reliability import Family, Scale, run_battery  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def report(families: list[Family], scale: Scale, seconds: float) -> str:
    gates = all(f.gates_met for f in families)
    total = Family("total")
    for f in families:
        for name in ("requests", "server_errors", "lost", "duplicates", "leaks", "canary_hits", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(f, name))
        total.defects += f.defects
    rows = "\n".join(
        f"| {f.name} | {f.requests} | {f.seconds:.0f} s | {f.server_errors} | {f.lost} | {f.duplicates} | {f.leaks} "
        f"| {f.canary_hits} | {len(f.defects)} |"
        for f in [*families, total]
    )
    facts = "\n".join(
        f"- **{f.name}**: " + "; ".join(f"{k}: {_cell(v)}" for k, v in f.facts.items()) for f in families if f.facts
    )
    defects = "\n".join(f"- **{f.name}**: `{_cell(d)[:1500]}`" for f in families for d in f.defects) or "None."
    return f"""{START}
## Figures of the last run

{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()},
{seconds / 60:.1f} minutes in all. Scale: `{_cell(dataclasses.asdict(scale))}`.

| family | requests | time | server errors | tasks lost | duplicates | leaks | canary hits | defects |
|---|---|---|---|---|---|---|---|---|
{rows}

Gates (0 server errors, 0 tasks lost, 0 duplicates, 0 leaks, 0 canary hits): {"met" if gates else "**NOT met**"}.

What each family measured:

{facts}

Defects and findings, as the battery saw them (request, response):

{defects}
{END}"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="Comma-separated families, e.g. sse,kill (default: all).")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    scale = Scale()
    if args.only:
        scale = dataclasses.replace(scale, families=tuple(args.only.split(",")))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        families = run_battery(Path(tmp), scale, log=lambda line: print(line, flush=True))
    text = report(families, scale, time.monotonic() - t0)
    print(text)
    if not args.no_doc:
        write_section(text, START, END, DOC)
    return 0 if all(f.gates_met for f in families) else 1


if __name__ == "__main__":
    sys.exit(main())
