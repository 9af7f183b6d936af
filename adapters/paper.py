"""The paper venue: a simulated exchange that fills approved orders against the live top of book.

It sits on the bus where a real venue adapter would: it consumes ``SubmitOrder`` and
``CancelOrder`` commands and the market data it needs (``Quote``, ``MarkPrice``), and
answers with ``OrderUpdate``, ``Fill`` and ``FundingPayment`` events, exactly the events a
live venue adapter publishes, so the portfolio and the order manager cannot tell the two
apart.

Execution model (all times are event time, from the bus clock):

- An accepted order becomes fillable ``latency`` after submission, where the latency is
  ``latency_ms`` plus a uniform ``[0, latency_jitter_ms)`` draw. It is tried on every quote
  of its instrument whose ``ts_recv`` is at or after that time, never on the quote that was
  current when it was sent (a real order cannot trade on a book it has not reached yet).
- Taking liquidity (market orders, marketable limits) walks the book. The average price is
  the touch (ask for a buy, bid for a sell) worsened by ``impact_bps · sqrt(qty / touch_size)``
  plus ``impact_noise_bps · |z|`` with ``z`` a seeded standard normal: square-root impact is
  the usual empirical law, and the noise is always adverse because walking the book never
  improves on the touch. A marketable limit never fills beyond its limit price.
- A limit order that is not marketable rests at its price and fills whole, as maker, on the
  first later quote that trades through it (ask ≤ limit for a buy, bid ≥ limit for a sell).
- Orders fill whole, never partially.
- The venue keeps its own account of positions from its fills, like an exchange account:
  reduce-only orders are clipped to that position, spot sells to the holding (spot cannot go
  short), and perpetual funding is settled on it.

Every random draw comes from one seeded generator, consumed in event order, so replaying the
same events with the same seed reproduces every fill bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from bot.bus import EventBus
from bot.events import (
    CancelOrder,
    Fill,
    FundingPayment,
    Liquidity,
    MarkPrice,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Quote,
    Side,
    SubmitOrder,
)
from bot.instruments import InstrumentRegistry, InstrumentSpec

log = structlog.get_logger(__name__)

_BPS = 1e-4
_NS_PER_MS = 1_000_000


class PaperVenueConfig(BaseModel):
    """Fees, latency and slippage of the simulated venue (Binance VIP 0 fees by default)."""

    model_config = ConfigDict(extra="forbid")

    spot_maker_fee: float = Field(default=0.001, ge=0.0, lt=0.1)
    spot_taker_fee: float = Field(default=0.001, ge=0.0, lt=0.1)
    perp_maker_fee: float = Field(default=0.0002, ge=-0.01, lt=0.1)
    perp_taker_fee: float = Field(default=0.0005, ge=0.0, lt=0.1)
    latency_ms: float = Field(default=50.0, ge=0.0, description="Base order latency.")
    latency_jitter_ms: float = Field(default=20.0, ge=0.0, description="Uniform extra latency [0, jitter).")
    impact_bps: float = Field(
        default=2.0, ge=0.0, description="Impact in bps of an order as large as the touch size (sqrt law)."
    )
    impact_noise_bps: float = Field(
        default=0.5, ge=0.0, description="Scale of the adverse random slippage |N(0,1)| in bps."
    )
    seed: int = Field(default=0, ge=0)


@dataclass(slots=True)
class _OpenOrder:
    """An accepted order the venue still holds."""

    intent: OrderIntent
    venue_order_id: str
    fillable_at_ns: int
    resting: bool = False


class PaperVenue:
    """Simulated venue on the bus: accepts, fills, cancels orders and settles funding."""

    def __init__(
        self,
        bus: EventBus,
        instruments: InstrumentRegistry | Iterable[InstrumentSpec],
        config: PaperVenueConfig | None = None,
    ) -> None:
        self._bus = bus
        self._instruments = (
            instruments
            if isinstance(instruments, InstrumentRegistry)
            else InstrumentRegistry(list(instruments))
        )
        self.config = config if config is not None else PaperVenueConfig()
        self._rng = np.random.Generator(np.random.PCG64(self.config.seed))
        self._open: dict[str, _OpenOrder] = {}
        self._known_ids: set[str] = set()
        self._positions: dict[str, float] = {}
        self._last_quote: dict[str, Quote] = {}
        self._last_mark: dict[str, MarkPrice] = {}
        self._order_sequence = 0
        self._trade_sequence = 0
        bus.subscribe(SubmitOrder, self.on_submit)
        bus.subscribe(CancelOrder, self.on_cancel)
        bus.subscribe(Quote, self.on_quote)
        bus.subscribe(MarkPrice, self.on_mark_price)

    # --- account -----------------------------------------------------------------------------

    def restore_positions(self, positions: dict[str, float]) -> None:
        """Set the account's positions (signed base quantity) when a run restarts on an existing account."""
        for instrument, quantity in positions.items():
            if instrument not in self._instruments:
                raise KeyError(f"cannot restore a position in unknown instrument {instrument!r}")
            self._positions[instrument] = float(quantity)

    def position(self, instrument: str) -> float:
        """The venue's signed position in ``instrument`` (0.0 when flat or unknown)."""
        return self._positions.get(instrument, 0.0)

    @property
    def open_orders(self) -> list[str]:
        """Client order ids of the orders still working, in submission order."""
        return list(self._open)

    # --- commands ----------------------------------------------------------------------------

    def on_submit(self, command: SubmitOrder) -> None:
        intent = command.intent
        now = self._bus.clock.now_ns()
        reason = self._validate(intent)
        if reason:
            self._reject(intent.client_order_id, intent.instrument, reason, now)
            return
        self._known_ids.add(intent.client_order_id)
        self._order_sequence += 1
        venue_order_id = f"PAPER-{self._order_sequence}"
        latency_ms = self.config.latency_ms + self.config.latency_jitter_ms * float(self._rng.random())
        order = _OpenOrder(intent, venue_order_id, now + round(latency_ms * _NS_PER_MS))
        self._open[intent.client_order_id] = order
        log.info(
            "paper_order_accepted",
            instrument=intent.instrument,
            client_order_id=intent.client_order_id,
            side=intent.side.value,
            quantity=intent.quantity,
            order_type=intent.order_type.value,
            limit_price=intent.limit_price,
            reduce_only=intent.reduce_only,
            fillable_at_ns=order.fillable_at_ns,
        )
        self._bus.publish(
            OrderUpdate(
                ts_event=now,
                ts_recv=now,
                client_order_id=intent.client_order_id,
                instrument=intent.instrument,
                status=OrderStatus.ACCEPTED,
                venue_order_id=venue_order_id,
            )
        )

    def on_cancel(self, command: CancelOrder) -> None:
        now = self._bus.clock.now_ns()
        order = self._open.pop(command.client_order_id, None)
        if order is None:
            self._reject(command.client_order_id, command.instrument, "cancel_unknown_or_closed_order", now)
            return
        log.info(
            "paper_order_cancelled", instrument=command.instrument, client_order_id=command.client_order_id
        )
        self._bus.publish(
            OrderUpdate(
                ts_event=now,
                ts_recv=now,
                client_order_id=command.client_order_id,
                instrument=order.intent.instrument,
                status=OrderStatus.CANCELLED,
                venue_order_id=order.venue_order_id,
            )
        )

    def _validate(self, intent: OrderIntent) -> str:
        """Why the venue refuses ``intent`` at submission, or "" when it accepts it."""
        spec = self._instruments.get(intent.instrument)
        if spec is None:
            return "unknown_instrument"
        if intent.client_order_id in self._known_ids:
            return "duplicate_client_order_id"
        if not (intent.quantity > 0.0 and spec.is_qty_valid(intent.quantity)):
            return "invalid_quantity"
        if intent.order_type is OrderType.LIMIT and (
            intent.limit_price is None or not spec.is_price_valid(intent.limit_price)
        ):
            return "invalid_limit_price"
        quote = self._last_quote.get(intent.instrument)
        if not intent.reduce_only and quote is not None and intent.quantity * quote.mid < spec.min_notional:
            return "below_min_notional"
        return self._executable_quantity(intent, spec)[1]

    def _executable_quantity(self, intent: OrderIntent, spec: InstrumentSpec) -> tuple[float, str]:
        """Quantity the account allows now, and the reason when it allows none."""
        position = self._positions.get(intent.instrument, 0.0)
        quantity = intent.quantity
        if intent.reduce_only:
            reducible = -position if intent.side is Side.BUY else position
            quantity = spec.round_qty_down(min(quantity, max(reducible, 0.0)))
            if quantity <= 0.0:
                return 0.0, "reduce_only_nothing_to_reduce"
        if not spec.is_perp and intent.side is Side.SELL and quantity > position + 0.5 * spec.lot_size:
            return 0.0, "insufficient_spot_balance"
        return quantity, ""

    # --- market data -------------------------------------------------------------------------

    def on_quote(self, quote: Quote) -> None:
        self._last_quote[quote.instrument] = quote
        if not self._open:
            return
        due = [
            order
            for order in self._open.values()
            if order.intent.instrument == quote.instrument and order.fillable_at_ns <= quote.ts_recv
        ]
        for order in due:
            self._try_fill(order, quote)

    def _try_fill(self, order: _OpenOrder, quote: Quote) -> None:
        intent = order.intent
        spec = self._instruments[intent.instrument]
        is_buy = intent.side is Side.BUY
        if intent.limit_price is not None and intent.order_type is OrderType.LIMIT:
            marketable = quote.ask <= intent.limit_price if is_buy else quote.bid >= intent.limit_price
            if not marketable:
                order.resting = True  # from now on only a quote trading through it fills it
                return
        quantity, reason = self._executable_quantity(intent, spec)
        now = self._bus.clock.now_ns()
        del self._open[intent.client_order_id]
        if reason:
            self._reject(intent.client_order_id, intent.instrument, reason, now, order.venue_order_id)
            return
        if order.resting and intent.limit_price is not None:
            price, liquidity = intent.limit_price, Liquidity.MAKER
        else:
            price, liquidity = self._taker_price(intent, quantity, quote), Liquidity.TAKER
        self._publish_fill(order, quantity, price, liquidity, spec, now)

    def _taker_price(self, intent: OrderIntent, quantity: float, quote: Quote) -> float:
        """Average price of walking the book from the touch (see the module docstring)."""
        is_buy = intent.side is Side.BUY
        touch, touch_size = (quote.ask, quote.ask_size) if is_buy else (quote.bid, quote.bid_size)
        depth_ratio = quantity / touch_size if touch_size > 0.0 else 1.0
        noise = abs(float(self._rng.standard_normal()))
        impact = (
            self.config.impact_bps * math.sqrt(depth_ratio) + self.config.impact_noise_bps * noise
        ) * _BPS
        price = touch * (1.0 + impact) if is_buy else touch * (1.0 - impact)
        if intent.order_type is OrderType.LIMIT and intent.limit_price is not None:
            price = min(price, intent.limit_price) if is_buy else max(price, intent.limit_price)
        return price

    def _publish_fill(
        self,
        order: _OpenOrder,
        quantity: float,
        price: float,
        liquidity: Liquidity,
        spec: InstrumentSpec,
        now: int,
    ) -> None:
        intent = order.intent
        fee = self._fee_rate(spec, liquidity) * quantity * price
        self._trade_sequence += 1
        trade_id = f"PAPER-T{self._trade_sequence}"
        signed = quantity if intent.side is Side.BUY else -quantity
        self._positions[intent.instrument] = self._positions.get(intent.instrument, 0.0) + signed
        log.info(
            "paper_fill",
            instrument=intent.instrument,
            client_order_id=intent.client_order_id,
            side=intent.side.value,
            quantity=quantity,
            price=price,
            fee=fee,
            liquidity=liquidity.value,
            trade_id=trade_id,
        )
        self._bus.publish(
            Fill(
                ts_event=now,
                ts_recv=now,
                client_order_id=intent.client_order_id,
                instrument=intent.instrument,
                side=intent.side,
                quantity=quantity,
                price=price,
                fee=fee,
                liquidity=liquidity,
                trade_id=trade_id,
            )
        )
        self._bus.publish(
            OrderUpdate(
                ts_event=now,
                ts_recv=now,
                client_order_id=intent.client_order_id,
                instrument=intent.instrument,
                status=OrderStatus.FILLED,
                venue_order_id=order.venue_order_id,
                filled_qty=quantity,
                avg_price=price,
            )
        )

    def _fee_rate(self, spec: InstrumentSpec, liquidity: Liquidity) -> float:
        config = self.config
        if spec.is_perp:
            return config.perp_maker_fee if liquidity is Liquidity.MAKER else config.perp_taker_fee
        return config.spot_maker_fee if liquidity is Liquidity.MAKER else config.spot_taker_fee

    def on_mark_price(self, mark: MarkPrice) -> None:
        """Settle funding when this mark is the first at or after the previous mark's funding time.

        The rate settled is the previous mark's ``funding_rate`` (the rate predicted for the
        interval that just ended, final at its end); the mark price is this mark's, the first
        one observed at the funding time.
        """
        previous = self._last_mark.get(mark.instrument)
        self._last_mark[mark.instrument] = mark
        if previous is None or mark.ts_event < previous.next_funding_ts:
            return
        spec = self._instruments.get(mark.instrument)
        position = self._positions.get(mark.instrument, 0.0)
        if spec is None or not spec.is_perp or position == 0.0:
            return
        now = self._bus.clock.now_ns()
        amount = -position * mark.mark_price * previous.funding_rate
        log.info(
            "paper_funding",
            instrument=mark.instrument,
            funding_rate=previous.funding_rate,
            mark_price=mark.mark_price,
            position_qty=position,
            amount=amount,
            funding_ts=previous.next_funding_ts,
        )
        self._bus.publish(
            FundingPayment(
                ts_event=now,
                ts_recv=now,
                instrument=mark.instrument,
                funding_rate=previous.funding_rate,
                mark_price=mark.mark_price,
                position_qty=position,
                amount=amount,
            )
        )

    # --- helpers -----------------------------------------------------------------------------

    def _reject(
        self, client_order_id: str, instrument: str, reason: str, now: int, venue_order_id: str = ""
    ) -> None:
        log.warning(
            "paper_order_rejected", instrument=instrument, client_order_id=client_order_id, reason=reason
        )
        self._bus.publish(
            OrderUpdate(
                ts_event=now,
                ts_recv=now,
                client_order_id=client_order_id,
                instrument=instrument,
                status=OrderStatus.REJECTED,
                venue_order_id=venue_order_id,
                reason=reason,
            )
        )
