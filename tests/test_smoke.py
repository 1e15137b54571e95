from conftest import LiveServer, wait_terminal


def test_diagnostic_runs_to_success(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 2, "step_seconds": 0.01}})
        assert r.status_code == 202
        assert r.headers["location"] == f"/v1/tasks/{r.json()['id']}"
        body = wait_terminal(c, r.json()["id"])
        assert body["status"] == "succeeded"
        assert body["envelope"]["status"] == "success"  # type: ignore[index]
