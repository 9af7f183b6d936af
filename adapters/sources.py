"""What a paper session trades on: the embedded synthetic market or the venues' live public feeds.

A source tells the session its instruments and then pushes inbound events into the session's
:class:`~bot.bus.InboundQueue` until it is cancelled (live feeds) or runs out (a synthetic run
with an end). The engine behind it is the same :func:`bot.app.build_engine` either way; only the
edge differs: the synthetic market is paced against the wall clock and waits for queue space,
live feeds are driven by the exchanges and use the queue's non-blocking overflow policy.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from adapters.binance import BinanceFeed, binance_exchange, load_instruments
from adapters.deribit import DeribitFeed
from adapters.synthetic import SyntheticMarket, paced
from bot.bus import InboundQueue
from bot.events import Venue, instrument_id
from bot.instruments import InstrumentSpec

if TYPE_CHECKING:
    from config.settings import Settings

FEEDS = ("synthetic", "binance", "binance+deribit")


class SourceError(Exception):
    """The source cannot start (no symbols, instruments unavailable); one line for the CLI."""


class MarketSource(Protocol):
    name: str

    async def instruments(self) -> list[InstrumentSpec]:
        """The tradable instruments, known before the first event."""
        ...

    async def run(self, queue: InboundQueue, stop: asyncio.Event) -> None:
        """Push events into ``queue`` until cancelled, ``stop`` is set or the data ends."""
        ...


class SyntheticSource:
    """The seeded synthetic market from ``start_ns``, paced at ``speed`` times real time."""

    name = "synthetic"

    def __init__(self, settings: Settings, start_ns: int, speed: float) -> None:
        self.market = SyntheticMarket(settings.market.model_copy(update={"start_ns": start_ns}))
        self.speed = speed

    async def instruments(self) -> list[InstrumentSpec]:
        return self.market.instruments()

    async def run(self, queue: InboundQueue, stop: asyncio.Event) -> None:
        async for event in paced(self.market.events(), self.speed, stop):
            await queue.put(event)


class LiveFeedSource:
    """Binance spot and USD-M public streams, optionally with Deribit option IVs and surfaces.

    Instruments and their precision come from the exchange's REST ``exchangeInfo`` through ccxt,
    limited to the configured symbols. Deribit's option marks and IV surfaces are features, not
    instruments: nothing here trades options.
    """

    def __init__(self, settings: Settings, with_deribit: bool) -> None:
        self.settings = settings
        self.with_deribit = with_deribit
        self.name = "binance+deribit" if with_deribit else "binance"
        config = settings.binance
        self.wanted = {
            instrument_id(venue, symbol)
            for venue, market in ((Venue.BINANCE, config.spot), (Venue.BINANCE_USDM, config.usdm))
            for symbol in market.symbols
        }
        if not self.wanted:
            raise SourceError("feed binance needs symbols in binance.spot.symbols or binance.usdm.symbols")

    async def instruments(self) -> list[InstrumentSpec]:
        config = self.settings.binance
        exchange = binance_exchange(config.spot.rest_url, config.usdm.rest_url)
        try:
            specs = await load_instruments(exchange)
        except Exception as exc:  # ccxt raises many kinds; any of them means no instrument rules
            raise SourceError(f"cannot load Binance instruments: {type(exc).__name__}: {exc}") from None
        finally:
            await exchange.close()
        found = [spec for spec in specs if spec.instrument in self.wanted]
        missing = sorted(self.wanted - {spec.instrument for spec in found})
        if missing:
            raise SourceError(f"Binance does not list {', '.join(missing)} as active")
        return found

    async def run(self, queue: InboundQueue, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            binance = BinanceFeed(self.settings.binance, queue.put_nowait)
            feeds = [group.create_task(binance.run(), name="binance")]
            if self.with_deribit:
                deribit = DeribitFeed(self.settings.deribit, queue.put_nowait)
                feeds.append(group.create_task(deribit.run(), name="deribit"))
            await stop.wait()
            for feed in feeds:
                feed.cancel()


def market_source(settings: Settings, start_ns: int, speed: float) -> MarketSource:
    """The source ``run.feed`` names."""
    if settings.run.feed == "synthetic":
        return SyntheticSource(settings, start_ns, speed)
    return LiveFeedSource(settings, with_deribit=settings.run.feed == "binance+deribit")
