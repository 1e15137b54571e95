"""Per-tenant limits against a real server: the request rate (429, Retry-After, the IETF RateLimit fields), the cap
on queued and running tasks, the daily and monthly cost quotas, and the admin API that sets them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from conftest import LiveServer, wait_terminal
from keel.backends import open_store
from keel.memory.limits import TenantLimits, month_start, next_month_start, take_token
from keel.memory.types import KeySecret, ModelCallRecord

LONG = {"workflow": "diagnostic", "input": {"steps": 40, "step_seconds": 0.25}}


def _admin(live: LiveServer) -> httpx.Client:
    """The operator's key: limits are theirs to set, for any tenant."""
    return live.client(live.new_key("ops", "admin,operator"))


def _set(live: LiveServer, tenant: str, **limits: Any) -> dict[str, Any]:
    with _admin(live) as admin:
        r = admin.put(f"/v1/tenants/{tenant}/limits", json=limits)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _spend(live: LiveServer, tenant: str, usd: float, at: float) -> None:
    async def record() -> None:
        store = open_store(live.settings.resolved_store_url)
        try:
            call = ModelCallRecord(provider="test", requested_model="m", model_id="m", at=at, cost_usd=usd)
            await store.record_model_call(tenant, call)
        finally:
            await store.aclose()

    asyncio.run(record())


def test_the_request_rate_answers_429_with_retry_after_and_the_ratelimit_fields(live: LiveServer) -> None:
    view = _set(live, "acme", rate_per_s=0.2, burst=3)
    assert view["effective"]["rate_per_s"] == 0.2 and view["limits"]["burst"] == 3
    with live.client() as client:
        seen = [client.get("/v1/tasks") for _ in range(3)]
        assert [r.status_code for r in seen] == [200, 200, 200]
        assert [r.headers["RateLimit"] for r in seen] == ['"tenant";r=2;t=5', '"tenant";r=1;t=10', '"tenant";r=0;t=15']
        assert seen[0].headers["RateLimit-Policy"] == '"tenant";q=3;w=15'
        refused = client.get("/v1/tasks")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "urn:keel:problem:rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 5  # one token back at 0.2/s
        assert refused.headers["RateLimit"].startswith('"tenant";r=0;')
        # A 429 is a problem like any other: a submission is refused the same way, and nothing is stored.
        assert client.post("/v1/tasks", json=LONG).status_code == 429
    with live.client(live.new_key("globex")) as other:  # another tenant has its own bucket (and no limit)
        assert other.get("/v1/tasks").status_code == 200
        assert "RateLimit" not in other.get("/v1/tasks").headers
    with _admin(live) as admin:
        assert admin.delete("/v1/tenants/acme/limits").json()["effective"]["rate_per_s"] is None
    with live.client() as client:
        assert client.get("/v1/tasks").status_code == 200  # limits forgotten: the defaults (none) apply


def test_the_smallest_rate_gives_finite_fields_not_a_500(live: LiveServer) -> None:
    # Found by `make reliability` (Schemathesis): rate_per_s 5e-324 passes `gt=0`, and a bucket divided by it was an
    # infinite window, which made every request of the tenant a 500 (OverflowError in ceil).
    _set(live, "acme", rate_per_s=5e-324)
    with live.client() as client:
        first, second = client.get("/v1/tasks"), client.get("/v1/tasks")
    assert first.status_code == 200 and first.headers["RateLimit-Policy"] == '"tenant";q=1;w=1000000000'
    assert second.status_code == 429 and second.headers["Retry-After"] == "1000000000"


def test_mcp_requests_spend_the_same_bucket(live: LiveServer) -> None:
    _set(live, "acme", rate_per_s=0.1, burst=1)
    key = live.new_key("acme", "tasks:read,tasks:write")
    with live.client(key) as client:
        assert client.get("/v1/tasks").status_code == 200  # the bucket's one token
        refused = client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "urn:keel:problem:rate_limited" and int(refused.headers["Retry-After"]) >= 1


