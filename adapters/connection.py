"""Connection discipline for venue websockets: one stream kept alive however the network behaves.

Every websocket adapter (Binance, Deribit) hands its URL, its subscribe messages and a message
handler to :class:`ResilientWebSocket`, which owns everything about staying connected:

- **Reconnect** after any failure with exponential backoff and full jitter (:class:`Backoff`,
  seedable), sending the subscribe messages again on every new connection. The backoff only
  resets once a connection has delivered data, so a server that accepts and drops at once is
  retried ever more slowly instead of hammered.
- **Keepalive**: websockets' own ping/pong (``ping_interval_s``, ``ping_timeout_s``), an
  optional application heartbeat (``heartbeat`` callback, every ``heartbeat_interval_s``), and
  replies: whatever the handler returns for a frame is sent back on the connection it came from
  (a venue's heartbeat test request wants an answer).
- **Health statuses** pushed as :class:`~bot.events.FeedStatus` under the feed's name:
  ``CONNECTED`` and ``DISCONNECTED``; ``STALE`` when nothing usable arrived for
  ``stale_after_s``, ``RECOVERED`` when data flows again.
- **Planned handover** before the venue's connection age limit (Binance closes every connection
  at 24 h): once ``max_connection_age_s`` has passed, a second connection is opened and
  subscribed while the first keeps streaming; ``handover_overlap_s`` after the new one delivers
  its first message the old one is closed, its last messages are handled, then the new one's
  buffered messages. Nothing is lost, but messages of the overlap arrive twice: the handler
  drops them by the venue's sequence numbers (trade ids, book update ids).
- **Bad messages never crash the feed**: a handler raising :class:`MessageError` (malformed,
  truncated, unknown) is counted and logged and the message skipped; any other exception from
  the handler is a bug, logged with its traceback and counted apart.

Stop it by cancelling the task running :meth:`ResilientWebSocket.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from pydantic import BaseModel, ConfigDict, Field
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bot.events import FeedState, FeedStatus

log = structlog.get_logger("adapters.connection")

Message = str | bytes
# Returns the replies the venue expects on the same connection (e.g. an answer to a heartbeat
# test request), or None.
MessageHandler = Callable[[Message, int], Iterable[Message] | None]
StatusSink = Callable[[FeedStatus], None]

# Failures worth another attempt; anything else (a bad URL, a bug) propagates.
_CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed)
_LOGGED_MESSAGE_CHARS = 200
_CLOSE_TIMEOUT_S = 2.0


class MessageError(Exception):
    """A received message that cannot be turned into events: counted, logged and skipped."""


class BackoffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(0.5, gt=0, description="cap of the first retry delay")
    max_s: float = Field(30.0, gt=0, description="cap of any retry delay")
    multiplier: float = Field(2.0, ge=1, description="growth of the cap per failed attempt")
    seed: int | None = Field(None, description="seed of the jitter (tests); None draws from the OS")


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits ``U(0, min(max, initial·multiplier^n))``.

    Full jitter spreads the reconnects of many clients dropped at once, so they do not return
    together and get rate-limited together.
    """

    def __init__(self, config: BackoffConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)

    def cap(self, attempt: int) -> float:
        """Upper bound of the delay before retry number ``attempt`` (0-based)."""
        config = self.config
        # Compare logarithms: multiplier**attempt overflows after a long enough outage.
        if attempt * math.log(config.multiplier) >= math.log(config.max_s / config.initial_s):
            return config.max_s
        return config.initial_s * config.multiplier**attempt

    def delay(self, attempt: int) -> float:
        return self._rng.uniform(0.0, self.cap(attempt))


class ConnectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stale_after_s: float = Field(10.0, gt=0, description="no usable message for this long → STALE")
    max_connection_age_s: float | None = Field(
        23.5 * 3600, gt=0, description="hand over to a fresh connection before the venue's limit"
    )
    handover_overlap_s: float = Field(
        1.0, ge=0, description="how long the old connection keeps streaming after the new one delivers"
    )
    ping_interval_s: float | None = Field(20.0, gt=0, description="websocket ping period; None disables")
    ping_timeout_s: float | None = Field(20.0, gt=0, description="no pong within this → connection lost")
    heartbeat_interval_s: float = Field(30.0, gt=0, description="period of the application heartbeat")
    open_timeout_s: float = Field(10.0, gt=0, description="connect and handshake timeout")
    max_message_bytes: int = Field(2**22, gt=0, description="larger frames close the connection")
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)


@dataclass
class ConnectionStats:
    """Counters a status line or a test can read; only the connection task writes them."""

    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    planned_handovers: int = 0
    messages: int = 0
    parse_errors: int = 0
    handler_errors: int = 0
    stale: int = 0
    heartbeats: int = 0
    replies: int = 0


@dataclass(frozen=True)
class _Closed:
    """Put in a link's inbox by its reader when the connection ends."""

    reason: str


