"""Scale-out on real servers: two ``keel serve --role api`` replicas and two ``keel worker`` processes sharing
Postgres and Redis (started by ``scripts/``), on the embedded engine and on Temporal. Workers are killed with
SIGKILL while the queue drains: no task is lost and no write is applied twice. A stream read on one replica
resumes on the other with ``Last-Event-ID``, without a gap or a duplicate. Skipped, with the reason, when Postgres,
Redis or Temporal cannot be had.

``bench/crash_scaleout.py`` runs the same crash test at the issue's size (200 tasks, a kill every 3-15 s).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

pytest.importorskip("psycopg", reason="the Postgres driver is not installed: pip install 'keel-runtime[postgres]'")
pytest.importorskip("redis", reason="the Redis driver is not installed: pip install 'keel-runtime[redis]'")

from payment_sink import Sink  # noqa: E402
from scaleout import Cluster, Unavailable, cluster, run_crash_test  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.fixture(params=["embedded", "temporal"])
def two_by_two(request: pytest.FixtureRequest, tmp_path: Path, sink: Sink) -> Iterator[Cluster]:
    if request.param == "temporal":
        pytest.importorskip("temporalio", reason="no Temporal SDK: pip install 'keel-runtime[temporal]'")
    try:
        with cluster(tmp_path, apis=2, workers=2, sink_url=sink.url, engine=request.param) as c:
            yield c
    except Unavailable as exc:
        pytest.skip(f"scale-out servers unavailable: {exc}")


@pytest.mark.timeout(300)  # the drain's own bound (180 s) decides, not the suite's 120 s hang guard
def test_killing_workers_loses_no_task_and_duplicates_no_effect(two_by_two: Cluster, sink: Sink) -> None:
    report = run_crash_test(two_by_two, sink, tasks=30, kill_every=(1.0, 3.0), drain_timeout=180)
    print("\n".join(report.lines()))
    assert report.kills >= 2, report
    assert report.lost == 0 and report.failed == 0, report
    assert report.duplicate_effects == 0 and report.effects == 90, report
    assert report.outcome_unknown == 0, report  # every unknown outcome was reconciled against the sink


def test_a_stream_cut_on_one_replica_resumes_on_the_other_without_gaps(two_by_two: Cluster) -> None:
    a, b = two_by_two.apis
    headers = {"Authorization": f"Bearer {two_by_two.key}"}
    body = {"workflow": "diagnostic", "input": {"steps": 12, "step_seconds": 0.2}}
    task_id = httpx.post(f"{a.url}/v1/tasks", json=body, headers=headers, timeout=10).json()["id"]
    seen: list[int] = []
    with httpx.Client(base_url=a.url or "", headers=headers, timeout=30) as client:
        with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events") as source:
            for sse in source.iter_sse():
                if not sse.id:
                    continue  # the stream's opening comment
                seen.append(int(sse.id))
                if len(seen) == 15:
                    break  # the connection is cut mid-task
    with httpx.Client(base_url=b.url or "", headers=headers, timeout=60) as client:
        resume = {"Last-Event-ID": str(seen[-1])}
        with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events", headers=resume) as source:
            for sse in source.iter_sse():
                if not sse.id:
                    continue
                seen.append(int(sse.id))
                if sse.event == "end":
                    envelope = json.loads(sse.data)["envelope"]
                    break
    assert seen == list(range(1, len(seen) + 1))  # no gap, no duplicate, across the two replicas
    assert envelope["status"] == "success"
