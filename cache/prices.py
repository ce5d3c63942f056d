"""Pure: what a stored answer's usage costs at its provider, so cache hits can count the money saved.

Prices come from the offline price table bundled with the `genai-prices` package, read straight from
`genai_prices.data`. They are never looked up through `genai_prices.calc_price`, whose process-wide
snapshot an `UpdatePrices` started anywhere in the process would replace with prices fetched over
the network: nothing here touches the network, and the prices are those of the installed
genai-prices release. `PRICE_OVERRIDES` (see `parse_price_overrides`) adds models the table lacks,
such as self-hosted ones at 0, or replaces its prices.

The cost is computed on every cache hit, so it is cheap: model lookups are memoized, and each price
of the table is turned once into per-token rates derived from genai-prices' own calculation (one set
per price tier), so a hit costs a few multiplications.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cache.usage import Usage

if TYPE_CHECKING:
    from genai_prices import types as genai

PER_MILLION = Decimal(1_000_000)

# Our provider names that genai-prices spells differently. Any other name is used as it is when
# genai-prices has a provider with exactly that id: of the built-ins openai, anthropic, openrouter,
# groq, mistral and cohere (it has no ai21), and for example together, deepseek, fireworks or azure
# when an extra provider is added under that name. Other names (ollama, vllm, ...) get no price
# from the table: such servers are often self-hosted, so guessing the provider from the model's
# name would invent a price. PRICE_OVERRIDES prices them.
PROVIDER_ALIASES: Mapping[str, str] = {"xai": "x-ai", "gemini": "google", "bedrock": "aws"}

_OPTIONAL_FIELDS = ("cached_input", "cache_write")
_FIELDS = ("input", "output", *_OPTIONAL_FIELDS)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's prices in USD per million tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # None: cached input is priced as input
    cache_write: Decimal | None = None  # None: cache writes are priced as input

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if not (isinstance(value, Decimal) and value.is_finite() and value >= 0):
                raise ValueError(f"{name} must be a finite, non-negative number (USD per million tokens)")

    def cost(self, usage: Usage) -> Decimal | None:
        """USD for this usage; None when the usage is missing or inconsistent."""
        counts = _counts(usage)
        return None if counts is None else self._cost(counts)

    def _cost(self, counts: _Counts) -> Decimal:
        cached = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        total = (
            self.input * counts.uncached_input
            + cached * counts.cache_read
            + write * counts.cache_write
            + self.output * counts.output
        )
        return total / PER_MILLION


def parse_price_overrides(text: str) -> dict[str, ModelPrice]:
    """PRICE_OVERRIDES: a JSON object, or the path of a JSON file holding one, e.g.

        {"ollama/llama3": {"input": 0, "output": 0},
         "my-model": {"input": 0.5, "output": 1.5, "cached_input": 0.05}}

    Prices are USD per million tokens: `input` and `output` are required, `cached_input` and
    `cache_write` optional (priced as input when absent). Keys are "provider/model" (that provider
    only) or just "model" (every provider), matched exactly but without regard to case; a cost
    looks up "provider/model" first, then "model". Model names may hold a slash themselves, so
    "openai/gpt-4o-mini" prices OpenAI's gpt-4o-mini and also the model OpenRouter spells so.
    Blank text means no overrides. Raises ValueError with a one-line message naming what is wrong
    (quoting at most the file's path, a model name or a field name, never a value)."""
    text = text.strip()
    if not text:
        return {}
    source = "PRICE_OVERRIDES"
    if not text.startswith("{"):
        source = f"PRICE_OVERRIDES file {_short(text, 200, keep_end=True)}"
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"{source} cannot be read ({error.strerror or type(error).__name__})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{source} is not UTF-8 text") from None
        except ValueError:  # e.g. a NUL byte in the path
            raise ValueError(f"{source} is not a usable path") from None
    try:
        data = json.loads(text, parse_float=Decimal, parse_constant=Decimal)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f'{source} must be a JSON object like {{"model": {{"input": 0.5, "output": 1.5}}}}')
    overrides: dict[str, ModelPrice] = {}
    for raw_key, value in data.items():
        key = raw_key.strip().lower()
        if not key:
            raise ValueError(f"{source} has an empty model name")
        if key in overrides:
            raise ValueError(f"{source} names {_short(key)} twice")
        overrides[key] = _parse_price(f"{source}[{_short(raw_key)}]", value)
    return overrides


