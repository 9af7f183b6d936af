"""Historical files into one event journal: several recorded sources merged by receive time.

The format modules (:mod:`adapters.binance_vision`, :mod:`adapters.tardis`) turn one file into
events, row by row, each event stamped with the ``ts_recv`` a live system would have had. This
module holds what they share and what joins them:

- CSV primitives: plain, gzip and single-CSV zip files read as numbered rows
  (:func:`csv_records`), epoch timestamps in ms, µs or ns (:func:`epoch_ns`), finite numbers,
  and :class:`SourceReport`, which counts a source's rows and events and records its malformed
  rows with file and line (skipped, or an error in a strict import).
- Source specs ``KIND:PATH[:VENUE:SYMBOL]`` (:func:`parse_source_spec`) naming the kinds in
  :data:`SOURCE_KINDS`; a PATH with ``*`` or ``?`` is a glob, one source per file.
- :func:`import_sources` merges the sources by ``ts_recv`` (ties in the order the sources are
  given) into a new journal, refusing any event that would go back in time within its source,
  and gives a funding record without a mark price the last price of its instrument seen so far.
  :func:`import_main` is what ``main.py --mode import`` calls. See ``docs/IMPORT.md``.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import math
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import glob, has_magic
from heapq import merge
from pathlib import Path
from typing import BinaryIO, TypeAlias, TypeVar

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bot.events import Bar, Event, MarkPrice, Quote, Trade, Venue
from bot.journal import JournalWriter

NANOS_PER_MILLI = 1_000_000
NANOS_PER_SECOND = 1_000_000_000
MAX_KEPT_ISSUES = 20  # malformed rows kept per source with their line; all of them are counted
_PROGRESS_EVERY = 4096  # events between progress-bar refreshes
_BYTES_EVERY = 1024  # rows between readings of a file's position
_VENUE_NAMES = frozenset(venue.value for venue in Venue)

T = TypeVar("T")

# Kind → (module, function) of its reader. The format modules import this module's CSV
# primitives, so they are imported when a source is read rather than at import time.
SOURCE_KINDS: dict[str, tuple[str, str]] = {
    "binance-klines": ("adapters.binance_vision", "read_klines"),
    "binance-aggtrades": ("adapters.binance_vision", "read_agg_trades"),
    "binance-funding": ("adapters.binance_vision", "read_funding_rates"),
    "tardis-trades": ("adapters.tardis", "read_trades"),
    "tardis-quotes": ("adapters.tardis", "read_quotes"),
    "tardis-book": ("adapters.tardis", "read_book_snapshots"),
    "tardis-derivative-ticker": ("adapters.tardis", "read_derivative_tickers"),
    "tardis-options-chain": ("adapters.tardis", "read_options_chain"),
}


class ImportFailed(Exception):
    """An import that cannot go on; ``str(error)`` is one line naming the file (the CLI exits 2)."""


class MalformedRow(ValueError):
    """One row that does not parse: skipped and counted, or an :class:`ImportFailed` when strict."""


@dataclass(frozen=True)
class RowIssue:
    """A malformed row: where it is and why it was refused."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class SourceReport:
    """What one source gave: rows read, events per kind, rows passed over on purpose, malformed rows.

    ``notes`` counts deliberate decisions that are not errors (an unchanged top of book, a ticker
    row before its first complete state, a funding record with no price yet); ``line`` is the line
    being read, so that whoever consumes the reader lazily can name the row behind an event.
    """

    path: Path
    kind: str = ""
    strict: bool = False
    rows: int = 0
    line: int = 0
    bytes_read: int = 0
    events: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    issues: list[RowIssue] = field(default_factory=list)

    def bad_row(self, line: int, reason: str) -> None:
        """Record a malformed row; in a strict import, fail on it instead."""
        issue = RowIssue(self.path, line, reason)
        if self.strict:
            raise ImportFailed(f"{issue} (strict import)")
        self.malformed += 1
        if len(self.issues) < MAX_KEPT_ISSUES:
            self.issues.append(issue)


Reader: TypeAlias = Callable[[Path, str | None, SourceReport], Iterator[Event]]


# --- CSV primitives -------------------------------------------------------------------------------


