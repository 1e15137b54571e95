"""Prices: from genai-prices (a maintained source), overridden by KEEL_MODEL_PRICES, free for models that run here
or are scripted, and *unknown* (never silently $0) for anything else."""

from __future__ import annotations

import pytest

from keel.orchestration.llm.models.catalog import FREE, lookup, price, unpriced


def test_a_pinned_checkpoint_is_priced_by_the_maintained_source() -> None:
    info = price("openai", "gpt-4o-mini-2024-07-18")
    assert info.known and info.source == "genai-prices"
    assert info.input_usd_per_mtok > 0 and info.output_usd_per_mtok > info.input_usd_per_mtok
    assert info.context_window == 128_000
    claude = price("anthropic", "claude-3-5-haiku-20241022")
    assert claude.known and claude.cost(1_000_000, 0) == pytest.approx(claude.input_usd_per_mtok)


def test_a_host_genai_prices_knows_prices_its_own_models() -> None:
    groq = price("openai-compatible", "llama-3.1-8b-instant", base_url="https://api.groq.com/openai/v1")
    assert groq.known and groq.input_usd_per_mtok > 0


def test_local_and_test_models_are_free_not_unknown() -> None:
    assert price("local", "qwen2.5-1.5b") == FREE and FREE.known and FREE.cost(10**6, 10**6) == 0
    assert price("test", "") == FREE
    assert unpriced("local:qwen2.5-1.5b") == [] and unpriced("test") == []


def test_a_self_hosted_model_is_unknown_until_priced() -> None:
    spec = "openai-compatible:http://gpu-box:8000/v1#Qwen/Qwen2.5-7B-Instruct"
    assert not price("openai-compatible", "Qwen/Qwen2.5-7B-Instruct", base_url="http://gpu-box:8000/v1").known
    assert unpriced(spec) == [spec]
    overrides = {"Qwen/Qwen2.5-7B": {"input": 0, "output": 0, "context_window": 32768}}
    assert unpriced(spec, overrides) == []
    assert price("openai-compatible", "Qwen/Qwen2.5-7B-Instruct", overrides).context_window == 32768
    # A window alone says nothing about the price.
    assert unpriced(spec, {"Qwen/Qwen2.5-7B": {"context_window": 32768}}) == [spec]


def test_an_override_beats_the_maintained_price_by_longest_prefix() -> None:
    overrides = {"gpt-4o": {"input": 9.0, "output": 9.0}, "gpt-4o-mini": {"input": 1.0, "output": 2.0}}
    info = lookup("gpt-4o-mini-2024-07-18", overrides)
    assert (info.input_usd_per_mtok, info.output_usd_per_mtok, info.source) == (1.0, 2.0, "KEEL_MODEL_PRICES")
    assert info.context_window == 128_000  # what the override leaves out comes from the maintained source


def test_a_chain_names_each_unpriced_member() -> None:
    chain = "anthropic:claude-3-5-haiku-20241022,openai-compatible:http://h:1/v1#mystery-7b,local:qwen2.5-1.5b"
    assert unpriced(chain) == ["openai-compatible:http://h:1/v1#mystery-7b"]
    assert unpriced("mine:some-model") == ["mine:some-model"]  # a provider keel does not know prices nothing
