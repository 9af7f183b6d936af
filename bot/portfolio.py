"""The portfolio: sole owner of cash, positions and PnL, marked to market from the bus.

Accounting (quote currency USDT, the same for every engineer):

- spot: the position holds the asset; a buy costs ``qty·price + fee`` of cash, a sell
  returns ``qty·price − fee``. Realised PnL is tracked per instrument for reporting, but
  spot cash moves by the full notional.
- perpetual (linear, USDT-margined): opening moves cash only by the fee; realised PnL goes
  to cash when a position is reduced, closed or flipped.
- funding (``FundingPayment.amount``, already signed) goes to cash; fees are positive and
  subtracted from cash.
- marks: spot = latest quote mid; perp = latest ``MarkPrice.mark_price`` (quote mid until
  the first one). equity = cash + Σ spot qty·mark + Σ perp unrealised PnL.

Besides the running cash balance, the portfolio keeps an independent ledger of flows
(spot buy/sell notional, perp realised PnL, fees, funding) so that :meth:`reconcile`
can prove the balance is the sum of its flows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import structlog

from bot.bus import EventBus
from bot.events import Fill, FundingPayment, MarkPrice, PortfolioSnapshot, PositionUpdate, Quote
from bot.instruments import InstrumentRegistry, InstrumentSpec

log = structlog.get_logger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Position:
    """One instrument's position; immutable so that readers can never mutate the owner's state."""

    instrument: str
    quantity: float = 0.0
    avg_price: float = 0.0
    realized_pnl: float = 0.0

    @property
    def is_flat(self) -> bool:
        return self.quantity == 0.0


@dataclass(frozen=True, slots=True)
class TradeResult:
    """How one fill changed a position: the new position and the PnL it realised."""

    position: Position
    realized: float


def apply_trade(position: Position, signed_qty: float, price: float, spec: InstrumentSpec) -> TradeResult:
    """Average-price accounting for one trade.

    Adding (or opening) moves the average price to the size-weighted mean; reducing keeps it
    and realises ``closed·(price − avg)`` in the position's direction; closing resets it; a
    flip realises the whole old position and opens the remainder at the trade price.
    """
    qty = position.quantity
    if qty == 0.0 or math.copysign(1.0, qty) == math.copysign(1.0, signed_qty):
        new_qty = _snap_qty(qty + signed_qty, spec)
        avg = (abs(qty) * position.avg_price + abs(signed_qty) * price) / (abs(qty) + abs(signed_qty))
        return TradeResult(dataclasses.replace(position, quantity=new_qty, avg_price=avg), 0.0)
    closed = min(abs(signed_qty), abs(qty))
    realized = math.copysign(closed, qty) * (price - position.avg_price)
    new_qty = _snap_qty(qty + signed_qty, spec)
    if new_qty == 0.0:
        avg = 0.0
    elif math.copysign(1.0, new_qty) == math.copysign(1.0, qty):
        avg = position.avg_price
    else:
        avg = price
    return TradeResult(
        dataclasses.replace(
            position, quantity=new_qty, avg_price=avg, realized_pnl=position.realized_pnl + realized
        ),
        realized,
    )


def _snap_qty(qty: float, spec: InstrumentSpec) -> float:
    """Remove binary noise from a sum of lot multiples (0.1 + 0.2 → 0.3) so flat means exactly 0."""
    nearest = spec.round_qty_down(qty)  # tolerates 1e-9 lot below a multiple
    return nearest if abs(nearest - qty) <= 1e-9 * spec.lot_size else qty


@dataclass(slots=True)
class _Ledger:
    """Cumulative flows, summed independently of the cash balance (for :meth:`Portfolio.reconcile`)."""

    spot_buy_notional: float = 0.0
    spot_sell_notional: float = 0.0
    perp_realized_pnl: float = 0.0
    fees: float = 0.0
    funding: float = 0.0
    fees_in_kind: float = 0.0  # quote value of fees the exchange took in the base asset, not from cash


class Portfolio:
    """Cash, positions, fees, funding and PnL, updated only from ``Fill`` and ``FundingPayment``.

    The app constructs the portfolio before the risk engine and the order manager so that
    its marks are updated first on every quote and mark price.
    """

    def __init__(self, bus: EventBus, instruments: InstrumentRegistry, initial_cash: float) -> None:
        if not math.isfinite(initial_cash) or initial_cash < 0:
            raise ValueError(f"initial_cash must be finite and non-negative, got {initial_cash}")
        self._bus = bus
        self._instruments = instruments
        self._initial_cash = float(initial_cash)
        self._cash = float(initial_cash)
        self._positions: dict[str, Position] = {}
        self._ledger = _Ledger()
        self._quote_mids: dict[str, float] = {}
        self._mark_prices: dict[str, float] = {}
        bus.subscribe(Fill, self._on_fill)
        bus.subscribe(FundingPayment, self._on_funding)
        bus.subscribe(Quote, self._on_quote)
        bus.subscribe(MarkPrice, self._on_mark_price)

    # --- handlers ------------------------------------------------------------------------------

    def _on_quote(self, quote: Quote) -> None:
        if quote.bid > 0 and quote.ask > 0:
            self._quote_mids[quote.instrument] = quote.mid

    def _on_mark_price(self, mark: MarkPrice) -> None:
        if mark.mark_price > 0:
            self._mark_prices[mark.instrument] = mark.mark_price

    def _on_fill(self, fill: Fill) -> None:
        spec = self._instruments.get(fill.instrument)
        if spec is None:
            log.error(
                "fill_unknown_instrument", instrument=fill.instrument, client_order_id=fill.client_order_id
            )
            raise KeyError(f"fill for unknown instrument {fill.instrument!r}")
        before = self.position(fill.instrument)
        notional = fill.quantity * fill.price
        cash_fee = fill.fee
        if not spec.is_perp and fill.fee_currency == spec.base and fill.fee_currency != spec.quote:
            # A live spot fee taken in the coin (Binance charges buys so): fewer coins for the same
            # cash, so the coins held cost more each; the fee's value is booked apart from cash.
            coins = fill.signed_quantity - fill.fee
            result = apply_trade(before, coins, notional / abs(coins), spec)
            cash_fee = 0.0
            self._ledger.fees_in_kind += fill.fee * fill.price
        else:
            result = apply_trade(before, fill.signed_quantity, fill.price, spec)
        if spec.is_perp:
            self._cash += result.realized - cash_fee
            self._ledger.perp_realized_pnl += result.realized
        elif fill.signed_quantity > 0:
            self._cash -= notional + cash_fee
            self._ledger.spot_buy_notional += notional
        else:
            self._cash += notional - cash_fee
            self._ledger.spot_sell_notional += notional
        self._ledger.fees += cash_fee
        self._positions[fill.instrument] = result.position
        if not spec.is_perp and result.position.quantity < 0:
            log.error(
                "spot_position_negative",
                instrument=fill.instrument,
                client_order_id=fill.client_order_id,
                quantity=result.position.quantity,
            )
        log.info(
            "fill_applied",
            instrument=fill.instrument,
            client_order_id=fill.client_order_id,
            side=fill.side.value,
            quantity=fill.quantity,
            price=fill.price,
            fee=fill.fee,
            position=result.position.quantity,
            avg_price=result.position.avg_price,
            realized=result.realized,
            cash=self._cash,
        )
        now = self._bus.clock.now_ns()
        mark = self.mark(fill.instrument)
        self._bus.publish(
            PositionUpdate(
                ts_event=now,
                ts_recv=now,
                instrument=fill.instrument,
                quantity=result.position.quantity,
                avg_price=result.position.avg_price,
                realized_pnl=result.position.realized_pnl,
                unrealized_pnl=_unrealized(result.position, fill.price if mark is None else mark),
            )
        )

    def _on_funding(self, payment: FundingPayment) -> None:
        self._cash += payment.amount
        self._ledger.funding += payment.amount
        log.info(
            "funding_applied",
            instrument=payment.instrument,
            amount=payment.amount,
            rate=payment.funding_rate,
            cash=self._cash,
        )

    # --- queries -------------------------------------------------------------------------------

    @property
    def initial_cash(self) -> float:
        return self._initial_cash

    @property
    def cash(self) -> float:
        return self._cash

    @property
    def positions(self) -> dict[str, Position]:
        """Open (non-flat) positions by instrument; a copy, so callers cannot alter the books."""
        return {instrument: p for instrument, p in self._positions.items() if not p.is_flat}

    def position(self, instrument: str) -> Position:
        return self._positions.get(instrument, Position(instrument))

    def mark(self, instrument: str) -> float | None:
        """Latest mark, or None when no market data has arrived for the instrument."""
        spec = self._instruments.get(instrument)
        if spec is not None and spec.is_perp and instrument in self._mark_prices:
            return self._mark_prices[instrument]
        return self._quote_mids.get(instrument)

    def missing_marks(self) -> list[str]:
        """Instruments with an open position but no mark (e.g. just after a restart)."""
        return [instrument for instrument in self.positions if self.mark(instrument) is None]

    def _valuation_price(self, position: Position) -> float:
        """Mark, or the average price while none is known (unrealised PnL 0; see :meth:`missing_marks`)."""
        mark = self.mark(position.instrument)
        return position.avg_price if mark is None else mark

    def notional(self, instrument: str) -> float:
        """Signed position value at the mark."""
        position = self.position(instrument)
        if position.is_flat:
            return 0.0
        return position.quantity * self._valuation_price(position)

    def unrealized_pnl(self) -> float:
        return sum(_unrealized(p, self._valuation_price(p)) for p in self.positions.values())

    def equity(self) -> float:
        """cash + Σ spot qty·mark + Σ perp unrealised PnL."""
        total = self._cash
        for position in self.positions.values():
            price = self._valuation_price(position)
            if self._instruments[position.instrument].is_perp:
                total += _unrealized(position, price)
            else:
                total += position.quantity * price
        return total

    def margin_balance(self) -> float:
        """cash + Σ perp unrealised PnL: what backs perpetual margin (spot holdings are not USDT)."""
        return self._cash + sum(
            _unrealized(p, self._valuation_price(p))
            for p in self.positions.values()
            if self._instruments[p.instrument].is_perp
        )

    def exposure(self, instrument: str) -> float:
        """Signed notional as a fraction of equity (±inf when equity is not positive)."""
        return _ratio(self.notional(instrument), self.equity())

    def gross_exposure(self) -> float:
        """Σ |notional| as a fraction of equity (inf when positions are open and equity is not positive)."""
        return _ratio(sum(abs(self.notional(i)) for i in self.positions), self.equity())

    @property
    def realized_pnl(self) -> float:
        """Trading PnL realised so far on all instruments (before fees and funding)."""
        return sum(p.realized_pnl for p in self._positions.values())

    @property
    def total_fees(self) -> float:
        return self._ledger.fees + self._ledger.fees_in_kind

    @property
    def total_funding(self) -> float:
        return self._ledger.funding

    def reconcile(self) -> float:
        """Residual of the cash balance against its ledger of flows; ~0 unless the books are broken."""
        ledger = self._ledger
        return math.fsum(
            (
                self._initial_cash,
                -ledger.spot_buy_notional,
                ledger.spot_sell_notional,
                ledger.perp_realized_pnl,
                -ledger.fees,
                ledger.funding,
                -self._cash,
            )
        )

    def snapshot(self) -> PortfolioSnapshot:
        """Publish (and return) equity marked to market at the current event time."""
        now = self._bus.clock.now_ns()
        snapshot = PortfolioSnapshot(
            ts_event=now,
            ts_recv=now,
            equity=self.equity(),
            cash=self._cash,
            unrealized_pnl=self.unrealized_pnl(),
            realized_pnl=self.realized_pnl,
            fees=self.total_fees,
            funding=self._ledger.funding,
            gross_exposure=self.gross_exposure(),
        )
        self._bus.publish(snapshot)
        return snapshot

    # --- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Books as plain JSON values (floats round-trip exactly); marks are market data and are not saved."""
        return {
            "version": STATE_VERSION,
            "initial_cash": self._initial_cash,
            "cash": self._cash,
            "positions": [dataclasses.asdict(p) for p in self._positions.values()],
            "ledger": dataclasses.asdict(self._ledger),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the books of a previous run (positions, cash, PnL and the flow ledger)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported portfolio state version {state.get('version')!r}")
        positions = {p["instrument"]: Position(**p) for p in state["positions"]}
        unknown = [i for i in positions if i not in self._instruments]
        if unknown:
            raise KeyError(f"saved positions on unknown instruments {unknown}")
        self._initial_cash = float(state["initial_cash"])
        self._cash = float(state["cash"])
        self._positions = positions
        self._ledger = _Ledger(**state["ledger"])
        log.info(
            "portfolio_restored", cash=self._cash, positions={i: p.quantity for i, p in positions.items()}
        )

    def publish_positions(self, ts_ns: int) -> None:
        """Announce every held position on the bus, so subscribers that track positions (the
        ``position`` feature module, the store) know a resumed book without waiting for a fill."""
        for instrument, position in self._positions.items():
            mark = self.mark(instrument)
            self._bus.publish(
                PositionUpdate(
                    ts_event=ts_ns,
                    ts_recv=ts_ns,
                    instrument=instrument,
                    quantity=position.quantity,
                    avg_price=position.avg_price,
                    realized_pnl=position.realized_pnl,
                    unrealized_pnl=_unrealized(position, position.avg_price if mark is None else mark),
                )
            )


def _unrealized(position: Position, price: float) -> float:
    return position.quantity * (price - position.avg_price)


def _ratio(numerator: float, equity: float) -> float:
    if numerator == 0.0:
        return 0.0
    if equity <= 0.0:
        return math.copysign(math.inf, numerator)
    return numerator / equity
