"""`/readyz` tells the truth: 200 only when the store, the default model and the embedder answer; otherwise 503,
an RFC 9457 problem naming the parts that are not ready. And every answer carries an `X-Request-ID`."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import LiveServer, start_server
from keel.app import create_app
from keel.memory.embeddings import EmbeddingSpace, register_embedder_provider
from keel.providers import Spec
from keel.service import Keel
from keel.settings import Settings


class UnloadableEmbedder:
    """Opens, as an embedder with a corrupt weights file does, and fails on its first embedding."""

    space = EmbeddingSpace(model="unloadable", version="1", dim=8)
    max_tokens = 64

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise OSError("model.safetensors: truncated file")

    async def aclose(self) -> None:
        pass


def _unloadable(spec: Spec, **options: Any) -> UnloadableEmbedder:
    return UnloadableEmbedder()


register_embedder_provider("unloadable", _unloadable, form="unloadable:<any>")


@pytest.fixture
def serve(settings: Settings) -> Iterator[Any]:
    """Start a live server on ``settings`` as the test has changed them."""
    stop: list[Any] = []

    def start() -> LiveServer:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server, thread = start_server(settings)
        stop.append((server, thread))
        return LiveServer(
            url=f"http://127.0.0.1:{settings.port}", data_dir=settings.data_dir, settings=settings, key=""
        )

    yield start
    for server, thread in stop:
        server.should_exit = True
        thread.join(timeout=15)


def test_ready_when_every_part_answers(live: LiveServer) -> None:
    r = httpx.get(live.url + "/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "checks": {"store": "ok", "embedder": "ok"}}


def test_an_embedder_that_cannot_load_is_named(settings: Settings, serve: Any) -> None:
    settings.embedding_model = "unloadable:x"
    server = serve()
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 503 and body["type"] == "urn:keel:problem:not_ready"
    assert body["not_ready"] == ["embedder"]
    assert body["checks"] == {"store": "ok", "embedder": "unloadable:x: OSError: model.safetensors: truncated file"}
    assert body["detail"] == "embedder: unloadable:x: OSError: model.safetensors: truncated file"


def test_a_model_and_an_embedder_that_cannot_load_are_both_named(settings: Settings, serve: Any) -> None:
    settings.embedding_model = "unloadable:x"
    settings.default_model = "local:no-such-model"
    server = serve()
    body = httpx.get(server.url + "/readyz").json()
    assert body["status"] == 503 and body["not_ready"] == ["model", "embedder"]
    assert body["model"]["spec"] == "local:no-such-model" and body["model"]["loadable"] is False
    assert body["checks"]["model"].startswith("local:no-such-model")


def test_an_unreachable_store_is_named_not_a_500(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unreachable(self: Keel) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(Keel, "ping", unreachable)
    r = httpx.get(live.url + "/readyz")
    assert r.status_code == 503
    assert r.json()["not_ready"] == ["store"]
    assert r.json()["checks"]["store"] == "ConnectionRefusedError: connection refused"


async def test_starting_is_not_ready(settings: Settings) -> None:
    app = create_app(settings)  # its lifespan has not run: no service yet
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as client:
        r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["not_ready"] == ["startup"]
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_x_request_id_is_echoed_or_minted(live: LiveServer) -> None:
    with live.client() as c:
        given = c.get("/v1/tasks", headers={"X-Request-ID": "req-42.a"})
        minted = c.get("/v1/tasks")
        refused = c.get("/v1/tasks", headers={"X-Request-ID": "two words"})  # would forge a log field
        problem = c.get("/v1/tasks/nope", headers={"X-Request-ID": "req-43"})
    assert given.headers["x-request-id"] == "req-42.a"
    assert re.fullmatch(r"[0-9a-f]{32}", minted.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])
    assert problem.status_code == 404 and problem.headers["x-request-id"] == "req-43"


REDIS_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "redis.sh"


def redis(command: str, where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEL_REDIS_DIR": str(where)}
    return subprocess.run(["bash", str(REDIS_SCRIPT), command], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_redis_is_checked_when_configured(settings: Settings, serve: Any, tmp_path: Path) -> None:
    pytest.importorskip("redis.asyncio", reason="the redis driver is not installed: pip install 'keel-runtime[redis]'")
    where = tmp_path / "redis"
    started = redis("start", where)
    if started.returncode != 0:
        pytest.skip(f"no Redis for this test: scripts/redis.sh start failed: {started.stderr.strip()}")
    try:
        settings.redis_url = started.stdout.strip().splitlines()[-1]
        server = serve()
        up = httpx.get(server.url + "/readyz")
        assert up.status_code == 200 and up.json()["checks"]["redis"] == "ok", up.text
        redis("stop", where)
        down = httpx.get(server.url + "/readyz", timeout=30)
        assert down.status_code == 503 and down.json()["not_ready"] == ["redis"], down.text
    finally:
        redis("stop", where)


TEMPORAL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "temporal.sh"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_temporal_is_checked_when_configured(settings: Settings, serve: Any, tmp_path: Path) -> None:
    pytest.importorskip("temporalio", reason="the Temporal SDK is not installed: pip install 'keel-runtime[temporal]'")
    env = {**os.environ, "KEEL_TEMPORAL_DIR": str(tmp_path / "temporal")}

    def temporal(command: str) -> subprocess.CompletedProcess[str]:
        cmd = ["bash", str(TEMPORAL_SCRIPT), command]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    started = temporal("start")
    if started.returncode != 0:
        pytest.skip(f"no Temporal dev server for this test: {started.stderr.strip()[-300:]}")
    try:
        settings.engine = "temporal"
        settings.temporal_address = started.stdout.strip().splitlines()[-1]
        settings.temporal_task_queue = f"keel-readyz-{os.getpid()}"
        server = serve()
        up = httpx.get(server.url + "/readyz")
        assert up.status_code == 200 and up.json()["checks"]["temporal"] == "ok", up.text
        temporal("stop")
        down = httpx.get(server.url + "/readyz", timeout=30)
        assert down.status_code == 503 and down.json()["not_ready"] == ["temporal"], down.text
    finally:
        temporal("stop")
