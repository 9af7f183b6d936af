"""Live execution through ccxt: Binance spot and USD-M orders, reconciled into the paper venue's events.

The core is synchronous and deterministic, so this venue never does I/O inside a bus handler.
:class:`CcxtVenue` subscribes to ``SubmitOrder`` and ``CancelOrder`` like
:class:`adapters.paper.PaperVenue`, only *queues* them, and one asyncio worker sends them in
order through ccxt's async client. Everything the exchange says comes back as ``OrderUpdate``
and ``Fill`` events pushed into ``sink`` (``InboundQueue.put_nowait``), so they are journalled
and dispatched like any inbound event: ``ts_event`` is the exchange's time (ms → ns),
``ts_recv`` the local time when the answer arrived.

Exactly once, in both directions:

- The order manager's deterministic client order id is Binance's ``newClientOrderId``. A
  submit whose outcome is unknown (timeout, connection lost, 5xx) is looked up by that id
  before anything is re-sent, and a "duplicate order" answer is reconciled to the order that
  already exists. A second ``SubmitOrder`` with a known id is never sent at all.
- Fills come from the order's placement response and from ``myTrades``/``userTrades``; each
  exchange trade id becomes one ``Fill``, however often it is seen.

Orders below the exchange's minimums (``load_markets()``: amount and cost limits, amount
precision) are rejected here without a request. Amending goes through ccxt ``edit_order``:
cancel-replace on spot (the replacement gets a derived client id; the engine keeps seeing the
original one), modify-in-place on USD-M. Event order per order mirrors the paper venue:
``ACCEPTED``, then each ``Fill``, then the status the fills led to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeAlias
from urllib.parse import urlsplit

import ccxt.async_support as ccxt_async
import structlog
from ccxt.base.errors import (
    DuplicateOrderId,
    ExchangeError,
    InsufficientFunds,
    InvalidOrder,
    OperationFailed,
    OrderNotFound,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from bot.bus import EventBus
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
    Venue,
    split_instrument,
)
from bot.logs import register_secret

log = structlog.get_logger("adapters.ccxt_venue")

EventSink = Callable[[Event], None]


class LiveSettings(Protocol):
    """What the venue reads of ``config.settings.LiveConfig`` (not imported: settings import adapters)."""

    exchange: str
    testnet: bool
    api_key: SecretStr | None
    api_secret: SecretStr | None


CcxtOrder: TypeAlias = dict[str, Any]
CcxtMarket: TypeAlias = dict[str, Any]

NANOS_PER_MILLI = 1_000_000
MAX_CLIENT_ID_LENGTH = 36  # Binance: ^[.A-Z:/a-z0-9_-]{1,36}$
_TRADE_PAGE = 1000
_MAX_TRADE_PAGES = 10
_QTY_EPS = 1e-12
_BINANCE_CODE = re.compile(r'"code"\s*:\s*(-?\d+)')
_BINANCE_MSG = re.compile(r'"msg"\s*:\s*"([^"]*)"')
# Binance codes meaning "this client order id is already taken": spot answers -2010 with
# "Duplicate order sent." (-2010 also covers other refusals, so the message decides), USD-M -4116.
_DUPLICATE_CODES = frozenset({-4116})
_CANCEL_REPLACE_NEW_FAILED = -2021  # spot cancel-replace: the cancel went through, the new order did not
_CANCEL_REPLACE_FAILED = -2022  # spot cancel-replace: the cancel failed, nothing changed
# Binance order states → the engine's; expiry (IOC/FOK leftovers, STP) ends the order like a cancel.
_STATUS: dict[str, OrderStatus] = {
    "NEW": OrderStatus.ACCEPTED,
    "PARTIALLY_FILLED": OrderStatus.PARTIALLY_FILLED,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELLED,
    "PENDING_CANCEL": OrderStatus.CANCELLED,
    "EXPIRED": OrderStatus.CANCELLED,
    "EXPIRED_IN_MATCH": OrderStatus.CANCELLED,
    "REJECTED": OrderStatus.REJECTED,
}
_CCXT_STATUS: dict[str, OrderStatus] = {
    "open": OrderStatus.ACCEPTED,
    "closed": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELLED,
    "expired": OrderStatus.CANCELLED,
    "rejected": OrderStatus.REJECTED,
}
# Engine venue → (ccxt market type, exchanges that list it).
_VENUE_MARKETS: dict[Venue, tuple[str, frozenset[str]]] = {
    Venue.BINANCE: ("spot", frozenset({"binance"})),
    Venue.BINANCE_USDM: ("swap", frozenset({"binance", "binanceusdm"})),
}
_MARKET_TYPES: dict[str, list[str]] = {"binance": ["spot"], "binanceusdm": ["linear"]}


class CcxtVenueConfig(BaseModel):
    """Which exchange, which endpoints, and how patiently to talk to them."""

    model_config = ConfigDict(extra="forbid")

    exchange: Literal["binance", "binanceusdm"] = Field(
        "binance", description="ccxt exchange id: binance (spot) or binanceusdm (USD-M perpetuals)"
    )
    testnet: bool = Field(True, description="trade on the exchange's testnet (ccxt sandbox mode)")
    base_url: str | None = Field(
        None,
        description="send every REST call to this scheme://host[:port], keeping Binance's paths "
        "(a local test server, a recording proxy)",
    )
    urls_override: dict[str, str] = Field(
        default_factory=dict, description="ccxt urls['api'] entries to replace, applied last"
    )
    timeout_ms: int = Field(10_000, ge=50, description="one HTTP request's timeout")
    max_retries: int = Field(3, ge=0, le=10, description="re-sends after a network failure")
    retry_backoff_s: float = Field(0.5, ge=0.0, description="first retry delay; doubles each time")
    retry_backoff_max_s: float = Field(5.0, ge=0.0)
    recv_window_ms: int = Field(5_000, ge=1, le=60_000, description="Binance recvWindow of signed calls")
    poll_interval_s: float = Field(5.0, ge=0.0, description="reconcile period; 0 disables the poller")
    trade_lookback_s: float = Field(
        60.0, ge=0.0, description="first trades poll starts this long before start (clock skew)"
    )
    enable_rate_limit: bool = Field(True, description="ccxt's client-side rate limiter")
    instruments: list[str] = Field(
        default_factory=list, description="instruments whose trades are polled even with no open order"
    )

    @field_validator("base_url")
    @classmethod
    def _is_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"base_url must look like http(s)://host[:port], got {url!r}")
            return url.rstrip("/")
        return url


def build_exchange(
    config: CcxtVenueConfig, api_key: SecretStr | str | None, api_secret: SecretStr | str | None
) -> ccxt_async.Exchange:
    """A ccxt async client set up for trading: sandbox, endpoint overrides, no side requests.

    Only the traded market type is loaded (no margin, coin-margined or option exchangeInfo),
    and currencies are not fetched (a private sapi call this venue does not need).
    """
    options: dict[str, Any] = {
        "fetchMarkets": {"types": _MARKET_TYPES[config.exchange]},
        "fetchCurrencies": False,
        "adjustForTimeDifference": False,
        "recvWindow": config.recv_window_ms,
        # ccxt refuses the futures testnet unless told the user knows it is deprecated.
        "disableFuturesSandboxWarning": True,
    }
    exchange: ccxt_async.Exchange = getattr(ccxt_async, config.exchange)(
        {
            "apiKey": _plain(api_key),
            "secret": _plain(api_secret),
            "enableRateLimit": config.enable_rate_limit,
            "timeout": config.timeout_ms,
            "options": options,
        }
    )
    if config.testnet:
        exchange.set_sandbox_mode(True)
    if config.base_url is not None:
        exchange.urls["api"] = {
            name: _rebase(url, config.base_url) if isinstance(url, str) else url
            for name, url in exchange.urls["api"].items()
        }
    exchange.urls["api"].update(config.urls_override)
    return exchange


def _plain(secret: SecretStr | str | None) -> str:
    if secret is None:
        return ""
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


def _rebase(url: str, base_url: str) -> str:
    """``https://api.binance.com/api/v3`` → ``<base_url>/api/v3``."""
    parts = urlsplit(url)
    return base_url + parts.path


