"""GET /metrics, read with prometheus_client's own parser: each figure moves by exactly what was done."""

from __future__ import annotations

import genai_prices
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import HIT_SECONDS, REQUESTS, LocalFigures, ModelLabels
from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream

pytestmark = pytest.mark.both_backends

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str, **headers: str) -> Samples:
    response = httpx.get(f"{base}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples: Samples, cache_status: str, status_class: str = "2xx", **labels: str) -> float:
    defaults = {"provider": "openai", "endpoint": "chat/completions", "coalesced": "false"}
    return value(
        samples,
        "openai_proxy_requests_total",
        **{**defaults, **labels, "cache_status": cache_status, "status_class": status_class},
    )


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}]}


def test_every_figure_moves_by_exactly_what_was_done(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    before = scrape(base)
    chat = f"{base}/v1/chat/completions"
    assert httpx.post(chat, json=CHAT).headers["x-cache-status"] == "MISS"
    assert httpx.post(chat, json=CHAT).headers["x-cache-status"] == "HIT"
    assert httpx.post(chat, json=CHAT).headers["x-cache-status"] == "HIT"
    streamed = {**CHAT, "messages": [{"role": "user", "content": "stream me"}], "stream": True}
    assert httpx.post(chat, json=streamed).headers["x-cache-status"] == "MISS"
    assert httpx.post(chat, json=CHAT, headers={"cache-control": "no-cache"}).headers["x-cache-status"] == "REFRESH"
    assert httpx.post(chat, content=b"not json").headers["x-cache-status"] == "BYPASS"
    assert httpx.post(f"{base}/nowhere/v1/chat/completions", json=CHAT).status_code == 404
    after = scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert requests(after, "MISS") - requests(before, "MISS") == 2
    assert requests(after, "HIT") - requests(before, "HIT") == 2
    assert requests(after, "REFRESH") - requests(before, "REFRESH") == 1
    assert requests(after, "BYPASS", "4xx") - requests(before, "BYPASS", "4xx") == 1  # the upstream refused it
    unknown = {"provider": "none", "endpoint": "other"}
    assert requests(after, "none", "4xx", **unknown) - requests(before, "none", "4xx", **unknown) == 1
    assert moved("openai_proxy_hit_duration_seconds_count") == 2
    assert moved("openai_proxy_upstream_duration_seconds_count", provider="openai") == 4
    assert moved("openai_proxy_upstream_first_byte_seconds_count", provider="openai") == 1
    assert moved("openai_proxy_cache_hits_total") == 2
    assert moved("openai_proxy_cache_misses_total") == 3  # the two misses and the refresh
    assert value(after, "openai_proxy_cache_entries") == 2
    assert value(after, "openai_proxy_cache_bytes") > 0
    usage = httpx.post(chat, json=CHAT).json()["usage"]
    after_one_more_hit = scrape(base)
    saved = {"provider": "openai", "model": "gpt-4o-mini"}
    assert (
        value(after_one_more_hit, "openai_proxy_tokens_saved_total", **saved, kind="input")
        == 3 * usage["prompt_tokens"]
    )
    assert value(after_one_more_hit, "openai_proxy_cache_up", backend=_backend(base)) == 1


def _backend(base: str) -> str:
    return str(httpx.get(f"{base}/healthz").json()["cache"]["backend"])


def test_the_store_figures_are_those_of_cache_stats(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    for content in ("a", "b", "a", "a"):
        httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]})
    samples = scrape(base)
    stats = httpx.get(f"{base}/cache/stats").json()
    assert value(samples, "openai_proxy_cache_hits_total") == stats["hits"] == 2
    assert value(samples, "openai_proxy_cache_misses_total") == stats["misses"] == 2
    assert value(samples, "openai_proxy_cache_entries") == stats["entries"]
    assert value(samples, "openai_proxy_cache_bytes") == stats["bytes"]
    saved = {"provider": "openai", "model": "gpt-4o-mini", "kind": "output"}
    assert value(samples, "openai_proxy_tokens_saved_total", **saved) == stats["tokens_saved"]["output"]