def _parse_price(where: str, value: Any) -> ModelPrice:
    if not isinstance(value, dict):
        raise ValueError(f'{where} must be an object like {{"input": 0.5, "output": 1.5}}')
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown field {_short(unknown[0])} (allowed: {', '.join(_FIELDS)})")
    prices: dict[str, Decimal] = {}
    for name in _FIELDS:
        if name not in value:
            if name in _OPTIONAL_FIELDS:
                continue
            raise ValueError(f"{where} lacks {name!r}")
        price = value[name]
        if isinstance(price, int) and not isinstance(price, bool):
            price = Decimal(price)
        if not (isinstance(price, Decimal) and price.is_finite() and price >= 0):
            raise ValueError(f"{where}.{name} must be a finite, non-negative number (USD per million tokens)")
        prices[name] = price
    return ModelPrice(**prices)


def _short(text: str, limit: int = 60, *, keep_end: bool = False) -> str:
    if len(text) > limit:
        text = "..." + text[-limit:] if keep_end else text[:limit] + "..."
    return repr(text)


class PriceTable:
    """Prices usage: overrides first, then the bundled genai-prices table."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self._overrides = {key.strip().lower(): price for key, price in (overrides or {}).items()}
        _bundled()  # load the table now (about a second), not on the first cache hit

    def cost(self, provider: str, model: str | None, usage: Usage) -> Decimal | None:
        """USD for this usage of this provider's model (`provider` is the proxy's provider name,
        "openai" for /v1/): overrides first ("provider/model", then "model"), then genai-prices,
        priced as the provider bills it (cached input at the cached
        price, cache writes at the cache-write price, the rest of the input at the input price,
        output at the output price, plus any per-request fee) at today's prices.

        None when the model is unknown (see PROVIDER_ALIASES for which providers the table covers),
        when the table prices the model by something other than tokens, or when the usage is
        missing (no input and no output tokens) or inconsistent (negative, or more cached tokens
        than input tokens) -- never a made-up price. A missing side of an otherwise reported usage
        counts as 0."""
        counts = _counts(usage)
        if counts is None or not model:
            return None
        provider = provider.strip().lower()
        model = model.strip().lower()
        if self._overrides:
            override = self._overrides.get(f"{provider}/{model}") or self._overrides.get(model)
            if override is not None:
                return override._cost(counts)
        table_model = _table_model(provider, model)
        return None if table_model is None else _table_cost(table_model, counts)


class _Counts(NamedTuple):
    total_input: int  # including cache reads and writes
    cache_read: int
    cache_write: int
    output: int

    @property
    def uncached_input(self) -> int:
        return self.total_input - self.cache_read - self.cache_write


def _counts(usage: Usage) -> _Counts | None:
    if usage.input_tokens is None and usage.output_tokens is None:
        return None
    read = usage.cached_input_tokens or 0
    write = usage.cache_write_tokens or 0
    total = usage.input_tokens if usage.input_tokens is not None else read + write
    counts = _Counts(total, read, write, usage.output_tokens or 0)
    if min(counts) < 0 or counts.uncached_input < 0:
        return None
    return counts


# The bundled table


def compile_bundled_table() -> None:
    """Import genai-prices' table module (1.6 MB of Python source). Where its bytecode is not written back
    (PYTHONDONTWRITEBYTECODE, as in many container images), importing it compiles it, which holds the
    interpreter for about 0.4 s: done before serving, not in the thread that builds the table, where it
    stalled the first requests."""
    import genai_prices.data  # noqa: F401


@lru_cache(maxsize=1)
def _bundled() -> tuple[list[genai.Provider], dict[str, genai.Provider]]:
    from genai_prices.data import providers

    return providers, {provider.id: provider for provider in providers}


@lru_cache(maxsize=4096)
def _table_model(provider: str, model: str) -> genai.ModelInfo | None:
    """The table's model for a lower-case provider and model name; None when it has none.

    genai-prices matches dated names (gpt-4o-mini-2024-07-18) and OpenRouter's spelling
    (openai/gpt-4o-mini under openrouter) to their model."""
    providers, by_id = _bundled()
    table_provider = by_id.get(PROVIDER_ALIASES.get(provider, provider))
    if table_provider is None:
        return None
    return table_provider.find_model(model, all_providers=providers)


def _table_cost(model: genai.ModelInfo, counts: _Counts) -> Decimal | None:
    prices = model.get_prices(datetime.now(tz=UTC))  # the price in force today
    card = _CARDS.get(id(prices))
    if card is None or card.prices is not prices:
        card = _CARDS[id(prices)] = _PriceCard(prices)
    return card.cost(counts)


class _Rates(NamedTuple):
    """USD per token (and per request) within one price tier."""

    request: Decimal
    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal

    def cost(self, counts: _Counts) -> Decimal:
        return (
            self.request
            + self.input * counts.uncached_input
            + self.cache_read * counts.cache_read
            + self.cache_write * counts.cache_write
            + self.output * counts.output
        )


class _PriceCard:
    """One genai-prices price as per-token rates, derived from genai-prices' own calculation.

    Within a price tier (tiers start where the total input exceeds a threshold) that calculation is
    linear in the token counts, so a few sample calculations give the exact rates."""

    def __init__(self, prices: genai.ModelPrice) -> None:
        from genai_prices.types import TieredPrices

        self.prices = prices
        # An empty price is a free model (OpenRouter's ":free" ones); one with prices but none per
        # input or output token is billed per audio hour, character or page, which Usage does not count.
        self.by_tokens = prices.input_mtok is not None or prices.output_mtok is not None or not _has_prices(prices)
        starts = {
            tier.start for value in vars(prices).values() if isinstance(value, TieredPrices) for tier in value.tiers
        }
        self.starts = sorted(starts)
        self.bands: dict[int, _Rates | None] = {}

    def cost(self, counts: _Counts) -> Decimal | None:
        if not self.by_tokens:
            return None  # priced per audio hour, per character, ...: not what Usage counts
        band = bisect_left(self.starts, counts.total_input)  # how many tier starts the input exceeds
        if band not in self.bands:
            self.bands[band] = self._rates(band)
        rates = self.bands[band]
        if rates is None:
            return _genai_total(self.prices, counts)
        return rates.cost(counts)

    def _rates(self, band: int) -> _Rates | None:
        at = 1 if band == 0 else self.starts[band - 1] + 1
        if band < len(self.starts) and at + 1 > self.starts[band]:
            return None  # a band too narrow to sample: let genai-prices price each usage
        samples = [
            _genai_total(self.prices, _Counts(at, 0, 0, 0)),
            _genai_total(self.prices, _Counts(at + 1, 0, 0, 0)),
            _genai_total(self.prices, _Counts(at, 1, 0, 0)),
            _genai_total(self.prices, _Counts(at, 0, 1, 0)),
            _genai_total(self.prices, _Counts(at, 0, 0, 1)),
        ]
        if any(sample is None for sample in samples):
            return None
        plain, more, read, write, output = (sample or Decimal(0) for sample in samples)
        per_input = more - plain
        return _Rates(
            request=plain - per_input * at,
            input=per_input,
            cache_read=read - plain + per_input,
            cache_write=write - plain + per_input,
            output=output - plain,
        )


def _has_prices(prices: genai.ModelPrice) -> bool:
    return any(value is not None for name, value in vars(prices).items() if not name.startswith("_"))


_CARDS: dict[int, _PriceCard] = {}  # by id() of the table's price objects, which live as long as the table


def _genai_total(prices: genai.ModelPrice, counts: _Counts) -> Decimal | None:
    """genai-prices' price for these counts; its input_tokens include cache reads and writes."""
    from genai_prices.types import Usage as GenaiUsage

    usage = GenaiUsage(
        input_tokens=counts.total_input,
        cache_read_tokens=counts.cache_read,
        cache_write_tokens=counts.cache_write,
        output_tokens=counts.output,
    )
    try:
        return prices.calc_price(usage)["total_price"]
    except ValueError:  # prices it cannot apply to these counts
        return None
