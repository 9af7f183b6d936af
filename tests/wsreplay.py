"""Local replay servers for adapter tests: real websocket and HTTP protocol on 127.0.0.1, recorded data.

:class:`ReplayServer` is a websocket server on an ephemeral port that plays one :class:`Session`
per client connection, in connection order: it waits for the client's subscribe messages,
sends the session's recorded frames (with pauses, pacing and injected garbage frames where
asked), then drops the connection without a close frame, closes it cleanly, or holds it open.
It records every connection's request path and everything the client sent, and can answer
client messages (a venue's subscription acks) through ``respond``. A connection beyond the
scripted sessions is refused with HTTP 503, as an overloaded venue would.

:func:`resumed_sessions` cuts one recorded stream into sessions that each carry on where the
previous connection was dropped, as a venue's stream continues while a client reconnects.

:class:`HttpReplayServer` answers GET requests by path from recorded bodies (or a callable
that computes one), for REST snapshots and for ccxt pointed at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Self

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

Frame = str | bytes
Responder = Callable[[Frame], Sequence[Frame]]


@dataclass(frozen=True)
class Session:
    """What the server does on one client connection.

    ``garbage[i]`` frames are sent just before message ``i`` (``len(messages)``: after the last);
    ``pauses[i]`` seconds of silence precede message ``i``; ``interval_s`` paces every message.
    ``drop_after=n`` aborts the TCP connection, without a close frame, once ``n`` messages are
    sent; otherwise the session ends with a clean close (``hold=False``) or stays open until the
    client leaves (``hold=True``).
    """

    messages: Sequence[Frame] = ()
    await_client_messages: int = 0
    garbage: Mapping[int, Sequence[Frame]] = field(default_factory=dict)
    pauses: Mapping[int, float] = field(default_factory=dict)
    interval_s: float = 0.0
    drop_after: int | None = None
    hold: bool = True


@dataclass
class ConnectionRecord:
    """What happened on one connection, for the test to check."""

    path: str
    received: list[Frame] = field(default_factory=list)
    sent: int = 0
    garbage_sent: int = 0
    dropped: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def resumed_sessions(
    messages: Sequence[Frame],
    drop_after: Sequence[int],
    *,
    await_client_messages: int = 0,
    interval_s: float = 0.0,
) -> list[Session]:
    """Sessions that replay ``messages`` once in total, the connection dropped after each cut.

    ``drop_after`` holds absolute message counts, strictly increasing; the last session holds on.
    """
    cuts = [0, *drop_after, len(messages)]
    if any(stop <= start for start, stop in itertools.pairwise(cuts)):
        raise ValueError("cuts must strictly increase within the stream")
    return [
        Session(
            messages=messages[start:stop],
            await_client_messages=await_client_messages,
            interval_s=interval_s,
            drop_after=stop - start if stop < len(messages) else None,
        )
        for start, stop in itertools.pairwise(cuts)
    ]


class ReplayServer:
    """Websocket server on 127.0.0.1 that plays one scripted :class:`Session` per connection."""

    def __init__(self, sessions: Sequence[Session], respond: Responder | None = None) -> None:
        self.sessions = list(sessions)
        self.respond = respond
        self.connections: list[ConnectionRecord] = []
        self.refused = 0
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._admit, ping_interval=None
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[ReplayServer], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (checked whenever a connection changes)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        if len(self.connections) < len(self.sessions):
            return None
        self.refused += 1
        return Response(
            HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable", Headers(), b"no more sessions\n"
        )

    async def _handle(self, connection: ServerConnection) -> None:
        session = self.sessions[len(self.connections)]
        record = ConnectionRecord(path=connection.request.path if connection.request else "")
        self.connections.append(record)
        await self._notify()
        subscribed = asyncio.Event()
        if session.await_client_messages == 0:
            subscribed.set()
        listener = asyncio.create_task(self._listen(connection, record, session, subscribed))
        try:
            await subscribed.wait()
            await self._play(connection, record, session)
            if not record.dropped and not session.hold:
                await connection.close()
            await connection.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            record.closed.set()
            await self._notify()

    async def _listen(
        self,
        connection: ServerConnection,
        record: ConnectionRecord,
        session: Session,
        subscribed: asyncio.Event,
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in connection:
                record.received.append(frame)
                if len(record.received) >= session.await_client_messages:
                    subscribed.set()
                for reply in self.respond(frame) if self.respond is not None else ():
                    await connection.send(reply)
                await self._notify()

    async def _play(self, connection: ServerConnection, record: ConnectionRecord, session: Session) -> None:
        for index, message in enumerate(session.messages):
            await self._garbage(connection, record, session, index)
            delay = session.pauses.get(index, 0.0) + session.interval_s
            if delay:
                await asyncio.sleep(delay)
            await connection.send(message)
            record.sent += 1
            if record.sent == session.drop_after:
                # Like a link that dies once the kernel has flushed: everything sent arrives, then the
                # connection ends without a close frame (so a resumed session loses nothing).
                while connection.transport.get_write_buffer_size():
                    await asyncio.sleep(0.001)
                record.dropped = True
                connection.transport.abort()
                return
        await self._garbage(connection, record, session, len(session.messages))

    @staticmethod
    async def _garbage(
        connection: ServerConnection, record: ConnectionRecord, session: Session, index: int
    ) -> None:
        for frame in session.garbage.get(index, ()):
            await connection.send(frame)
            record.garbage_sent += 1

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


RouteBody = bytes | Callable[[web.Request], bytes]


class HttpReplayServer:
    """HTTP server on 127.0.0.1 answering GET ``path`` with a recorded JSON body; 404 elsewhere."""

    def __init__(self, routes: Mapping[str, RouteBody]) -> None:
        self.routes = dict(routes)
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self._url = ""

    @property
    def url(self) -> str:
        return self._url

    def requested(self, path: str) -> Iterator[str]:
        """The recorded request targets (path and query) for ``path``."""
        return (target for target in self.requests if target.split("?")[0] == path)

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(str(request.rel_url))
        body = self.routes.get(request.path)
        if body is None:
            return web.json_response(
                {"code": -1, "msg": f"no recorded response for {request.path}"}, status=404
            )
        return web.Response(body=body(request) if callable(body) else body, content_type="application/json")
