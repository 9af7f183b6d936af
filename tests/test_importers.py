"""Historical importers: recorded CSVs into journals, checked row by row against the source files.

Expected values are recomputed here from the source rows with the stdlib ``csv``/``json`` and
``float(s)``, never copied from the importers' output. Files in other formats (aggTrades, fundingRate,
Tardis quotes) are built in the test's temporary folder from recorded REST and websocket captures.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import zipfile
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from rich.console import Console

from adapters.binance_vision import read_klines
from adapters.importer import (
    ImportFailed,
    ImportSummary,
    SourceReport,
    SourceSpec,
    epoch_ns,
    import_main,
    import_sources,
    parse_source_spec,
)
from bot.events import AggressorSide, Bar, Event, MarkPrice, OptionMark, Quote, Trade
from bot.journal import read_events, read_header

MS = 1_000_000
US = 1_000
HOUR_NS = 3_600 * 1_000_000_000


# --- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures(shared_data: Path) -> Path:
    return shared_data / "reference_fixtures"


def run_import(out: Path, *sources: str, strict: bool = False) -> tuple[ImportSummary, list[Event]]:
    specs = [spec for text in sources for spec in parse_source_spec(text)]
    summary = import_sources(specs, out, strict=strict)
    return summary, list(read_events(out))


def sample_indices(count: int, seed: int = 11) -> list[int]:
    """First, last and a few seeded random rows."""
    picks = random.Random(seed).sample(range(1, count - 1), min(4, count - 2))
    return [0, count - 1, *picks]


def csv_lines(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return [row for row in csv.reader(handle) if row]


def tardis_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[list[object]], header: list[str] | None = None) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def of_type(events: list[Event], kind: type[Event]) -> list:
    return [event for event in events if isinstance(event, kind)]


# --- data.binance.vision klines ---------------------------------------------------------------------


def test_klines_match_the_source_rows_and_close_before_they_are_received(
    fixtures: Path, tmp_path: Path
) -> None:
    dumps = fixtures / "binance_dumps"
    rows = [row for day in (27, 28) for row in csv_lines(dumps / f"ADABTC-1m-2021-11-{day}.csv")]
    summary, events = run_import(
        tmp_path / "klines.jsonl", f"binance-klines:{dumps}/ADABTC-1m-2021-11-2?.csv:BINANCE:ADABTC"
    )
    bars = of_type(events, Bar)
    assert len(bars) == len(events) == len(rows) == summary.events
    assert [report.rows for _, report in summary.sources] == [10, 11]
    for i in sample_indices(len(rows)):
        row, bar = rows[i], bars[i]
        assert bar.instrument == "BINANCE:ADABTC" and bar.interval_s == 60 and bar.closed
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == tuple(float(v) for v in row[1:6])
        assert bar.ts_recv == bar.ts_event == int(row[6]) * MS + MS
    for row, bar in zip(rows, bars, strict=True):
        close_ns = int(row[6]) * MS
        assert bar.ts_recv > close_ns, "a bar is never received before its close"
        assert bar.ts_recv == int(row[0]) * MS + bar.interval_s * 1_000_000_000
    header = read_header(tmp_path / "klines.jsonl")
    assert header["meta"]["mode"] == "import" and len(header["meta"]["sources"]) == 2


def test_klines_from_a_zip_with_a_header_in_microseconds_give_the_same_bars(
    fixtures: Path, tmp_path: Path
) -> None:
    """Newer files: µs timestamps and a header line; data.binance.vision ships them zipped."""
    source = fixtures / "binance_dumps" / "ADABTC-1m-2021-11-27.csv"
    rows = csv_lines(source)
    micro = [[int(r[0]) * 1000, *r[1:6], int(r[6]) * 1000 + 999, *r[7:]] for r in rows]
    text = io.StringIO()
    text.write("open_time,open,high,low,close,volume,close_time,quote_volume,count,")
    text.write("taker_buy_volume,taker_buy_quote_volume,ignore\n")
    csv.writer(text).writerows(micro)
    archive = tmp_path / "ADABTC-1m-2021-11-27.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("ADABTC-1m-2021-11-27.csv", text.getvalue())
    assert list(read_klines(archive, "BINANCE:ADABTC")) == list(read_klines(source, "BINANCE:ADABTC"))


def test_kline_interval_comes_from_the_rows_when_the_name_has_none(fixtures: Path, tmp_path: Path) -> None:
    rows = csv_lines(fixtures / "binance_dumps" / "ADABTC-1m-2021-11-28.csv")
    hourly = [[int(r[0]) * 60, *r[1:6], int(r[0]) * 60 + 3_600_000 - 1, *r[7:]] for r in rows]
    bars = list(read_klines(write_csv(tmp_path / "adabtc.csv", hourly), "BINANCE:ADABTC"))
    assert [bar.interval_s for bar in bars] == [3600] * len(rows)
    assert [bar.ts_recv for bar in bars] == [(int(r[0]) * 60 + 3_600_000) * MS for r in rows]


# --- data.binance.vision aggTrades ------------------------------------------------------------------


def agg_rows(shared_data: Path, micro: bool) -> list[list[object]]:
    """An aggTrades file from recorded spot trades (one trade per aggregate)."""
    trades = json.loads((shared_data / "binance_rest" / "api_v3_trades__ETHBTC_1000.json").read_text())
    scale = 1000 if micro else 1
    return [
        [
            t["id"],
            t["price"],
            t["qty"],
            t["id"],
            t["id"],
            t["time"] * scale,
            t["isBuyerMaker"],
            t["isBestMatch"],
        ]
        for t in trades
    ]


@pytest.mark.parametrize("variant", ["spot-ms-no-header", "usdm-us-header"])
def test_agg_trades_match_the_source_rows(shared_data: Path, tmp_path: Path, variant: str) -> None:
    micro = variant == "usdm-us-header"
    rows = agg_rows(shared_data, micro)
    header = None
    if micro:  # the USD-M layout: a header and no is_best_match column
        rows = [row[:7] for row in rows]
        header = ["agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id", "transact_time"]
        header.append("is_buyer_maker")
    folder = tmp_path / ("futures/um" if micro else "spot") / "daily" / "aggTrades"
    folder.mkdir(parents=True)
    path = write_csv(folder / "ETHBTC-aggTrades-2023-03-20.csv", rows, header)
    summary, events = run_import(tmp_path / "trades.jsonl", f"binance-aggtrades:{path}")
    trades = of_type(events, Trade)
    assert len(trades) == len(rows) == 1000 and summary.events_by_kind == Counter(Trade=1000)
    instrument = "BINANCE_USDM:ETHBTC" if micro else "BINANCE:ETHBTC"
    for i in sample_indices(len(rows)):
        row, trade = rows[i], trades[i]
        assert trade.instrument == instrument
        assert (trade.price, trade.size) == (float(row[1]), float(row[2]))
        assert trade.trade_id == str(row[0])
        assert trade.ts_event == trade.ts_recv == int(row[5]) * (US if micro else MS)
        assert trade.aggressor_side is (AggressorSide.SELL if row[6] else AggressorSide.BUY)
    assert {t.aggressor_side for t in trades} == {AggressorSide.BUY, AggressorSide.SELL}


# --- data.binance.vision fundingRate ----------------------------------------------------------------


def funding_csv(shared_data: Path, name: str, path: Path) -> list[dict]:
    rows = json.loads((shared_data / "binance_rest" / name).read_text())
    write_csv(
        path,
        [[row["fundingTime"], 8, row["fundingRate"]] for row in rows],
        ["calc_time", "funding_interval_hours", "last_funding_rate"],
    )
    return rows


def test_funding_rows_become_marks_at_their_funding_time(shared_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-fundingRate-2020-09.csv"
    rows = funding_csv(shared_data, "fapi_v1_fundingRate__symbol=BTCUSDT.json", path)
    summary, events = run_import(tmp_path / "funding.jsonl", f"binance-funding:{path}")
    marks = of_type(events, MarkPrice)
    assert len(marks) == len(rows) == 100
    for i in sample_indices(len(rows)):
        row, mark = rows[i], marks[i]
        assert mark.instrument == "BINANCE_USDM:BTCUSDT"
        assert mark.ts_recv == mark.ts_event == row["fundingTime"] * MS  # jitter kept: ...800010 ms
        assert mark.funding_rate == float(row["fundingRate"])
        assert mark.next_funding_ts == mark.ts_recv + 8 * HOUR_NS
        assert (mark.mark_price, mark.index_price) == (0.0, 0.0), "no price is known: consumers ignore 0.0"
    [(_, report)] = summary.sources
    assert report.notes == Counter({"funding record before any price of its instrument (mark 0.0)": 100})


def test_funding_marks_take_the_last_closed_bar_never_a_later_one(shared_data: Path, tmp_path: Path) -> None:
    """USD-M daily klines to 2020-01-02 and the fundings of 2020-01-01/02, merged."""
    klines = json.loads((shared_data / "binance_rest" / "fapi_v1_klines__BTCUSDT_1d_2019.json").read_text())
    kline_path = write_csv(tmp_path / "BTCUSDT-1d-2019.csv", klines)
    funding_path = tmp_path / "BTCUSDT-fundingRate-2020-01.csv"
    rows = funding_csv(shared_data, "fapi_v1_fundingRate__BTCUSDT_2020-01-01.json", funding_path)
    _, events = run_import(
        tmp_path / "perp.jsonl",
        f"binance-klines:{kline_path}:BINANCE_USDM:BTCUSDT",
        f"binance-funding:{funding_path}",
    )
    assert [e.ts_recv for e in events] == sorted(e.ts_recv for e in events)
    marks = of_type(events, MarkPrice)
    assert len(marks) == len(rows) == 6
    for row, mark in zip(rows, marks, strict=True):
        funding_ms = row["fundingTime"]
        closed = [k for k in klines if k[6] + 1 <= funding_ms]  # bars whose end is not after the funding
        assert mark.mark_price == float(closed[-1][4])
        assert mark.index_price == 0.0
    # the last bar (2020-01-01) ends on 2020-01-02 00:00: fundings during that day never see its close
    last_close = float(klines[-1][4])
    during = [m for m in marks if m.ts_recv < (klines[-1][6] + 1) * MS]
    assert during and all(m.mark_price != last_close for m in during)


# --- Tardis -----------------------------------------------------------------------------------------


def test_tardis_trades_keep_exchange_and_local_time(fixtures: Path, tmp_path: Path) -> None:
    path = fixtures / "tardis" / "rs_trades_1.csv"
    rows = tardis_rows(path)
    with pytest.raises(ImportFailed, match=r"rs_trades_1\.csv: Tardis exchange 'bitmex' has no volbot venue"):
        run_import(tmp_path / "no-venue.jsonl", f"tardis-trades:{path}")
    assert not list(tmp_path.iterdir()), "a failed import leaves no journal behind"
    _, events = run_import(tmp_path / "trades.jsonl", f"tardis-trades:{path}:BINANCE_USDM:XBTUSD")
    trades = of_type(events, Trade)
    assert len(trades) == len(rows) == 2
    for row, trade in zip(rows, trades, strict=True):
        assert trade.instrument == "BINANCE_USDM:XBTUSD"
        assert trade.ts_event == int(row["timestamp"]) and trade.ts_recv == int(
            row["local_timestamp"]
        )  # ns file
        assert (trade.price, trade.size, trade.trade_id) == (
            float(row["price"]),
            float(row["amount"]),
            row["id"],
        )
        assert trade.aggressor_side.value == row["side"].upper()


def expected_tops(
    rows: list[dict[str, str]], bid: str, ask: str
) -> list[tuple[int, int, float, float, float, float]]:
    """(ts_event ns, ts_recv ns, bid, bid size, ask, ask size) of each top-of-book change."""
    tops, last = [], None
    for row in rows:
        top = tuple(float(row[f"{side}.{field}"]) for side in (bid, ask) for field in ("price", "amount"))
        if top != last:
            tops.append((int(row["timestamp"]) * US, int(row["local_timestamp"]) * US, *top))
            last = top
    return tops


@pytest.mark.parametrize("depth", [5, 25])
def test_tardis_book_snapshots_give_quotes_on_top_of_book_changes(
    fixtures: Path, tmp_path: Path, depth: int
) -> None:
    path = fixtures / "tardis" / f"binance-futures_book_snapshot_{depth}_BTCUSDT.csv"
    rows = tardis_rows(path)
    summary, events = run_import(tmp_path / "book.jsonl", f"tardis-book:{path}")
    quotes = of_type(events, Quote)
    expected = expected_tops(rows, "bids[0]", "asks[0]")
    assert 0 < len(quotes) < len(rows), "the samples repeat their top of book"
    assert [(q.ts_event, q.ts_recv, q.bid, q.bid_size, q.ask, q.ask_size) for q in quotes] == expected
    assert {q.instrument for q in quotes} == {"BINANCE_USDM:BTCUSDT"}
    [(_, report)] = summary.sources
    assert report.notes["top of book unchanged (no quote)"] == len(rows) - len(quotes)


def test_tardis_quotes_gzipped_match_the_book_they_come_from(fixtures: Path, tmp_path: Path) -> None:
    rows = tardis_rows(fixtures / "tardis" / "binance-futures_book_snapshot_5_BTCUSDT.csv")
    header = ["exchange", "symbol", "timestamp", "local_timestamp", "ask_amount", "ask_price"]
    header += ["bid_price", "bid_amount"]
    columns = ("exchange", "symbol", "timestamp", "local_timestamp", "asks[0].amount", "asks[0].price")
    columns += ("bids[0].price", "bids[0].amount")
    lines = [[row[column] for column in columns] for row in rows]
    one_sided = [*lines[-1][:4], "", "", lines[-1][6], lines[-1][7]]
    one_sided[3] = str(int(one_sided[3]) + 1)
    text = io.StringIO()
    csv.writer(text).writerows([header, *lines, one_sided])
    path = tmp_path / "binance-futures_quotes_2020-09-01_BTCUSDT.csv.gz"
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    summary, events = run_import(tmp_path / "quotes.jsonl", f"tardis-quotes:{path}")
    quotes = of_type(events, Quote)
    assert [(q.ts_event, q.ts_recv, q.bid, q.bid_size, q.ask, q.ask_size) for q in quotes] == expected_tops(
        rows, "bids[0]", "asks[0]"
    )
    [(_, report)] = summary.sources
    assert report.notes["one-sided book (no quote)"] == 1


def test_tardis_derivative_ticker_gives_marks_with_funding(fixtures: Path, tmp_path: Path) -> None:
    path = fixtures / "tardis" / "rs_derivative_ticker_1.csv"
    rows = tardis_rows(path)
    _, events = run_import(tmp_path / "ticker.jsonl", f"tardis-derivative-ticker:{path}:BINANCE_USDM:XBTUSD")
    marks = of_type(events, MarkPrice)
    assert len(marks) == len(rows) == 2
    for row, mark in zip(rows, marks, strict=True):
        assert (mark.ts_event, mark.ts_recv) == (int(row["timestamp"]) * US, int(row["local_timestamp"]) * US)
        assert (mark.mark_price, mark.index_price) == (float(row["mark_price"]), float(row["index_price"]))
        assert mark.funding_rate == float(row["funding_rate"])
        assert mark.next_funding_ts == int(row["funding_timestamp"]) * US


def test_tardis_ticker_fields_left_empty_keep_earlier_values(fixtures: Path, tmp_path: Path) -> None:
    rows = tardis_rows(fixtures / "tardis" / "rs_derivative_ticker_1.csv")
    first, second = (dict(row) for row in rows)
    first["mark_price"] = ""  # not known yet: no mark from this row
    second["index_price"] = second["funding_timestamp"] = ""  # unchanged: carried from the first row
    later = dict(second, local_timestamp=str(int(second["local_timestamp"]) + 1), funding_rate="")
    path = write_csv(tmp_path / "ticker.csv", [list(r.values()) for r in (first, second, later)], list(first))
    summary, events = run_import(
        tmp_path / "ticker.jsonl", f"tardis-derivative-ticker:{path}:BINANCE_USDM:XBTUSD"
    )
    marks = of_type(events, MarkPrice)
    assert len(marks) == 2
    assert marks[0].index_price == float(first["index_price"])
    assert marks[0].next_funding_ts == int(first["funding_timestamp"]) * US
    assert marks[0].mark_price == float(second["mark_price"]) and marks[0].funding_rate == float(
        rows[1]["funding_rate"]
    )
    assert marks[1].funding_rate == marks[0].funding_rate and marks[1].ts_recv == marks[0].ts_recv + US
    [(_, report)] = summary.sources
    assert report.notes["ticker before mark, index and funding are all known (no mark)"] == 1


def test_tardis_options_chain_gives_option_marks_with_decimal_ivs(fixtures: Path, tmp_path: Path) -> None:
    path = fixtures / "tardis" / "rs_options_chain.csv"
    rows = tardis_rows(path)
    _, events = run_import(tmp_path / "chain.jsonl", f"tardis-options-chain:{path}")
    marks = of_type(events, OptionMark)
    assert len(marks) == len(rows) == 7
    for i in sample_indices(len(rows)):
        row, mark = rows[i], marks[i]
        assert mark.instrument == f"DERIBIT:{row['symbol']}"
        assert mark.underlying == row["symbol"].split("-")[0]
        assert (mark.strike, mark.is_call) == (float(row["strike_price"]), row["type"] == "call")
        assert mark.expiry_ts == int(row["expiration"]) * US
        assert mark.mark_iv == float(row["mark_iv"]) / 100.0
        assert (mark.bid_iv, mark.ask_iv) == (float(row["bid_iv"]) / 100.0, float(row["ask_iv"]) / 100.0)
        assert (mark.mark_price, mark.underlying_price) == (
            float(row["mark_price"]),
            float(row["underlying_price"]),
        )
        assert mark.index_price is None
        assert (mark.ts_event, mark.ts_recv) == (int(row["timestamp"]) * US, int(row["local_timestamp"]) * US)
    assert any(m.ts_recv < m.ts_event for m in marks), (
        "the sample holds a row received before its exchange time"
    )


def test_options_chain_unquoted_ivs_are_none_and_a_row_contradicting_its_name_is_malformed(
    fixtures: Path, tmp_path: Path
) -> None:
    rows = tardis_rows(fixtures / "tardis" / "rs_options_chain.csv")
    unquoted = dict(rows[0], bid_iv="", ask_iv="0")
    contradicting = dict(rows[1], type="call")  # BTC-9JUN20-9875-P is a put
    path = write_csv(
        tmp_path / "chain.csv", [list(unquoted.values()), list(contradicting.values())], list(rows[0])
    )
    summary, events = run_import(tmp_path / "chain.jsonl", f"tardis-options-chain:{path}")
    (mark,) = of_type(events, OptionMark)
    assert (mark.bid_iv, mark.ask_iv, mark.mark_iv) == (None, None, float(rows[0]["mark_iv"]) / 100.0)
    (issue,) = summary.issues
    assert (issue.path, issue.line) == (path, 3) and "disagree with the name" in issue.reason


# --- merging, bad rows, wrong files -----------------------------------------------------------------


def test_merged_sources_are_in_receive_order_with_counts_per_source(fixtures: Path, tmp_path: Path) -> None:
    tardis = fixtures / "tardis"
    sources = [
        f"binance-klines:{fixtures}/binance_dumps/ADABTC-1m-2021-11-2?.csv:BINANCE:ADABTC",
        f"tardis-trades:{tardis}/rs_trades_1.csv:BINANCE_USDM:XBTUSD",
        f"tardis-derivative-ticker:{tardis}/rs_derivative_ticker_1.csv:BINANCE_USDM:XBTUSD",
        f"tardis-book:{tardis}/binance-futures_book_snapshot_5_BTCUSDT.csv",
        f"tardis-book:{tardis}/binance-futures_book_snapshot_25_BTCUSDT.csv",
        f"tardis-options-chain:{tardis}/rs_options_chain.csv",
    ]
    summary, events = run_import(tmp_path / "all.jsonl", *sources)
    assert all(a.ts_recv <= b.ts_recv for a, b in pairwise(events))
    assert len(events) == summary.events == sum(report.events.total() for _, report in summary.sources)
    assert Counter(type(e).__name__ for e in events) == summary.events_by_kind
    rows = {kind: 0 for kind in ("Bar", "Trade", "MarkPrice", "OptionMark")}
    rows["Bar"] = sum(len(csv_lines(p)) for p in (fixtures / "binance_dumps").glob("ADABTC-1m-*.csv"))
    rows["Trade"] = len(tardis_rows(tardis / "rs_trades_1.csv"))
    rows["MarkPrice"] = len(tardis_rows(tardis / "rs_derivative_ticker_1.csv"))
    rows["OptionMark"] = len(tardis_rows(tardis / "rs_options_chain.csv"))
    quotes = sum(
        len(
            expected_tops(
                tardis_rows(tardis / f"binance-futures_book_snapshot_{n}_BTCUSDT.csv"), "bids[0]", "asks[0]"
            )
        )
        for n in (5, 25)
    )
    assert summary.events_by_kind == Counter(**rows, Quote=quotes)
    assert (summary.first_ts_recv, summary.last_ts_recv) == (events[0].ts_recv, events[-1].ts_recv)
    # the merge is a stable sort of the sources read alone: ties (the two book files share receive
    # times) go in the order the sources were given
    alone = [
        event
        for text in sources
        for spec in parse_source_spec(text)
        for event in spec.reader()(spec.path, spec.instrument, SourceReport(spec.path))
    ]
    assert events == sorted(alone, key=lambda event: event.ts_recv)
    assert len({e.ts_recv for e in events}) < len(events), "the samples hold ties across files"


def test_malformed_rows_are_counted_reported_and_skipped_or_fatal_when_strict(
    fixtures: Path, tmp_path: Path
) -> None:
    lines = (fixtures / "binance_dumps" / "ADABTC-1m-2021-11-27.csv").read_text().splitlines()
    nan_row = lines[4].split(",")
    nan_row[4] = "nan"
    short_row = ",".join(lines[6].split(",")[:5])
    high_below_low = lines[8].split(",")
    high_below_low[2], high_below_low[3] = high_below_low[3], "0.00003"
    bad = [lines[0], lines[1], "garbage", lines[2], lines[3], ",".join(nan_row), short_row]
    bad += [lines[7], ",".join(high_below_low), lines[9]]
    path = tmp_path / "ADABTC-1m-2021-11-27.csv"
    path.write_text("\n".join(bad) + "\n")
    summary, events = run_import(tmp_path / "ok.jsonl", f"binance-klines:{path}:BINANCE:ADABTC")
    assert len(events) == 6 and summary.malformed == 4
    assert [(issue.path, issue.line) for issue in summary.issues] == [
        (path, 3),
        (path, 6),
        (path, 7),
        (path, 9),
    ]
    assert "not finite" in summary.issues[1].reason and "columns" in summary.issues[2].reason
    assert [e.close for e in of_type(events, Bar)] == [
        float(lines[i].split(",")[4]) for i in (0, 1, 2, 3, 7, 9)
    ]
    with pytest.raises(ImportFailed, match=rf"{path}:3: .*\(strict import\)"):
        run_import(tmp_path / "strict.jsonl", f"binance-klines:{path}:BINANCE:ADABTC", strict=True)
    assert not (tmp_path / "strict.jsonl").exists() and not list(tmp_path.glob("*partial*"))


def test_a_row_going_back_in_time_within_its_file_is_malformed(fixtures: Path, tmp_path: Path) -> None:
    rows = tardis_rows(fixtures / "tardis" / "rs_options_chain.csv")
    late = dict(rows[3], local_timestamp=str(int(rows[2]["local_timestamp"]) - 5_000))  # 5 ms before row 3
    order = [rows[0], rows[1], rows[2], late, rows[4]]
    path = write_csv(tmp_path / "chain.csv", [list(r.values()) for r in order], list(rows[0]))
    summary, events = run_import(tmp_path / "chain.jsonl", f"tardis-options-chain:{path}")
    assert len(events) == 4
    (issue,) = summary.issues
    assert issue.line == 5 and "5 ms before the previous row" in issue.reason


@pytest.mark.parametrize(
    ("kind", "file", "message"),
    [
        ("binance-klines", "tardis/rs_trades_1.csv", "not a data.binance.vision klines CSV"),
        (
            "binance-aggtrades",
            "binance_dumps/ADABTC-1m-2021-11-27.csv",
            "not a data.binance.vision aggTrades",
        ),
        (
            "binance-funding",
            "binance_dumps/ADABTC-1m-2021-11-27.csv",
            "not a data.binance.vision fundingRate",
        ),
        ("tardis-trades", "tardis/rs_options_chain.csv", "not a Tardis trades CSV"),
        ("tardis-book", "tardis/rs_trades_1.csv", "not a Tardis book_snapshot CSV"),
        ("tardis-options-chain", "binance_dumps/ADABTC-1m-2021-11-27.csv", "not a Tardis options_chain CSV"),
        ("tardis-quotes", "tardis/rs_derivative_ticker.json", "not a Tardis quotes CSV"),
    ],
)
def test_a_file_of_the_wrong_kind_is_a_one_line_error_naming_it(
    fixtures: Path, tmp_path: Path, kind: str, file: str, message: str
) -> None:
    path = fixtures / file
    instrument = ":BINANCE_USDM:BTCUSDT" if kind.startswith("binance") else ""
    with pytest.raises(ImportFailed) as failure:
        run_import(tmp_path / "wrong.jsonl", f"{kind}:{path}{instrument}")
    text = str(failure.value)
    assert text.startswith(f"{path}: {message}") and "\n" not in text
    assert not list(tmp_path.iterdir())


def test_source_specs_globs_and_refusals(fixtures: Path, tmp_path: Path) -> None:
    dumps = fixtures / "binance_dumps"
    (spec,) = parse_source_spec(f"binance-klines:{dumps}/ADABTC-1m-2021-11-27.csv:BINANCE_USDM:ADABTC")
    assert spec == SourceSpec("binance-klines", dumps / "ADABTC-1m-2021-11-27.csv", "BINANCE_USDM:ADABTC")
    assert [s.path.name for s in parse_source_spec(f"binance-klines:{dumps}/ADABTC-1m-*.csv")] == [
        "ADABTC-1m-2021-11-27.csv",
        "ADABTC-1m-2021-11-28.csv",
    ]
    for text, message in [
        ("kraken-trades:x.csv", "unknown source kind 'kraken-trades'"),
        ("tardis-trades", "names no file"),
        (f"binance-klines:{dumps}/NOPE-*.csv", "no file matches"),
    ]:
        with pytest.raises(ImportFailed, match=message):
            parse_source_spec(text)
    with pytest.raises(ImportFailed, match="cannot tell spot from USD-M"):
        run_import(tmp_path / "a.jsonl", f"binance-klines:{dumps}/ADABTC-1m-2021-11-27.csv")
    existing = tmp_path / "existing.jsonl"
    existing.write_text("")
    with pytest.raises(ImportFailed, match="exists; an import writes a new journal"):
        run_import(existing, f"binance-klines:{dumps}/ADABTC-1m-2021-11-27.csv:BINANCE:ADABTC")
    assert epoch_ns("1600156800010") == epoch_ns("1600156800010000") == epoch_ns("1600156800010000000")
    with pytest.raises(ValueError, match="not epoch ms"):
        epoch_ns("1600156800")


def test_import_main_writes_a_gzip_journal_and_prints_counts(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "journal.jsonl.gz"
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    summary = import_main(
        [f"tardis-book:{fixtures}/tardis/binance-futures_book_snapshot_5_BTCUSDT.csv"],
        out,
        console=console,
    )
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "binance-futures_book_snapshot_5_BTCUSDT.csv" in printed and "Quote 8" in printed
    assert "top of book unchanged (no quote): 2" in printed
    assert gzip.decompress(out.read_bytes()).count(b"\n") == 1 + summary.events == 9


# --- end to end through the backtester ----------------------------------------------------------------


def hftbacktest_to_tardis(capture: Path, folder: Path) -> tuple[Path, Path]:
    """Tardis quotes and trades CSVs from a recorded Binance spot stream (local time ns, raw JSON)."""
    quotes = [["exchange", "symbol", "timestamp", "local_timestamp", "ask_amount", "ask_price"]]
    quotes[0] += ["bid_price", "bid_amount"]
    trades = [["exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount"]]
    with gzip.open(capture, "rt") as handle:
        for line in handle:
            local_ns, _, raw = line.partition(" ")
            message = json.loads(raw)
            data, local_us = message.get("data", {}), int(local_ns) // 1000
            if message.get("stream", "").endswith("@bookTicker"):  # spot bookTicker has no exchange time
                quotes.append(
                    ["binance", data["s"], local_us, local_us, data["A"], data["a"], data["b"], data["B"]]
                )
            elif data.get("e") == "trade":
                side = "sell" if data["m"] else "buy"
                trades.append(
                    ["binance", data["s"], data["T"] * 1000, local_us, data["t"], side, data["p"], data["q"]]
                )
    return write_csv(folder / "quotes.csv", quotes), write_csv(folder / "trades.csv", trades)


def test_the_backtester_replays_an_imported_journal(shared_data: Path, tmp_path: Path) -> None:
    from backtest.engine import run_backtest
    from bot.app import build_engine
    from bot.instruments import InstrumentKind, InstrumentSpec
    from config.settings import load_settings
    from strategies.hold import HoldPolicy, HoldPolicyConfig

    target = 0.05

    quotes_csv, trades_csv = hftbacktest_to_tardis(
        shared_data / "hftbacktest" / "spot" / "btcusdt_20240808.gz", tmp_path
    )
    journal = tmp_path / "btcusdt.jsonl"
    summary = import_sources(
        [SourceSpec("tardis-quotes", quotes_csv), SourceSpec("tardis-trades", trades_csv)], journal
    )
    spec = InstrumentSpec(
        instrument="BINANCE:BTCUSDT",
        kind=InstrumentKind.SPOT,
        base="BTC",
        tick_size=0.01,
        lot_size=0.00001,
        min_qty=0.00001,
        min_notional=5.0,
    )
    settings = load_settings(overrides={"run": {"seed": 1}, "venue": {"seed": 1}})
    # A small target: the recorded touch is thin, and square-root impact walks a large order past it.
    policy = HoldPolicy(HoldPolicyConfig(targets={"BINANCE:BTCUSDT": target}))
    result = run_backtest(settings, events_path=journal, instruments=[spec], policy=policy, progress=False)
    assert result.events == summary.events > 20_000
    assert result.strategy.decisions >= 4, "six minutes of event time at one decision a minute"
    assert result.fills and {fill.instrument for fill in result.fills} == {"BINANCE:BTCUSDT"}
    quotes = of_type(list(read_events(journal)), Quote)
    assert all(
        min(q.bid for q in quotes) <= fill.price <= max(q.ask for q in quotes) for fill in result.fills
    )
    assert 0.8 * target < result.equity[-1].exposures[0] < 1.2 * target, "the hold target is reached and kept"

    engine = build_engine(
        settings, [spec], policy=HoldPolicy(HoldPolicyConfig(targets={"BINANCE:BTCUSDT": target}))
    )
    for event in read_events(journal):
        engine.feed(event)
    assert engine.bus.stats.handler_errors == 0
    assert engine.fingerprint.fills_sha256 == result.fills_sha256