class _Link:
    """One open connection whose reader task stamps and queues every frame, so reading never waits."""

    def __init__(self, ws: ClientConnection, number: int) -> None:
        self.ws = ws
        self.number = number
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.opened_at = loop.time()
        self.first_message_at: float | None = None
        self.inbox: asyncio.Queue[tuple[Message, int] | _Closed] = asyncio.Queue()
        self.reader = loop.create_task(self._read(), name=f"ws-reader-{number}")

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if self.first_message_at is None:
                    self.first_message_at = self._loop.time()
                self.inbox.put_nowait((raw, time.time_ns()))
            reason = f"closed by peer (code {self.ws.close_code}, {self.ws.close_reason!r})"
        except ConnectionClosed as exc:
            reason = f"connection lost: {exc}"
        self.inbox.put_nowait(_Closed(reason))

    async def next(self, timeout: float | None) -> tuple[Message, int] | _Closed | None:
        """The next frame or close marker; None when ``timeout`` seconds pass first."""
        if not self.inbox.empty():
            return self.inbox.get_nowait()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a frame's arrival.
        try:
            async with asyncio.timeout(timeout):
                return await self.inbox.get()
        except TimeoutError:
            return None

    async def close(self) -> None:
        with contextlib.suppress(*_CONNECT_ERRORS):
            await asyncio.wait_for(self.ws.close(), _CLOSE_TIMEOUT_S)
        self.ws.transport.abort()
        await asyncio.gather(self.reader, return_exceptions=True)


class _Handover:
    """The planned replacement of an aging connection: open a successor, wait until it streams, swap."""

    _POLL_S = 0.05

    def __init__(self, owner: ResilientWebSocket) -> None:
        self._owner = owner
        self._config = owner.config
        self._opening: asyncio.Task[_Link] | None = None
        self._successor: _Link | None = None
        self._attempt = 0
        self._next_try = 0.0

    def _due(self, primary: _Link) -> float:
        age = self._config.max_connection_age_s
        return math.inf if age is None else max(primary.opened_at + age, self._next_try)

    async def poll(self, now: float, primary: _Link) -> _Link | None:
        """Advance the handover; returns the successor once the primary should be retired."""
        if self._opening is None and self._successor is None and now >= self._due(primary):
            self._opening = asyncio.get_running_loop().create_task(self._owner._open())
        if self._opening is not None and self._opening.done():
            self._collect(now)
        successor = self._successor
        if successor is None:
            return None
        if successor.reader.done():
            self._owner._log.warning("handover_lost", connection=successor.number)
            self._successor = None
            self._retry_later(now)
            return None
        ready_at = successor.first_message_at
        if ready_at is None:
            if now - successor.opened_at >= self._config.stale_after_s:
                self._owner._log.warning("handover_silent", connection=successor.number)
                self._successor = None
                self._retry_later(now)
                await successor.close()
            return None
        if now < ready_at + self._config.handover_overlap_s:
            return None
        self._successor = None
        self._attempt = 0
        return successor

    def _collect(self, now: float) -> None:
        opening, self._opening = self._opening, None
        assert opening is not None
        try:
            self._successor = opening.result()
        except _CONNECT_ERRORS as exc:
            self._owner.stats.connect_failures += 1
            delay = self._retry_later(now)
            self._owner._log.warning(
                "handover_connect_failed", attempt=self._attempt, delay_s=round(delay, 3), error=repr(exc)
            )
            return
        self._owner._log.info("handover_opened", connection=self._successor.number)

    def _retry_later(self, now: float) -> float:
        delay = self._owner._backoff.delay(self._attempt)
        self._attempt += 1
        self._next_try = now + delay
        return delay

    def next_check(self, now: float, primary: _Link) -> float:
        """When :meth:`poll` must run again even if no frame arrives."""
        if self._opening is not None or self._successor is not None:
            return now + min(self._POLL_S, self._config.handover_overlap_s or self._POLL_S)
        return self._due(primary)

    def take(self) -> _Link | None:
        """The successor, promoted at once because the primary died during the handover."""
        successor, self._successor = self._successor, None
        return successor

    async def cancel(self) -> None:
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_CONNECT_ERRORS):
                self._successor = await opening
        if self._successor is not None:
            await self._successor.close()
            self._successor = None


