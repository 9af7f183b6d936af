"""The live venue: ccxt's real Binance client against a local exchange on 127.0.0.1 (tests/ccxt_server.py).

Every request goes through ccxt.async_support's own request building, HMAC signing, response
parsing and error mapping; the server checks the signature and keeps real order state, so the
assertions about "one order, never two" are made on the exchange's side.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from ccxt_server import BinanceRestServer, Fault, Market

from adapters.ccxt_venue import CcxtVenue, CcxtVenueConfig, amended_client_id, build_exchange
from bot.bus import EventBus, InboundQueue
from bot.events import (
    CancelOrder,
    Event,
    Fill,
    Liquidity,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Quote,
    Side,
    SubmitOrder,
)
from bot.logs import close_logging, configure_logging
from config.settings import LiveConfig

API_KEY = f"vbkey{uuid.uuid4().hex}"
API_SECRET = f"vbsecret{uuid.uuid4().hex}{uuid.uuid4().hex}"
SPOT = "BINANCE:BTCUSDT"
PERP = "BINANCE_USDM:BTCUSDT"
ORDER = "/api/v3/order"
FAPI_ORDER = "/fapi/v1/order"
T0 = 1_700_000_000_000_000_000


@pytest.fixture
async def server(shared_data: Path) -> AsyncIterator[BinanceRestServer]:
    """The local exchange, its exchangeInfo the recorded Binance responses."""
    info: dict[Market, bytes] = {
        "spot": (shared_data / "binance_rest" / "api_v3_exchangeInfo.json").read_bytes(),
        "usdm": (shared_data / "binance_rest" / "fapi_v1_exchangeInfo.json").read_bytes(),
    }
    async with BinanceRestServer(info, API_KEY, API_SECRET, prices={"BTCUSDT": 60_000.0}) as exchange:
        yield exchange


def config(server: BinanceRestServer, **overrides: Any) -> CcxtVenueConfig:
    settings: dict[str, Any] = {
        "testnet": True,
        "base_url": server.url,
        "poll_interval_s": 0.0,
        "enable_rate_limit": False,
        "timeout_ms": 2_000,
        "retry_backoff_s": 0.01,
    }
    return CcxtVenueConfig(**(settings | overrides))


@contextlib.asynccontextmanager
async def live_venue(
    server: BinanceRestServer, sink: list[Event] | None = None, **overrides: Any
) -> AsyncIterator[tuple[CcxtVenue, EventBus, list[Event]]]:
    """A started venue on a bus; what it reports lands in the returned list."""
    events: list[Event] = [] if sink is None else sink
    bus = EventBus()
    venue = CcxtVenue(
        config(server, **overrides), events.append, api_key=API_KEY, api_secret=API_SECRET, bus=bus
    )
    async with venue:
        yield venue, bus, events


def intent(
    cid: str,
    quantity: float,
    price: float | None = None,
    side: Side = Side.BUY,
    instrument: str = SPOT,
    reduce_only: bool = False,
) -> SubmitOrder:
    order = OrderIntent(
        ts_event=T0,
        ts_recv=T0,
        client_order_id=cid,
        instrument=instrument,
        side=side,
        quantity=quantity,
        order_type=OrderType.MARKET if price is None else OrderType.LIMIT,
        limit_price=price,
        reduce_only=reduce_only,
    )
    return SubmitOrder(ts_event=T0, ts_recv=T0, intent=order)


def cancel(cid: str, instrument: str = SPOT) -> CancelOrder:
    return CancelOrder(ts_event=T0, ts_recv=T0, client_order_id=cid, instrument=instrument)


def updates(events: list[Event], cid: str | None = None) -> list[OrderUpdate]:
    return [e for e in events if isinstance(e, OrderUpdate) and cid in (None, e.client_order_id)]


def fills(events: list[Event]) -> list[Fill]:
    return [e for e in events if isinstance(e, Fill)]


def statuses(events: list[Event], cid: str) -> list[OrderStatus]:
    return [u.status for u in updates(events, cid)]


# --- configuration --------------------------------------------------------------------------------


def test_testnet_base_url_and_overrides_select_endpoints() -> None:
    spot = build_exchange(CcxtVenueConfig(testnet=True), None, None)
    assert spot.urls["api"]["private"] == "https://testnet.binance.vision/api/v3"
    live = build_exchange(CcxtVenueConfig(testnet=False), None, None)
    assert live.urls["api"]["private"] == "https://api.binance.com/api/v3"
    usdm = build_exchange(CcxtVenueConfig(exchange="binanceusdm", testnet=True), None, None)
    assert usdm.urls["api"]["fapiPrivate"] == "https://testnet.binancefuture.com/fapi/v1"
    local = build_exchange(
        CcxtVenueConfig(
            exchange="binanceusdm",
            base_url="http://127.0.0.1:9/",
            urls_override={"public": "http://127.0.0.1:8/api/v3"},
        ),
        None,
        None,
    )
    assert local.urls["api"]["fapiPrivate"] == "http://127.0.0.1:9/fapi/v1"
    assert local.urls["api"]["private"] == "http://127.0.0.1:9/api/v3"
    assert local.urls["api"]["public"] == "http://127.0.0.1:8/api/v3"
    assert local.options["fetchMarkets"]["types"] == ["linear"]
    with pytest.raises(ValueError, match="base_url"):
        CcxtVenueConfig(base_url="127.0.0.1:9")


def test_amended_client_ids_stay_binance_safe() -> None:
    assert amended_client_id("vb-18c5f0a3b2e1d000-a1b2c3-0", 1) == "vb-18c5f0a3b2e1d000-a1b2c3-0.1"
    long_a, long_b = "x" * 35 + "a", "x" * 35 + "b"
    assert len(amended_client_id(long_a, 12)) == 36
    assert amended_client_id(long_a, 1) != amended_client_id(long_b, 1)


async def test_instruments_map_to_ccxt_markets(server: BinanceRestServer) -> None:
    async with live_venue(server) as (spot, _, _):
        assert spot.ccxt_symbol(SPOT) == "BTC/USDT"
        assert spot.ccxt_symbol(PERP) is None  # the spot client does not list USD-M
        assert spot.ccxt_symbol("SYNTH:BTCUSDT") is None
    async with live_venue(server, exchange="binanceusdm") as (usdm, _, _):
        assert usdm.ccxt_symbol(PERP) == "BTC/USDT:USDT"
        assert usdm.ccxt_symbol(SPOT) is None
    # only exchangeInfo of the traded market type was loaded, once per client
    assert [r.path for r in server.requests] == ["/api/v3/exchangeInfo", "/fapi/v1/exchangeInfo"]


# --- place, amend, cancel -------------------------------------------------------------------------


async def test_places_amends_and_cancels_through_ccxt(server: BinanceRestServer) -> None:
    """Bus commands → signed REST calls through ccxt; OrderUpdates come back through the inbound queue."""
    inbound = InboundQueue()
    engine = EventBus()
    seen: list[Event] = []
    engine.subscribe(OrderUpdate, seen.append)
    bus = EventBus()
    venue = CcxtVenue(config(server), inbound.put_nowait, api_key=API_KEY, api_secret=API_SECRET, bus=bus)
    async with venue:
        bus.publish(intent("vb-1", 0.00123, 59_000.123))  # price off the 0.01 tick
        assert inbound.get_nowait() is None  # the bus handler only queued it
        await venue.drain()
        assert await venue.amend("vb-1", quantity=0.002, price=59_100.0)
        bus.publish(cancel("vb-1"))
        await venue.drain()
    while (event := inbound.get_nowait()) is not None:
        engine.feed(event)  # journalled and dispatched like any inbound event

    assert [(u.status, u.reason) for u in seen] == [
        (OrderStatus.ACCEPTED, ""),
        (OrderStatus.ACCEPTED, "amended"),
        (OrderStatus.CANCELLED, ""),
    ]
    first, replacement = server.orders["spot"].values()
    assert (first.client_order_id, first.status) == ("vb-1", "CANCELED")
    assert (replacement.client_order_id, replacement.status) == ("vb-1.1", "CANCELED")
    assert [u.venue_order_id for u in seen] == [str(first.order_id)] + [str(replacement.order_id)] * 2
    assert all(u.client_order_id == "vb-1" and u.instrument == SPOT for u in seen)
    assert seen[0].ts_event == first.time_ms * 1_000_000 and seen[0].ts_recv >= seen[0].ts_event

    (create,) = server.requested("POST", ORDER)
    assert create.outcome == "created"
    params = create.params
    assert (params["symbol"], params["side"], params["type"], params["timeInForce"]) == (
        "BTCUSDT",
        "BUY",
        "LIMIT",
        "GTC",
    )
    assert (params["newClientOrderId"], params["quantity"], params["price"]) == (
        "vb-1",
        "0.00123",
        "59000.12",
    )
    assert "signature" in params and "timestamp" in params
    (replace,) = server.requested("POST", "/api/v3/order/cancelReplace")
    assert replace.outcome == "replaced"
    assert (replace.params["cancelOrderId"], replace.params["newClientOrderId"]) == (
        str(first.order_id),
        "vb-1.1",
    )
    assert (replace.params["quantity"], replace.params["price"]) == ("0.002", "59100")
    (delete,) = server.requested("DELETE", ORDER)
    assert (delete.outcome, delete.params["origClientOrderId"]) == ("cancelled", "vb-1.1")
    assert all(r.outcome != "unauthorized" for r in server.requests)


async def test_repeated_submit_with_same_client_id_creates_one_order(server: BinanceRestServer) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-dup", 0.001, 50_000.0))
        bus.publish(intent("vb-dup", 0.001, 50_000.0))
        await venue.drain()
        bus.publish(intent("vb-dup", 0.001, 50_000.0))
        await venue.drain()
    assert len(server.requested("POST", ORDER)) == 1
    assert len(server.orders["spot"]) == 1
    assert statuses(events, "vb-dup") == [OrderStatus.ACCEPTED]


async def test_resubmit_after_restart_reconciles_to_the_existing_order(server: BinanceRestServer) -> None:
    """A new process sends a known id: Binance answers -2010 "Duplicate order sent."; no second order."""
    async with live_venue(server) as (venue, bus, _):
        bus.publish(intent("vb-restart", 0.001, 50_000.0))
        await venue.drain()
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-restart", 0.001, 50_000.0))
        await venue.drain()
    assert [r.outcome for r in server.requested("POST", ORDER)] == ["created", "duplicate"]
    (order,) = server.orders["spot"].values()
    assert [(u.status, u.venue_order_id) for u in updates(events)] == [
        (OrderStatus.ACCEPTED, str(order.order_id))
    ]


async def test_other_new_order_rejections_are_not_taken_for_duplicates(server: BinanceRestServer) -> None:
    refusal = {"code": -2010, "msg": "Account has insufficient balance for requested action."}
    server.fault("POST", ORDER, Fault(apply=True, status=400, body=refusal))
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-poor", 0.001, 50_000.0))
        await venue.drain()
    (update,) = updates(events)
    assert update.status is OrderStatus.REJECTED
    assert update.reason == "insufficient_funds"  # ccxt's reading of Binance's message
    assert len(server.requested("POST", ORDER)) == 1 and not server.requested("GET", ORDER)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(delay_s=0.5), id="timeout"),
        pytest.param(Fault(status=503, body={"code": -1001, "msg": "Internal error."}), id="http-503"),
    ],
)
async def test_create_with_unknown_outcome_is_found_by_client_id_not_resent(
    server: BinanceRestServer, fault: Fault
) -> None:
    """The exchange took the order but the answer was lost: look it up by client id, never send again."""
    server.fault("POST", ORDER, fault)
    async with live_venue(server, timeout_ms=200) as (venue, bus, events):
        bus.publish(intent("vb-slow", 0.001, 50_000.0))
        await venue.drain()
        assert venue.venue_order_id("vb-slow") != ""
    assert len(server.requested("POST", ORDER)) == 1
    (lookup,) = server.requested("GET", ORDER)
    assert (lookup.params["origClientOrderId"], lookup.outcome) == ("vb-slow", "queried")
    (order,) = server.orders["spot"].values()
    assert [(u.status, u.venue_order_id) for u in updates(events)] == [
        (OrderStatus.ACCEPTED, str(order.order_id))
    ]


async def test_create_lost_before_the_exchange_is_sent_again_once(server: BinanceRestServer) -> None:
    server.fault("POST", ORDER, Fault(apply=False, delay_s=0.5))
    async with live_venue(server, timeout_ms=200) as (venue, bus, events):
        bus.publish(intent("vb-lost", 0.001, 50_000.0))
        await venue.drain()
    assert [r.outcome for r in server.requested("POST", ORDER)] == ["lost", "created"]
    assert [r.outcome for r in server.requested("GET", ORDER)] == ["not_found"]  # looked up before re-sending
    assert len(server.orders["spot"]) == 1
    assert statuses(events, "vb-lost") == [OrderStatus.ACCEPTED]


@pytest.mark.parametrize(("taken", "expected"), [(True, OrderStatus.ACCEPTED), (False, OrderStatus.REJECTED)])
async def test_reconcile_settles_a_create_left_unresolved(
    server: BinanceRestServer, taken: bool, expected: OrderStatus
) -> None:
    """Retries exhausted with the outcome still unknown: the order stays NEW until reconcile finds out."""
    server.fault("POST", ORDER, Fault(apply=taken, delay_s=0.5))
    async with live_venue(server, timeout_ms=200, max_retries=0) as (venue, bus, events):
        bus.publish(intent("vb-limbo", 0.001, 50_000.0))
        await venue.drain()
        assert updates(events) == [] and venue.open_orders == ["vb-limbo"]
        assert await venue.reconcile() == 1
    (update,) = updates(events)
    assert update.status is expected
    assert update.reason == ("" if taken else "not_found_after_network_error")
    assert len(server.requested("POST", ORDER)) == 1


# --- fills ----------------------------------------------------------------------------------------


async def test_a_trade_becomes_exactly_one_fill_however_often_polled(server: BinanceRestServer) -> None:
    clock = iter(range(T0, T0 + 10_000))
    events: list[Event] = []
    bus = EventBus()
    venue = CcxtVenue(
        config(server),
        events.append,
        api_key=API_KEY,
        api_secret=API_SECRET,
        bus=bus,
        clock=lambda: next(clock),
    )
    async with venue:
        bus.publish(intent("vb-maker", 0.003, 59_000.0, side=Side.SELL))
        await venue.drain()
        first = server.fill("vb-maker", 0.001, 59_000.0, maker=True)
        assert await venue.reconcile() == 2  # the fill, then PARTIALLY_FILLED
        assert await venue.reconcile() == 0
        second = server.fill("vb-maker", 0.002, 59_000.0, maker=True)
        assert await venue.reconcile() == 2
        assert await venue.reconcile() == 0
        assert venue.open_orders == []

    assert statuses(events, "vb-maker") == [
        OrderStatus.ACCEPTED,
        OrderStatus.PARTIALLY_FILLED,
        OrderStatus.FILLED,
    ]
    one, two = fills(events)
    assert [f.trade_id for f in (one, two)] == [str(first["id"]), str(second["id"])]
    assert (one.side, one.quantity, one.price, one.liquidity) == (Side.SELL, 0.001, 59_000.0, Liquidity.MAKER)
    assert (one.fee, one.fee_currency) == (pytest.approx(0.059), "USDT")  # a spot sell pays in the quote
    assert one.ts_event == first["time"] * 1_000_000
    assert T0 <= one.ts_recv < T0 + 10_000  # the venue's clock, not the exchange's
    final = updates(events)[-1]
    assert (final.filled_qty, final.avg_price) == (pytest.approx(0.003), pytest.approx(59_000.0))
    # the first poll asks from the venue's start, later ones only after the last trade seen
    polls = [r.params for r in server.requested("GET", "/api/v3/myTrades")]
    assert "startTime" in polls[0] and "fromId" not in polls[0]
    assert [p.get("fromId") for p in polls[1:]] == [str(first["id"] + 1)] * 2


async def test_market_order_fills_from_the_placement_response(server: BinanceRestServer) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-taker", 0.002))
        await venue.drain()
        assert await venue.reconcile() == 0  # nothing open; the trade is not reported twice
        venue.config.instruments.append(SPOT)
        assert await venue.reconcile() == 0  # polled on purpose: still one fill
    assert [type(e).__name__ for e in events] == ["OrderUpdate", "Fill", "OrderUpdate"]
    (fill,) = fills(events)
    (trade,) = server.trades["spot"]
    assert (fill.trade_id, fill.quantity, fill.price) == (str(trade["id"]), 0.002, 60_000.0)
    assert fill.liquidity is Liquidity.TAKER
    assert (fill.fee, fill.fee_currency) == (pytest.approx(0.000002), "BTC")  # a spot buy pays in the base
    assert statuses(events, "vb-taker") == [OrderStatus.ACCEPTED, OrderStatus.FILLED]
    assert server.requested("POST", ORDER)[0].params["type"] == "MARKET"
    assert not server.requested("GET", ORDER)  # the FULL response carried the fill


async def test_cancel_of_an_order_that_filled_meanwhile_reports_the_fill(server: BinanceRestServer) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-late", 0.001, 61_000.0))
        await venue.drain()
        server.fill("vb-late", 0.001, 61_000.0, maker=True)
        bus.publish(cancel("vb-late"))
        await venue.drain()
    assert [r.outcome for r in server.requested("DELETE", ORDER)] == ["unknown"]
    assert statuses(events, "vb-late") == [OrderStatus.ACCEPTED, OrderStatus.FILLED]
    (fill,) = fills(events)
    assert (fill.liquidity, fill.quantity) == (Liquidity.MAKER, 0.001)


async def test_amend_of_a_partly_filled_order_replaces_what_is_left(server: BinanceRestServer) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-part", 0.003, 59_000.0))
        await venue.drain()
        server.fill("vb-part", 0.001, 59_000.0)
        assert await venue.reconcile() == 2
        assert await venue.amend("vb-part", price=59_200.0)
        server.fill("vb-part.1", 0.002, 59_200.0)
        # the replacement filled before the next amend reached it: Binance -2022, nothing changes
        assert await venue.amend("vb-part", price=59_300.0) is False
    (replace, refused) = server.requested("POST", "/api/v3/order/cancelReplace")
    assert (replace.params["quantity"], replace.params["price"]) == ("0.002", "59200")
    assert refused.outcome == "replace_failed"
    assert [(u.status, u.reason, u.filled_qty) for u in updates(events)] == [
        (OrderStatus.ACCEPTED, "", 0.0),
        (OrderStatus.PARTIALLY_FILLED, "", 0.001),
        (OrderStatus.PARTIALLY_FILLED, "amended", 0.001),
        (OrderStatus.FILLED, "", pytest.approx(0.003)),
    ]
    assert [f.quantity for f in fills(events)] == [0.001, 0.002]
    assert updates(events)[-1].avg_price == pytest.approx((59_000.0 + 2 * 59_200.0) / 3)
    assert venue.exchange_client_id("vb-part") == "vb-part.1"


async def test_cancel_after_restart_finds_the_order_by_client_id(server: BinanceRestServer) -> None:
    """A previous run's order: cancelled by client id; its earlier fill is not reported a second time."""
    async with live_venue(server) as (venue, bus, _):
        bus.publish(intent("vb-old", 0.002, 58_000.0))
        await venue.drain()
    server.fill("vb-old", 0.001, 58_000.0)
    async with live_venue(server) as (venue, bus, events):
        bus.publish(cancel("vb-old"))
        bus.publish(cancel("vb-never-sent"))
        await venue.drain()
    assert [(u.client_order_id, u.status, u.filled_qty) for u in updates(events)] == [
        ("vb-old", OrderStatus.CANCELLED, 0.001),
        ("vb-never-sent", OrderStatus.REJECTED, 0.0),
    ]
    assert updates(events)[1].reason == "cancel_unknown_or_closed_order"
    assert fills(events) == []
    old = server.order_by_client_id("vb-old")
    assert old is not None and old.status == "CANCELED"


