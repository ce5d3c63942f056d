"""The price table that puts dollars on what hits saved, built after start-up rather than delaying it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

from cache.prices import PriceTable, compile_bundled_table, parse_price_overrides
from cache.usage import Usage, entry_usage
from proxy.statistics import Pricer

logger = logging.getLogger("openai_proxy")
T = TypeVar("T")

_SOME_USAGE = Usage(input_tokens=1, output_tokens=1)


class LoadedLater(Generic[T]):
    """A value that takes a while to build (the price table: most of a second), built in a thread after
    start-up rather than delaying it; `get` waits for it (and builds it, if nothing has begun to)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self.value: T | None = None
        self._begun = False
        self._loaded = asyncio.Event()

    async def load(self) -> None:
        self._begun = True
        # Shielded: a shutdown that begins meanwhile waits for it, so `get` never waits for nothing.
        with anyio.CancelScope(shield=True):
            try:
                self.value = await anyio.to_thread.run_sync(self._build)
            except Exception:
                logger.exception("could not build %s", self._build)
            finally:
                self._loaded.set()

    async def get(self) -> T:
        if not self._begun:
            await self.load()
        await self._loaded.wait()
        if self.value is None:
            raise RuntimeError("the value could not be built")
        return self.value


class Prices:
    """genai-prices' table with PRICE_OVERRIDES on top."""

    def __init__(self, overrides: str | None) -> None:
        self.overrides = overrides
        self.table = LoadedLater(self._build)

    def _build(self) -> PriceTable:
        return PriceTable(parse_price_overrides(self.overrides) if self.overrides else None)

    def prepare(self) -> None:
        """What must happen before serving, since it would hold the event loop: compiling the table's source."""
        compile_bundled_table()

    async def load(self) -> None:
        await self.table.load()

    async def loaded(self) -> None:
        """Wait until the table is built, or could not be."""
        with contextlib.suppress(RuntimeError):
            await self.table.get()

    def knows(self, provider: str, model: str) -> bool:
        """Whether the table prices `model` of `provider`; False while it is being built."""
        table = self.table.value
        return table is not None and table.cost(provider, model, _SOME_USAGE) is not None

    async def pricer(self) -> Pricer:
        table = await self.table.get()
        return lambda entry: table.cost(entry.provider, entry.model, entry_usage(entry))
