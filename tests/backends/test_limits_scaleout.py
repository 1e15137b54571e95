"""Per-tenant limits across replicas: two ``keel serve --role api`` processes on one Postgres share the tenant's
token bucket and its cap on queued tasks, exactly (no worker runs, so submitted tasks stay queued)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("psycopg", reason="the Postgres driver is not installed: pip install 'keel-runtime[postgres]'")
pytest.importorskip("redis", reason="the Redis driver is not installed: pip install 'keel-runtime[redis]'")

from scaleout import TESTS, Cluster, Unavailable, cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Cluster]:
    limits = {"KEEL_LIMIT_RATE_PER_S": "0.05", "KEEL_LIMIT_BURST": "6", "KEEL_LIMIT_MAX_TASKS": "3"}
    # The replicas import the keel under test (a worktree's src on PYTHONPATH), not only the tests' helpers.
    limits["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    try:
        with cluster(tmp_path, apis=2, workers=0, sink_url="http://127.0.0.1:9", extra_env=limits) as c:
            yield c
    except Unavailable as exc:
        pytest.skip(f"scale-out servers unavailable: {exc}")


def test_two_replicas_share_the_bucket_and_the_task_cap(replicas: Cluster) -> None:
    a, b = replicas.apis
    headers = {"Authorization": f"Bearer {replicas.key}"}
    body = {"workflow": "diagnostic", "input": {"steps": 1}}
    with httpx.Client(headers=headers, timeout=10) as client:
        # Four submissions, alternating replicas: the cap of 3 queued tasks holds across both.
        submitted = [client.post(f"{url}/v1/tasks", json=body) for url in (a.url, b.url, a.url, b.url)]
        assert [r.status_code for r in submitted] == [202, 202, 202, 429], [r.text for r in submitted]
        assert submitted[3].json()["type"] == "urn:keel:problem:too_many_tasks"
        # Six tokens in the bucket, four spent: two more pass, on either replica, then both refuse.
        reads = [client.get(f"{url}/v1/tasks") for url in (b.url, a.url, b.url, a.url)]
    assert [r.status_code for r in reads] == [200, 200, 429, 429]
    assert reads[1].headers["RateLimit"].startswith('"tenant";r=0;')
    assert all(int(r.headers["Retry-After"]) >= 1 for r in reads[2:])
