"""What a stored answer's usage costs, from genai-prices' bundled table or PRICE_OVERRIDES."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price, data_snapshot
from genai_prices.data import providers as TABLE_PROVIDERS

from cache.prices import PROVIDER_ALIASES, ModelPrice, PriceTable, _table_model, parse_price_overrides
from cache.usage import Usage
from tests.processes import environment

ROOT = Path(__file__).resolve().parent.parent
TABLE = PriceTable()


def genai_price(provider_id: str, model: str, usage: Usage) -> Decimal:
    """genai-prices' own answer. Its input_tokens count cache reads and writes, like ours."""
    genai_usage = GenaiUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    return calc_price(genai_usage, model, provider_id=provider_id).total_price


# Known models: genai-prices' calculation, and a figure worked out by hand from the snapshot's prices


def test_gpt_4o_mini_costs_what_genai_prices_and_the_hand_computation_say() -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)

    cost = TABLE.cost("openai", "gpt-4o-mini", usage)

    assert cost == genai_price("openai", "gpt-4o-mini", usage)
    # $0.15 input, $0.075 cached input, $0.60 output per million: 600 * 0.15 + 400 * 0.075 + 200 * 0.6
    assert cost == Decimal("0.00024")


def test_claude_3_5_sonnet_prices_cache_reads_and_writes_as_anthropic_does() -> None:
    # Anthropic reported input_tokens=100, cache_read_input_tokens=1000, cache_creation_input_tokens=200.
    usage = Usage(input_tokens=1300, cached_input_tokens=1000, output_tokens=50, cache_write_tokens=200)

    cost = TABLE.cost("anthropic", "claude-3-5-sonnet-20241022", usage)

    assert cost == genai_price("anthropic", "claude-3-5-sonnet-20241022", usage)
    # $3 input, $0.30 cache read, $3.75 cache write, $15 output: 100*3 + 1000*0.3 + 200*3.75 + 50*15 = 2100
    assert cost == Decimal("0.0021")


def test_cached_input_costs_the_cached_rate() -> None:
    uncached = TABLE.cost("openai", "gpt-4o-mini", Usage(input_tokens=1000, output_tokens=0))
    cached = TABLE.cost("openai", "gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=1000, output_tokens=0))

    assert uncached == Decimal("0.00015")
    assert cached == Decimal("0.000075")


@pytest.mark.parametrize(
    ("provider", "model", "same_as"),
    [
        pytest.param("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", id="dated-openai"),
        pytest.param("openai", "GPT-4o-mini ", "gpt-4o-mini", id="case-and-space"),
        pytest.param("openrouter", "openai/gpt-4o-mini", "openai/gpt-4o-mini", id="openrouter-spelling"),
        pytest.param("openrouter", "openai/gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini", id="openrouter-dated"),
        pytest.param("anthropic", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet", id="dated-anthropic"),
    ],
)
def test_dated_and_openrouter_names_resolve(provider: str, model: str, same_as: str) -> None:
    usage = Usage(input_tokens=5000, cached_input_tokens=1000, output_tokens=700)

    cost = TABLE.cost(provider, model, usage)

    assert cost is not None
    assert cost == genai_price(provider, same_as, usage)


@pytest.mark.parametrize("total_input", [199_999, 200_000, 200_001, 1_000_000])
def test_tiered_prices_switch_with_the_total_input_as_genai_prices_does(total_input: int) -> None:
    usage = Usage(input_tokens=total_input, cached_input_tokens=1000, output_tokens=300, cache_write_tokens=500)

    assert TABLE.cost("anthropic", "claude-sonnet-4-5", usage) == genai_price("anthropic", "claude-sonnet-4-5", usage)


def test_long_prompts_cost_more_per_token_on_tiered_models() -> None:
    below = TABLE.cost("anthropic", "claude-sonnet-4-5", Usage(input_tokens=200_000, output_tokens=0))
    above = TABLE.cost("anthropic", "claude-sonnet-4-5", Usage(input_tokens=200_001, output_tokens=0))

    assert below == Decimal("0.6")  # $3 per million
    assert above == Decimal("1.200006")  # $6 per million once the prompt exceeds 200k tokens


def _table_models(provider_id: str, every: int = 1) -> list[tuple[str, str]]:
    provider = next(p for p in TABLE_PROVIDERS if p.id == provider_id)
    return [(provider_id, model.id) for model in provider.models[::every]]


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        *_table_models("openai"),
        *_table_models("anthropic"),
        *_table_models("groq"),
        *_table_models("mistral"),
        *_table_models("cohere"),
        *_table_models("openrouter", every=20),
    ],
)
def test_every_table_model_costs_exactly_what_genai_prices_computes(provider: str, model: str) -> None:
    usages = [
        Usage(input_tokens=1, output_tokens=0),
        Usage(input_tokens=0, output_tokens=1),
        Usage(input_tokens=12_345, cached_input_tokens=2_000, output_tokens=678, cache_write_tokens=300),
        *(
            Usage(
                input_tokens=total, cached_input_tokens=total // 3, output_tokens=4_321, cache_write_tokens=total // 7
            )
            for total in (128_001, 200_001, 272_001, 600_000)
        ),
    ]
    table_model = _table_model(provider, model.lower())
    if table_model is None:  # an id its own match rules do not match (ft:gpt-4o-mini, codestral)
        with pytest.raises(LookupError):
            genai_price(provider, model, usages[0])
        assert TABLE.cost(provider, model, usages[0]) is None
        return
    prices = table_model.get_prices(datetime.now(tz=UTC))
    free = not any(value is not None for value in vars(prices).values())
    by_tokens = prices.input_mtok is not None or prices.output_mtok is not None or free
    for usage in usages:
        try:
            expected: Decimal | None = genai_price(provider, model, usage) if by_tokens else None
        except ValueError:  # usage the model's prices cannot apply to
            expected = None
        assert TABLE.cost(provider, model, usage) == expected, usage


