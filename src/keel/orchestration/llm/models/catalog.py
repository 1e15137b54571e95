"""What keel knows about models: context windows, prices (USD per 1M tokens) and whether a name is pinned.

Prices come from a maintained source, pydantic's ``genai-prices`` (pinned in ``pyproject.toml``; a new release is
a version bump, not a hand edit here): its providers, their API URLs, and each model's prices over time.
``KEEL_MODEL_PRICES`` (JSON or TOML: ``{"my-model": {"input": 0.5, "output": 1.5, "context_window": 32768}}``)
overrides or extends it, by longest prefix, so a dated checkpoint (``gpt-4o-mini-2024-07-18``) finds its family's
entry. A model that runs here (``local:``) or is scripted (``test``) is free by definition: its price is known,
and it is 0. Any other model missing from both is *unknown*: it is charged $0, the envelope warns
``price_unknown``, and a ``max_cost_usd`` budget on it is refused at submission (:func:`unpriced`), because a
budget that can never trip is worse than none.

:func:`price` is the one place that decides a model's price; the adapters, the submission check and the envelope
warning all ask it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from keel.providers import Spec, chain

if TYPE_CHECKING:  # loaded on the first lookup (0.3 s of price data): importing the models stays cheap
    import genai_prices
    from genai_prices.types import TieredPrices

FREE_PROVIDERS = frozenset({"local", "test"})
"""Providers whose models cost nothing: the embedded model runs on this machine; ``test`` is scripted."""

PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic"}
"""keel's provider name → genai-prices' provider id. ``openai-compatible`` has none: its server's URL says who
serves it (see :func:`_by_url_then_name`)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelInfo:
    context_window: int
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    known: bool = True
    """False when no source knows the price: the model is charged $0, and the envelope says so."""
    source: str = ""
    """Where the price came from: ``genai-prices``, ``KEEL_MODEL_PRICES``, ``free`` or empty (unknown)."""

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


UNKNOWN = ModelInfo(context_window=8_192, known=False)
FREE = ModelInfo(context_window=8_192, source="free")

_DATED = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|@sha256:[0-9a-f]{12,}|@[0-9a-f]{12,})$")


def price(
    provider: str | None,
    model: str,
    overrides: dict[str, Any] | None = None,
    *,
    base_url: str | None = None,
) -> ModelInfo:
    """The price and window of ``model`` as ``provider`` serves it (at ``base_url``, for ``openai-compatible``):
    free for a local or test model, else ``overrides`` (longest prefix), else genai-prices, else :data:`UNKNOWN`."""
    if provider in FREE_PROVIDERS:
        return FREE
    table = _parse(overrides or {})
    best = max((k for k in table if model.startswith(k)), key=len, default=None)
    if best is not None:
        return table[best]
    return _maintained(provider, model, base_url) or UNKNOWN


def lookup(model: str, overrides: dict[str, Any] | None = None) -> ModelInfo:
    """:func:`price` for a bare model name, its provider guessed from the name (``gpt-…`` is OpenAI's)."""
    return price(None, model, overrides)


def unpriced(spec: str, overrides: dict[str, Any] | None = None) -> list[str]:
    """The models of ``spec`` (each of a fallback chain ``a,b``) whose price is unknown: what a ``max_cost_usd``
    budget could never count."""
    out = []
    for member in chain(spec):
        parsed = Spec.parse(member)
        base_url, name = None, parsed.rest
        if parsed.provider == "openai-compatible":
            base_url, _, name = parsed.rest.rpartition("#")
        if not price(parsed.provider, name, overrides, base_url=base_url).known:
            out.append(member)
    return out


def _maintained(provider: str | None, model: str, base_url: str | None) -> ModelInfo | None:
    """The model's current list price from genai-prices, or None when it knows no such model."""
    import genai_prices

    usage = genai_prices.Usage(input_tokens=0, output_tokens=0)
    try:
        if provider in PROVIDER_IDS:
            calc = genai_prices.calc_price(usage, model, provider_id=PROVIDER_IDS[provider])
        elif provider in (None, "openai-compatible"):
            calc = _by_url_then_name(usage, model, base_url)
        else:  # a provider keel does not know (an entry point's): genai-prices cannot know its models either
            return None
    except LookupError:
        return None
    prices = calc.model_price
    return ModelInfo(
        context_window=calc.model.context_window or UNKNOWN.context_window,
        input_usd_per_mtok=_per_mtok(getattr(prices, "input_mtok", None)),
        output_usd_per_mtok=_per_mtok(getattr(prices, "output_mtok", None)),
        source="genai-prices",
    )


def _by_url_then_name(
    usage: genai_prices.Usage, model: str, base_url: str | None
) -> genai_prices.types.PriceCalculation:
    """A known host (Groq, Together, OpenRouter, …) prices its own models; on any other host (a proxy on your own
    machine, say) a model named like a provider's (``gpt-4o-mini``) is priced as that provider's, as keel's
    built-in table did. A self-hosted open model (``Qwen/Qwen2.5-7B-Instruct``) matches neither: unknown."""
    import genai_prices

    if base_url:
        try:
            return genai_prices.calc_price(usage, model, provider_api_url=base_url)
        except LookupError:
            pass
    return genai_prices.calc_price(usage, model)


def _per_mtok(value: Decimal | TieredPrices | None) -> float:
    """A tiered price (more per token past 200k, say) is charged at its base tier: keel's calls stay below it."""
    from genai_prices.types import TieredPrices

    if isinstance(value, TieredPrices):
        return float(value.base)
    return float(value) if value is not None else 0.0


def _parse(raw: dict[str, Any]) -> dict[str, ModelInfo]:
    out: dict[str, ModelInfo] = {}
    for name, spec in raw.items():
        if isinstance(spec, ModelInfo):
            out[name] = spec
            continue
        base = _maintained(None, name, None) or UNKNOWN
        out[name] = ModelInfo(
            context_window=int(spec.get("context_window", base.context_window)),
            input_usd_per_mtok=float(spec.get("input", base.input_usd_per_mtok)),
            output_usd_per_mtok=float(spec.get("output", base.output_usd_per_mtok)),
            # An override that leaves a price out, for a model no source prices, still has no price.
            known=base.known or ("input" in spec and "output" in spec),
            source="KEEL_MODEL_PRICES",
        )
    return out


def is_pinned(model_id: str) -> bool:
    """A dated checkpoint (``…-2024-07-18``, ``…-20241022``) or a content hash (``local:…@<sha256>``) is pinned;
    a bare family name (``gpt-4o``, ``claude-3-5-sonnet-latest``) floats: the provider may change what answers."""
    return bool(_DATED.search(model_id))
