"""Events round-trip exactly through the journal; a crash-truncated journal stays readable."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.events import (
    AggressorSide,
    IVSurface,
    MarkPrice,
    OptionMark,
    Quote,
    Trade,
    Venue,
    decode,
    encode,
    instrument_id,
    split_instrument,
)
from bot.journal import JournalError, JournalWriter, read_events, read_header

finite = st.floats(allow_nan=False, allow_infinity=False)


@given(price=finite, size=finite, ts=st.integers(min_value=0, max_value=2**63 - 1))
def test_trade_round_trips_bit_for_bit(price: float, size: float, ts: int) -> None:
    event = Trade(
        ts_event=ts,
        ts_recv=ts,
        instrument="BINANCE:BTCUSDT",
        price=price,
        size=size,
        aggressor_side=AggressorSide.SELL,
        trade_id="42",
    )
    back = decode(encode(event))
    assert back == event
    assert type(back) is Trade


def test_every_market_kind_round_trips() -> None:
    events = [
        Quote(
            ts_event=1, ts_recv=2, instrument="SYNTH:BTCUSDT", bid=1.1, bid_size=2.0, ask=1.2, ask_size=3.0
        ),
        MarkPrice(
            ts_event=1,
            ts_recv=2,
            instrument="BINANCE_USDM:BTCUSDT",
            mark_price=60000.5,
            index_price=60001.25,
            funding_rate=0.0001,
            next_funding_ts=1_600_156_800_010_000_000,
        ),
        OptionMark(
            ts_event=1,
            ts_recv=2,
            instrument="DERIBIT:BTC-25JUN21-40000-C",
            underlying="BTC",
            strike=40000.0,
            expiry_ts=3,
            is_call=True,
            mark_price=0.05,
            mark_iv=0.65,
            bid_iv=None,
            ask_iv=0.7,
            underlying_price=39000.0,
        ),
        IVSurface(
            ts_event=1,
            ts_recv=2,
            underlying="BTC",
            spot=1.0,
            log_moneyness=(-0.1, 0.0),
            maturities=(0.1,),
            iv=((0.6,), (0.5,)),
            fit_rmse=0.001,
            source="svi",
        ),
    ]
    for event in events:
        assert decode(encode(event)) == event


def test_instrument_ids() -> None:
    assert instrument_id("BINANCE_USDM", "BTCUSDT") == "BINANCE_USDM:BTCUSDT"
    assert split_instrument("DERIBIT:BTC-PERPETUAL") == (Venue.DERIBIT, "BTC-PERPETUAL")
    with pytest.raises(ValueError):
        split_instrument("BTCUSDT")
    with pytest.raises(ValueError):
        split_instrument("NOWHERE:BTCUSDT")


def _quotes(n: int) -> list[Quote]:
    return [
        Quote(
            ts_event=i,
            ts_recv=i,
            instrument="SYNTH:BTCUSDT",
            bid=100 + i / 3,
            bid_size=1.0,
            ask=101 + i / 7,
            ask_size=2.0,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_journal_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    writer = JournalWriter(path, run_id="r1", meta={"seed": 7})
    for event in _quotes(100):
        writer.write(event)
    writer.close()
    assert read_header(path)["run_id"] == "r1"
    assert read_header(path)["meta"] == {"seed": 7}
    assert list(read_events(path)) == _quotes(100)


def test_truncated_journal_reads_up_to_last_complete_event(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    writer = JournalWriter(path, run_id="r2")
    for event in _quotes(10):
        writer.write(event)
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # the process died in the middle of the last line
    assert list(read_events(path)) == _quotes(9)


def test_journal_appends_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    first, second = _quotes(5), _quotes(8)[5:]
    writer = JournalWriter(path, run_id="r3")
    for event in first:
        writer.write(event)
    writer.close()
    writer = JournalWriter(path, run_id="r3")
    for event in second:
        writer.write(event)
    writer.close()
    assert list(read_events(path)) == first + second


def test_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(JournalError):
        read_header(path)
    gz = tmp_path / "y.jsonl.gz"
    with gzip.open(gz, "wb") as handle:
        handle.write(b"not json\n")
    with pytest.raises(JournalError):
        read_header(gz)


def test_truncated_gzip_journal_reads_up_to_last_flush(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl.gz"
    writer = JournalWriter(path, run_id="r4")
    for event in _quotes(20):
        writer.write(event)
    writer.flush()
    writer._file.fileobj.flush()  # type: ignore[attr-defined]  # what reaches disk before a kill -9
    data = path.read_bytes()
    writer.close()
    path.write_bytes(data)
    assert list(read_events(path)) == _quotes(20)