# No price rather than a made-up one


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        pytest.param("openai", "no-such-model", id="unknown-model"),
        pytest.param("openai", None, id="no-model"),
        pytest.param("openai", "", id="empty-model"),
        pytest.param("openrouter", "gpt-4o-mini", id="openrouter-without-vendor-prefix"),
        pytest.param("ollama", "gpt-4o-mini", id="custom-provider-no-guessing"),
        pytest.param("ai21", "jamba-large", id="provider-not-in-table"),
    ],
)
def test_unknown_models_and_providers_cost_nothing_known(provider: str, model: str | None) -> None:
    assert TABLE.cost(provider, model, Usage(input_tokens=10, output_tokens=10)) is None


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(Usage(), id="nothing"),
        pytest.param(Usage(cached_input_tokens=5, cache_write_tokens=5), id="only-cache-details"),
        pytest.param(Usage(input_tokens=10, cached_input_tokens=11, output_tokens=1), id="more-cached-than-input"),
        pytest.param(Usage(input_tokens=10, cached_input_tokens=6, cache_write_tokens=6), id="more-cache-than-input"),
        pytest.param(Usage(input_tokens=-1, output_tokens=1), id="negative"),
    ],
)
def test_missing_or_inconsistent_usage_costs_nothing_known(usage: Usage) -> None:
    assert TABLE.cost("openai", "gpt-4o-mini", usage) is None
    assert PriceTable({"gpt-4o-mini": ModelPrice(Decimal(1), Decimal(1))}).cost("openai", "gpt-4o-mini", usage) is None


def test_a_missing_side_counts_as_zero() -> None:
    assert TABLE.cost("openai", "gpt-4o-mini", Usage(input_tokens=1000)) == Decimal("0.00015")
    assert TABLE.cost("openai", "gpt-4o-mini", Usage(output_tokens=1000)) == Decimal("0.0006")


def test_free_models_cost_zero() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)

    assert TABLE.cost("openrouter", "meta-llama/llama-3.2-1b-instruct:free", usage) == 0


def test_models_billed_by_something_other_than_tokens_have_no_token_price() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)

    assert TABLE.cost("openai", "whisper-1", usage) is None  # per audio hour
    assert TABLE.cost("openai", "tts-1", usage) is None  # per character


def test_embeddings_are_priced_by_their_input() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=0)

    assert TABLE.cost("openai", "text-embedding-3-small", usage) == Decimal("0.02")


# Overrides