# --- precision and minimums -----------------------------------------------------------------------


async def test_orders_below_exchange_minimums_are_rejected_without_a_request(
    server: BinanceRestServer,
) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-dust", 0.000001, 60_000.0))  # under the 0.00001 lot
        bus.publish(intent("vb-small", 0.00005, 60_000.0))  # 3 USDT < 5 USDT NOTIONAL
        bus.publish(intent("vb-noprice", 0.001, 0.0))
        bus.publish(intent("vb-synth", 1.0, 1.0, instrument="SYNTH:BTCUSDT"))
        bus.publish(
            Quote(
                ts_event=T0,
                ts_recv=T0,
                instrument=SPOT,
                bid=59_999.0,
                bid_size=1.0,
                ask=60_001.0,
                ask_size=1.0,
            )
        )
        bus.publish(intent("vb-mkt", 0.00005))  # market: checked against the last quote
        await venue.drain()
        assert await venue.amend("vb-dust", price=1.0) is False
    assert [(u.client_order_id, u.status, u.reason) for u in updates(events)] == [
        ("vb-dust", OrderStatus.REJECTED, "below_min_quantity"),
        ("vb-small", OrderStatus.REJECTED, "below_min_notional"),
        ("vb-noprice", OrderStatus.REJECTED, "invalid_limit_price"),
        ("vb-synth", OrderStatus.REJECTED, "unknown_instrument"),
        ("vb-mkt", OrderStatus.REJECTED, "below_min_notional"),
    ]
    assert [r.path for r in server.requests] == ["/api/v3/exchangeInfo"]


