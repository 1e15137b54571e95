"""``GET /metrics`` on a live server: parsed with the Prometheus text parser, its counters move as tasks run."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import LiveServer, make_key, wait_terminal
from keel.observability import Metrics, Observer
from keel.settings import Settings
from webhook_receiver import Receiver, new_secret, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(live: LiveServer, key: str) -> Samples:
    """Every sample as ``(name, sorted labels) -> value``."""
    response = httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("keel_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(client: httpx.Client, workflow: str, inp: dict[str, object], **extra: object) -> str:
    response = client.post("/v1/tasks", json={"workflow": workflow, "input": inp, **extra})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["id"]
    return task_id


def test_metrics_need_the_metrics_scope_which_a_tenants_admin_lacks(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    forbidden = httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {live.key}"})
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"].startswith("application/problem+json")
    admin = make_key(live.data_dir, "acme", frozenset({"admin"}))  # the figures are the whole server's
    assert httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 403
    scraper = make_key(live.data_dir, "ops", frozenset({"metrics"}))
    assert httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {scraper}"}).status_code == 200


def test_counters_move_as_tasks_run(live: LiveServer, receiver: Receiver) -> None:
    scraper = make_key(live.data_dir, "ops", frozenset({"metrics"}))
    before = scrape(live, scraper)
    assert value(before, "keel_tasks_created_total", workflow="diagnostic") == 0
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}) as client:
        receiver.respond((503, {}), default=(200, {}))  # one failed delivery, then delivered
        hook = {"url": receiver.url, "secret": new_secret()}
        done = submit(client, "diagnostic", {"steps": 2, "step_seconds": 0}, webhook=hook)
        assert wait_terminal(client, done)["status"] == "succeeded"
        receiver.wait_hits(2)
        asked = submit(client, "ask", {"question": "how are you"})
        assert wait_terminal(client, asked)["status"] == "succeeded"
        tripped = submit(client, "diagnostic", {"steps": 3, "step_seconds": 0}, budget={"max_steps": 1})
        assert wait_terminal(client, tripped)["status"] == "partial_success"

    # The dispatcher counts a delivery once the receiver has answered: wait for that, not for the hit.
    def counted() -> Samples | None:
        samples = scrape(live, scraper)
        return samples if value(samples, "keel_webhook_deliveries_total", outcome="delivered") else None

    after = wait_for(counted, 10, "the delivery to be counted")
    assert value(after, "keel_tasks_created_total", workflow="diagnostic") == 2
    assert value(after, "keel_tasks_created_total", workflow="ask") == 1
    assert value(after, "keel_tasks_finished_total", workflow="diagnostic", status="succeeded") == 1
    assert value(after, "keel_tasks_finished_total", workflow="diagnostic", status="partial_success") == 1
    assert value(after, "keel_task_duration_seconds_count", workflow="diagnostic") == 2
    assert value(after, "keel_queue_depth") == 0
    assert value(after, "keel_step_duration_seconds_count", kind="step", status="succeeded") == 3
    assert value(after, "keel_budget_trips_total", budget="steps") == 1
    assert value(after, "keel_webhook_deliveries_total", outcome="retry") == 1
    assert value(after, "keel_webhook_deliveries_total", outcome="delivered") == 1
    assert value(after, "keel_webhook_failures_total") == 1
    # The `test` model: one call, its tokens counted per model id.
    models = {dict(labels)["model"] for (name, labels) in after if name == "keel_model_calls_total"}
    assert len(models) == 1
    (model,) = models
    assert value(after, "keel_model_calls_total", model=model, outcome="ok") == 1
    assert value(after, "keel_model_tokens_total", model=model, direction="input") > 0
    assert value(after, "keel_model_call_latency_seconds_count", model=model) == 1
    assert value(after, "keel_model_errors_total", model=model) == 0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.workers = 1  # a second task waits in the queue while the first runs
    return settings


def test_open_streams_and_queue_depth(live: LiveServer) -> None:
    scraper = make_key(live.data_dir, "ops", frozenset({"metrics"}))
    headers = {"Authorization": f"Bearer {live.key}"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=10) as client:
        task_id = submit(client, "diagnostic", {"steps": 2, "step_seconds": 1})
        with client.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
            lines = stream.iter_lines()  # kept: closing the iterator early closes the connection
            while next(lines) != "event: token":  # the first task runs: the worker is busy
                pass
            waiting = submit(client, "diagnostic", {"steps": 1, "step_seconds": 0})
            during = scrape(live, scraper)
            assert value(during, "keel_sse_open_streams") == 1
            assert value(during, "keel_queue_depth") == 1
        wait_terminal(client, waiting)
        wait_terminal(client, task_id)
    assert value(scrape(live, scraper), "keel_sse_open_streams") == 0


def test_each_app_has_its_own_registry() -> None:
    one, two = Observer(), Observer()
    one.task_created("diagnostic")
    assert one.metrics is not None and two.metrics is not None
    assert b'keel_tasks_created_total{workflow="diagnostic"} 1.0' in one.metrics.render()
    assert b"keel_tasks_created_total{" not in two.metrics.render()
    assert isinstance(one.metrics, Metrics)