def test_overrides_win_over_the_table() -> None:
    table = PriceTable({"openai/gpt-4o-mini": ModelPrice(input=Decimal(1), output=Decimal(2))})

    assert table.cost("openai", "gpt-4o-mini", Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == 3
    # another provider's gpt-4o-mini keeps the table's price (Azure's falls back to OpenAI's)
    assert table.cost("azure", "gpt-4o-mini", Usage(input_tokens=1_000_000)) == Decimal("0.15")
    # a key is "provider/model" or a model name, and OpenRouter names this model so
    assert table.cost("openrouter", "openai/gpt-4o-mini", Usage(input_tokens=1_000_000)) == 1


def test_a_model_only_override_applies_to_every_provider() -> None:
    table = PriceTable(
        parse_price_overrides('{"llama3": {"input": 0, "output": 0}, "gpt-4o-mini": {"input": 1, "output": 1}}')
    )
    usage = Usage(input_tokens=500, output_tokens=500)

    assert table.cost("ollama", "llama3", usage) == 0
    assert table.cost("groq", "LLAMA3", usage) == 0
    assert table.cost("openai", "gpt-4o-mini", usage) == Decimal("0.001")
    assert table.cost("my-vllm", "gpt-4o-mini", usage) == Decimal("0.001")


def test_a_provider_override_beats_a_model_override() -> None:
    table = PriceTable(parse_price_overrides('{"m": {"input": 1, "output": 1}, "Local/M": {"input": 0, "output": 0}}'))
    usage = Usage(input_tokens=1_000_000, output_tokens=0)

    assert table.cost("local", "m", usage) == 0
    assert table.cost("other", "m", usage) == 1


def test_override_cache_prices_default_to_the_input_price() -> None:
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=0, cache_write_tokens=100_000)
    plain = PriceTable(parse_price_overrides('{"m": {"input": 1, "output": 5}}'))
    cached = PriceTable(
        parse_price_overrides('{"m": {"input": 1, "output": 5, "cached_input": 0.1, "cache_write": 1.25}}')
    )

    assert plain.cost("x", "m", usage) == 1
    assert cached.cost("x", "m", usage) == Decimal("0.5") + Decimal("0.04") + Decimal("0.125")


def test_overrides_parse_to_exact_decimals() -> None:
    assert parse_price_overrides('{"m": {"input": 0.1, "output": 3, "cached_input": 1e-2}}') == {
        "m": ModelPrice(input=Decimal("0.1"), output=Decimal(3), cached_input=Decimal("0.01"))
    }


def test_overrides_come_from_a_file_too(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"ollama/llama3": {"input": 0, "output": 0}}', encoding="utf-8")

    assert parse_price_overrides(f" {path} ") == {"ollama/llama3": ModelPrice(Decimal(0), Decimal(0))}


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_blank_overrides_are_none(text: str) -> None:
    assert parse_price_overrides(text) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('{"m": {"input": 1, "output": 1}', r"not valid JSON: Expecting ',' delimiter", id="bad-json"),
        pytest.param("{'m': 1}", r"not valid JSON", id="python-not-json"),
        pytest.param('{"m": {"input": 1, "output": 2}}  x', r"not valid JSON: Extra data", id="trailing"),
        pytest.param('{"m": [1, 2]}', r"\['m'\] must be an object", id="value-not-object"),
        pytest.param('{"m": {"input": 1, "outptu": 2}}', r"\['m'\] has unknown field 'outptu'", id="unknown-field"),
        pytest.param('{"m": {"input": 1}}', r"\['m'\] lacks 'output'", id="missing-output"),
        pytest.param('{"m": {"input": -0.5, "output": 1}}', r"\['m'\]\.input must be a finite, non-negative", id="neg"),
        pytest.param('{"m": {"input": 1, "output": "2"}}', r"\.output must be a finite", id="string-price"),
        pytest.param('{"m": {"input": true, "output": 1}}', r"\.input must be a finite", id="bool-price"),
        pytest.param('{"m": {"input": NaN, "output": 1}}', r"\.input must be a finite", id="nan"),
        pytest.param('{"m": {"input": 1, "output": Infinity}}', r"\.output must be a finite", id="infinity"),
        pytest.param('{"m": {"input": 1, "output": 1, "cached_input": null}}', r"cached_input must be", id="null"),
        pytest.param('{" ": {"input": 1, "output": 1}}', r"has an empty model name", id="empty-name"),
        pytest.param('{"M": {"input": 1, "output": 1}, "m": {"input": 2, "output": 2}}', r"names 'm' twice", id="dup"),
    ],
)
def test_invalid_overrides_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        parse_price_overrides(text)

    assert str(raised.value).startswith("PRICE_OVERRIDES")
    assert "\n" not in str(raised.value)


