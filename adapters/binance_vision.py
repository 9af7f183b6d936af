"""data.binance.vision history files (spot or USD-M) as events, each stamped when live would have had it.

Files are the CSVs Binance publishes, as ``.csv`` or as the ``.zip`` holding one CSV, with or
without their header line:

- ``klines`` (``open_time,open,high,low,close,volume,close_time,…``, 12 columns) → :class:`Bar`
  with ``closed=True``, received at the bar's end ``open_time + interval``, which is
  ``close_time + 1 ms`` (``+ 1 µs`` in µs files): the instant the kline stream's final message of
  the bar (``"x": true``) is sent, and the earliest a live system could know the bar. ``ts_event``
  is the same instant. The interval comes from the file name (``ADABTC-1m-2021-11-27.csv``) or,
  without one, from the first row; a row whose span disagrees with it is malformed.
- ``aggTrades`` (``agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,
  is_buyer_maker[,is_best_match]``) → :class:`Trade` at its ``transact_time``, received then
  (the file has no receive time, so no latency is assumed); the buyer being the maker means the
  seller took liquidity (aggressor SELL), as in :func:`adapters.binance.to_event`.
- ``fundingRate`` (``calc_time,funding_interval_hours,last_funding_rate``) → :class:`MarkPrice`
  at ``calc_time``, the moment the rate is settled and published, carrying that settled rate and
  ``next_funding_ts = calc_time + funding_interval_hours``. The file holds no prices, so
  ``mark_price`` and ``index_price`` are 0.0 (consumers ignore non-positive prices);
  :func:`adapters.importer.import_sources` fills the mark with the instrument's last price when
  another source provides one. The paper venue settles a mark's rate at its ``next_funding_ts``,
  so an imported rate acts as the forecast of the following interval (see ``docs/IMPORT.md``).

Timestamps are ms, or µs in newer files, told apart by magnitude; numbers are ``float(s)`` of
the file's strings. Ids follow :mod:`adapters.binance`: ``BINANCE:<symbol>`` for spot,
``BINANCE_USDM:<symbol>`` for USD-M perpetuals. Without an explicit instrument the symbol is the
file name's first part and the market comes from the data.binance.vision folder
(``…/spot/…`` or ``…/futures/um/…``); funding is always USD-M.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from adapters.binance import NANOS_PER_MILLI, NANOS_PER_SECOND, ParseError, interval_seconds
from adapters.importer import (
    ImportFailed,
    MalformedRow,
    SourceReport,
    check_width,
    csv_records,
    epoch_ns,
    finite,
    non_negative,
    positive,
)
from bot.events import AggressorSide, Bar, MarkPrice, Trade, Venue, instrument_id, split_instrument

NANOS_PER_HOUR = 3_600 * NANOS_PER_SECOND
KLINE_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "ignore",
)
AGG_TRADE_COLUMNS = (
    "agg_trade_id",
    "price",
    "quantity",
    "first_trade_id",
    "last_trade_id",
    "transact_time",
    "is_buyer_maker",
    "is_best_match",
)
FUNDING_COLUMNS = ("calc_time", "funding_interval_hours", "last_funding_rate")
_KLINE_WIDTHS = (len(KLINE_COLUMNS),)
_AGG_TRADE_WIDTHS = (len(AGG_TRADE_COLUMNS) - 1, len(AGG_TRADE_COLUMNS))  # is_best_match: spot only
_FUNDING_WIDTHS = (len(FUNDING_COLUMNS),)
_FILE_NAME = re.compile(r"(?P<symbol>[A-Z0-9]+)-(?P<rest>.+)")
_KLINE_FILE_NAME = re.compile(r"[A-Z0-9]+-(?P<interval>\d+[smhdw])-.*")
_BOOLEANS = {"true": True, "false": False}


def resolve_instrument(path: Path, instrument: str | None, *, usdm_only: bool = False) -> str:
    """The instrument id of a file's rows: the one given, else from its name and folder."""
    if instrument is not None:
        venue, _ = split_instrument(instrument)
        if venue not in (Venue.BINANCE, Venue.BINANCE_USDM):
            raise ImportFailed(f"{path}: {instrument} is not a Binance instrument")
        if usdm_only and venue is not Venue.BINANCE_USDM:
            raise ImportFailed(f"{path}: funding exists for USD-M perpetuals only, not {instrument}")
        return instrument
    match = _FILE_NAME.fullmatch(path.name)
    if match is None:
        raise ImportFailed(
            f"{path}: no symbol in the file name; give the instrument (KIND:PATH:VENUE:SYMBOL)"
        )
    folders = set(path.resolve().parent.parts)
    if usdm_only or {"futures", "um"} <= folders:
        venue = Venue.BINANCE_USDM
    elif "spot" in folders:
        venue = Venue.BINANCE
    else:
        raise ImportFailed(
            f"{path}: cannot tell spot from USD-M by its folder; give the instrument "
            f"(KIND:PATH:BINANCE:{match['symbol']} or KIND:PATH:BINANCE_USDM:{match['symbol']})"
        )
    return instrument_id(venue, match["symbol"])