def test_queued_and_running_tasks_are_capped_per_tenant(live: LiveServer) -> None:
    _set(live, "acme", max_tasks=2)
    with live.client() as client:
        first = client.post("/v1/tasks", json=LONG).json()["id"]
        client.post("/v1/tasks", json=LONG).raise_for_status()
        refused = client.post("/v1/tasks", json=LONG)
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"] == "urn:keel:problem:too_many_tasks"
        assert refused.json()["limit"] == 2 and refused.json()["active"] == 2
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.get("/v1/tasks").json()["items"].__len__() == 2  # nothing stored for the refusal
        with live.client(live.new_key("globex")) as other:  # the cap is acme's alone
            assert other.post("/v1/tasks", json=LONG).status_code == 202
        client.post(f"/v1/tasks/{first}/cancel").raise_for_status()
        wait_terminal(client, first)
        assert client.post("/v1/tasks", json=LONG).status_code == 202  # a slot freed


def test_concurrent_submissions_never_pass_the_cap(live: LiveServer) -> None:
    _set(live, "acme", max_tasks=3)

    async def burst() -> list[int]:
        headers = {"Authorization": f"Bearer {live.key}"}
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as client:
            answers = await asyncio.gather(*(client.post("/v1/tasks", json=LONG) for _ in range(12)))
        return [a.status_code for a in answers]

    codes = asyncio.run(burst())
    assert sorted(codes) == [202] * 3 + [429] * 9


def test_a_spent_daily_quota_refuses_submissions_until_midnight(live: LiveServer) -> None:
    now = time.time()
    _spend(live, "acme", 0.75, now)
    view = _set(live, "acme", daily_cost_usd=0.5)
    assert view["usage"]["cost_today_usd"] == pytest.approx(0.75)
    with live.client() as client:
        refused = client.post("/v1/tasks", json=LONG)
    assert refused.status_code == 429, refused.text
    problem = refused.json()
    assert problem["type"] == "urn:keel:problem:quota_exceeded" and problem["quota"] == "daily"
    midnight = now // 86400 * 86400 + 86400
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now)) <= 5


def test_what_is_left_of_a_quota_becomes_the_tasks_cost_budget(live: LiveServer) -> None:
    now = time.time()
    _spend(live, "acme", 0.25, now)
    _set(live, "acme", daily_cost_usd=1.0, monthly_cost_usd=0.5)  # the monthly quota leaves less: it wins
    with live.client() as client:
        own = client.post("/v1/tasks", json={**LONG, "budget": {"max_cost_usd": 0.1}}).json()["id"]
        capped = client.post("/v1/tasks", json=LONG).json()["id"]

    async def budgets() -> tuple[dict[str, Any], dict[str, Any]]:
        store = open_store(live.settings.resolved_store_url)
        try:
            a, b = await store.get_task(own), await store.get_task(capped)
            assert a is not None and b is not None
            return a.budget, b.budget
        finally:
            await store.aclose()

    mine, theirs = asyncio.run(budgets())
    assert mine["max_cost_usd"] == pytest.approx(0.1)  # a tighter budget of the caller's own is kept
    assert theirs["max_cost_usd"] == pytest.approx(0.25)  # 0.5 a month, 0.25 spent


def test_the_monthly_quota_counts_the_whole_month(live: LiveServer) -> None:
    now = time.time()
    _spend(live, "acme", 0.3, now)
    _spend(live, "acme", 0.3, month_start(now))  # the month's first second: another day unless today is the 1st
    _set(live, "acme", daily_cost_usd=0.5, monthly_cost_usd=0.5)
    with live.client() as client:
        answer = client.post("/v1/tasks", json=LONG)
    assert answer.status_code == 429
    if now - month_start(now) >= 86400:  # the daily quota (0.3 today) is not spent; the month's is
        assert answer.json()["quota"] == "monthly"
        assert abs(int(answer.headers["Retry-After"]) - (next_month_start(now) - now)) <= 5


