"""Statistical SLAs: a scripted model whose invalid-JSON rate steps from 1% to 8% moves ``json_valid >= 0.97``
from ok through uncertain to violated, within a number of calls the arithmetic predicts, and the interval holds
the true rate. The calls' answers are judged by the model step's own rule (``Answer.validity``), counted by the
SQLite store and reported by the service, over an injected clock (one call every 40 s of a 24 h window)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pydantic
import pytest

from keel.app import running
from keel.interaction.schemas import SloView
from keel.memory.types import ModelCallRecord
from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.llm.generation import Answer
from keel.orchestration.llm.models import Message
from keel.settings import Settings
from keel.testing.models import AgentInfo, FunctionModel

SCHEMA = {"type": "object", "properties": {"risk": {"type": "string"}}, "required": ["risk"]}
PROMPT = [Message(role="user", content="The top risk?")]
EVERY_S = 40.0
WINDOW = int(24 * 3600 / EVERY_S)  # 2160 calls fill the window


class Drifting:
    """Answers valid JSON, or (with probability ``invalid``) JSON cut short, from a seeded RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.invalid = 0.01
        self.model = FunctionModel(self.reply, name="test:drifting-2026-01-01")

    def reply(self, messages: list[Message], info: AgentInfo) -> str:
        return '{"risk": "fx"' if self.rng.random() < self.invalid else '{"risk": "fx"}'


async def test_json_validity_moves_from_ok_through_uncertain_to_violated(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "keel", default_model="test", slo={"json_valid": 0.97})
    settings.data_dir.mkdir(parents=True)
    drifting = Drifting(seed=2026)
    answer = Answer(output_type=None, schema=SCHEMA, settings=None, repair=False)
    now = 1_767_225_600.0  # 2026-01-01T00:00Z

    async with running(settings, WorkflowRegistry()) as keel:
        keel.clock = lambda: now

        async def calls(n: int) -> None:
            nonlocal now
            records = []
            for _ in range(n):
                now += EVERY_S
                resp = await drifting.model.request(PROMPT, output_schema=SCHEMA)
                json_valid, schema_valid = answer.validity(resp, "ok")
                records.append(
                    ModelCallRecord(provider=resp.provider, requested_model=resp.requested_model,
                                    model_id=resp.model_id, at=now, latency_ms=120.0, json_valid=json_valid,
                                    schema_valid=schema_valid)
                )  # fmt: skip
            await asyncio.gather(*(keel.stores.stats.record_model_call("acme", r) for r in records))

        async def json_valid() -> dict[str, object]:
            [model] = SloView.of(await keel.slo()).models
            assert model.model_id == "test:drifting-2026-01-01" and model.provider == "test"
            return model.metrics["json_valid"].model_dump()

        await calls(WINDOW)  # a day at 1% invalid
        before = await json_valid()
        assert before["verdict"] == "ok" and before["n"] == WINDOW
        assert before["low"] <= 0.99 <= before["high"]  # type: ignore[operator]

        drifting.invalid = 0.08  # the provider changes something under a stable name
        seen: dict[str, int] = {}
        for step in range(1, 2 * WINDOW // 20 + 1):
            await calls(20)
            verdict = (await json_valid())["verdict"]
            assert isinstance(verdict, str)
            seen.setdefault(verdict, step * 20)
        # Expected, with the window holding k new calls of 2160: rate = 0.99 - 0.07 k / 2160, and a half-width of
        # 1.96 sqrt(0.97 * 0.03 / 2160) = 0.0072. The low end leaves 0.97 near rate 0.977 (k ~ 400), the high end
        # passes below it near 0.963 (k ~ 830). The bounds allow for the draws: over 40 seeds the first uncertain
        # came at 280-620 calls and the first violated at 620-1140 (this seed: 540 and 960). In hours, at a call
        # every 40 s: uncertain within 8 h of the change, violated within 13.
        assert list(seen) == ["ok", "uncertain", "violated"], seen
        assert 250 <= seen["uncertain"] <= 700, seen
        assert 550 <= seen["violated"] <= 1200, seen
        after = await json_valid()  # two days on, the window holds only the new behaviour
        # The window starts at the start of a minute: it may hold the one call made in the minute before.
        assert after["verdict"] == "violated" and WINDOW <= after["n"] <= WINDOW + 1  # type: ignore[operator]
        assert after["low"] <= 0.92 <= after["high"], after  # type: ignore[operator]
        assert after["threshold"] == 0.97


def test_keel_slo_is_checked_when_the_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_SLO", '{"json_valid": 0.97, "error": 0.02}')
    assert Settings().slo == {"json_valid": 0.97, "error": 0.02}
    for bad, why in (('{"jsonvalid": 0.97}', "unknown rate 'jsonvalid'"), ('{"error": 2}', "between 0 and 1"),
                     ('{"error": true}', "between 0 and 1"), ("[0.97]", "JSON object")):  # fmt: skip
        monkeypatch.setenv("KEEL_SLO", bad)
        with pytest.raises(pydantic.ValidationError, match=why):
            Settings()
    monkeypatch.setenv("KEEL_SLO_WINDOW_H", "200")
    monkeypatch.delenv("KEEL_SLO")
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 168"):  # the rows are kept a week
        Settings()
