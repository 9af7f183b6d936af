"""Tardis.dev CSV datasets as events, each received at its row's ``local_timestamp``.

Every Tardis CSV has a header and the columns ``exchange,symbol,timestamp,local_timestamp``:
``timestamp`` is the exchange's time (``ts_event``), ``local_timestamp`` when Tardis's recorder
received the message (``ts_recv``), both µs since the epoch (ns files are accepted, told apart by
magnitude). A row may be received before its exchange time; that is clock skew, kept as recorded.

- ``trades`` → :class:`Trade` (``side`` buy/sell/unknown is the aggressor).
- ``quotes`` and ``book_snapshot_N_…`` (top level: ``bids[0]``/``asks[0]``) → :class:`Quote`, only
  when the top of book changed, as the live Binance adapter emits them; a one-sided book gives none.
- ``derivative_ticker`` → :class:`MarkPrice` with ``funding_rate`` and ``next_funding_ts`` from
  ``funding_rate``/``funding_timestamp``. Tardis leaves a field empty when it has not changed or is
  not known yet; an empty field keeps the instrument's last value from earlier rows of the file, and
  rows before all four of mark, index, funding rate and time are known give no event.
- ``options_chain`` (Deribit) → :class:`OptionMark`: IVs from percent to decimals, ``bid_iv``/``ask_iv``
  None when empty or 0 as in :mod:`adapters.deribit`; strike, expiry and right from the option's
  name with :func:`adapters.deribit.parse_option_name` (a row whose columns disagree with its name is
  malformed); no index price (the dataset has none).

Ids: Tardis exchanges ``binance``, ``binance-futures`` and ``deribit`` map to the venues
``BINANCE``, ``BINANCE_USDM`` and ``DERIBIT`` with Tardis's symbol. Another exchange needs an
explicit instrument, which then stands for the file's single symbol. Numbers are ``float(s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from adapters.deribit import parse_option_name
from adapters.importer import (
    ImportFailed,
    MalformedRow,
    SourceReport,
    csv_records,
    epoch_ns,
    finite,
    non_negative,
    positive,
)
from bot.events import (
    AggressorSide,
    MarkPrice,
    OptionMark,
    Quote,
    Trade,
    Venue,
    instrument_id,
    split_instrument,
)

TARDIS_VENUES: dict[str, Venue] = {
    "binance": Venue.BINANCE,
    "binance-futures": Venue.BINANCE_USDM,
    "deribit": Venue.DERIBIT,
}
_COMMON = ("exchange", "symbol", "timestamp", "local_timestamp")
_SIDES = {"buy": AggressorSide.BUY, "sell": AggressorSide.SELL, "unknown": AggressorSide.NONE}
_OPTION_TYPES = {"call": True, "put": False}
_TICKER_FIELDS = ("mark_price", "index_price", "funding_rate", "funding_timestamp")
T = TypeVar("T")


class _Header:
    """Column positions from a Tardis header line, which must name every required column."""

    def __init__(self, *required: str) -> None:
        self.required = (*_COMMON, *required)
        self.missing = self.required
        self.index: dict[str, int] = {}
        self.width = 0

    def __call__(self, row: list[str]) -> bool:
        names = [cell.strip() for cell in row]
        self.missing = tuple(name for name in self.required if name not in names)
        if self.missing:
            return False
        self.index = {name: position for position, name in enumerate(names)}
        self.width = len(names)
        return True

    def check(self, row: list[str]) -> None:
        """Refuse a row read without a valid header, or of the wrong width."""
        if not self.index:
            raise MalformedRow(f"no Tardis header naming {', '.join(self.missing)}")
        if len(row) != self.width:
            raise MalformedRow(f"expected {self.width} columns, got {len(row)}")


class _InstrumentIds:
    """Instrument id of each (exchange, symbol); an explicit instrument stands for one symbol only."""

    def __init__(self, path: Path, instrument: str | None) -> None:
        self.path = path
        self.instrument = instrument
        if instrument is not None:
            split_instrument(instrument)
        self._ids: dict[tuple[str, str], str] = {}

    def __call__(self, exchange: str, symbol: str) -> str:
        key = (exchange, symbol)
        known = self._ids.get(key)
        if known is not None:
            return known
        if self.instrument is not None:
            if self._ids:
                (first_exchange, first_symbol), _ = next(iter(self._ids.items()))
                raise ImportFailed(
                    f"{self.path}: holds {first_exchange} {first_symbol} and {exchange} {symbol}; "
                    f"the instrument {self.instrument} can stand for one symbol only"
                )
            resolved = self.instrument
        else:
            venue = TARDIS_VENUES.get(exchange)
            if venue is None:
                raise ImportFailed(
                    f"{self.path}: Tardis exchange {exchange!r} has no volbot venue; "
                    "give the instrument (KIND:PATH:VENUE:SYMBOL)"
                )
            if not symbol:
                raise MalformedRow("empty symbol")
            resolved = instrument_id(venue, symbol)
        self._ids[key] = resolved
        return resolved


def _read(
    path: Path, report: SourceReport, header: _Header, parse: Callable[[list[str]], T | None], what: str
) -> Iterator[T]:
    """Rows parsed once the header (line 1) has named every required column."""

    def checked(row: list[str]) -> T | None:
        header.check(row)
        return parse(row)

    return csv_records(path, report, checked, what=f"a Tardis {what} CSV", header=header)


def read_trades(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[Trade]:
    """Trades of a Tardis ``trades`` file."""
    report = report or SourceReport(path, "tardis-trades")
    ids = _InstrumentIds(path, instrument)
    header = _Header("id", "side", "price", "amount")

    def parse(row: list[str]) -> Trade:
        at = header.index
        side = _SIDES.get(row[at["side"]])
        if side is None:
            raise MalformedRow(f"side {row[at['side']]!r} is not buy, sell or unknown")
        return Trade(
            ts_event=epoch_ns(row[at["timestamp"]]),
            ts_recv=epoch_ns(row[at["local_timestamp"]]),
            instrument=ids(row[at["exchange"]], row[at["symbol"]]),
            price=positive(row[at["price"]], "price"),
            size=positive(row[at["amount"]], "amount"),
            aggressor_side=side,
            trade_id=row[at["id"]],
        )

    yield from _read(path, report, header, parse, "trades")


class _TopOfBook:
    """Quotes only when an instrument's top of book changed: a deeper change is not a new quote."""

    def __init__(self, report: SourceReport) -> None:
        self._report = report
        self._last: dict[str, tuple[float, float, float, float]] = {}

    def quote(
        self, row: list[str], at: dict[str, int], instrument: str, levels: tuple[str, ...]
    ) -> Quote | None:
        bid_text, bid_size_text, ask_text, ask_size_text = (row[at[name]] for name in levels)
        if not bid_text or not ask_text:
            self._report.notes["one-sided book (no quote)"] += 1
            return None
        top = (
            positive(bid_text, levels[0]),
            non_negative(bid_size_text, levels[1]),
            positive(ask_text, levels[2]),
            non_negative(ask_size_text, levels[3]),
        )
        ts_event, ts_recv = epoch_ns(row[at["timestamp"]]), epoch_ns(row[at["local_timestamp"]])
        if self._last.get(instrument) == top:
            self._report.notes["top of book unchanged (no quote)"] += 1
            return None
        self._last[instrument] = top
        bid, bid_size, ask, ask_size = top
        return Quote(
            ts_event=ts_event,
            ts_recv=ts_recv,
            instrument=instrument,
            bid=bid,
            bid_size=bid_size,
            ask=ask,
            ask_size=ask_size,
        )


