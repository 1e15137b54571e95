"""Real `keel serve` subprocesses for crash tests: started on loopback, killed with SIGKILL, all reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

KEEL = Path(sys.executable).parent / "keel"


@dataclass
class KeelProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class Servers:
    """Starts `keel serve` subprocesses and guarantees they are all gone when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[KeelProcess] = []

    def start(
        self, port: int, data_dir: Path, *, env: dict[str, str] | None = None, timeout: float = 15
    ) -> KeelProcess:
        """Start on ``port`` with ``data_dir``; ``env`` adds to (or overrides) the test defaults."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        full.update(KEEL_POLL_INTERVAL_S="0.05", KEEL_LEASE_SECONDS="3", PYTHONUNBUFFERED="1")
        full.setdefault("KEEL_DEFAULT_MODEL", "test")  # /readyz checks the default model; tests pick theirs
        full.update(env or {})
        log = self.tmp_path / f"serve-{len(self.running)}.log"
        cmd = [str(KEEL), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cmd, "--log-level", "warning"], env=full, cwd=self.tmp_path, stdout=out, stderr=subprocess.STDOUT
            )
        server = KeelProcess(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
        self.running.append(server)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=server.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"keel serve exited with {proc.returncode}:\n{server.output()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return server
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"keel serve not ready within {timeout}s:\n{server.output()}")

    def stop_all(self) -> None:
        for server in self.running:
            if server.proc.poll() is None:
                server.proc.kill()
            server.proc.wait(timeout=10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()
