"""ResilientWebSocket against a real local websocket server: reconnects, statuses, garbage, handover."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
import structlog
from wsreplay import ReplayServer, Session, resumed_sessions

from adapters.connection import (
    Backoff,
    BackoffConfig,
    ConnectionConfig,
    MessageError,
    ResilientWebSocket,
)
from bot.events import FeedState, FeedStatus

SUBSCRIBE = json.dumps({"method": "SUBSCRIBE", "params": ["x"], "id": 1})


def numbered(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"seq": i}) for i in range(start, start + n)]


class Collector:
    """A handler that keeps every sequence number and refuses anything that is not one."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.statuses: list[FeedStatus] = []

    def on_message(self, raw: str | bytes, ts_recv: int) -> None:
        try:
            self.seqs.append(json.loads(raw)["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageError(f"not a sequenced message: {exc}") from None

    @property
    def states(self) -> list[FeedState]:
        return [status.status for status in self.statuses]


def fast_config(**overrides: object) -> ConnectionConfig:
    values: dict[str, object] = {
        "stale_after_s": 5.0,
        "max_connection_age_s": None,
        "ping_interval_s": None,
        "open_timeout_s": 2.0,
        "backoff": BackoffConfig(initial_s=0.02, max_s=0.2, seed=7),
    }
    values.update(overrides)
    return ConnectionConfig.model_validate(values)


def make_socket(server: ReplayServer, collector: Collector, **config: object) -> ResilientWebSocket:
    return ResilientWebSocket(
        "TEST",
        server.url + "/stream",
        on_message=collector.on_message,
        emit_status=collector.statuses.append,
        subscribe=lambda: [SUBSCRIBE],
        config=fast_config(**config),
    )


async def run_until(socket: ResilientWebSocket, done: Callable[[], bool], timeout: float = 5.0) -> None:
    task = asyncio.create_task(socket.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_backoff_full_jitter_is_bounded_capped_and_seeded() -> None:
    config = BackoffConfig(initial_s=0.5, max_s=8.0, multiplier=2.0, seed=42)
    backoff = Backoff(config)
    assert [backoff.cap(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.cap(10_000) == 8.0  # no overflow however long the outage
    delays = [backoff.delay(n) for n in range(200)]
    assert all(0.0 <= d <= backoff.cap(n) for n, d in enumerate(delays))
    same_seed, other_seed = Backoff(config), Backoff(config.model_copy(update={"seed": 43}))
    assert delays == [same_seed.delay(n) for n in range(200)]
    assert delays != [other_seed.delay(n) for n in range(200)]
    # full jitter: the late delays spread over the whole [0, max] range, not just near the cap
    late = delays[10:]
    assert min(late) < 0.25 * config.max_s and max(late) > 0.75 * config.max_s


async def test_reconnects_resubscribes_and_reports_disconnect() -> None:
    stream = numbered(30)
    sessions = resumed_sessions(stream, [10, 20], await_client_messages=1)
    collector = Collector()
    async with ReplayServer(sessions) as server:
        socket = make_socket(server, collector)
        with structlog.testing.capture_logs() as logs:
            await run_until(socket, lambda: len(collector.seqs) == 30)
    assert collector.seqs == list(range(30))  # resumed where each connection dropped: none lost, none twice
    assert [c.received for c in server.connections] == [[SUBSCRIBE]] * 3  # resubscribed every time
    assert all(c.path == "/stream" for c in server.connections)
    assert [c.dropped for c in server.connections] == [True, True, False]
    assert collector.states == [
        FeedState.CONNECTED,
        FeedState.DISCONNECTED,
        FeedState.CONNECTED,
        FeedState.DISCONNECTED,
        FeedState.CONNECTED,
    ]
    assert all(status.feed == "TEST" for status in collector.statuses)
    assert socket.stats.connects == 3 and socket.stats.reconnects == 2 and socket.stats.messages == 30
    reconnects = [entry for entry in logs if entry["event"] == "reconnecting"]
    assert len(reconnects) == 2
    # each connection delivered data, so the backoff restarts from attempt 1 after it
    assert [entry["attempt"] for entry in reconnects] == [1, 1]
    assert all(entry["feed"] == "TEST" and 0 <= entry["delay_s"] <= 0.02 for entry in reconnects)
    assert all("no close frame" in entry["reason"] for entry in reconnects)


async def test_refused_connections_back_off_with_growing_seeded_delays() -> None:
    collector = Collector()
    async with ReplayServer([]) as server:  # refuses everything with HTTP 503 until given a session
        socket = make_socket(server, collector)
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(socket.run())
            async with asyncio.timeout(5):
                while socket.stats.connect_failures < 4:
                    await asyncio.sleep(0.005)
            server.sessions.append(Session(messages=numbered(3)))
            async with asyncio.timeout(5):
                while len(collector.seqs) < 3:
                    await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    failures = [entry for entry in logs if entry["event"] == "connect_failed"]
    assert [entry["attempt"] for entry in failures] == list(range(1, len(failures) + 1))
    expected = Backoff(BackoffConfig(initial_s=0.02, max_s=0.2, seed=7))
    assert [entry["delay_s"] for entry in failures] == [
        round(expected.delay(n), 3) for n in range(len(failures))
    ]
    assert all("503" in entry["error"] for entry in failures)
    assert server.refused == len(failures) and collector.seqs == [0, 1, 2]
    assert collector.states == [FeedState.CONNECTED]  # failed attempts are not connections lost


async def test_garbage_is_counted_logged_and_skipped() -> None:
    garbage = {2: ["not json", '{"seq": '], 4: [b"\xff\xfe binary"], 5: ['{"other": 1}']}
    collector = Collector()
    async with ReplayServer([Session(messages=numbered(5), garbage=garbage)]) as server:
        socket = make_socket(server, collector)
        with structlog.testing.capture_logs() as logs:
            await run_until(socket, lambda: socket.stats.messages == 9)
    assert collector.seqs == list(range(5))
    assert socket.stats.parse_errors == 4 and socket.stats.handler_errors == 0
    skipped = [entry for entry in logs if entry["event"] == "message_skipped"]
    assert [entry["message"] for entry in skipped] == [
        "not json",
        '{"seq": ',
        repr(b"\xff\xfe binary"),
        '{"other": 1}',
    ]
    assert collector.states == [FeedState.CONNECTED]


async def test_handler_bug_is_logged_and_does_not_stop_the_feed() -> None:
    seen: list[str | bytes] = []

    def buggy(raw: str | bytes, ts_recv: int) -> None:
        seen.append(raw)
        if len(seen) == 2:
            raise ZeroDivisionError("bug")

    statuses: list[FeedStatus] = []
    async with ReplayServer([Session(messages=numbered(4))]) as server:
        socket = ResilientWebSocket(
            "TEST", server.url, on_message=buggy, emit_status=statuses.append, config=fast_config()
        )
        with structlog.testing.capture_logs() as logs:
            await run_until(socket, lambda: len(seen) == 4)
    assert socket.stats.handler_errors == 1 and socket.stats.parse_errors == 0
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["handler_failed"]


async def test_silence_publishes_stale_then_recovered() -> None:
    session = Session(messages=numbered(6), pauses={3: 0.8})
    collector = Collector()
    async with ReplayServer([session]) as server:
        socket = make_socket(server, collector, stale_after_s=0.3)
        await run_until(socket, lambda: len(collector.seqs) == 6)
    assert collector.states == [FeedState.CONNECTED, FeedState.STALE, FeedState.RECOVERED]
    assert socket.stats.stale == 1 and not socket.is_stale
    stale, recovered = collector.statuses[1:]
    assert 0.3e9 < recovered.ts_recv - stale.ts_recv < 0.9e9  # recovered when message 3 came, ~0.5 s later


async def test_garbage_alone_does_not_count_as_data() -> None:
    """A feed that only sends junk is stale, however often the junk comes: only accepted messages are data."""
    session = Session(messages=[*numbered(1), *["junk"] * 7], interval_s=0.06)
    collector = Collector()
    async with ReplayServer([session]) as server:
        socket = make_socket(server, collector, stale_after_s=0.15)
        await run_until(socket, lambda: socket.stats.parse_errors == 7)
    assert collector.seqs == [0]
    assert collector.states == [FeedState.CONNECTED, FeedState.STALE]


async def test_planned_handover_keeps_every_message_in_order() -> None:
    """The aged connection streams on until its successor delivers, so nothing falls in between."""
    stream = numbered(80)
    # The venue's streams overlap in time: the successor starts 20 messages before the old one's last.
    old = Session(messages=stream[:60], await_client_messages=1)
    new = Session(messages=stream[40:], await_client_messages=1)
    collector = Collector()
    async with ReplayServer([old, new]) as server:
        socket = make_socket(server, collector, max_connection_age_s=0.3, handover_overlap_s=0.05)
        with structlog.testing.capture_logs() as logs:
            await run_until(
                socket, lambda: socket.stats.planned_handovers == 1 and len(collector.seqs) == 100
            )
        await server.wait_for(lambda s: s.connections[0].closed.is_set())
    # all of the old connection first, then the successor's buffered frames: the overlap twice,
    # for the venue adapter to drop by its sequence numbers
    assert collector.seqs == list(range(60)) + list(range(40, 80))
    assert [c.received for c in server.connections] == [[SUBSCRIBE], [SUBSCRIBE]]
    assert not server.connections[0].dropped  # the client closed it
    assert collector.states == [FeedState.CONNECTED]  # never disconnected
    assert socket.stats.reconnects == 0
    events = [entry["event"] for entry in logs]
    assert events.index("handover_opened") < events.index("handover_done")


async def test_application_heartbeat_is_sent_periodically() -> None:
    collector = Collector()
    async with ReplayServer([Session(messages=numbered(1))]) as server:
        socket = ResilientWebSocket(
            "TEST",
            server.url,
            on_message=collector.on_message,
            emit_status=collector.statuses.append,
            heartbeat=lambda: '{"method":"public/test"}',
            config=fast_config(heartbeat_interval_s=0.05),
        )
        await run_until(socket, lambda: socket.stats.heartbeats >= 3)
        await server.wait_for(lambda s: len(s.connections[0].received) >= 3)
    assert set(server.connections[0].received) == {'{"method":"public/test"}'}


@pytest.mark.parametrize("bad", ["max_connection_age_s", "stale_after_s"])
def test_config_rejects_non_positive_durations(bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        fast_config(**{bad: 0})


async def test_handler_replies_go_back_on_the_same_connection() -> None:
    """A venue's heartbeat test request gets its answer: the handler's return value is sent back."""
    test_request = json.dumps({"method": "heartbeat", "params": {"type": "test_request"}})
    answered: list[int] = []

    def on_message(raw: str | bytes, ts_recv: int) -> list[str] | None:
        if raw == test_request:
            answered.append(ts_recv)
            return ['{"method":"public/test"}']
        return None

    async with ReplayServer(
        [Session(messages=[*numbered(2), test_request, *numbered(1, start=2)])]
    ) as server:
        socket = ResilientWebSocket(
            "TEST", server.url, on_message=on_message, emit_status=lambda _: None, config=fast_config()
        )
        await run_until(socket, lambda: socket.stats.replies == 1)
        await server.wait_for(lambda s: len(s.connections[0].received) == 1)
    assert server.connections[0].received == ['{"method":"public/test"}']
    assert len(answered) == 1 and socket.stats.messages >= 3