@dataclass(slots=True)
class _LiveOrder:
    """What this venue knows of one engine order; ``status`` is the last status it emitted."""

    client_order_id: str
    instrument: str
    symbol: str
    side: Side
    order_type: OrderType
    quantity: float
    price: float | None
    reduce_only: bool
    exchange_client_id: str  # differs from client_order_id after a spot amend (cancel-replace)
    venue_order_id: str = ""
    status: OrderStatus = OrderStatus.NEW
    uncertain: bool = False  # a create was sent and its outcome is unknown
    amendments: int = 0
    filled_qty: float = 0.0
    notional: float = 0.0
    status_filled: float = 0.0  # filled_qty when the last status went out
    leg_filled: dict[str, float] = field(default_factory=dict)  # per exchange order id

    @property
    def is_open(self) -> bool:
        return self.status.is_open

    @property
    def avg_price(self) -> float:
        return self.notional / self.filled_qty if self.filled_qty > 0.0 else 0.0


@dataclass(slots=True)
class _Submit:
    intent: OrderIntent


@dataclass(slots=True)
class _Cancel:
    client_order_id: str
    instrument: str


@dataclass(slots=True)
class _Amend:
    client_order_id: str
    quantity: float | None
    price: float | None
    done: asyncio.Future[bool]


_Command: TypeAlias = _Submit | _Cancel | _Amend


