"""What keel knows about models: context windows, prices (USD per 1M tokens) and whether a name is pinned.

Prices change; the table is a default. Override or extend it with ``KEEL_MODEL_PRICES`` (JSON or TOML:
``{"my-model": {"input": 0.5, "output": 1.5, "context_window": 32768}}``). Lookup is by longest prefix, so a dated
checkpoint (``gpt-4o-mini-2024-07-18``) finds its family's entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelInfo:
    context_window: int
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    known: bool = True

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


BUILTIN: dict[str, ModelInfo] = {
    # OpenAI (list prices, USD per 1M tokens)
    "gpt-4o-mini": ModelInfo(context_window=128_000, input_usd_per_mtok=0.15, output_usd_per_mtok=0.60),
    "gpt-4o": ModelInfo(context_window=128_000, input_usd_per_mtok=2.50, output_usd_per_mtok=10.00),
    "gpt-4.1-nano": ModelInfo(context_window=1_047_576, input_usd_per_mtok=0.10, output_usd_per_mtok=0.40),
    "gpt-4.1-mini": ModelInfo(context_window=1_047_576, input_usd_per_mtok=0.40, output_usd_per_mtok=1.60),
    "gpt-4.1": ModelInfo(context_window=1_047_576, input_usd_per_mtok=2.00, output_usd_per_mtok=8.00),
    "o3-mini": ModelInfo(context_window=200_000, input_usd_per_mtok=1.10, output_usd_per_mtok=4.40),
    # Anthropic
    "claude-3-haiku": ModelInfo(context_window=200_000, input_usd_per_mtok=0.25, output_usd_per_mtok=1.25),
    "claude-3-5-haiku": ModelInfo(context_window=200_000, input_usd_per_mtok=0.80, output_usd_per_mtok=4.00),
    "claude-3-5-sonnet": ModelInfo(context_window=200_000, input_usd_per_mtok=3.00, output_usd_per_mtok=15.00),
    "claude-3-7-sonnet": ModelInfo(context_window=200_000, input_usd_per_mtok=3.00, output_usd_per_mtok=15.00),
    "claude-sonnet-4": ModelInfo(context_window=200_000, input_usd_per_mtok=3.00, output_usd_per_mtok=15.00),
    "claude-opus-4": ModelInfo(context_window=200_000, input_usd_per_mtok=15.00, output_usd_per_mtok=75.00),
}

UNKNOWN = ModelInfo(context_window=8_192, known=False)

_DATED = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|@sha256:[0-9a-f]{12,}|@[0-9a-f]{12,})$")


def lookup(model: str, overrides: dict[str, Any] | None = None) -> ModelInfo:
    """The entry for ``model`` (longest prefix wins; ``overrides`` first), or :data:`UNKNOWN`."""
    for table in (_parse(overrides or {}), BUILTIN):
        best = max((k for k in table if model.startswith(k)), key=len, default=None)
        if best is not None:
            return table[best]
    return UNKNOWN


def _parse(raw: dict[str, Any]) -> dict[str, ModelInfo]:
    out: dict[str, ModelInfo] = {}
    for name, spec in raw.items():
        if isinstance(spec, ModelInfo):
            out[name] = spec
            continue
        base = BUILTIN.get(name, UNKNOWN)
        out[name] = ModelInfo(
            context_window=int(spec.get("context_window", base.context_window)),
            input_usd_per_mtok=float(spec.get("input", base.input_usd_per_mtok)),
            output_usd_per_mtok=float(spec.get("output", base.output_usd_per_mtok)),
        )
    return out


def is_pinned(model_id: str) -> bool:
    """A dated checkpoint (``…-2024-07-18``, ``…-20241022``) or a content hash (``local:…@<sha256>``) is pinned;
    a bare family name (``gpt-4o``, ``claude-3-5-sonnet-latest``) floats: the provider may change what answers."""
    return bool(_DATED.search(model_id))
