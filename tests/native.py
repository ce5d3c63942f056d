"""Checks the native provider tests (Azure OpenAI, Gemini, Bedrock) share: what two hits of one answer
saved, as the statistics, the metrics and the entry list show it, and everywhere a credential must not be."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import genai_prices
import httpx
import pytest

from proxy.commands import export_entries, run
from proxy.settings import Settings
from proxy.store import build_backend
from tests.test_metrics import scrape, value

# What every fake upstream of these tests reports for one answer.
INPUT_TOKENS, OUTPUT_TOKENS = 9, 3


def assert_two_hits_saved(base: str, provider: str, endpoint: str, model: str, price_provider: str) -> None:
    """After one miss and two hits of one answer: the savings at the price table's price for `model`,
    counted under `provider` and `model`, and the requests under `provider` and `endpoint`."""
    usage = genai_prices.Usage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS)
    one_hit = genai_prices.calc_price(usage, model_ref=model, provider_id=price_provider).total_price
    stats = httpx.get(f"{base}/cache/stats").json()
    assert stats["by_provider"][provider]["hits"] == 2
    assert stats["cost_saved_usd"] == pytest.approx(float(2 * one_hit), rel=1e-6)
    assert [row["model"] for row in stats["by_model"]] == [model]
    samples = scrape(base)
    labels = {"provider": provider, "endpoint": endpoint, "coalesced": "false", "status_class": "2xx"}
    assert value(samples, "openai_proxy_requests_total", cache_status="HIT", **labels) == 2
    assert value(samples, "openai_proxy_requests_total", cache_status="MISS", **labels) == 1
    assert value(samples, "openai_proxy_cost_saved_usd_total", provider=provider, model=model) > 0


def shown_and_exported(base: str, store_settings: dict[str, Any], tmp_path: Path) -> list[str]:
    """Everything the proxy shows of its entries (metrics, entry list, statistics, dashboard) and the
    export of its store, for a test to look for a credential in."""
    shown = [httpx.get(f"{base}{path}").text for path in ("/metrics", "/cache/entries", "/cache/stats", "/dashboard")]
    exported = tmp_path / "export.jsonl"
    settings = Settings(_env_file=None, cache_db=tmp_path / "cache.db", **store_settings)  # type: ignore[call-arg]
    backend = build_backend(settings)
    assert asyncio.run(run(backend, "export", lambda: export_entries(backend, exported))) == 0
    return [*shown, exported.read_text()]
