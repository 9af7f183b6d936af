"""Portfolio accounting: average price, realised/unrealised PnL, cash flows, marks, ledger, persistence."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.bus import EventBus
from bot.clock import NANOS_PER_SECOND, SimulatedClock
from bot.events import Fill, FundingPayment, MarkPrice, PortfolioSnapshot, PositionUpdate, Quote, Side
from bot.instruments import InstrumentKind, InstrumentRegistry, InstrumentSpec
from bot.portfolio import Portfolio

T0 = 1_700_000_000 * NANOS_PER_SECOND
SPOT = "SYNTH:BTCUSDT"
PERP = "SYNTH:BTCUSDT-PERP"


def registry() -> InstrumentRegistry:
    return InstrumentRegistry(
        [
            InstrumentSpec(
                instrument=SPOT, kind=InstrumentKind.SPOT, base="BTC", tick_size=0.01, lot_size=0.001
            ),
            InstrumentSpec(
                instrument=PERP, kind=InstrumentKind.PERP, base="BTC", tick_size=0.1, lot_size=0.001
            ),
        ]
    )


def make(initial_cash: float = 10_000.0) -> tuple[EventBus, Portfolio, list[object]]:
    bus = EventBus(SimulatedClock(start_ns=T0))
    portfolio = Portfolio(bus, registry(), initial_cash)
    published: list[object] = []
    bus.subscribe(PositionUpdate, published.append)
    bus.subscribe(PortfolioSnapshot, published.append)
    return bus, portfolio, published


def fill(bus: EventBus, instrument: str, signed_qty: float, price: float, fee: float = 0.0) -> None:
    now = bus.clock.now_ns()
    bus.publish(
        Fill(
            ts_event=now,
            ts_recv=now,
            client_order_id="t",
            instrument=instrument,
            side=Side.BUY if signed_qty > 0 else Side.SELL,
            quantity=abs(signed_qty),
            price=price,
            fee=fee,
        )
    )


def quote(bus: EventBus, instrument: str, mid: float, half_spread: float = 0.5) -> None:
    now = bus.clock.now_ns()
    bus.feed(
        Quote(
            ts_event=now,
            ts_recv=now,
            instrument=instrument,
            bid=mid - half_spread,
            bid_size=1.0,
            ask=mid + half_spread,
            ask_size=1.0,
        )
    )


def mark_price(bus: EventBus, instrument: str, mark: float) -> None:
    now = bus.clock.now_ns()
    bus.feed(
        MarkPrice(
            ts_event=now,
            ts_recv=now,
            instrument=instrument,
            mark_price=mark,
            index_price=mark,
            funding_rate=0.0001,
            next_funding_ts=now + 8 * 3600 * NANOS_PER_SECOND,
        )
    )


def test_spot_add_reduce_close_moves_average_and_cash() -> None:
    bus, portfolio, _ = make()
    fill(bus, SPOT, 1.0, 100.0, fee=0.1)
    fill(bus, SPOT, 1.0, 110.0, fee=0.11)
    position = portfolio.position(SPOT)
    assert position.quantity == 2.0
    assert position.avg_price == pytest.approx(105.0)
    assert portfolio.cash == pytest.approx(10_000 - 210 - 0.21)

    fill(bus, SPOT, -0.5, 120.0, fee=0.06)
    position = portfolio.position(SPOT)
    assert position.quantity == 1.5
    assert position.avg_price == pytest.approx(105.0)  # reducing keeps the average
    assert position.realized_pnl == pytest.approx(0.5 * 15.0)
    assert portfolio.cash == pytest.approx(10_000 - 210 - 0.21 + 60 - 0.06)

    fill(bus, SPOT, -1.5, 90.0, fee=0.135)
    position = portfolio.position(SPOT)
    assert position.is_flat and position.avg_price == 0.0
    assert position.realized_pnl == pytest.approx(7.5 - 22.5)
    assert portfolio.total_fees == pytest.approx(0.1 + 0.11 + 0.06 + 0.135)
    # Flat: cash is the initial cash plus realised PnL minus fees.
    assert portfolio.cash == pytest.approx(10_000 - 15.0 - portfolio.total_fees)
    assert portfolio.positions == {}


def test_perp_open_moves_only_fees_and_flip_realises_the_old_position() -> None:
    bus, portfolio, _ = make()
    fill(bus, PERP, 2.0, 100.0, fee=0.2)
    assert portfolio.cash == pytest.approx(10_000 - 0.2)  # opening a perp does not spend notional

    fill(bus, PERP, -3.0, 90.0, fee=0.27)  # close 2 at a loss of 10 each, open 1 short at 90
    position = portfolio.position(PERP)
    assert position.quantity == -1.0
    assert position.avg_price == 90.0
    assert position.realized_pnl == pytest.approx(-20.0)
    assert portfolio.cash == pytest.approx(10_000 - 0.2 - 0.27 - 20.0)

    fill(bus, PERP, -1.0, 100.0)  # add to the short: average 95
    assert portfolio.position(PERP).avg_price == pytest.approx(95.0)
    fill(bus, PERP, 2.0, 80.0)  # cover at 80: +15 each
    position = portfolio.position(PERP)
    assert position.is_flat
    assert position.realized_pnl == pytest.approx(-20.0 + 30.0)
    assert portfolio.realized_pnl == pytest.approx(10.0)
    assert portfolio.reconcile() == pytest.approx(0.0, abs=1e-9)


def test_float_noise_does_not_leave_dust() -> None:
    bus, portfolio, _ = make()
    for _ in range(3):
        fill(bus, PERP, 0.1, 100.0)
    fill(bus, PERP, -0.3, 100.0)  # 0.1 + 0.1 + 0.1 - 0.3 is 5.5e-17 in floats
    assert portfolio.position(PERP).quantity == 0.0
    assert portfolio.positions == {}


def test_marks_equity_and_exposure() -> None:
    bus, portfolio, _ = make()
    fill(bus, SPOT, 2.0, 100.0, fee=1.0)
    fill(bus, PERP, -3.0, 100.0, fee=1.0)
    assert portfolio.mark(SPOT) is None
    assert portfolio.missing_marks() == [SPOT, PERP]

    quote(bus, SPOT, 110.0)
    quote(bus, PERP, 105.0)
    assert portfolio.mark(PERP) == 105.0  # quote mid until the first mark price
    mark_price(bus, PERP, 120.0)
    quote(bus, PERP, 101.0)
    assert portfolio.mark(PERP) == 120.0  # then the mark price, whatever the quotes say
    assert portfolio.missing_marks() == []

    cash = 10_000 - 200 - 2.0
    assert portfolio.cash == pytest.approx(cash)
    unrealized_perp = -3.0 * (120.0 - 100.0)
    assert portfolio.margin_balance() == pytest.approx(cash + unrealized_perp)
    equity = cash + 2.0 * 110.0 + unrealized_perp
    assert portfolio.equity() == pytest.approx(equity)
    assert portfolio.unrealized_pnl() == pytest.approx(2.0 * 10.0 + unrealized_perp)
    assert portfolio.exposure(SPOT) == pytest.approx(220.0 / equity)
    assert portfolio.exposure(PERP) == pytest.approx(-360.0 / equity)
    assert portfolio.gross_exposure() == pytest.approx(580.0 / equity)
    # equity = initial + realised + unrealised − fees + funding
    assert portfolio.equity() == pytest.approx(
        10_000 + portfolio.realized_pnl + portfolio.unrealized_pnl() - portfolio.total_fees
    )


def test_funding_goes_to_cash_and_snapshot_reports_the_books() -> None:
    bus, portfolio, published = make()
    fill(bus, PERP, 1.0, 100.0, fee=0.5)
    mark_price(bus, PERP, 110.0)
    now = bus.clock.now_ns()
    bus.publish(
        FundingPayment(
            ts_event=now,
            ts_recv=now,
            instrument=PERP,
            funding_rate=0.01,
            mark_price=110.0,
            position_qty=1.0,
            amount=-1.1,
        )
    )
    assert portfolio.total_funding == pytest.approx(-1.1)
    assert portfolio.cash == pytest.approx(10_000 - 0.5 - 1.1)

    snapshot = portfolio.snapshot()
    assert published[-1] == snapshot
    assert snapshot.ts_event == now
    assert snapshot.cash == portfolio.cash
    assert snapshot.equity == pytest.approx(10_000 - 0.5 - 1.1 + 10.0)
    assert snapshot.unrealized_pnl == pytest.approx(10.0)
    assert snapshot.fees == pytest.approx(0.5)
    assert snapshot.funding == pytest.approx(-1.1)
    assert snapshot.gross_exposure == pytest.approx(110.0 / snapshot.equity)


def test_position_update_after_each_fill() -> None:
    bus, _, published = make()
    quote(bus, PERP, 130.0)
    fill(bus, PERP, 1.0, 100.0)
    fill(bus, PERP, 1.0, 120.0)
    updates = [e for e in published if isinstance(e, PositionUpdate)]
    assert [u.quantity for u in updates] == [1.0, 2.0]
    assert updates[-1].avg_price == pytest.approx(110.0)
    assert updates[-1].unrealized_pnl == pytest.approx(2.0 * (130.0 - 110.0))
    assert updates[-1].instrument == PERP


def test_fill_on_unknown_instrument_changes_nothing() -> None:
    bus, portfolio, _ = make()
    fill(bus, "SYNTH:ETHUSDT", 1.0, 100.0, fee=1.0)
    assert bus.stats.handler_errors == 1
    assert portfolio.cash == 10_000.0
    assert portfolio.positions == {}


def test_state_round_trip_is_exact() -> None:
    bus, portfolio, _ = make()
    fill(bus, SPOT, 0.003, 101.37, fee=0.0123)
    fill(bus, PERP, -0.007, 99.91, fee=0.031)
    fill(bus, PERP, 0.002, 98.13, fee=0.011)
    state = json.loads(json.dumps(portfolio.state_dict()))

    restored_bus, restored, _ = make(initial_cash=0.0)
    restored.load_state_dict(state)
    assert restored.cash == portfolio.cash
    assert restored.initial_cash == 10_000.0
    assert restored.positions == portfolio.positions
    assert restored.realized_pnl == portfolio.realized_pnl
    assert restored.total_fees == portfolio.total_fees
    assert restored.reconcile() == portfolio.reconcile()
    assert restored.missing_marks() == [SPOT, PERP]  # marks are market data, not state
    quote(restored_bus, SPOT, 100.0)
    quote(bus, SPOT, 100.0)
    mark_price(restored_bus, PERP, 100.0)
    mark_price(bus, PERP, 100.0)
    assert restored.equity() == portfolio.equity()


def test_state_with_unknown_instrument_is_refused() -> None:
    _, portfolio, _ = make()
    state = portfolio.state_dict()
    state["positions"] = [
        {"instrument": "SYNTH:ETHUSDT", "quantity": 1.0, "avg_price": 1.0, "realized_pnl": 0.0}
    ]
    with pytest.raises(KeyError):
        portfolio.load_state_dict(state)


spot_or_perp = st.sampled_from([SPOT, PERP])
lots = st.integers(min_value=-500, max_value=500).filter(bool)
prices = st.floats(min_value=1_000.0, max_value=90_000.0, allow_nan=False)
fee_rates = st.sampled_from([0.0, 0.0002, 0.001])
fundings = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False)
steps = st.lists(st.tuples(spot_or_perp, lots, prices, fee_rates, fundings), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_ledger_reconciles_after_random_fills(steps: list[tuple[str, int, float, float, float]]) -> None:
    bus, portfolio, _ = make(initial_cash=100_000.0)
    reference_qty = {SPOT: 0, PERP: 0}  # in lots: an exact integer model of the positions
    spot_and_funding_flows = 100_000.0
    perp_trade_flow = 0.0  # Σ −qty·price of perp trades: realised PnL without average-price logic
    for instrument, lot_count, price, fee_rate, funding in steps:
        if instrument == SPOT and reference_qty[SPOT] + lot_count < 0:
            lot_count = -reference_qty[SPOT]  # spot cannot go short: sell what is held
            if lot_count == 0:
                continue
        qty = lot_count * 0.001
        fee = abs(qty) * price * fee_rate
        fill(bus, instrument, qty, price, fee)
        reference_qty[instrument] += lot_count
        now = bus.clock.now_ns()
        bus.publish(
            FundingPayment(
                ts_event=now,
                ts_recv=now,
                instrument=PERP,
                funding_rate=0.0,
                mark_price=price,
                position_qty=portfolio.position(PERP).quantity,
                amount=funding,
            )
        )
        spot_and_funding_flows += funding - fee
        if instrument == SPOT:
            spot_and_funding_flows -= qty * price
        else:
            perp_trade_flow -= qty * price

    assert abs(portfolio.reconcile()) <= 1e-9
    for instrument, lot_total in reference_qty.items():
        assert portfolio.position(instrument).quantity == pytest.approx(lot_total * 0.001, abs=1e-12)
    perp = portfolio.position(PERP)
    expected_perp_realized = perp_trade_flow + perp.quantity * perp.avg_price
    assert perp.realized_pnl == pytest.approx(expected_perp_realized, abs=1e-6)
    assert portfolio.cash == pytest.approx(spot_and_funding_flows + expected_perp_realized, abs=1e-6)


def test_spot_fee_taken_in_the_coin_reduces_the_holding_not_the_cash() -> None:
    """Binance takes a spot buy's fee in the bought coin: the live venue reports it as such."""
    bus, portfolio, _ = make()
    now = bus.clock.now_ns()
    bus.publish(
        Fill(
            ts_event=now,
            ts_recv=now,
            client_order_id="live-1",
            instrument=SPOT,
            side=Side.BUY,
            quantity=1.0,
            price=100.0,
            fee=0.001,
            fee_currency="BTC",
        )
    )
    position = portfolio.position(SPOT)
    assert position.quantity == pytest.approx(0.999)
    assert position.avg_price == pytest.approx(100.0 / 0.999)
    assert portfolio.cash == pytest.approx(10_000 - 100.0)
    assert portfolio.total_fees == pytest.approx(0.1)
    quote(bus, SPOT, 100.0, half_spread=0.0)
    assert portfolio.equity() == pytest.approx(10_000 - 0.1)
    assert abs(portfolio.reconcile()) <= 1e-9
    fill(bus, SPOT, -0.999, 100.0, fee=0.0999)  # sells pay in USDT
    assert portfolio.positions == {}
    assert portfolio.cash == pytest.approx(10_000 - 0.1 - 0.0999)
    assert abs(portfolio.reconcile()) <= 1e-9
