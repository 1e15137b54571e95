"""Memory at scale: idle SSE streams held by one keel process, and many running tasks over a soak, against the floor.

Run: ``.venv/bin/python bench/bench_streams.py`` (``--streams N``, ``--soak-s S``, ``--running N``; ``--no-write``).

1. **Idle streams.** ``N`` tasks that stay queued behind one long task (``KEEL_WORKERS=1``), each followed by its own
   SSE stream from a raw asyncio client (one socket a stream, no client library). The server's RSS is read from
   /proc before the streams open and after they have all been idle for a while; its CPU over the idle window says
   what holding them costs. The floor app of ``bench_peer.py`` holds the same number of streams of tasks that sleep.
2. **Running tasks over a soak.** ``KEEL_WORKERS`` = ``--running``; a driver keeps that many ``peer_fanout`` tasks
   (one branch sleeping ``TASK_S``) in flight for ``--soak-s`` seconds, topping up every second, and samples RSS
   every 5 s. Growth = the median RSS of the last fifth over that of the second fifth (the first is warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvloop
from _doc import cpu_model, write_section
from bench_api import Server, create_key, keel_command, serve
from bench_peer import FLOOR_APP, keel_env

START_MARK, END_MARK = "<!-- bench_streams:start -->", "<!-- bench_streams:end -->"
TASK_S = 30.0  # long enough that the driver (about 100 submissions a second here) keeps them all in flight
IDLE_S = 20.0


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def submit_many(server: Server, key: str, body: dict[str, object], n: int, concurrency: int = 32) -> list[str]:
    ids: list[str] = []
    remaining = n

    async def user() -> None:
        nonlocal remaining
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            while remaining > 0:
                remaining -= 1
                r = await c.post("/v1/tasks", json=body, timeout=60)
                r.raise_for_status()
                ids.append(r.json()["id"])

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return ids


async def open_stream(url: str, key: str, task_id: str) -> asyncio.StreamWriter:
    """One raw SSE request; returns once the response's headers and first frame are in (the stream is open)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream of {task_id}: {head[:200]!r}")
    if not await reader.read(4096):  # the opening frame (a comment and `retry:`), whatever its framing
        raise RuntimeError(f"stream of {task_id} closed at once")
    writer.transport.pause_reading()  # later frames (pings, status) wait in the kernel: the client stays idle
    return writer


async def idle_streams(server: Server, key: str, task_ids: list[str]) -> dict[str, float]:
    before = rss_mb(server)
    writers: list[asyncio.StreamWriter] = []
    t0 = time.perf_counter()
    for start in range(0, len(task_ids), 200):
        writers += await asyncio.gather(*(open_stream(server.url, key, t) for t in task_ids[start : start + 200]))
    opened_s = time.perf_counter() - t0
    await asyncio.sleep(2)
    c0, w0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(IDLE_S)
    idle_cpu = (server.cpu_seconds() - c0) / (time.perf_counter() - w0)
    after = rss_mb(server)
    for w in writers:
        w.close()
    return {
        "streams": len(writers),
        "rss_before_mb": before,
        "rss_after_mb": after,
        "kb_per_stream": 1024 * (after - before) / len(writers),
        "open_s": opened_s,
        "idle_cpu": idle_cpu,
    }


def counts(data_dir: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'keel.db'}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())


async def soak(server: Server, key: str, data_dir: Path, running: int, seconds: float) -> dict[str, object]:
    body = {"workflow": "peer_fanout", "input": {"branches": 1, "seconds": TASK_S}}
    samples: list[tuple[float, float, int]] = []
    submitted = 0
    t0 = time.perf_counter()
    next_sample = t0
    while (now := time.perf_counter()) - t0 < seconds:
        c = counts(data_dir)
        in_flight = c.get("queued", 0) + c.get("running", 0)
        if in_flight < running:
            await submit_many(server, key, body, running - in_flight)
            submitted += running - in_flight
        if now >= next_sample:
            samples.append((now - t0, rss_mb(server), c.get("running", 0)))
            next_sample += 5
        await asyncio.sleep(1)
    c = counts(data_dir)
    fifth = max(1, len(samples) // 5)
    early = statistics.median(s[1] for s in samples[fifth : 2 * fifth])
    late = statistics.median(s[1] for s in samples[-fifth:])
    return {
        "samples": samples,
        "submitted": submitted,
        "succeeded": c.get("succeeded", 0),
        "running_median": statistics.median(s[2] for s in samples),
        "rss_early_mb": early,
        "rss_late_mb": late,
        "growth": late / early,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=1_000)
    parser.add_argument("--soak-s", type=float, default=120)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    out: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-streams-") as tmp:
        work = Path(tmp)
        # 1. idle streams, keel then the floor
        data = work / "keel-idle"
        key = create_key(data)
        cmd = [keel_command("keel"), "serve", "--port", "{port}", "--data-dir", str(data), "--log-level", "warning"]
        # Past KEEL_HTTP_MAX_CONNECTIONS (1000 by default) a connection gets 503: a server meant to hold 10,000
        # streams is configured for them.
        env = {
            **keel_env(),
            "KEEL_WORKERS": "1",
            "KEEL_LOG_LEVEL": "warning",
            "KEEL_HTTP_MAX_CONNECTIONS": str(args.streams + 100),
        }
        with serve("keel", cmd, work, "/readyz", env) as keel:
            blocker = {"workflow": "peer_fanout", "input": {"branches": 1, "seconds": 3600}}
            uvloop.run(submit_many(keel, key, blocker, 1, 1))
            ids = uvloop.run(submit_many(keel, key, {"workflow": "peer_chain", "input": {"steps": 0}}, args.streams))
            print(f"keel: {len(ids)} queued tasks; opening streams", file=sys.stderr)
            out["keel"] = uvloop.run(idle_streams(keel, key, ids))
            print(out["keel"], file=sys.stderr)
        (work / "floor_app.py").write_text(FLOOR_APP)
        floor_cmd = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(work)]
        floor_cmd += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
        with serve("floor", floor_cmd, work, "/healthz") as floor:
            sleeper = {"workflow": "peer_fanout", "input": {"branches": 1, "seconds": 3600}}
            ids = uvloop.run(submit_many(floor, "floor", sleeper, args.streams))
            out["floor"] = uvloop.run(idle_streams(floor, "floor", ids))
            print(out["floor"], file=sys.stderr)
        # 2. the soak
        data = work / "keel-soak"
        key = create_key(data)
        cmd = [keel_command("keel"), "serve", "--port", "{port}", "--data-dir", str(data), "--log-level", "warning"]
        env = {**keel_env(), "KEEL_WORKERS": str(args.running), "KEEL_LOG_LEVEL": "warning"}
        with serve("keel-soak", cmd, work, "/readyz", env) as keel:
            out["soak"] = uvloop.run(soak(keel, key, data, args.running, args.soak_s))
            print({k: v for k, v in out["soak"].items() if k != "samples"}, file=sys.stderr)
    section = render(out, args, time.monotonic() - started)
    print(section)
    if not args.no_write:
        write_section(section, START_MARK, END_MARK)