def test_a_tenants_admin_reads_its_limits_but_only_the_operator_sets_them(live: LiveServer) -> None:
    _set(live, "acme", max_tasks=3)
    admin = live.new_key("acme", "admin")
    with live.client(admin) as own:
        view = own.get("/v1/tenants/acme/limits")
        assert view.status_code == 200 and view.json()["effective"]["max_tasks"] == 3
        for method, path in (("PUT", "/v1/tenants/acme/limits"), ("DELETE", "/v1/tenants/acme/limits")):
            r = own.request(method, path, json={"max_tasks": 10**6} if method == "PUT" else None)
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json", r.text
            assert "operator" in r.json()["detail"]
        assert own.get("/v1/tenants/globex/limits").status_code == 403  # another tenant's usage is not its to see
        assert own.put("/v1/tenants/globex/limits", json={"rate_per_s": 0.001}).status_code == 403
        # Nor can it mint the operator's scope, or take over a key that holds it.
        assert own.post("/v1/keys", json={"scopes": ["operator"]}).status_code == 403
        assert own.post("/v1/keys", json={"scopes": ["admin", "operator"]}).status_code == 403
        ops_in_acme = live.new_key("acme", "admin,operator")
        ops = KeySecret.parse(ops_in_acme)
        assert ops is not None
        ops_id = ops.id
        for action in ("rotate", "revoke"):
            r = own.post(f"/v1/keys/{ops_id}/{action}")
            assert r.status_code == 403 and "operator" in r.json()["detail"], r.text
    with live.client(ops_in_acme) as ops:
        assert ops.get("/v1/tenants/acme/limits").json()["effective"]["max_tasks"] == 3  # still 3: nothing changed
        assert ops.get("/v1/tenants/globex/limits").status_code == 200
        assert ops.post("/v1/keys", json={"scopes": ["operator"]}).status_code == 201  # it holds what it grants
    with live.client() as client:
        assert client.get("/v1/tenants/acme/limits").status_code == 403


def test_limits_are_admin_only_and_validated(live: LiveServer) -> None:
    with live.client() as client:
        assert client.get("/v1/tenants/acme/limits").status_code == 403
    with _admin(live) as admin:
        for bad in (
            '{"rate_per_s": 0}',
            '{"max_tasks": true}',
            '{"burst": "3"}',
            '{"daily_cost_usd": -1}',
            '{"x": 1}',
            '{"burst": 1000000000000000000000000000000}',  # would overflow the store's INTEGER
            '{"rate_per_s": 1e999}',
        ):
            answer = admin.put("/v1/tenants/acme/limits", content=bad, headers={"content-type": "application/json"})
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
        view = admin.get("/v1/tenants/acme/limits").json()
    assert view["limits"] == {k: None for k in view["limits"]}
    assert view["usage"] == {"active_tasks": 0, "cost_today_usd": 0.0, "cost_month_usd": 0.0}


def test_the_token_bucket_refills_and_reports_when_to_retry() -> None:
    bucket, first = take_token(None, 2.0, 2, 100.0)
    assert first.allowed and first.remaining == 1 and first.window_s == 1.0 and first.reset_s == 0.5
    bucket, second = take_token(bucket, 2.0, 2, 100.0)
    bucket, third = take_token(bucket, 2.0, 2, 100.0)
    assert second.allowed and not third.allowed and third.retry_after_s == 0.5
    _, later = take_token(bucket, 2.0, 2, 99.0)  # a clock that went back refills nothing
    assert not later.allowed
    _, refilled = take_token(bucket, 2.0, 2, 100.5)
    assert refilled.allowed
    assert TenantLimits(max_tasks=1).over(TenantLimits(max_tasks=5, rate_per_s=1.0)) == TenantLimits(
        max_tasks=1, rate_per_s=1.0
    )