def _is_header(columns: tuple[str, ...], widths: tuple[int, ...]) -> Callable[[list[str]], bool]:
    """A predicate true for a header line: the first ``width`` of ``columns`` for an allowed width."""

    def is_header(row: list[str]) -> bool:
        return len(row) in widths and [cell.strip().lower() for cell in row] == list(columns[: len(row)])

    return is_header


def _integer(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MalformedRow(f"{name} {text!r} is not an integer") from None


def _boolean(text: str, name: str) -> bool:
    value = _BOOLEANS.get(text.strip().lower())
    if value is None:
        raise MalformedRow(f"{name} {text!r} is not true or false")
    return value


def read_klines(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[Bar]:
    """Closed bars of a klines file, each received at its end (``close_time`` + 1 ms)."""
    report = report or SourceReport(path, "binance-klines")
    instrument = resolve_instrument(path, instrument)
    named = _KLINE_FILE_NAME.fullmatch(path.name)
    try:
        interval_ns = interval_seconds(named["interval"]) * NANOS_PER_SECOND if named else None
    except ParseError as exc:
        raise ImportFailed(f"{path}: {exc}") from None

    def parse(row: list[str]) -> Bar:
        nonlocal interval_ns
        check_width(row, _KLINE_WIDTHS)
        open_ns, close_ns = epoch_ns(row[0]), epoch_ns(row[6])
        if close_ns <= open_ns:
            raise MalformedRow(f"close_time {row[6]} is not after open_time {row[0]}")
        if interval_ns is None:  # a bar spans its interval less one time unit of the file
            interval_ns = round((close_ns - open_ns) / NANOS_PER_SECOND) * NANOS_PER_SECOND
        end_ns = open_ns + interval_ns
        if not 0 < end_ns - close_ns <= NANOS_PER_MILLI:
            raise MalformedRow(
                f"open_time {row[0]} to close_time {row[6]} is not one {interval_ns // 10**9} s bar"
            )
        open_, high, low, close = (positive(row[i], name) for i, name in enumerate(KLINE_COLUMNS[1:5], 1))
        if not low <= min(open_, close) <= max(open_, close) <= high:
            raise MalformedRow(
                f"prices out of order: open {row[1]} high {row[2]} low {row[3]} close {row[4]}"
            )
        return Bar(
            ts_event=end_ns,
            ts_recv=end_ns,
            instrument=instrument,
            interval_s=interval_ns // NANOS_PER_SECOND,
            open=open_,
            high=high,
            low=low,
            close=close,
            volume=non_negative(row[5], "volume"),
            closed=True,
        )

    yield from csv_records(
        path,
        report,
        parse,
        what="a data.binance.vision klines CSV",
        header=_is_header(KLINE_COLUMNS, _KLINE_WIDTHS),
    )


def read_agg_trades(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[Trade]:
    """Trades of an aggTrades file, received at their ``transact_time``."""
    report = report or SourceReport(path, "binance-aggtrades")
    instrument = resolve_instrument(path, instrument)

    def parse(row: list[str]) -> Trade:
        check_width(row, _AGG_TRADE_WIDTHS)
        ts = epoch_ns(row[5])
        return Trade(
            ts_event=ts,
            ts_recv=ts,
            instrument=instrument,
            price=positive(row[1], "price"),
            size=positive(row[2], "quantity"),
            aggressor_side=AggressorSide.SELL if _boolean(row[6], "is_buyer_maker") else AggressorSide.BUY,
            trade_id=str(_integer(row[0], "agg_trade_id")),
        )

    yield from csv_records(
        path,
        report,
        parse,
        what="a data.binance.vision aggTrades CSV",
        header=_is_header(AGG_TRADE_COLUMNS, _AGG_TRADE_WIDTHS),
    )


def read_funding_rates(
    path: Path, instrument: str | None = None, report: SourceReport | None = None
) -> Iterator[MarkPrice]:
    """Settled funding rates of a fundingRate file as marks at their funding time (prices 0.0: none known)."""
    report = report or SourceReport(path, "binance-funding")
    instrument = resolve_instrument(path, instrument, usdm_only=True)

    def parse(row: list[str]) -> MarkPrice:
        check_width(row, _FUNDING_WIDTHS)
        ts = epoch_ns(row[0])
        hours = _integer(row[1], "funding_interval_hours")
        if hours <= 0:
            raise MalformedRow(f"funding_interval_hours {row[1]!r} is not positive")
        return MarkPrice(
            ts_event=ts,
            ts_recv=ts,
            instrument=instrument,
            mark_price=0.0,
            index_price=0.0,
            funding_rate=finite(row[2], "last_funding_rate"),
            next_funding_ts=ts + hours * NANOS_PER_HOUR,
        )

    yield from csv_records(
        path,
        report,
        parse,
        what="a data.binance.vision fundingRate CSV",
        header=_is_header(FUNDING_COLUMNS, _FUNDING_WIDTHS),
    )