class ResilientWebSocket:
    """A websocket subscription that reconnects, watches its health and reports it.

    ``on_message(raw, ts_recv)`` is called for every frame, in order, with the local receive
    time in ns, and may return replies for that connection; ``subscribe()`` gives the messages
    to send on each new connection; ``emit_status`` receives the feed's :class:`FeedStatus`
    events; ``heartbeat()``, when given, gives the application heartbeat message sent every
    ``heartbeat_interval_s``.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        on_message: MessageHandler,
        emit_status: StatusSink,
        subscribe: Callable[[], Iterable[Message]] | None = None,
        heartbeat: Callable[[], Message] | None = None,
        config: ConnectionConfig | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.config = config if config is not None else ConnectionConfig()
        self.stats = ConnectionStats()
        self._on_message = on_message
        self._emit_status = emit_status
        self._subscribe = subscribe
        self._heartbeat = heartbeat
        self._backoff = Backoff(self.config.backoff)
        self._links_opened = 0
        self._last_data = 0.0
        self._stale = False
        self._delivered = False
        self._log = log.bind(feed=name)

    @property
    def is_stale(self) -> bool:
        return self._stale

    async def run(self) -> None:
        """Stay connected until cancelled."""
        attempt = 0
        while True:
            try:
                link = await self._open()
            except _CONNECT_ERRORS as exc:
                self.stats.connect_failures += 1
                delay = self._backoff.delay(attempt)
                attempt += 1
                self._log.warning(
                    "connect_failed", url=self.url, attempt=attempt, delay_s=round(delay, 3), error=repr(exc)
                )
                await asyncio.sleep(delay)
                continue
            self.stats.connects += 1
            self._log.info("connected", url=self.url, connection=link.number, attempt=attempt)
            self._status(FeedState.CONNECTED, f"connection {link.number}")
            self._delivered = False
            reason = await self._serve(link)
            if self._delivered:
                attempt = 0
            self.stats.reconnects += 1
            delay = self._backoff.delay(attempt)
            attempt += 1
            self._status(FeedState.DISCONNECTED, reason)
            self._log.warning("reconnecting", reason=reason, attempt=attempt, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _open(self) -> _Link:
        """Connect and subscribe; a link only exists once its subscriptions are sent."""
        config = self.config
        ws = await connect(
            self.url,
            open_timeout=config.open_timeout_s,
            ping_interval=config.ping_interval_s,
            ping_timeout=config.ping_timeout_s,
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=config.max_message_bytes,
        )
        try:
            for message in self._subscribe() if self._subscribe is not None else ():
                await ws.send(message)
        except BaseException:
            ws.transport.abort()
            raise
        self._links_opened += 1
        return _Link(ws, self._links_opened)

    async def _serve(self, primary: _Link) -> str:
        """Handle ``primary``'s frames, handing over to fresh connections as it ages; returns why it ended."""
        loop = asyncio.get_running_loop()
        config = self.config
        self._last_data = loop.time()
        self._stale = False
        handover = _Handover(self)
        next_heartbeat = loop.time() + config.heartbeat_interval_s
        try:
            while True:
                now = loop.time()
                successor = await handover.poll(now, primary)
                if successor is not None:
                    await self._retire(primary)
                    primary = successor
                    self.stats.planned_handovers += 1
                    self._log.info("handover_done", connection=primary.number)
                    continue
                deadlines = [handover.next_check(now, primary)]
                if self._heartbeat is not None:
                    if now >= next_heartbeat:
                        next_heartbeat = now + config.heartbeat_interval_s
                        if await self._send(primary, self._heartbeat()):
                            self.stats.heartbeats += 1
                    deadlines.append(next_heartbeat)
                if not self._stale:
                    deadlines.append(self._last_data + config.stale_after_s)
                item = await primary.next(max(0.0, min(deadlines) - now))
                if item is None:
                    self._check_stale(loop.time())
                elif not isinstance(item, _Closed):
                    await self._handle(primary, *item)
                elif (successor := handover.take()) is not None:
                    self._log.warning("closed_during_handover", reason=item.reason)
                    primary = successor
                else:
                    return item.reason
        finally:
            await handover.cancel()
            await primary.close()

    @staticmethod
    async def _send(link: _Link, message: Message) -> bool:
        """Send on ``link``; False when it is already closed (its reader reports why)."""
        try:
            await link.ws.send(message)
        except ConnectionClosed:
            return False
        return True

    async def _retire(self, link: _Link) -> None:
        """Close the old connection of a handover and handle what it still delivered."""
        await link.close()
        while not link.inbox.empty():
            item = link.inbox.get_nowait()
            if not isinstance(item, _Closed):
                await self._handle(link, *item)

    async def _handle(self, link: _Link, raw: Message, ts_recv: int) -> None:
        self.stats.messages += 1
        try:
            replies = self._on_message(raw, ts_recv)
        except MessageError as exc:
            self.stats.parse_errors += 1
            self._log.warning("message_skipped", error=str(exc), message=_excerpt(raw))
            return
        except Exception:
            self.stats.handler_errors += 1
            self._log.exception("handler_failed", message=_excerpt(raw))
            return
        self._delivered = True
        self._last_data = asyncio.get_running_loop().time()
        if self._stale:
            self._stale = False
            self._status(FeedState.RECOVERED, "data resumed")
        for reply in replies or ():
            if await self._send(link, reply):
                self.stats.replies += 1

    def _check_stale(self, now: float) -> None:
        if not self._stale and now - self._last_data >= self.config.stale_after_s:
            self._stale = True
            self.stats.stale += 1
            silent = now - self._last_data
            self._log.warning("stale", silent_s=round(silent, 3))
            self._status(FeedState.STALE, f"no data for {silent:.1f} s")

    def _status(self, state: FeedState, detail: str) -> None:
        now = time.time_ns()
        self._emit_status(FeedStatus(ts_event=now, ts_recv=now, feed=self.name, status=state, detail=detail))


def _excerpt(raw: Message) -> str:
    text = raw if isinstance(raw, str) else repr(raw)
    return text if len(text) <= _LOGGED_MESSAGE_CHARS else text[:_LOGGED_MESSAGE_CHARS] + "…"
