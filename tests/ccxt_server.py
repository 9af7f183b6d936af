"""A small Binance REST exchange on 127.0.0.1 for driving ccxt's real client in tests.

:class:`BinanceRestServer` answers the spot (``/api/v3``) and USD-M (``/fapi/v1``) endpoints
ccxt's ``binance``/``binanceusdm`` call to trade: exchangeInfo (recorded bodies), time, order
create/query/cancel/modify, cancel-replace, open orders and account trades. It keeps a real
little order state — orders by id and by client order id, fills, trades with commissions — and
answers with Binance's JSON shapes and error codes: a taken ``newClientOrderId`` gets
``{"code":-2010,"msg":"Duplicate order sent."}`` on spot and ``-4116`` on USD-M, an unknown
order ``-2013``/``-2011``. Signed endpoints check the ``X-MBX-APIKEY`` header and the HMAC-SHA256
``signature`` over the exact parameter string, as Binance does.

Market orders fill at once at :attr:`BinanceRestServer.prices` (taker, 0.1 % commission: spot
buys pay it in the base asset, spot sells and USD-M in the quote); limit orders rest until the
test calls :meth:`BinanceRestServer.fill` (maker). :meth:`BinanceRestServer.fault` scripts the
next answer of an endpoint: late (after the matching engine has acted, as a slow exchange is),
lost before reaching the engine, or replaced by an error. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl

from aiohttp import web

Market = Literal["spot", "usdm"]
COMMISSION = Decimal("0.001")
_PREFIX: dict[Market, str] = {"spot": "/api/v3", "usdm": "/fapi/v1"}


@dataclass(frozen=True)
class Fault:
    """How to answer the next request to one endpoint.

    ``apply=False``: the request is lost before the matching engine (nothing changes). ``status``
    and ``body``: answer this instead of the real response. ``delay_s``: answer this late.
    """

    delay_s: float = 0.0
    apply: bool = True
    status: int | None = None
    body: Any = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]
    outcome: str


@dataclass
class ServerOrder:
    market: Market
    symbol: str
    order_id: int
    client_order_id: str
    side: str
    type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    time_ms: int
    reduce_only: bool = False
    executed_qty: Decimal = Decimal(0)
    cum_quote: Decimal = Decimal(0)
    status: str = "NEW"
    update_ms: int = 0
    fills: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.status in ("NEW", "PARTIALLY_FILLED")


def _s(value: Decimal) -> str:
    return f"{value:.8f}"


class BinanceRestServer:
    """Binance spot and USD-M REST, enough for ccxt to trade; see the module docstring."""

    def __init__(
        self,
        exchange_info: Mapping[Market, bytes],
        api_key: str,
        api_secret: str,
        prices: Mapping[str, float] | None = None,
    ) -> None:
        self.exchange_info = dict(exchange_info)
        self.api_key = api_key
        self.api_secret = api_secret
        self.prices: dict[str, Decimal] = {k: Decimal(str(v)) for k, v in (prices or {}).items()}
        self.requests: list[RecordedRequest] = []
        self.orders: dict[Market, dict[int, ServerOrder]] = {"spot": {}, "usdm": {}}
        self.trades: dict[Market, list[dict[str, Any]]] = {"spot": [], "usdm": []}
        self._faults: dict[tuple[str, str], list[Fault]] = {}
        self._order_ids = itertools.count(5_000_000)
        self._trade_ids = itertools.count(900_000)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- test controls -------------------------------------------------------------------------

    def fault(self, method: str, path: str, *faults: Fault) -> None:
        """Answer the next ``len(faults)`` requests to ``method path`` as scripted."""
        self._faults.setdefault((method.upper(), path), []).extend(faults)

    def requested(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def order_by_client_id(self, client_order_id: str, market: Market = "spot") -> ServerOrder | None:
        return next((o for o in self.orders[market].values() if o.client_order_id == client_order_id), None)

    def fill(
        self, client_order_id: str, qty: float, price: float, *, maker: bool = True, market: Market = "spot"
    ) -> dict[str, Any]:
        """Match ``qty`` of a working order at ``price`` (a counterparty arrived): one account trade."""
        order = self.order_by_client_id(client_order_id, market)
        assert order is not None and order.is_open, f"no working order {client_order_id!r}"
        return self._execute(order, Decimal(str(qty)), Decimal(str(price)), maker=maker)

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    # --- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        params = dict(parse_qsl(request.query_string, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        method, path = request.method, request.path
        market: Market = "usdm" if path.startswith("/fapi/") else "spot"
        route = path.removeprefix(_PREFIX[market])
        queued = self._faults.get((method, path))
        fault = queued.pop(0) if queued else Fault()

        if route in ("/exchangeInfo", "/time", "/ping"):
            self.requests.append(RecordedRequest(method, path, params, "public"))
            if route == "/exchangeInfo" and market in self.exchange_info:
                return web.Response(body=self.exchange_info[market], content_type="application/json")
            return web.json_response({"serverTime": _now_ms()} if route == "/time" else {})

        refusal = self._authenticate(request, body)
        if refusal is not None:
            self.requests.append(RecordedRequest(method, path, params, "unauthorized"))
            return web.json_response(refusal, status=401 if refusal["code"] == -2015 else 400)
        if not fault.apply:
            self.requests.append(RecordedRequest(method, path, params, "lost"))
            await asyncio.sleep(fault.delay_s)
            return web.json_response({"code": -1007, "msg": "Timeout waiting for response."}, status=503)
        status, payload, outcome = self._dispatch(market, method, route, params)
        self.requests.append(RecordedRequest(method, path, params, outcome))
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.status is not None:
            return web.json_response(fault.body, status=fault.status)
        return web.json_response(payload, status=status)

    def _authenticate(self, request: web.Request, body: str) -> dict[str, Any] | None:
        """Binance's checks: API key header, then HMAC-SHA256 of the parameter string."""
        if request.headers.get("X-MBX-APIKEY") != self.api_key:
            return {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
        total = request.query_string + body
        payload, sep, signature = total.rpartition("&signature=")
        if not sep or "timestamp=" not in payload:
            return {
                "code": -1102,
                "msg": "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
            }
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return {"code": -1022, "msg": "Signature for this request is not valid."}
        return None

    def _dispatch(
        self, market: Market, method: str, route: str, params: dict[str, str]
    ) -> tuple[int, Any, str]:
        if route == "/order" and method == "POST":
            return self._create(market, params)
        if route == "/order" and method == "GET":
            order = self._find(market, params, "orderId", "origClientOrderId")
            if order is None:
                return 400, {"code": -2013, "msg": "Order does not exist."}, "not_found"
            return 200, self._order_json(order), "queried"
        if route == "/order" and method == "DELETE":
            order = self._find(market, params, "orderId", "origClientOrderId")
            if order is None or not order.is_open:
                return 400, {"code": -2011, "msg": "Unknown order sent."}, "unknown"
            order.status, order.update_ms = "CANCELED", _now_ms()
            answer = self._order_json(order)
            if market == "spot":
                answer["origClientOrderId"] = order.client_order_id
                answer["clientOrderId"] = params.get("newClientOrderId", f"cancel-{order.order_id}")
            return 200, answer, "cancelled"
        if route == "/order" and method == "PUT" and market == "usdm":
            return self._modify(params)
        if route == "/order/cancelReplace" and method == "POST" and market == "spot":
            return self._cancel_replace(params)
        if route == "/openOrders" and method == "GET":
            symbol = params.get("symbol")
            listed = [
                self._order_json(o)
                for o in self.orders[market].values()
                if o.is_open and (symbol is None or o.symbol == symbol)
            ]
            return 200, listed, "listed"
        if route in ("/myTrades", "/userTrades") and method == "GET":
            return 200, self._account_trades(market, params), "trades"
        return 404, {"code": -1, "msg": f"no such endpoint {method} {route}"}, "unknown_endpoint"

    # --- matching engine -----------------------------------------------------------------------

    def _create(self, market: Market, params: dict[str, str]) -> tuple[int, Any, str]:
        client_id = params["newClientOrderId"]
        if self.order_by_client_id(client_id, market) is not None:
            if market == "spot":
                return 400, {"code": -2010, "msg": "Duplicate order sent."}, "duplicate"
            return 400, {"code": -4116, "msg": "ClientOrderId is duplicated."}, "duplicate"
        now = _now_ms()
        order = ServerOrder(
            market=market,
            symbol=params["symbol"],
            order_id=next(self._order_ids),
            client_order_id=client_id,
            side=params["side"],
            type=params["type"],
            time_in_force=params.get("timeInForce", "GTC"),
            price=Decimal(params.get("price", "0")),
            orig_qty=Decimal(params["quantity"]),
            time_ms=now,
            update_ms=now,
            reduce_only=params.get("reduceOnly") == "true",
        )
        self.orders[market][order.order_id] = order
        if order.type == "MARKET":
            self._execute(order, order.orig_qty, self.prices[order.symbol], maker=False)
        answer = self._order_json(order)
        if market == "spot":
            answer["transactTime"] = now
            if params.get("newOrderRespType", "FULL") == "FULL":
                answer["fills"] = list(order.fills)
        return 200, answer, "created"

    def _modify(self, params: dict[str, str]) -> tuple[int, Any, str]:
        order = self._find("usdm", params, "orderId", "origClientOrderId")
        if order is None or not order.is_open:
            return 400, {"code": -2013, "msg": "Order does not exist."}, "not_found"
        order.orig_qty = Decimal(params["quantity"])
        order.price = Decimal(params["price"])
        order.update_ms = _now_ms()
        return 200, self._order_json(order), "modified"

    def _cancel_replace(self, params: dict[str, str]) -> tuple[int, Any, str]:
        old = self._find("spot", params, "cancelOrderId", "cancelOrigClientOrderId")
        if old is None or not old.is_open:
            data = {
                "cancelResult": "FAILURE",
                "newOrderResult": "NOT_ATTEMPTED",
                "cancelResponse": {"code": -2011, "msg": "Unknown order sent."},
                "newOrderResponse": None,
            }
            return 400, {"code": -2022, "msg": "Order cancel-replace failed.", "data": data}, "replace_failed"
        old.status, old.update_ms = "CANCELED", _now_ms()
        cancel_response = {**self._order_json(old), "origClientOrderId": old.client_order_id}
        status, created, _ = self._create("spot", params)
        if status != 200:
            data = {
                "cancelResult": "SUCCESS",
                "newOrderResult": "FAILURE",
                "cancelResponse": cancel_response,
                "newOrderResponse": created,
            }
            msg = "Order cancel-replace partially failed."
            return 409, {"code": -2021, "msg": msg, "data": data}, "replace_partially_failed"
        answer = {
            "cancelResult": "SUCCESS",
            "newOrderResult": "SUCCESS",
            "cancelResponse": cancel_response,
            "newOrderResponse": created,
        }
        return 200, answer, "replaced"

    def _execute(self, order: ServerOrder, qty: Decimal, price: Decimal, *, maker: bool) -> dict[str, Any]:
        qty = min(qty, order.orig_qty - order.executed_qty)
        base, quote = _assets(order.symbol)
        if order.market == "spot" and order.side == "BUY":
            commission, asset = qty * COMMISSION, base
        else:
            commission, asset = qty * price * COMMISSION, quote
        trade_id = next(self._trade_ids)
        now = _now_ms()
        order.executed_qty += qty
        order.cum_quote += qty * price
        order.status = "FILLED" if order.executed_qty >= order.orig_qty else "PARTIALLY_FILLED"
        order.update_ms = now
        order.fills.append(
            {
                "price": _s(price),
                "qty": _s(qty),
                "commission": _s(commission),
                "commissionAsset": asset,
                "tradeId": trade_id,
            }
        )
        if order.market == "spot":
            trade: dict[str, Any] = {
                "symbol": order.symbol,
                "id": trade_id,
                "orderId": order.order_id,
                "orderListId": -1,
                "price": _s(price),
                "qty": _s(qty),
                "quoteQty": _s(qty * price),
                "commission": _s(commission),
                "commissionAsset": asset,
                "time": now,
                "isBuyer": order.side == "BUY",
                "isMaker": maker,
                "isBestMatch": True,
            }
        else:
            trade = {
                "buyer": order.side == "BUY",
                "commission": _s(commission),
                "commissionAsset": asset,
                "id": trade_id,
                "maker": maker,
                "orderId": order.order_id,
                "price": _s(price),
                "qty": _s(qty),
                "quoteQty": _s(qty * price),
                "realizedPnl": "0",
                "side": order.side,
                "positionSide": "BOTH",
                "symbol": order.symbol,
                "time": now,
            }
        self.trades[order.market].append(trade)
        return trade

    def _account_trades(self, market: Market, params: dict[str, str]) -> list[dict[str, Any]]:
        rows = [t for t in self.trades[market] if t["symbol"] == params["symbol"]]
        if "orderId" in params:
            rows = [t for t in rows if t["orderId"] == int(params["orderId"])]
        if "fromId" in params:
            rows = [t for t in rows if t["id"] >= int(params["fromId"])]
        elif "startTime" in params:
            rows = [t for t in rows if t["time"] >= int(params["startTime"])]
        return rows[: int(params.get("limit", "500"))]

    def _find(
        self, market: Market, params: dict[str, str], id_key: str, client_key: str
    ) -> ServerOrder | None:
        if id_key in params:
            return self.orders[market].get(int(params[id_key]))
        if client_key in params:
            return self.order_by_client_id(params[client_key], market)
        return None

    def _order_json(self, order: ServerOrder) -> dict[str, Any]:
        avg = order.cum_quote / order.executed_qty if order.executed_qty else Decimal(0)
        if order.market == "spot":
            return {
                "symbol": order.symbol,
                "orderId": order.order_id,
                "orderListId": -1,
                "clientOrderId": order.client_order_id,
                "price": _s(order.price),
                "origQty": _s(order.orig_qty),
                "executedQty": _s(order.executed_qty),
                "cummulativeQuoteQty": _s(order.cum_quote),
                "status": order.status,
                "timeInForce": order.time_in_force,
                "type": order.type,
                "side": order.side,
                "stopPrice": "0.00000000",
                "icebergQty": "0.00000000",
                "time": order.time_ms,
                "updateTime": order.update_ms,
                "isWorking": True,
                "workingTime": order.time_ms,
                "origQuoteOrderQty": "0.00000000",
                "selfTradePreventionMode": "EXPIRE_MAKER",
            }
        return {
            "avgPrice": _s(avg),
            "clientOrderId": order.client_order_id,
            "cumQuote": _s(order.cum_quote),
            "executedQty": _s(order.executed_qty),
            "orderId": order.order_id,
            "origQty": _s(order.orig_qty),
            "origType": order.type,
            "price": _s(order.price),
            "reduceOnly": order.reduce_only,
            "side": order.side,
            "positionSide": "BOTH",
            "status": order.status,
            "stopPrice": "0",
            "closePosition": False,
            "symbol": order.symbol,
            "time": order.time_ms,
            "timeInForce": order.time_in_force,
            "type": order.type,
            "updateTime": order.update_ms,
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
        }


def _assets(symbol: str) -> tuple[str, str]:
    for quote in ("USDT", "USDC", "FDUSD", "BTC", "ETH", "BNB"):
        if symbol.endswith(quote) and symbol != quote:
            return symbol[: -len(quote)], quote
    raise ValueError(f"cannot split {symbol!r} into base and quote")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