async def test_amend_below_minimum_leaves_the_order_alone(server: BinanceRestServer) -> None:
    async with live_venue(server) as (venue, bus, events):
        bus.publish(intent("vb-keep", 0.001, 50_000.0))
        await venue.drain()
        assert await venue.amend("vb-keep", quantity=0.00005) is False
        assert await venue.amend("vb-unknown", price=50_000.0) is False
    assert not server.requested("POST", "/api/v3/order/cancelReplace")
    assert statuses(events, "vb-keep") == [OrderStatus.ACCEPTED]
    assert server.order_by_client_id("vb-keep") is not None


# --- USD-M ----------------------------------------------------------------------------------------


async def test_usdm_places_modifies_and_cancels(server: BinanceRestServer) -> None:
    async with live_venue(server, exchange="binanceusdm") as (venue, bus, events):
        bus.publish(intent("vb-perp", 0.002, 50_000.0, instrument=PERP))  # 100 USDT: the minimum
        bus.publish(intent("vb-perp-small", 0.001, 50_000.0, instrument=PERP))
        await venue.drain()
        assert await venue.amend("vb-perp", quantity=0.003, price=50_100.0)
        server.fill("vb-perp", 0.001, 50_100.0, maker=True, market="usdm")
        assert await venue.reconcile() == 2
        bus.publish(cancel("vb-perp", PERP))
        bus.publish(intent("vb-perp", 0.002, 50_000.0, instrument=PERP))  # a replayed submit
        # reduce-only orders are exempt from MIN_NOTIONAL: 60 USDT goes out, flagged
        bus.publish(intent("vb-perp-close", 0.001, side=Side.SELL, instrument=PERP, reduce_only=True))
        await venue.drain()
    assert [r.outcome for r in server.requested("POST", FAPI_ORDER)] == ["created", "created"]
    assert server.requested("POST", FAPI_ORDER)[1].params["reduceOnly"] == "true"
    assert statuses(events, "vb-perp-close") == [OrderStatus.ACCEPTED, OrderStatus.FILLED]
    (modify,) = server.requested("PUT", FAPI_ORDER)
    assert (modify.params["quantity"], modify.params["price"]) == ("0.003", "50100")
    perp = server.order_by_client_id("vb-perp", "usdm")
    assert perp is not None and perp.status == "CANCELED"
    assert [(u.status, u.reason) for u in updates(events, "vb-perp")] == [
        (OrderStatus.ACCEPTED, ""),
        (OrderStatus.ACCEPTED, "amended"),
        (OrderStatus.PARTIALLY_FILLED, ""),
        (OrderStatus.CANCELLED, ""),
    ]
    assert [u.reason for u in updates(events, "vb-perp-small")] == ["below_min_notional"]
    fill, close = fills(events)
    assert (fill.instrument, fill.fee_currency, fill.fee) == (PERP, "USDT", pytest.approx(0.0501))
    assert (close.side, close.liquidity, close.fee) == (Side.SELL, Liquidity.TAKER, pytest.approx(0.06))
    assert server.requested("GET", "/fapi/v1/userTrades")