def test_metrics_follow_the_admin_rule_unless_public(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    guarded = start_proxy(admin_api_key="admin-secret")
    assert httpx.get(f"{guarded}/metrics").status_code == 401
    assert httpx.get(f"{guarded}/metrics").json()["error"]["code"] == "invalid_api_key"
    scrape(guarded, authorization="Bearer admin-secret")
    public = start_proxy(admin_api_key="admin-secret", metrics_public=True)
    scrape(public)


def test_a_failing_store_shows_as_down_and_counts_its_failures(
    start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: object
) -> None:
    base = start_proxy(
        cache_backend="redis", redis_url="redis://127.0.0.1:1/0", redis_timeout=0.1, redis_key_prefix="down"
    )
    httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    samples = scrape(base)
    assert value(samples, "openai_proxy_cache_up", backend="redis") == 0
    assert value(samples, "openai_proxy_cache_store_failures_total", operation="read") >= 1
    assert requests(samples, "BYPASS") == 1


def test_only_known_or_listed_model_names_are_labels() -> None:
    labels = ModelLabels(known=lambda provider, model: model.startswith("gpt-"), listed=["my-local"])
    assert {labels("openai", f"custom-{number}") for number in range(60)} == {"other"}
    assert labels("openai", "gpt-4o") == "gpt-4o", "a model the price table knows has its own label"
    assert labels("groq", "my-local") == "my-local", "a listed model has its own label with every provider"
    assert labels("openai", None) == "none"


def test_30_unknown_model_names_add_no_series(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy(metrics_models="my-local,another-local")
    models = [f"client-made-{number}" for number in range(30)] + ["my-local", "gpt-4o-mini"]
    for model in models:
        body = {"model": model, "messages": [{"role": "user", "content": f"label {model}"}]}
        for _ in range(2):  # a miss, then a hit that saves tokens under the model's label
            assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 200
    samples = scrape(base)
    labelled = {
        dict(labels)["model"] for (name, labels), _ in samples.items() if name == "openai_proxy_tokens_saved_total"
    }
    assert labelled == {"other", "my-local", "gpt-4o-mini"}
    saved = {"provider": "openai", "model": "other", "kind": "input"}
    assert value(samples, "openai_proxy_tokens_saved_total", **saved) == 30 * 9, "every unknown model's hit counted"
    stats = httpx.get(f"{base}/cache/stats").json()
    assert len(stats["by_model"]) == 32, "/cache/stats still names every stored model"


def test_hits_save_the_price_genai_prices_gives_and_unknown_models_save_tokens_only(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy()
    known = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "price me"}]}
    unknown = {"model": "no-such-model-anywhere", "messages": [{"role": "user", "content": "price me not"}]}
    usage = httpx.post(f"{base}/v1/chat/completions", json=known).json()["usage"]
    for body in (known, known, unknown, unknown):
        httpx.post(f"{base}/v1/chat/completions", json=body)
    one_hit = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]),
        model_ref="gpt-4o-mini",
        provider_id="openai",
    ).total_price
    assert one_hit > 0
    stats = httpx.get(f"{base}/cache/stats").json()
    assert stats["cost_saved_usd"] == pytest.approx(float(2 * one_hit), rel=1e-6)
    assert stats["hits_without_price"] == 1, "the unknown model's hit: tokens, no dollars"
    by_model = {row["model"]: row for row in stats["by_model"]}
    assert by_model["no-such-model-anywhere"]["input_tokens"] > 0
    assert by_model["no-such-model-anywhere"]["cost_usd"] == 0
    assert stats["upstream_seconds_saved"] > 0
    samples = scrape(base)
    assert value(samples, "openai_proxy_cost_saved_usd_total", provider="openai", model="gpt-4o-mini") == pytest.approx(
        float(2 * one_hit), rel=1e-6
    )
    unpriced = value(samples, "openai_proxy_hits_without_price_total", provider="openai", model="other")
    assert unpriced == 1, "an unknown model is counted under `other`, not a label of its own"


