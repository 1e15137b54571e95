"""The scale-out crash test at the issue's size: 2 API replicas, 2 workers, Postgres and Redis (all started by
``scripts/``); 200 tasks of three write-tool steps each against a loopback effect sink; a worker killed with
SIGKILL every 3-15 s and restarted while the queue drains. Reports lost tasks, duplicated effects,
``outcome_unknown`` effects and the recovery times, and writes them into docs/benchmarks.md.

Run: ``.venv/bin/python bench/crash_scaleout.py`` (a few minutes; ``--tasks N``, ``--no-doc``). Exits 1 when a gate
fails (lost > 0 or duplicated effects > 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _doc import cpu_model, write_section  # noqa: E402

from payment_sink import Sink  # noqa: E402
from scaleout import CrashReport, cluster, run_crash_test, stop_services  # noqa: E402

START, END = "<!-- crash_scaleout:start -->", "<!-- crash_scaleout:end -->"
START_T, END_T = "<!-- crash_scaleout_temporal:start -->", "<!-- crash_scaleout_temporal:end -->"


def report(r: CrashReport, engine: str, start: str, end: str, delay: float) -> str:
    gates = "met" if r.lost == 0 and r.duplicate_effects == 0 else "**NOT met**"

    def s(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f} s"

    return f"""{start}
## Scale-out crash test, {engine.split(" ")[0]} engine (`bench/crash_scaleout.py --engine ...`)

{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}. Engine:
{engine}. 2 `keel serve --role api` replicas and 2 `keel worker` processes on one Postgres 18 (pgvector) and one
Redis, all on loopback; lease 3 s; 4 concurrent runs per worker. {r.tasks} tasks of `charge_thrice` (three
write-tool steps each, against a loopback sink that takes {delay:g} s per charge and counts every request by
idempotency key), submitted across both replicas, while a random worker is killed with SIGKILL every 3-15 s and
restarted.

| measure | value |
|---|---|
| tasks succeeded / failed / **lost** | {r.succeeded} / {r.failed} / **{r.lost}** |
| effects applied (expected {3 * r.tasks}) / **duplicated** | {r.effects} / **{r.duplicate_effects}** |
| effects left `outcome_unknown` | {r.outcome_unknown} |
| workers killed | {r.kills} |
| recovery (kill → every task in flight then moving again), p50 / p95 | {s(r.recovery_p50_s)} / {s(r.recovery_p95_s)} |
| queue drained in | {r.drain_s:.1f} s |

Gates (lost = 0, duplicated effects = 0): {gates}. On the embedded engine, recovery is bounded by the lease
(3 s): a killed worker's runs are taken over once their lease runs out, then their history is replayed and the next
step runs. On Temporal, by the workflow task timeout (2 s), after which another worker replays the workflow; a
step whose checkpoint keel recorded is not run again.
{end}"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--engine", choices=["embedded", "temporal"], default="embedded")
    parser.add_argument("--sink-delay", type=float, default=0.5, help="Seconds each charge takes at the sink.")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    sink = Sink(delay_s=args.sink_delay)
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            cluster(
                Path(tmp), apis=2, workers=2, sink_url=sink.url, engine=args.engine, extra_env={"KEEL_WORKERS": "4"}
            ) as c,
        ):
            result = run_crash_test(c, sink, tasks=args.tasks, kill_every=(3.0, 15.0), drain_timeout=1800)
    finally:
        sink.server.shutdown()
    engine = "Temporal (dev server), each step a Temporal activity" if args.engine == "temporal" else "embedded"
    start, end = (START, END) if args.engine == "embedded" else (START_T, END_T)
    text = report(result, engine, start, end, args.sink_delay)
    print(text)
    if not args.no_doc:
        write_section(text, start, end)
    return 0 if result.lost == 0 and result.duplicate_effects == 0 else 1


if __name__ == "__main__":
    try:
        code = main()
    finally:
        stop_services()
    sys.exit(code)