async def test_usdm_duplicate_client_id_is_reconciled(server: BinanceRestServer) -> None:
    """USD-M says -4116 "ClientOrderId is duplicated."; the venue adopts the existing order."""
    async with live_venue(server, exchange="binanceusdm") as (venue, bus, _):
        bus.publish(intent("vb-perp-dup", 0.002, 50_000.0, instrument=PERP))
        await venue.drain()
    async with live_venue(server, exchange="binanceusdm") as (venue, bus, events):
        bus.publish(intent("vb-perp-dup", 0.002, 50_000.0, instrument=PERP))
        await venue.drain()
    assert [r.outcome for r in server.requested("POST", FAPI_ORDER)] == ["created", "duplicate"]
    assert len(server.orders["usdm"]) == 1
    assert statuses(events, "vb-perp-dup") == [OrderStatus.ACCEPTED]


def test_venue_from_live_settings() -> None:
    live = LiveConfig(exchange="binanceusdm", testnet=True, api_key=API_KEY, api_secret=API_SECRET)
    venue = CcxtVenue.from_live_config(live, [].append, timeout_ms=1_234)
    assert (venue.exchange.id, venue.config.timeout_ms) == ("binanceusdm", 1_234)
    assert (venue.exchange.apiKey, venue.exchange.secret) == (API_KEY, API_SECRET)
    assert venue.exchange.urls["api"]["fapiPrivate"].startswith("https://testnet.binancefuture.com")
    assert API_KEY not in repr(live) and API_SECRET not in repr(venue.config)
    with pytest.raises(ValueError, match="deribit"):
        CcxtVenue.from_live_config(LiveConfig(exchange="deribit"), [].append)


