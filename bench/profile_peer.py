"""Where keel's time goes under one ``bench_peer.py`` workload: ``keel serve`` under py-spy, then the top frames.

Run: ``.venv/bin/python bench/profile_peer.py submit`` (or ``done``, ``done32``, ``chain``, ``burst``, ``paced``;
``--seconds S``). Needs py-spy (the ``dev`` extra). It samples the whole server process (every thread) at 200 Hz
while the workload repeats, writes the collapsed stacks to ``--out`` (a flame graph's input) and prints, for
the event loop's samples only (start-up and idle threads left out), the share of each function, inclusive and self.

py-spy attaches to a child it starts (``py-spy record -- keel serve …``); attaching to a running process with
``-p`` needs ptrace rights that containers often lack.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from bench_api import create_key, keel_command, serve
from bench_peer import WORKLOADS, Target, keel_env

BY_NAME = {
    "submit": WORKLOADS[0][1],
    "done": WORKLOADS[1][1],
    "done32": WORKLOADS[2][1],
    "chain": WORKLOADS[3][1],
    "burst": WORKLOADS[4][1],
    "paced": WORKLOADS[5][1],
}
# The frame every callback and task step of the event loop runs under: asyncio's Handle._run, or, under uvloop
# (which runs callbacks from C), the asyncio.Runner frame that entered the loop. A sample with nothing below it
# is the loop idle, waiting in epoll.
LOOPS = ("_run (asyncio/events.py", "run (asyncio/runners.py")
STARTUP = ("lifespan (", "_find_and_load (")  # the server starting, not serving


def top(path: Path, n: int = 30) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "MainThread" not in stack or not any(loop in stack for loop in LOOPS):
            continue
        if any(skip in stack for skip in STARTUP):
            continue
        below = stack.split(";")
        below = below[max(i for i, f in enumerate(below) if f.startswith(LOOPS)) + 1 :]
        if not below:
            idle += int(count)
            continue
        total += int(count)
        frames = [re.sub(r":\d+\)", ")", f) for f in below]
        for frame in set(frames):
            inclusive[frame] += int(count)
        own[frames[-1]] += int(count)
    lines = [
        f"{total} busy event-loop samples ({idle} more idle; start-up left out), by function below the loop's "
        "callback frame"
    ]
    lines += ["-- inclusive"]
    lines += [f"{c / total:6.1%} {f}" for f, c in inclusive.most_common(n)]
    lines += ["-- self"] + [f"{c / total:6.1%} {f}" for f, c in own.most_common(n // 2)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("workload", choices=sorted(BY_NAME))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, help="where the stacks go (default: a file in the temp dir)")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.out or Path(tempfile.gettempdir()) / f"keel-profile-{args.workload}.txt"
    with tempfile.TemporaryDirectory(prefix="keel-profile-") as tmp:
        work = Path(tmp)
        key = create_key(work / "data")
        cmd = [spy, "record", "-r", "200", "-f", "raw", "-o", str(out), "--threads", "--", keel_command("keel")]
        cmd += ["serve", "--port", "{port}", "--data-dir", str(work / "data"), "--log-level", "warning"]
        with serve("keel", cmd, work, "/readyz", keel_env()) as server:
            started = time.monotonic()
            while time.monotonic() - started < args.seconds:
                print(uvloop.run(BY_NAME[args.workload](Target(server, key))), file=sys.stderr)
            server.proc.send_signal(signal.SIGINT)  # py-spy writes its file, then stops keel
            server.proc.wait(timeout=60)
    print(f"stacks: {out}\n{top(out)}")


if __name__ == "__main__":
    main()
