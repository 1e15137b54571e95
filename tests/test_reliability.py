"""A few cases of every family of the reliability battery (``bench/reliability.py`` runs it at full size), so that
the battery keeps working: each family must come back clean, with nothing lost, duplicated, leaked or fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability import Scale, run_battery

TINY = Scale(
    schemathesis_examples=1,
    schemathesis_max_time=4,
    schemathesis_paths="^/v1/tasks$",
    schemathesis_keys=("normal",),
    sse_cycles=6,
    race_rounds=2,
    race_concurrency=6,
    hostile_limit=None,
    pdf_limit=5,
    slow_connections=2,
    header_timeout_s=1.0,
    body_timeout_s=1.5,
    slow_margin_s=1.0,
    kill_short=4,
    kill_long=1,
    kill_count=1,
    kill_every_s=1.0,
    kill_long_steps=8,
    kill_long_step_s=0.25,
    ssrf_limit=3,
)


@pytest.mark.timeout(120)
def test_a_tiny_battery_is_clean(tmp_path: Path) -> None:
    families = run_battery(tmp_path, TINY, log=lambda _: None)
    assert [f.name for f in families][:9] == [
        "bola", "sse", "idempotency", "hostile bodies", "hostile PDFs", "slow clients", "ssrf", "kill -9",
        "schemathesis",
    ]  # fmt: skip
    for fam in families:
        assert fam.requests > 0 or fam.name == "server log", fam
        assert fam.gates_met, (fam.name, fam.defects)
        # Schemathesis also reports where the OpenAPI document and the server disagree: findings, not faults.
        assert fam.name == "schemathesis" or not fam.defects, (fam.name, fam.defects)