# --- secrets ----------------------------------------------------------------------------------------


@pytest.fixture
def debug_log(tmp_path: Path) -> Iterator[Path]:
    path = configure_logging(tmp_path, "run-ccxt", level="DEBUG", console=True)
    yield path
    close_logging()


async def test_secrets_never_appear_in_log_output(
    server: BinanceRestServer, debug_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.fault("POST", ORDER, Fault(delay_s=0.5))
    server.fault(
        "DELETE", ORDER, Fault(status=400, body={"code": -1021, "msg": "Timestamp outside recvWindow."})
    )
    with structlog.testing.capture_logs() as captured:
        async with live_venue(server, timeout_ms=200) as (venue, bus, _):
            bus.publish(intent("vb-secret", 0.001, 50_000.0))
            bus.publish(cancel("vb-secret"))
            await venue.drain()
    async with live_venue(server, timeout_ms=200) as (venue, bus, events):  # now into the log file
        bus.publish(intent("vb-secret-2", 0.001, 50_000.0))
        bus.publish(cancel("vb-secret-2"))
        server.fault("POST", ORDER, Fault(delay_s=0.5))
        bus.publish(intent("vb-secret-3", 0.001, 50_000.0))
        await venue.drain()
    close_logging()

    ours = json.dumps(captured, default=str)
    assert "create_order_outcome_unknown" in ours  # the venue did log the trouble, unredacted
    text = debug_log.read_text(encoding="utf-8")
    console = capsys.readouterr().err
    assert "/api/v3/order" in text  # ccxt's own DEBUG request lines were captured...
    assert "'X-MBX-APIKEY': '***'" in text  # ...headers included: the venue registered its secrets
    assert '"client_order_id":"vb-secret-3"' in text and '"instrument":"BINANCE:BTCUSDT"' in text
    for secret in (API_KEY, API_SECRET):
        assert secret not in ours and secret not in text and secret not in console
    assert statuses(events, "vb-secret-3") == [OrderStatus.ACCEPTED]