def _read_tops(
    path: Path, instrument: str | None, report: SourceReport, levels: tuple[str, ...], what: str
) -> Iterator[Quote]:
    ids = _InstrumentIds(path, instrument)
    header = _Header(*levels)
    book = _TopOfBook(report)

    def parse(row: list[str]) -> Quote | None:
        at = header.index
        return book.quote(row, at, ids(row[at["exchange"]], row[at["symbol"]]), levels)

    yield from _read(path, report, header, parse, what)


def read_quotes(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[Quote]:
    """Top-of-book changes of a Tardis ``quotes`` file."""
    report = report or SourceReport(path, "tardis-quotes")
    yield from _read_tops(
        path, instrument, report, ("bid_price", "bid_amount", "ask_price", "ask_amount"), "quotes"
    )


def read_book_snapshots(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[Quote]:
    """Top-of-book changes of a Tardis ``book_snapshot_N`` file (its level 0)."""
    report = report or SourceReport(path, "tardis-book")
    levels = ("bids[0].price", "bids[0].amount", "asks[0].price", "asks[0].amount")
    yield from _read_tops(path, instrument, report, levels, "book_snapshot")


def read_derivative_tickers(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[MarkPrice]:
    """Marks with funding of a Tardis ``derivative_ticker`` file, empty fields carried forward."""
    report = report or SourceReport(path, "tardis-derivative-ticker")
    ids = _InstrumentIds(path, instrument)
    header = _Header(*_TICKER_FIELDS)
    known: dict[str, dict[str, float | int]] = {}

    def parse(row: list[str]) -> MarkPrice | None:
        at = header.index
        target = ids(row[at["exchange"]], row[at["symbol"]])
        ts_event, ts_recv = epoch_ns(row[at["timestamp"]]), epoch_ns(row[at["local_timestamp"]])
        update: dict[str, float | int] = {}
        for name in ("mark_price", "index_price"):
            if text := row[at[name]]:
                update[name] = positive(text, name)
        if text := row[at["funding_rate"]]:
            update["funding_rate"] = finite(text, "funding_rate")
        if text := row[at["funding_timestamp"]]:
            update["funding_timestamp"] = epoch_ns(text)
        state = known.setdefault(target, {})
        state.update(update)
        if len(state) < len(_TICKER_FIELDS):
            report.notes["ticker before mark, index and funding are all known (no mark)"] += 1
            return None
        return MarkPrice(
            ts_event=ts_event,
            ts_recv=ts_recv,
            instrument=target,
            mark_price=float(state["mark_price"]),
            index_price=float(state["index_price"]),
            funding_rate=float(state["funding_rate"]),
            next_funding_ts=int(state["funding_timestamp"]),
        )

    yield from _read(path, report, header, parse, "derivative_ticker")


def _quoted_iv(text: str, name: str) -> float | None:
    """A bid or ask IV in decimals; None when not quoted (empty or 0)."""
    percent = non_negative(text, name) if text else 0.0
    return percent / 100.0 if percent else None


def read_options_chain(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[OptionMark]:
    """Option marks of a Tardis Deribit ``options_chain`` file (every row names its own option)."""
    report = report or SourceReport(path, "tardis-options-chain")
    if instrument is not None:
        raise ImportFailed(f"{path}: options_chain rows name their own options; give no instrument")
    header = _Header(
        "type", "strike_price", "expiration", "bid_iv", "ask_iv", "mark_price", "mark_iv", "underlying_price"
    )

    def parse(row: list[str]) -> OptionMark:
        at = header.index
        exchange, symbol = row[at["exchange"]], row[at["symbol"]]
        if TARDIS_VENUES.get(exchange) is not Venue.DERIBIT:
            raise ImportFailed(
                f"{path}: options_chain of {exchange!r}; only Deribit option names are understood"
            )
        option = parse_option_name(symbol)
        if option is None:
            raise MalformedRow(f"{symbol!r} is not a Deribit option name")
        is_call = _OPTION_TYPES.get(row[at["type"]])
        strike = positive(row[at["strike_price"]], "strike_price")
        expiry = epoch_ns(row[at["expiration"]])
        if (is_call, strike, expiry) != (option.is_call, option.strike, option.expiry_ts):
            raise MalformedRow(
                f"type {row[at['type']]!r}, strike_price {row[at['strike_price']]!r} and "
                f"expiration {row[at['expiration']]!r} disagree with the name {symbol!r}"
            )
        return OptionMark(
            ts_event=epoch_ns(row[at["timestamp"]]),
            ts_recv=epoch_ns(row[at["local_timestamp"]]),
            instrument=instrument_id(Venue.DERIBIT, symbol),
            underlying=option.underlying,
            strike=option.strike,
            expiry_ts=option.expiry_ts,
            is_call=option.is_call,
            mark_price=non_negative(row[at["mark_price"]], "mark_price"),
            mark_iv=non_negative(row[at["mark_iv"]], "mark_iv") / 100.0,
            bid_iv=_quoted_iv(row[at["bid_iv"]], "bid_iv"),
            ask_iv=_quoted_iv(row[at["ask_iv"]], "ask_iv"),
            underlying_price=positive(row[at["underlying_price"]], "underlying_price"),
        )

    yield from _read(path, report, header, parse, "options_chain")