def render(out: dict[str, dict[str, object]], args: argparse.Namespace, elapsed: float) -> str:
    k, f, s = out["keel"], out["floor"], out["soak"]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    def row(label: str, name: str, fmt: str) -> str:
        kv, fv = float(k[name]), float(f[name])  # type: ignore[arg-type]
        ratio = f"{kv / fv:.2f}×" if fv else "—"
        return f"| {label} | {format(kv, fmt)} | {format(fv, fmt)} | {ratio} |"

    samples = s["samples"]
    assert isinstance(samples, list)
    trace = ", ".join(f"{t:.0f} s: {r:.0f}" for t, r, _ in samples[:: max(1, len(samples) // 8)])
    lines = [
        START_MARK,
        "## Memory at scale (`bench/bench_streams.py`)",
        "",
        f"Generated by `.venv/bin/python bench/bench_streams.py` on {now} in {elapsed:.0f} s. **Machine:** "
        f"nproc={os.cpu_count()}, {cpu_model()}; shared with other work while it ran.",
        "",
        f"### {int(k['streams']):,} idle SSE streams in one process",
        "",
        "| figure | keel | floor | keel/floor |",
        "|---|---|---|---|",
        row("RSS before the streams, MB", "rss_before_mb", ".0f"),
        row(f"RSS with the streams open, after {IDLE_S:.0f} s idle, MB", "rss_after_mb", ".0f"),
        row("per stream, KB", "kb_per_stream", ".1f"),
        row(f"server CPU while idle ({IDLE_S:.0f} s), cores", "idle_cpu", ".2f"),
        row("seconds to open them all (200 at a time)", "open_s", ".1f"),
        "",
        f"Goal: < 1 GB RSS: **{'met' if float(k['rss_after_mb']) < 1024 else 'missed'}** "  # type: ignore[arg-type]
        f"({float(k['rss_after_mb']):,.0f} MB).",  # type: ignore[arg-type]
        "",
        f"### {args.running:,} concurrent running tasks over a {args.soak_s:.0f} s soak",
        "",
        f"`KEEL_WORKERS={args.running}`; each task is `peer_fanout` with one branch sleeping {TASK_S:g} s; "
        f"{int(s['submitted']):,} submitted, {int(s['succeeded']):,} succeeded, median {s['running_median']:.0f} "  # type: ignore[call-overload]
        f"running at a sample." + (" Shorter than the issue's 10 minutes." if args.soak_s < 600 else ""),
        "",
        f"RSS (MB) over time: {trace}. Second fifth {float(s['rss_early_mb']):.0f} MB, last fifth "  # type: ignore[arg-type]
        f"{float(s['rss_late_mb']):.0f} MB: growth **{float(s['growth']):.3f}×**.",  # type: ignore[arg-type]
        "",
        "### Method",
        "",
        textwrap.fill(
            "keel: `keel serve` on a fresh data dir with `KEEL_WORKFLOWS=peer_workflows:WORKFLOWS` and "
            "`KEEL_LOG_LEVEL=warning` (for the streams, `KEEL_HTTP_MAX_CONNECTIONS` above their number: past it a "
            "connection gets 503). Streams: one raw HTTP/1.1 request a stream over its own socket, opened 200 "
            "at a time; after the first frame the client stops reading (the kernel buffers later pings). RSS is "
            "VmRSS from /proc; CPU is user+system of the server process over the idle window.",
            118,
        ),
        END_MARK,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