class CcxtVenue:
    """A real exchange behind the bus: queues order commands, sends them through ccxt, reports back.

    Use as ``async with CcxtVenue(...) as venue`` (or ``await start()`` / ``await close()``):
    start loads the markets and runs the command worker and, when ``poll_interval_s`` > 0, the
    reconcile poller. Credentials are registered for log redaction and never logged.
    """

    def __init__(
        self,
        config: CcxtVenueConfig,
        sink: EventSink,
        *,
        api_key: SecretStr | str | None = None,
        api_secret: SecretStr | str | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self._sink = sink
        self._clock = clock
        for secret in (api_key, api_secret):
            if secret is not None:
                register_secret(_plain(secret))
        self.exchange = build_exchange(config, api_key, api_secret)
        self._queue: asyncio.Queue[_Command] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._orders: dict[str, _LiveOrder] = {}
        self._by_venue_id: dict[str, str] = {}
        self._seen_trades: set[tuple[str, str]] = set()
        self._last_trade_id: dict[str, int] = {}
        self._trades_since_ms = 0
        self._reference: dict[str, float] = {}
        self.emitted = 0
        if bus is not None:
            self.attach(bus)

    @classmethod
    def from_live_config(
        cls,
        live: LiveSettings,
        sink: EventSink,
        *,
        bus: EventBus | None = None,
        **overrides: Any,
    ) -> CcxtVenue:
        """The venue of the ``[live]`` settings section (exchange, testnet, credentials)."""
        if live.exchange not in _MARKET_TYPES:
            raise ValueError(f"live trading on {live.exchange!r} is not supported by CcxtVenue")
        config = CcxtVenueConfig(exchange=live.exchange, testnet=live.testnet, **overrides)
        return cls(config, sink, api_key=live.api_key, api_secret=live.api_secret, bus=bus)

    # --- wiring ----------------------------------------------------------------------------------

    def attach(self, bus: EventBus) -> None:
        """Take order commands (and quotes, for market orders' minimum notional) from ``bus``."""
        bus.subscribe(SubmitOrder, self.on_submit)
        bus.subscribe(CancelOrder, self.on_cancel)
        bus.subscribe(Quote, self.on_quote)

    def on_submit(self, command: SubmitOrder) -> None:
        """Bus handler: no I/O here, the worker sends it."""
        self._queue.put_nowait(_Submit(command.intent))

    def on_cancel(self, command: CancelOrder) -> None:
        self._queue.put_nowait(_Cancel(command.client_order_id, command.instrument))

    def on_quote(self, quote: Quote) -> None:
        if quote.bid > 0.0 and quote.ask > 0.0:
            self._reference[quote.instrument] = quote.mid

    async def amend(
        self, client_order_id: str, quantity: float | None = None, price: float | None = None
    ) -> bool:
        """Change a working limit order's total quantity and/or price; True when the exchange took it.

        Queued behind earlier commands so it never overtakes the submit it amends. A refused
        amend leaves the order as it was (no event), unless the exchange cancelled it on the way.
        """
        if not self._tasks:
            raise RuntimeError("start the venue before amending orders")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Amend(client_order_id, quantity, price, done))
        return await done

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load markets (precision, minimums) and run the worker and the poller."""
        await self.exchange.load_markets()
        self._trades_since_ms = int(self._clock() // NANOS_PER_MILLI - self.config.trade_lookback_s * 1000)
        self._tasks.append(asyncio.create_task(self._run_commands(), name="ccxt-venue-commands"))
        if self.config.poll_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._run_poller(), name="ccxt-venue-poller"))
        log.info(
            "ccxt_venue_started",
            exchange=self.exchange.id,
            testnet=self.config.testnet,
            markets=len(self.exchange.markets),
        )

    async def drain(self) -> None:
        """Wait until every queued command has been handled (tests, orderly shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        """Stop the worker and the poller, close ccxt's HTTP session."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        while not self._queue.empty():  # nobody will send these any more
            command = self._queue.get_nowait()
            self._queue.task_done()
            if isinstance(command, _Amend) and not command.done.done():
                command.done.set_exception(RuntimeError("venue closed before the amend was sent"))
            else:
                log.warning("command_dropped_on_close", command=type(command).__name__)
        await self.exchange.close()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def open_orders(self) -> list[str]:
        """Client order ids this venue still believes working, in submission order."""
        return [cid for cid, order in self._orders.items() if order.is_open]

    def venue_order_id(self, client_order_id: str) -> str:
        """The exchange's current order id for an engine order ("" when unknown)."""
        order = self._orders.get(client_order_id)
        return order.venue_order_id if order is not None else ""

    def exchange_client_id(self, client_order_id: str) -> str:
        """The client id the exchange currently knows the order by (changes on a spot amend)."""
        order = self._orders.get(client_order_id)
        return order.exchange_client_id if order is not None else ""

    # --- instruments -----------------------------------------------------------------------------

    def market(self, instrument: str) -> CcxtMarket | None:
        """ccxt's market of an instrument: ``BINANCE:BTCUSDT`` is ``BTC/USDT``.

        ``BINANCE_USDM:BTCUSDT`` is ``BTC/USDT:USDT``; other venues, or a market the configured
        exchange does not list, give None.
        """
        try:
            venue, symbol = split_instrument(instrument)
        except ValueError:
            return None
        wanted = _VENUE_MARKETS.get(venue)
        if wanted is None or self.exchange.id not in wanted[1] or not self.exchange.markets_by_id:
            return None
        for market in self.exchange.markets_by_id.get(symbol, []):
            if market["type"] == wanted[0] and (market["spot"] or market["linear"]):
                return market
        return None

    def ccxt_symbol(self, instrument: str) -> str | None:
        market = self.market(instrument)
        return market["symbol"] if market is not None else None

    def _check(
        self,
        market: CcxtMarket,
        instrument: str,
        quantity: float,
        order_type: OrderType,
        price: float | None,
        reduce_only: bool,
    ) -> tuple[float, float | None] | str:
        """Amount and price at the exchange's precision, or why the exchange would refuse them."""
        symbol = market["symbol"]
        if not quantity > 0.0:
            return "invalid_quantity"
        try:
            amount = float(self.exchange.amount_to_precision(symbol, quantity))
        except InvalidOrder:
            return "below_min_quantity"
        limits = market.get("limits") or {}
        min_amount = (limits.get("amount") or {}).get("min")
        if min_amount is not None and amount < min_amount - _QTY_EPS:
            return "below_min_quantity"
        limit_price: float | None = None
        if order_type is OrderType.LIMIT:
            if price is None or not price > 0.0:
                return "invalid_limit_price"
            try:
                limit_price = float(self.exchange.price_to_precision(symbol, price))
            except InvalidOrder:
                return "invalid_limit_price"
        reference = limit_price if limit_price is not None else self._reference.get(instrument)
        min_cost = (limits.get("cost") or {}).get("min")
        if (
            not reduce_only
            and min_cost is not None
            and reference is not None
            and amount * reference < min_cost
        ):
            return "below_min_notional"
        return amount, limit_price

    # --- worker ----------------------------------------------------------------------------------

    async def _run_commands(self) -> None:
        while True:
            command = await self._queue.get()
            try:
                async with self._lock:
                    await self._handle(command)
            except Exception as exc:
                # One command's surprise must not stop the venue; reconcile() repairs the state.
                client_order_id = command.intent.client_order_id if isinstance(command, _Submit) else None
                log.exception(
                    "ccxt_command_failed",
                    command=type(command).__name__,
                    client_order_id=client_order_id or getattr(command, "client_order_id", None),
                )
                if isinstance(command, _Amend) and not command.done.done():
                    command.done.set_exception(exc)
            finally:
                if isinstance(command, _Amend) and not command.done.done():
                    command.done.cancel()  # the worker was stopped mid-amend
                self._queue.task_done()

    async def _handle(self, command: _Command) -> None:
        if isinstance(command, _Submit):
            intent = command.intent
            with structlog.contextvars.bound_contextvars(
                client_order_id=intent.client_order_id, instrument=intent.instrument
            ):
                await self._submit(intent)
        elif isinstance(command, _Cancel):
            with structlog.contextvars.bound_contextvars(
                client_order_id=command.client_order_id, instrument=command.instrument
            ):
                await self._cancel(command.client_order_id, command.instrument)
        else:
            order = self._orders.get(command.client_order_id)
            with structlog.contextvars.bound_contextvars(
                client_order_id=command.client_order_id, instrument=order.instrument if order else None
            ):
                accepted = await self._amend(command.client_order_id, command.quantity, command.price)
            if not command.done.done():
                command.done.set_result(accepted)

    async def _run_poller(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.reconcile()
            except OperationFailed as exc:
                log.warning("reconcile_network_error", error=_describe(exc))
            except Exception:
                log.exception("reconcile_failed")

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.config.retry_backoff_s * 2 ** (attempt - 1), self.config.retry_backoff_max_s)
        await asyncio.sleep(delay)

    # --- submit ----------------------------------------------------------------------------------

    async def _submit(self, intent: OrderIntent) -> None:
        cid = intent.client_order_id
        known = self._orders.get(cid)
        if known is not None:
            log.warning(
                "duplicate_submit_ignored", status=known.status.value, venue_order_id=known.venue_order_id
            )
            return
        market = self.market(intent.instrument)
        order = _LiveOrder(
            client_order_id=cid,
            instrument=intent.instrument,
            symbol=market["symbol"] if market is not None else "",
            side=intent.side,
            order_type=intent.order_type,
            quantity=intent.quantity,
            price=intent.limit_price,
            reduce_only=intent.reduce_only,
            exchange_client_id=cid,
        )
        self._orders[cid] = order
        if market is None:
            self._emit_status(order, OrderStatus.REJECTED, None, reason="unknown_instrument")
            return
        checked = self._check(
            market,
            intent.instrument,
            intent.quantity,
            intent.order_type,
            intent.limit_price,
            intent.reduce_only,
        )
        if isinstance(checked, str):
            self._emit_status(order, OrderStatus.REJECTED, None, reason=checked)
            return
        amount, price = checked
        if abs(amount - intent.quantity) > _QTY_EPS:
            log.warning("quantity_rounded_to_precision", requested=intent.quantity, amount=amount)
        order.quantity, order.price = amount, price
        await self._place(order, market)

    async def _place(self, order: _LiveOrder, market: CcxtMarket) -> None:
        """Create the order exactly once: after an unknown outcome, look it up before re-sending."""
        params: dict[str, Any] = {"clientOrderId": order.exchange_client_id}
        if order.reduce_only and market.get("contract"):
            params["reduceOnly"] = True
        order_type = "limit" if order.order_type is OrderType.LIMIT else "market"
        side = order.side.value.lower()
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await self._backoff(attempt)
            if order.uncertain:
                try:
                    found = await self._lookup(order)
                except OperationFailed as exc:
                    log.warning("order_lookup_failed", attempt=attempt, error=_describe(exc))
                    continue
                if found is not None:
                    log.info(
                        "order_found_after_uncertain_create", attempt=attempt, venue_order_id=found["id"]
                    )
                    order.uncertain = False
                    await self._absorb(order, found)
                    return
            log.info(
                "create_order",
                attempt=attempt,
                symbol=order.symbol,
                side=side,
                order_type=order_type,
                amount=order.quantity,
                price=order.price,
            )
            try:
                created = await self.exchange.create_order(
                    order.symbol, order_type, side, order.quantity, order.price, params
                )
            except OperationFailed as exc:
                # ccxt's "may or may not have happened" family: timeouts, lost connections, 5xx,
                # Binance -1001/-1007. Only a lookup by client id can tell.
                order.uncertain = True
                log.warning("create_order_outcome_unknown", attempt=attempt, error=_describe(exc))
                continue
            except ExchangeError as exc:
                if not _is_duplicate(exc):
                    order.uncertain = False
                    self._emit_status(order, OrderStatus.REJECTED, None, reason=_reject_reason(exc))
                    return
                log.warning("create_order_duplicate", attempt=attempt, error=_describe(exc))
                try:
                    found = await self._lookup(order)
                except OperationFailed as lookup_exc:
                    order.uncertain = True
                    log.warning("order_lookup_failed", attempt=attempt, error=_describe(lookup_exc))
                    continue
                if found is None:
                    order.uncertain = False
                    self._emit_status(order, OrderStatus.REJECTED, None, reason="duplicate_client_order_id")
                    return
                order.uncertain = False
                await self._absorb(order, found)
                return
            order.uncertain = False
            await self._absorb(order, created)
            return
        log.error("create_order_unresolved", attempts=self.config.max_retries + 1)

    async def _lookup(self, order: _LiveOrder) -> CcxtOrder | None:
        """The exchange's order by its client id, or None when the exchange has no such order."""
        try:
            return await self.exchange.fetch_order(
                "", order.symbol, {"origClientOrderId": order.exchange_client_id}
            )
        except OrderNotFound:
            return None

    # --- cancel ----------------------------------------------------------------------------------

    async def _cancel(self, cid: str, instrument: str) -> None:
        order = self._orders.get(cid)
        if order is None:
            order = await self._adopt_unknown(cid, instrument)
            if order is None:
                self._reject_command(cid, instrument, "cancel_unknown_or_closed_order")
                return
        if order.uncertain:
            found = await self._lookup(order)
            if found is None:
                order.uncertain = False
                self._emit_status(order, OrderStatus.REJECTED, None, reason="not_found_after_network_error")
                return
            order.uncertain = False
            await self._absorb(order, found)
        if not order.is_open:
            self._reject_command(
                cid, order.instrument, "cancel_unknown_or_closed_order", order.venue_order_id
            )
            return
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await self._backoff(attempt)
            log.info("cancel_order", attempt=attempt, venue_order_id=order.venue_order_id)
            try:
                cancelled = await self.exchange.cancel_order(
                    order.venue_order_id, order.symbol, {"origClientOrderId": order.exchange_client_id}
                )
            except OrderNotFound:
                # Gone already: filled, expired or cancelled elsewhere. Report what it became.
                found = await self._lookup(order)
                if found is None:
                    self._reject_command(cid, order.instrument, "cancel_unknown_or_closed_order")
                else:
                    await self._absorb(order, found)
                return
            except OperationFailed as exc:
                log.warning("cancel_order_outcome_unknown", attempt=attempt, error=_describe(exc))
                continue
            except ExchangeError as exc:
                log.warning("cancel_order_refused", error=_describe(exc))
                found = await self._lookup(order)
                if found is not None:
                    await self._absorb(order, found)
                return
            await self._absorb(order, cancelled)
            return
        log.error("cancel_order_unresolved", attempts=self.config.max_retries + 1)

    async def _adopt_unknown(self, cid: str, instrument: str) -> _LiveOrder | None:
        """An order this run did not send (a previous run's, being cancelled): found by client id, or None.

        The engine already knows this order, so its fills so far are taken as booked by the run
        that saw them (a resumed portfolio has them): they are marked seen, not reported again.
        """
        market = self.market(instrument)
        if market is None:
            return None
        probe = _LiveOrder(
            client_order_id=cid,
            instrument=instrument,
            symbol=market["symbol"],
            side=Side.BUY,
            order_type=OrderType.LIMIT,
            quantity=0.0,
            price=None,
            reduce_only=False,
            exchange_client_id=cid,
        )
        found = await self._lookup(probe)
        if found is None:
            return None
        probe.side = Side.SELL if found.get("side") == "sell" else Side.BUY
        probe.order_type = OrderType.MARKET if found.get("type") == "market" else OrderType.LIMIT
        probe.quantity = float(found.get("amount") or 0.0)
        probe.price = found.get("price")
        probe.status = OrderStatus.ACCEPTED  # the engine knows it; do not announce it again
        venue_id = str(found["id"])
        probe.venue_order_id = venue_id
        if float(found.get("filled") or 0.0) > 0.0:
            for trade in await self.exchange.fetch_my_trades(probe.symbol, None, None, {"orderId": venue_id}):
                quantity, price = float(trade.get("amount") or 0.0), float(trade.get("price") or 0.0)
                self._seen_trades.add((probe.symbol, str(trade.get("id"))))
                probe.leg_filled[venue_id] = probe.leg_filled.get(venue_id, 0.0) + quantity
                probe.filled_qty += quantity
                probe.notional += quantity * price
        probe.status_filled = probe.filled_qty
        if probe.filled_qty > _QTY_EPS:
            probe.status = OrderStatus.PARTIALLY_FILLED
        self._orders[cid] = probe
        log.info("order_adopted", venue_order_id=venue_id, filled_qty=probe.filled_qty)
        await self._absorb(probe, found)
        return probe

    # --- amend -----------------------------------------------------------------------------------

    async def _amend(self, cid: str, quantity: float | None, price: float | None) -> bool:
        order = self._orders.get(cid)
        if order is None or not order.is_open or order.uncertain or not order.venue_order_id:
            log.warning("amend_refused", reason="unknown_or_closed_order")
            return False
        if order.order_type is not OrderType.LIMIT:
            log.warning("amend_refused", reason="not_a_limit_order")
            return False
        market = self.market(order.instrument)
        assert market is not None  # it was accepted on this market
        total = quantity if quantity is not None else order.quantity
        is_spot = bool(market["spot"])
        # Spot cancel-replace places a new order for what is left; USD-M modifies the total in place.
        wanted = total - order.filled_qty if is_spot else total
        checked = self._check(
            market,
            order.instrument,
            wanted,
            OrderType.LIMIT,
            price if price is not None else order.price,
            False,
        )
        if isinstance(checked, str):
            log.warning("amend_refused", reason=checked, quantity=total, price=price)
            return False
        amount, new_price = checked
        side = order.side.value.lower()
        params: dict[str, Any] = {}
        new_client_id = order.exchange_client_id
        if is_spot:
            new_client_id = amended_client_id(cid, order.amendments + 1)
            params["clientOrderId"] = new_client_id
        log.info("amend_order", venue_order_id=order.venue_order_id, amount=amount, price=new_price)
        previous_leg = order.venue_order_id
        try:
            edited = await self.exchange.edit_order(
                order.venue_order_id, order.symbol, "limit", side, amount, new_price, params
            )
        except (OperationFailed, ExchangeError) as exc:
            code = _binance_code(exc)
            if code == _CANCEL_REPLACE_NEW_FAILED:
                # Binance's cancel-replace answers (ccxt: BadResponse on the real hosts) say for sure.
                log.warning("amend_cancelled_but_not_replaced", error=_describe(exc))
                await self._refresh(order, previous_leg)
                if order.is_open:
                    self._emit_status(order, OrderStatus.CANCELLED, None, reason="amend_failed_after_cancel")
                return False
            if isinstance(exc, OperationFailed) and code != _CANCEL_REPLACE_FAILED:
                log.warning("amend_outcome_unknown", error=_describe(exc))
                return await self._resolve_amend(order, new_client_id, total, amount, new_price)
            log.warning("amend_refused_by_exchange", error=_describe(exc))
            await self._refresh(order, previous_leg)
            return False
        order.amendments += 1
        order.exchange_client_id = new_client_id
        order.quantity = total
        order.price = new_price
        if is_spot:
            await self._sync_trades(order.symbol)  # fills of the replaced leg up to the cancel
        await self._absorb(order, edited, reason="amended")
        return True

    async def _resolve_amend(
        self, order: _LiveOrder, new_client_id: str, total: float, amount: float, price: float | None
    ) -> bool:
        """After an amend with unknown outcome: did the replacement (or the modification) happen?"""
        if new_client_id != order.exchange_client_id:
            probe_id, order.exchange_client_id = order.exchange_client_id, new_client_id
            found = await self._lookup(order)
            if found is not None:
                order.amendments += 1
                order.quantity = total
                order.price = found.get("price")
                await self._sync_trades(order.symbol)
                await self._absorb(order, found, reason="amended")
                return True
            order.exchange_client_id = probe_id
            await self._refresh(order, order.venue_order_id)
            return False
        # Modified in place (USD-M): it happened if the order now carries the new values.
        try:
            found = await self.exchange.fetch_order(order.venue_order_id, order.symbol)
        except OrderNotFound:
            return False
        modified = found.get("amount") == amount and found.get("price") == price
        if modified:
            order.amendments += 1
            order.quantity, order.price = total, price
        await self._absorb(order, found, reason="amended" if modified else "")
        return modified

    async def _refresh(self, order: _LiveOrder, venue_order_id: str) -> None:
        """Re-read one exchange order and report whatever changed."""
        try:
            found = await self.exchange.fetch_order(venue_order_id, order.symbol)
        except OrderNotFound:
            return
        await self._absorb(order, found)

    # --- reconcile -------------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Poll open orders and new trades; report fills (once per trade id) and status changes.

        Returns the number of events emitted. Fills go out before the status they explain.
        Orders whose create had an unknown outcome are resolved here: found, or rejected.
        """
        async with self._lock:
            before = self.emitted
            open_orders = [order for order in self._orders.values() if order.is_open]
            symbols = {order.symbol for order in open_orders}
            for instrument in self.config.instruments:
                symbol = self.ccxt_symbol(instrument)
                if symbol is not None:
                    symbols.add(symbol)
            for symbol in sorted(symbols):
                await self._sync_trades(symbol)
            working: dict[str, dict[str, CcxtOrder]] = {}
            for symbol in sorted({order.symbol for order in open_orders}):
                listed = await self.exchange.fetch_open_orders(symbol)
                working[symbol] = {str(item["id"]): item for item in listed}
            for order in open_orders:
                with structlog.contextvars.bound_contextvars(
                    client_order_id=order.client_order_id, instrument=order.instrument
                ):
                    await self._reconcile_order(order, working[order.symbol])
            return self.emitted - before

    async def _reconcile_order(self, order: _LiveOrder, working: dict[str, CcxtOrder]) -> None:
        if order.uncertain:
            found = await self._lookup(order)
            order.uncertain = False
            if found is None:
                self._emit_status(order, OrderStatus.REJECTED, None, reason="not_found_after_network_error")
                return
            await self._absorb(order, found)
            return
        listed = working.get(order.venue_order_id)
        if listed is not None:
            await self._absorb(order, listed)
            return
        await self._refresh(order, order.venue_order_id)  # no longer working: learn how it ended

    async def _sync_trades(self, symbol: str) -> None:
        """New account trades on ``symbol`` since the last seen trade id → fills of known orders."""
        for _ in range(_MAX_TRADE_PAGES):
            last = self._last_trade_id.get(symbol)
            if last is None:
                trades = await self.exchange.fetch_my_trades(symbol, self._trades_since_ms, _TRADE_PAGE)
            else:
                trades = await self.exchange.fetch_my_trades(symbol, None, _TRADE_PAGE, {"fromId": last + 1})
            for trade in trades:
                self._fill_from_trade(trade, Liquidity.TAKER)
                trade_id = _int_or_none(trade.get("id"))
                if trade_id is not None:
                    self._last_trade_id[symbol] = max(self._last_trade_id.get(symbol, trade_id), trade_id)
            if len(trades) < _TRADE_PAGE:
                return

    # --- exchange state → events -----------------------------------------------------------------

    async def _absorb(self, order: _LiveOrder, exchange_order: CcxtOrder, reason: str = "") -> None:
        """Report an exchange view of ``order``: ACCEPTED first, then new fills, then the status."""
        venue_id = str(exchange_order.get("id") or "")
        renamed = bool(venue_id and order.venue_order_id) and venue_id != order.venue_order_id
        if venue_id:
            order.venue_order_id = venue_id
            self._by_venue_id[venue_id] = order.client_order_id
        status, status_reason = _status_of(exchange_order)
        ts_ms = _order_time_ms(exchange_order)
        if order.status is OrderStatus.NEW and status is not OrderStatus.REJECTED:
            self._emit_status(order, OrderStatus.ACCEPTED, ts_ms)
        executed = float(exchange_order.get("filled") or 0.0)
        if venue_id and executed > order.leg_filled.get(venue_id, 0.0) + _QTY_EPS:
            for trade in exchange_order.get("trades") or []:
                # Trades in a placement response matched on arrival: the order took liquidity.
                self._fill_from_trade({**trade, "order": venue_id}, Liquidity.TAKER, ts_ms)
            if executed > order.leg_filled.get(venue_id, 0.0) + _QTY_EPS:
                try:
                    trades = await self.exchange.fetch_my_trades(
                        order.symbol, None, None, {"orderId": venue_id}
                    )
                except OperationFailed as exc:
                    # Never report an end the engine cannot explain with fills: reconcile retries.
                    log.warning("fills_pending", venue_order_id=venue_id, error=_describe(exc))
                    return
                for trade in trades:
                    self._fill_from_trade(trade, Liquidity.TAKER)
        if status in (OrderStatus.ACCEPTED, OrderStatus.PARTIALLY_FILLED):
            status = OrderStatus.PARTIALLY_FILLED if order.filled_qty > _QTY_EPS else OrderStatus.ACCEPTED
        if (
            reason
            or renamed
            or status is not order.status
            or (status is OrderStatus.PARTIALLY_FILLED and order.filled_qty != order.status_filled)
        ):
            self._emit_status(order, status, ts_ms, reason=reason or status_reason)

    def _fill_from_trade(self, trade: dict[str, Any], default: Liquidity, ts_ms: int | None = None) -> bool:
        """One exchange trade → one ``Fill``, the first time its id is seen for a known order."""
        trade_id = str(trade.get("id") or "")
        symbol = str(trade.get("symbol") or "")
        cid = self._by_venue_id.get(str(trade.get("order") or ""))
        order = self._orders.get(cid) if cid is not None else None
        if not trade_id or order is None:
            return False
        key = (order.symbol, trade_id)
        if key in self._seen_trades:
            return False
        self._seen_trades.add(key)
        quantity = float(trade.get("amount") or 0.0)
        price = float(trade.get("price") or 0.0)
        fee = trade.get("fee") or {}
        role = trade.get("takerOrMaker")
        liquidity = Liquidity.MAKER if role == "maker" else Liquidity.TAKER if role == "taker" else default
        venue_id = str(trade["order"])
        order.leg_filled[venue_id] = order.leg_filled.get(venue_id, 0.0) + quantity
        order.filled_qty += quantity
        order.notional += quantity * price
        timestamp = trade.get("timestamp") or ts_ms
        now = self._clock()
        market = self.exchange.markets.get(order.symbol) or {}
        fill = Fill(
            ts_event=int(timestamp) * NANOS_PER_MILLI if timestamp else now,
            ts_recv=now,
            client_order_id=order.client_order_id,
            instrument=order.instrument,
            side=order.side,
            quantity=quantity,
            price=price,
            fee=float(fee.get("cost") or 0.0),
            fee_currency=str(fee.get("currency") or market.get("quote") or symbol.split("/")[-1]),
            liquidity=liquidity,
            trade_id=trade_id,
        )
        log.info(
            "live_fill",
            client_order_id=order.client_order_id,
            instrument=order.instrument,
            quantity=quantity,
            price=price,
            fee=fill.fee,
            fee_currency=fill.fee_currency,
            liquidity=liquidity.value,
            trade_id=trade_id,
        )
        self._emit(fill)
        return True

    def _emit_status(
        self, order: _LiveOrder, status: OrderStatus, ts_ms: int | None, reason: str = ""
    ) -> None:
        now = self._clock()
        order.status = status
        order.status_filled = order.filled_qty
        if status is OrderStatus.REJECTED:
            log.warning("live_order_rejected", client_order_id=order.client_order_id, reason=reason)
        else:
            log.info(
                "live_order_status",
                client_order_id=order.client_order_id,
                instrument=order.instrument,
                status=status.value,
                venue_order_id=order.venue_order_id,
                filled_qty=order.filled_qty,
                reason=reason,
            )
        self._emit(
            OrderUpdate(
                ts_event=ts_ms * NANOS_PER_MILLI if ts_ms else now,
                ts_recv=now,
                client_order_id=order.client_order_id,
                instrument=order.instrument,
                status=status,
                venue_order_id=order.venue_order_id,
                filled_qty=order.filled_qty,
                avg_price=order.avg_price,
                reason=reason,
            )
        )

    def _reject_command(self, cid: str, instrument: str, reason: str, venue_order_id: str = "") -> None:
        """A refused command about an order (as the paper venue reports it), not a new order state."""
        now = self._clock()
        log.warning("live_command_rejected", client_order_id=cid, instrument=instrument, reason=reason)
        self._emit(
            OrderUpdate(
                ts_event=now,
                ts_recv=now,
                client_order_id=cid,
                instrument=instrument,
                status=OrderStatus.REJECTED,
                venue_order_id=venue_order_id,
                reason=reason,
            )
        )

    def _emit(self, event: Event) -> None:
        self.emitted += 1
        self._sink(event)


# --- helpers ---------------------------------------------------------------------------------------


def amended_client_id(client_order_id: str, amendment: int) -> str:
    """Client id of the ``amendment``-th replacement order: derived, unique, ≤ 36 Binance-safe chars."""
    suffix = f".{amendment}"
    if len(client_order_id) + len(suffix) <= MAX_CLIENT_ID_LENGTH:
        return client_order_id + suffix
    digest = hashlib.blake2b(client_order_id.encode(), digest_size=4).hexdigest()
    keep = MAX_CLIENT_ID_LENGTH - len(suffix) - len(digest) - 1
    return f"{client_order_id[:keep]}.{digest}{suffix}"


def _status_of(exchange_order: CcxtOrder) -> tuple[OrderStatus, str]:
    """The engine status of a ccxt order (Binance's own status word first), and a reason for odd ends."""
    info = exchange_order.get("info") or {}
    raw = str(info.get("status") or "").upper()
    if raw in _STATUS:
        reason = "expired" if raw.startswith("EXPIRED") else ""
        return _STATUS[raw], reason
    status = _CCXT_STATUS.get(str(exchange_order.get("status") or ""), OrderStatus.ACCEPTED)
    return status, "expired" if exchange_order.get("status") == "expired" else ""


def _order_time_ms(exchange_order: CcxtOrder) -> int | None:
    for key in ("lastUpdateTimestamp", "timestamp"):
        value = exchange_order.get(key)
        if value:
            return int(value)
    return None


def _binance_code(exc: BaseException) -> int | None:
    match = _BINANCE_CODE.search(str(exc))
    return int(match.group(1)) if match else None


def _is_duplicate(exc: ExchangeError) -> bool:
    """Did the exchange refuse a create because the client order id is taken?"""
    if isinstance(exc, DuplicateOrderId) or _binance_code(exc) in _DUPLICATE_CODES:
        return True
    return "duplicate" in str(exc).lower()


def _reject_reason(exc: ExchangeError) -> str:
    if isinstance(exc, InsufficientFunds):
        return "insufficient_funds"
    code = _binance_code(exc)
    message = _BINANCE_MSG.search(str(exc))
    text = message.group(1) if message else type(exc).__name__
    return f"exchange_rejected:{code}:{text}" if code is not None else f"exchange_rejected:{text}"[:200]


def _describe(exc: BaseException) -> str:
    """A short, secret-free description (ccxt messages carry the URL and body, never credentials)."""
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


__all__ = [
    "CcxtVenue",
    "CcxtVenueConfig",
    "EventSink",
    "amended_client_id",
    "build_exchange",
]
