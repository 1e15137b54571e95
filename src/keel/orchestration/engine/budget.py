"""Per-task budgets: hard circuit breakers on steps, tool calls, tokens, cost and wall-clock time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from keel.errors import BudgetExceeded


@dataclass(kw_only=True, slots=True, frozen=True)
class Budget:
    """Caps set at submission. ``None`` means uncapped; tool calls default to 20 (seed 000)."""

    max_steps: int | None = None
    max_tool_calls: int | None = 20
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    deadline_s: float | None = None
    """Wall-clock seconds from submission; crashes and restarts do not reset it."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(kw_only=True, slots=True)
class Usage:
    steps: int = 0
    tool_calls: int = 0
    model_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: dict[str, Any]) -> None:
        for key, value in other.items():
            if key in _USAGE_FIELDS:
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v}


_USAGE_FIELDS = {f.name for f in fields(Usage)}


@dataclass(kw_only=True, slots=True)
class BudgetMeter:
    budget: Budget
    deadline_at: float | None
    clock: Callable[[], float]
    used: Usage = field(default_factory=Usage)

    def before_step(self, kind: str) -> None:
        """Refuse to start a step that would cross a count cap or that starts after the deadline."""
        self.check_deadline()
        b = self.budget
        if b.max_steps is not None and self.used.steps + 1 > b.max_steps:
            raise BudgetExceeded("steps", limit=b.max_steps, used=self.used.steps + 1)
        if kind == "tool" and b.max_tool_calls is not None and self.used.tool_calls + 1 > b.max_tool_calls:
            raise BudgetExceeded("tool_calls", limit=b.max_tool_calls, used=self.used.tool_calls + 1)

    def check_deadline(self) -> None:
        if self.deadline_at is not None and self.clock() >= self.deadline_at:
            limit = self.budget.deadline_s or 0.0
            raise BudgetExceeded("deadline", limit=limit, used=round(limit + self.clock() - self.deadline_at, 3))

    def check_spend(self) -> None:
        """Tokens and cost are known only after a call: the step that crosses them is kept, then the run stops."""
        b = self.budget
        if b.max_tokens is not None and self.used.tokens > b.max_tokens:
            raise BudgetExceeded("tokens", limit=b.max_tokens, used=self.used.tokens)
        if b.max_cost_usd is not None and self.used.cost_usd > b.max_cost_usd:
            raise BudgetExceeded("cost_usd", limit=b.max_cost_usd, used=round(self.used.cost_usd, 6))

    def snapshot(self) -> dict[str, Any]:
        b = self.budget
        limits = {
            "steps": b.max_steps,
            "tool_calls": b.max_tool_calls,
            "tokens": b.max_tokens,
            "cost_usd": b.max_cost_usd,
            "deadline_s": b.deadline_s,
        }
        used: dict[str, Any] = {
            "steps": self.used.steps,
            "tool_calls": self.used.tool_calls,
            "model_calls": self.used.model_calls,
            "tokens": self.used.tokens,
            "cost_usd": round(self.used.cost_usd, 10),
        }
        if self.deadline_at is not None:
            used["remaining_s"] = round(max(self.deadline_at - self.clock(), 0.0), 3)
        return {"used": used, "limits": {k: v for k, v in limits.items() if v is not None}}