def test_a_top_level_array_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text("[1, 2]", encoding="utf-8")

    with pytest.raises(ValueError, match=r"^PRICE_OVERRIDES file '.*prices\.json' must be a JSON object"):
        parse_price_overrides(str(path))


def test_an_unreadable_overrides_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^PRICE_OVERRIDES file '.*missing\.json' cannot be read \(No such file"):
        parse_price_overrides(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"cannot be read \(Is a directory\)"):
        parse_price_overrides(str(tmp_path))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"is not UTF-8 text"):
        parse_price_overrides(str(binary))


def test_error_messages_do_not_echo_the_text() -> None:
    secret = "sk-live-CANARY-0123456789"
    with pytest.raises(ValueError) as raised:
        parse_price_overrides('{"m": {"input": 1, "output": 1}, "note": "' + secret + '"')

    assert secret not in str(raised.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"input": Decimal(-1), "output": Decimal(1)},
        {"input": Decimal(1), "output": Decimal("NaN")},
        {"input": Decimal(1), "output": Decimal(1), "cached_input": Decimal(-1)},
        {"input": 0.5, "output": Decimal(1)},
    ],
)
def test_a_model_price_must_be_non_negative_decimals(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be a finite, non-negative number"):
        ModelPrice(**fields)  # type: ignore[arg-type]


# Provider ids and the offline table


@pytest.mark.parametrize("provider", ["openai", "anthropic", "openrouter", "groq", "mistral", "cohere"])
def test_the_builtin_providers_are_genai_prices_provider_ids(provider: str) -> None:
    assert provider in {p.id for p in TABLE_PROVIDERS}


def test_ai21_is_not_in_the_table_and_aliases_name_real_ids() -> None:
    ids = {p.id for p in TABLE_PROVIDERS}

    assert "ai21" not in ids
    assert set(PROVIDER_ALIASES.values()) <= ids


def test_model_lookups_are_memoized() -> None:
    usage = Usage(input_tokens=10, output_tokens=10)
    TABLE.cost("mistral", "mistral-large-latest", usage)
    hits = _table_model.cache_info().hits

    TABLE.cost("mistral", "mistral-large-latest", usage)
    TABLE.cost("mistral", "Mistral-Large-Latest", usage)

    assert _table_model.cache_info().hits == hits + 2


def test_prices_fetched_by_genai_prices_updater_are_ignored() -> None:
    """UpdatePrices, started anywhere in the process, swaps genai-prices' global snapshot for one
    fetched over the network; the table reads the bundled data, so it keeps its offline prices."""
    fetched = data_snapshot.DataSnapshot(providers=[], from_auto_update=True)
    data_snapshot.set_custom_snapshot(fetched)
    try:
        cost = PriceTable().cost(
            "openai", "gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)
        )
    finally:
        data_snapshot.set_custom_snapshot(None)

    assert cost == Decimal("0.00024")


NO_NETWORK = """
import socket, threading

def refuse(*args, **kwargs):
    raise OSError("network refused by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from cache.prices import PriceTable
from cache.usage import Usage

table = PriceTable()
print(table.cost("openai", "gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)))
print(table.cost("anthropic", "claude-sonnet-4-5", Usage(input_tokens=300_000, output_tokens=10)))
print(sorted(thread.name for thread in threading.enumerate()))
"""


def test_prices_need_no_network() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    gpt_4o_mini, long_sonnet, threads = done.stdout.splitlines()
    assert Decimal(gpt_4o_mini) == Decimal("0.00024")
    assert Decimal(long_sonnet) == Decimal("1.800225")  # 300k input at $6, 10 output at $22.50 per million
    assert threads == "['MainThread']"  # no genai-prices updater thread