def test_price_overrides_price_a_private_model(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy(price_overrides='{"local-llm": {"input": 1000000, "output": 2000000}}')
    body = {"model": "local-llm", "messages": [{"role": "user", "content": "mine"}]}
    usage = httpx.post(f"{base}/v1/chat/completions", json=body).json()["usage"]
    httpx.post(f"{base}/v1/chat/completions", json=body)
    expected = usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2  # dollars per token
    assert httpx.get(f"{base}/cache/stats").json()["cost_saved_usd"] == pytest.approx(expected)


@pytest.mark.anyio
async def test_hits_are_counted_without_dollars_when_the_price_table_cannot_load(tmp_path: object) -> None:
    from pathlib import Path

    from cache import SqliteBackend
    from cache.base import CachedResponse
    from cache.health import CacheHealth
    from proxy.pricing import LoadedLater
    from proxy.statistics import Pricer, Statistics

    def broken() -> Pricer:
        raise ValueError("no table")

    backend = SqliteBackend(Path(str(tmp_path)) / "c.db")
    await backend.open()
    table = LoadedLater(broken)
    statistics = Statistics(backend, CacheHealth("sqlite"), table.get)
    entry = CachedResponse(
        200, "application/json", b"{}", 1.0, "openai", "v1/chat/completions", "gpt-4o-mini", 0, None, 5, 2
    )
    statistics.hit("k", entry, 2.0)
    await statistics.flush()
    statistics.hit("k", entry, 3.0)
    await statistics.flush()
    saved = (await backend.statistics()).savings
    assert [(s.hits, s.input_tokens, s.cost_nanos, s.unpriced_hits) for s in saved] == [(2, 10, 0, 2)]
    await backend.close()


def test_a_histogram_counted_in_memory_holds_each_observation_in_every_bucket_at_or_above_it() -> None:
    figures = LocalFigures()
    hit_seconds = figures.child(HIT_SECONDS)
    for seconds in (0.0005, 0.0006, 2.0):
        hit_seconds.observe(seconds)
    figures.child(REQUESTS, "openai", "chat/completions", "HIT", "2xx", "false").inc()
    samples = {
        (sample.name, sample.labels.get("le", sample.labels.get("cache_status"))): sample.value
        for family in figures.collect()
        for sample in family.samples
    }
    assert samples[("openai_proxy_hit_duration_seconds_bucket", "0.0005")] == 1  # a bound holds its own value
    assert samples[("openai_proxy_hit_duration_seconds_bucket", "0.001")] == 2
    assert samples[("openai_proxy_hit_duration_seconds_bucket", "1.0")] == 2
    assert samples[("openai_proxy_hit_duration_seconds_bucket", "+Inf")] == 3
    assert samples[("openai_proxy_hit_duration_seconds_count", None)] == 3
    assert samples[("openai_proxy_hit_duration_seconds_sum", None)] == pytest.approx(2.0011)
    assert samples[("openai_proxy_requests_total", "HIT")] == 1


@pytest.mark.anyio
async def test_hits_on_an_entry_replaced_between_two_flushes_are_each_saved_and_priced_as_their_own(
    tmp_path: object,
) -> None:
    import dataclasses
    from decimal import Decimal
    from pathlib import Path

    from cache import SqliteBackend
    from cache.base import CachedResponse
    from cache.health import CacheHealth
    from proxy.statistics import Pricer, Statistics

    def per_input_token(entry: CachedResponse) -> Decimal:
        return Decimal("0.001") * (entry.input_tokens or 0)

    async def pricer() -> Pricer:
        return per_input_token

    backend = SqliteBackend(Path(str(tmp_path)) / "c.db")
    await backend.open()
    statistics = Statistics(backend, CacheHealth("sqlite"), pricer)
    older, newer = (
        CachedResponse(
            200, "application/json", b"{}", at, "openai", "v1/chat/completions", "gpt-4o-mini", "", None, n, 1
        )
        for at, n in ((1.0, 5), (3.5, 7))
    )
    statistics.hit("k", older, 2.0)
    statistics.hit("k", dataclasses.replace(older), 3.0)  # read again from the store: the same entry
    statistics.hit("k", newer, 4.0)  # the entry was refreshed in between
    await statistics.flush()
    figures = await backend.statistics()
    assert figures.hits == 3
    assert [(s.hits, s.input_tokens, s.output_tokens, s.cost_nanos, s.unpriced_hits) for s in figures.savings] == [
        (3, 2 * 5 + 7, 3, (2 * 5 + 7) * 1_000_000, 0)
    ]
    await backend.close()


@pytest.mark.anyio
async def test_hits_on_an_entry_read_again_from_the_store_keep_one_record_until_the_flush(tmp_path: object) -> None:
    # Without the memory tier every hit reads a new copy of its entry: it must not make a record per hit.
    import dataclasses
    from pathlib import Path

    from cache import SqliteBackend
    from cache.base import CachedResponse
    from cache.health import CacheHealth
    from proxy.statistics import Statistics

    backend = SqliteBackend(Path(str(tmp_path)) / "c.db")
    await backend.open()
    statistics = Statistics(backend, CacheHealth("sqlite"))
    entry = CachedResponse(200, "application/json", b"{}", 1.0, "openai", "v1/chat/completions", "gpt-4o-mini")
    for at in range(1000):
        statistics.hit("k", dataclasses.replace(entry), 2.0 + at)
    assert (len(statistics._hit), len(statistics._replaced)) == (1, 0)
    await statistics.flush()
    assert [(s.hits, s.unpriced_hits) for s in (await backend.statistics()).savings] == [(1000, 1000)]
    await backend.close()


@pytest.mark.anyio
async def test_hits_on_an_answer_still_waiting_to_be_stored_count_on_its_entry_once_it_is(tmp_path: object) -> None:
    # The store counts a hit on an entry only when it holds the entry: a hit on an answer still waiting to be
    # stored (a hit before the write, which a slow store makes common) is held until the entry is there.
    from pathlib import Path

    from cache import SqliteBackend
    from cache.base import CachedResponse, EntryFilter
    from cache.health import CacheHealth
    from proxy.statistics import Statistics

    backend = SqliteBackend(Path(str(tmp_path)) / "c.db")
    await backend.open()
    try:
        statistics = Statistics(backend, CacheHealth("sqlite"))
        waiting = {"k"}
        statistics.entry_waiting = waiting.__contains__
        entry = CachedResponse(200, "application/json", b"{}", 1.0, "openai", "v1/chat/completions", "gpt-4o-mini")
        statistics.hit("k", entry, 2.0)
        await statistics.flush()
        assert (await backend.statistics()).hits == 1, "counted at once in the totals"
        await backend.set("k", entry)
        waiting.clear()
        statistics.hit("k", entry, 3.0)
        await statistics.flush()
        [stored] = await backend.list_entries(EntryFilter(), 0, 10)
        assert (stored.hits, stored.last_hit_at) == (2, 3.0)
        assert (await backend.statistics()).hits == 2
    finally:
        await backend.close()


def test_the_statistics_ask_the_proxys_own_store_queue_what_waits(tmp_path: object) -> None:
    from pathlib import Path

    from openai_proxy import create_app
    from proxy.settings import Settings

    app = create_app(Settings(_env_file=None, cache_db=Path(str(tmp_path)) / "c.db"))  # type: ignore[call-arg]
    assert app.statistics.entry_waiting == app.proxy.stores.is_waiting