def _open_binary(path: Path, stack: ExitStack) -> tuple[BinaryIO, BinaryIO]:
    """The file's content as bytes, and the file on disk (whose position measures progress)."""
    try:
        raw: BinaryIO = stack.enter_context(path.open("rb"))
    except OSError as exc:
        raise ImportFailed(f"{path}: cannot open ({exc.strerror or exc})") from None
    if path.suffix == ".zip":
        try:
            archive = stack.enter_context(zipfile.ZipFile(raw))
        except zipfile.BadZipFile:
            raise ImportFailed(f"{path}: not a zip file") from None
        members = [name for name in archive.namelist() if not name.endswith("/")]
        if len(members) != 1:
            raise ImportFailed(f"{path}: expected a zip holding one CSV, it holds {len(members)} files")
        return stack.enter_context(archive.open(members[0])), raw
    if path.suffix == ".gz":
        return stack.enter_context(gzip.GzipFile(fileobj=raw)), raw  # type: ignore[return-value]
    return raw, raw


def csv_rows(path: Path, report: SourceReport) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank CSV line of a ``.csv``, ``.gz`` or one-CSV ``.zip``."""
    with ExitStack() as stack:
        content, raw = _open_binary(path, stack)
        text = stack.enter_context(io.TextIOWrapper(content, encoding="utf-8", newline=""))
        reader = csv.reader(text)
        try:
            for row in reader:
                if not row:
                    continue
                report.rows += 1
                report.line = reader.line_num
                if report.rows % _BYTES_EVERY == 0:
                    report.bytes_read = raw.tell()
                yield reader.line_num, row
        except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile, csv.Error) as exc:
            raise ImportFailed(f"{path}: unreadable after line {reader.line_num} ({exc})") from None
        report.bytes_read = path.stat().st_size


def csv_records(
    path: Path,
    report: SourceReport,
    parse: Callable[[list[str]], T | None],
    *,
    what: str,
    header: Callable[[list[str]], bool],
) -> Iterator[T]:
    """Parsed rows of one file; the first line decides whether the file is of the expected kind.

    Line 1 must be a header (``header(row)`` true) or a row ``parse`` accepts; otherwise the file
    is not ``what`` and :class:`ImportFailed` names it. Later rows that ``parse`` refuses with a
    ``ValueError`` go to :meth:`SourceReport.bad_row`; a row it maps to None gave no event on
    purpose (it notes why in the report).
    """
    first = True
    for line, row in csv_rows(path, report):
        if first and header(row):
            first = False
            continue
        try:
            record = parse(row)
        except ValueError as exc:
            if first:
                raise ImportFailed(f"{path}: not {what} (line {line}: {exc})") from None
            report.bad_row(line, str(exc))
            continue
        first = False
        if record is not None:
            yield record


def epoch_ns(text: str) -> int:
    """An epoch timestamp given in ms, µs or ns, told apart by magnitude (dates 1973–5138), as ns."""
    try:
        value = int(text)
    except ValueError:
        raise MalformedRow(f"timestamp {text!r} is not an integer") from None
    if value >= 10**17:
        return value
    if value >= 10**14:
        return value * 1_000
    if value >= 10**11:
        return value * NANOS_PER_MILLI
    raise MalformedRow(f"timestamp {text!r} is not epoch ms, µs or ns")


def finite(text: str, name: str) -> float:
    """``float(text)``, refused unless finite: NaN would not survive the journal's JSON."""
    try:
        value = float(text)
    except ValueError:
        raise MalformedRow(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise MalformedRow(f"{name} {text!r} is not finite")
    return value


def positive(text: str, name: str) -> float:
    value = finite(text, name)
    if value <= 0.0:
        raise MalformedRow(f"{name} {text!r} is not positive")
    return value


def non_negative(text: str, name: str) -> float:
    value = finite(text, name)
    if value < 0.0:
        raise MalformedRow(f"{name} {text!r} is negative")
    return value


def check_width(row: list[str], widths: Iterable[int]) -> None:
    allowed = tuple(widths)
    if len(row) not in allowed:
        expected = " or ".join(str(width) for width in allowed)
        raise MalformedRow(f"expected {expected} columns, got {len(row)}")


# --- source specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """One file to import: its kind, path and, optionally, the instrument id its rows are for."""

    kind: str
    path: Path
    instrument: str | None = None

    def __str__(self) -> str:
        suffix = f":{self.instrument}" if self.instrument else ""
        return f"{self.kind}:{self.path}{suffix}"

    def reader(self) -> Reader:
        module, function = SOURCE_KINDS[self.kind]
        return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def parse_source_spec(text: str) -> list[SourceSpec]:
    """``KIND:PATH[:VENUE:SYMBOL]`` as sources: one, or one per file (sorted) when PATH is a glob."""
    kind, sep, rest = text.partition(":")
    if kind not in SOURCE_KINDS:
        raise ImportFailed(f"unknown source kind {kind!r} in {text!r}; kinds: {', '.join(SOURCE_KINDS)}")
    if not sep or not rest:
        raise ImportFailed(f"source {text!r} names no file; expected {kind}:PATH[:VENUE:SYMBOL]")
    path_text, instrument = rest, None
    head, _, symbol = rest.rpartition(":")
    path_part, path_sep, venue = head.rpartition(":")
    if path_sep and venue in _VENUE_NAMES:
        if not symbol or not path_part:
            raise ImportFailed(f"source {text!r}: expected {kind}:PATH:VENUE:SYMBOL")
        path_text, instrument = path_part, f"{venue}:{symbol}"
    if not has_magic(path_text):
        return [SourceSpec(kind, Path(path_text), instrument)]
    matches = sorted(glob(path_text))
    if not matches:
        raise ImportFailed(f"no file matches {path_text!r} (source {text!r})")
    return [SourceSpec(kind, Path(match), instrument) for match in matches]


# --- merging --------------------------------------------------------------------------------------


class _LastPrices:
    """Last price and index seen per instrument, to price funding records that carry none.

    Only events already merged are looked at, so the price given is one a live system held at
    the funding time: the last trade, quote mid, closed bar close or mark of the instrument.
    """

    def __init__(self) -> None:
        self._price: dict[str, float] = {}
        self._index: dict[str, float] = {}

    def complete(self, event: Event, report: SourceReport) -> Event:
        match event:
            case MarkPrice(mark_price=0.0):
                price = self._price.get(event.instrument)
                if price is None:
                    report.notes["funding record before any price of its instrument (mark 0.0)"] += 1
                    return event
                index = self._index.get(event.instrument, 0.0)
                report.notes["funding record priced at the last price seen"] += 1
                return msgspec.structs.replace(event, mark_price=price, index_price=index)
            case MarkPrice():
                self._price[event.instrument] = event.mark_price
                if event.index_price > 0.0:
                    self._index[event.instrument] = event.index_price
            case Trade():
                self._price[event.instrument] = event.price
            case Quote() if event.bid > 0.0 and event.ask > 0.0:
                self._price[event.instrument] = event.mid
            case Bar(closed=True):
                self._price[event.instrument] = event.close
        return event


def _tagged(events: Iterator[Event], report: SourceReport) -> Iterator[tuple[Event, SourceReport]]:
    """One source's events with their report, refusing (as malformed) any that goes back in ts_recv."""
    last_recv = -1
    for event in events:
        if event.ts_recv < last_recv:
            back_ms = (last_recv - event.ts_recv) / NANOS_PER_MILLI
            report.bad_row(report.line, f"received {back_ms:g} ms before the previous row of its file")
            continue
        last_recv = event.ts_recv
        yield event, report


@dataclass(frozen=True)
class ImportSummary:
    """The journal written, and what each source contributed to it."""

    journal: Path
    events: int
    first_ts_recv: int | None
    last_ts_recv: int | None
    sources: tuple[tuple[SourceSpec, SourceReport], ...]

    @property
    def events_by_kind(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for _, report in self.sources:
            total.update(report.events)
        return total

    @property
    def malformed(self) -> int:
        return sum(report.malformed for _, report in self.sources)

    @property
    def issues(self) -> list[RowIssue]:
        return [issue for _, report in self.sources for issue in report.issues]

    def table(self) -> Table:
        """Rows, events per kind, notes and malformed rows per source, as a rich table."""
        table = Table(title=f"imported into {self.journal}")
        table.add_column("source", overflow="fold")
        table.add_column("instrument", overflow="fold")
        table.add_column("rows", justify="right")
        table.add_column("events")
        table.add_column("notes")
        table.add_column("malformed", justify="right")
        for spec, report in self.sources:
            events = "\n".join(f"{kind} {count:,}" for kind, count in sorted(report.events.items()))
            notes = "\n".join(f"{reason}: {count:,}" for reason, count in sorted(report.notes.items()))
            table.add_row(
                f"{spec.kind}\n{spec.path.name}",
                spec.instrument or "from the file",
                f"{report.rows:,}",
                events,
                notes,
                f"{report.malformed:,}",
            )
        span = ""
        if self.first_ts_recv is not None and self.last_ts_recv is not None:
            span = f"{_iso(self.first_ts_recv)} → {_iso(self.last_ts_recv)}"
        table.caption = f"{self.events:,} events {span}"
        return table


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / NANOS_PER_SECOND, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _partial_path(out: Path) -> Path:
    """Where the journal is written until it is complete; keeps ``.gz`` last so compression applies."""
    return out.with_name(f"{out.name.removesuffix(out.suffix)}.partial{out.suffix}")


def import_sources(
    specs: Sequence[SourceSpec],
    out: Path,
    *,
    strict: bool = False,
    console: Console | None = None,
) -> ImportSummary:
    """Merge the sources by ``ts_recv`` into a new journal at ``out`` (refused if it exists).

    The journal is written beside ``out`` and renamed into place only when complete, so a failed
    import leaves nothing behind. A progress bar goes to ``console`` when one is given.
    Raises :class:`ImportFailed`.
    """
    if not specs:
        raise ImportFailed("nothing to import: give at least one source")
    if out.exists():
        raise ImportFailed(f"{out} exists; an import writes a new journal")
    for spec in specs:
        if not spec.path.is_file():
            raise ImportFailed(f"{spec.path}: no such file (source {spec})")
    reports = [SourceReport(spec.path, spec.kind, strict) for spec in specs]
    streams = [
        _tagged(spec.reader()(spec.path, spec.instrument, report), report)
        for spec, report in zip(specs, reports, strict=True)
    ]
    partial = _partial_path(out)
    partial.unlink(missing_ok=True)
    meta = {"mode": "import", "feed": "import", "sources": [str(spec) for spec in specs]}
    writer = JournalWriter(partial, f"import-{datetime.now(UTC):%Y%m%dT%H%M%SZ}", meta)
    prices = _LastPrices()
    count, first, last = 0, None, None
    total_bytes = sum(spec.path.stat().st_size for spec in specs)
    progress = _ImportProgress(console, reports, total_bytes) if console is not None else None
    try:
        with progress if progress is not None else nullcontext():
            for event, report in merge(*streams, key=lambda item: item[0].ts_recv):
                event = prices.complete(event, report)
                writer.write(event)
                report.events[type(event).__name__] += 1
                count += 1
                if first is None:
                    first = event.ts_recv
                last = event.ts_recv
                if progress is not None and count % _PROGRESS_EVERY == 0:
                    progress.update(count, last)
            if progress is not None:
                progress.update(count, last)
        writer.close()
        if count == 0:
            raise ImportFailed(f"nothing imported: the sources hold no events ({', '.join(map(str, specs))})")
        partial.rename(out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return ImportSummary(out, count, first, last, tuple(zip(specs, reports, strict=True)))


class _ImportProgress:
    """A rich progress bar over the bytes of all source files, with the date reached and events written."""

    def __init__(self, console: Console, reports: Sequence[SourceReport], total_bytes: int) -> None:
        self._reports = reports
        self._bar = Progress(
            TextColumn("[bold]import"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[date]}"),
            TextColumn("{task.fields[events]:>12,} events"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._bar.add_task("import", total=max(total_bytes, 1), date="", events=0)

    def __enter__(self) -> _ImportProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    def update(self, events: int, now_ns: int | None) -> None:
        completed = sum(report.bytes_read for report in self._reports)
        date = _iso(now_ns) if now_ns is not None else ""
        self._bar.update(self._task, completed=completed, date=date, events=events)


def import_main(
    sources: list[str],
    out: Path,
    *,
    strict: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> ImportSummary:
    """``main.py --mode import --source KIND:PATH[:VENUE:SYMBOL] ... --journal OUT [--strict]``.

    Parses the specs, imports them with a progress bar on stderr, then prints the per-source table
    and the first malformed rows to ``console`` (stdout by default). Raises :class:`ImportFailed`,
    whose message is one line (the CLI exits 2).
    """
    specs = [spec for text in sources for spec in parse_source_spec(text)]
    shown = console or Console()
    bar_console = (console or Console(stderr=True)) if progress else None
    summary = import_sources(specs, out, strict=strict, console=bar_console)
    shown.print(summary.table())
    for issue in summary.issues:
        shown.print(f"malformed row skipped: {issue}", markup=False, highlight=False)
    if summary.malformed > len(summary.issues):
        shown.print(f"… {summary.malformed - len(summary.issues):,} more malformed rows skipped")
    return summary
