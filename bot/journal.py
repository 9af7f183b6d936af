"""The event journal: every inbound event of a run, in dispatch order, replayable.

Format (documented in ``docs/JOURNAL.md``): JSON lines, optionally gzip-compressed
when the file name ends in ``.gz``. The first line is a header object
``{"journal": "volbot", "version": 1, "run_id": ..., "created_ns": ..., "meta": {...}}``;
every further line is one event as encoded by :func:`bot.events.encode`. A line cut
short by a crash is detected and ignored by the reader, so a journal is always
readable up to its last complete event.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

from bot.events import Event, decode, encode

JOURNAL_VERSION = 1
log = structlog.get_logger("bot.journal")


class JournalError(ValueError):
    """The file is not a volbot journal or has an unsupported version."""


def _open(path: Path, mode: str) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, mode)  # type: ignore[return-value]
    return open(path, mode)


class JournalWriter:
    """Appends inbound events; :meth:`flush` makes them durable up to that point."""

    def __init__(self, path: Path | str, run_id: str, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._file = _open(self.path, "ab")
        if self.path.stat().st_size == 0:
            header = {
                "journal": "volbot",
                "version": JOURNAL_VERSION,
                "run_id": run_id,
                "created_ns": time.time_ns(),
                "meta": meta or {},
            }
            self._file.write(msgspec.json.encode(header) + b"\n")

    def write(self, event: Event) -> None:
        self._file.write(encode(event) + b"\n")
        self.count += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        if self.path.suffix != ".gz":
            os.fsync(self._file.fileno())
        self._file.close()


def read_header(path: Path | str) -> dict[str, Any]:
    """The journal's header object; JournalError when the file is not a journal."""
    path = Path(path)
    with _open(path, "rb") as handle:
        first = handle.readline()
    try:
        header = msgspec.json.decode(first)
    except msgspec.DecodeError as exc:
        raise JournalError(f"{path} is not a volbot journal (bad header line)") from exc
    if not isinstance(header, dict) or header.get("journal") != "volbot":
        raise JournalError(f"{path} is not a volbot journal")
    if header.get("version") != JOURNAL_VERSION:
        raise JournalError(f"{path} has journal version {header.get('version')}, expected {JOURNAL_VERSION}")
    return header


def read_events(path: Path | str) -> Iterator[Event]:
    """Yield the journal's events in order; a truncated final line is skipped with a warning."""
    path = Path(path)
    read_header(path)
    with _open(path, "rb") as handle:
        handle.readline()
        line_number = 1
        try:
            for line_number, line in enumerate(handle, start=2):
                if not line.endswith(b"\n"):
                    log.warning("journal_truncated_line", path=str(path), line=line_number)
                    return
                yield decode(line)
        except (EOFError, gzip.BadGzipFile):
            # a compressed journal whose writer died: everything up to its last flush is readable
            log.warning("journal_truncated_stream", path=str(path), line=line_number + 1)
