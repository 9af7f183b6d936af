"""Backtest reports: a deterministic ``metrics.json``, ``trades.csv``, ``equity.csv`` and ``report.html``.

``metrics.json`` holds nothing that depends on when or where the backtest ran (no wall
time, keys sorted, floats written exactly), so the same backtest twice gives the same
bytes and a diff of two reports shows only what changed. ``report.html`` is one
self-contained file: inline CSS and the plots as base64 PNGs drawn by matplotlib's Agg
canvas — equity and drawdown against buy-and-hold, exposure over time, and the
synthetic market's true regimes shaded behind them when the events carried them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.table import Table

from backtest.metrics import NANOS_PER_SECOND, drawdown

if TYPE_CHECKING:
    from backtest.engine import BacktestResult, EquityPoint, PolicyRun, RegimeMark

NANOS_PER_DAY = 86_400 * NANOS_PER_SECOND
REGIME_COLOURS = ("#4caf50", "#e53935", "#fb8c00", "#8e24aa", "#1e88e5")
STRATEGY_COLOUR, BENCHMARK_COLOUR = "#1f4e9c", "#9e9e9e"


# --- formatting shared by the console table and the HTML table ----------------------------------


def _missing(value: float) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _percent(value: float) -> str:
    return "–" if _missing(value) else f"{value:+.2%}"


def _plain_percent(value: float) -> str:
    return "–" if _missing(value) else f"{value:.1%}"


def _ratio(value: float) -> str:
    return "–" if _missing(value) else f"{value:.2f}"


def _money(value: float) -> str:
    return "–" if _missing(value) else f"{value:,.2f}"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _duration(seconds: float) -> str:
    """``3d 04:05:06`` style, to the second."""
    if _missing(seconds):
        return "–"
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


@dataclass(frozen=True)
class _Row:
    label: str
    field: str
    render: Callable[[float], str]


METRIC_ROWS: tuple[_Row, ...] = (
    _Row("start equity", "start_equity", _money),
    _Row("end equity", "end_equity", _money),
    _Row("total return", "total_return", _percent),
    _Row("annualised return", "annualised_return", _percent),
    _Row("annualised volatility", "annualised_volatility", _plain_percent),
    _Row("Sharpe", "sharpe", _ratio),
    _Row("Sortino", "sortino", _ratio),
    _Row("max drawdown", "max_drawdown", _plain_percent),
    _Row("max drawdown duration", "max_drawdown_duration_s", _duration),
    _Row("Calmar", "calmar", _ratio),
    _Row("turnover (× mean equity)", "turnover", _ratio),
    _Row("fees", "fees", _money),
    _Row("funding PnL", "funding_pnl", _money),
    _Row("trades (fills)", "trades", _count),
    _Row("hit rate (closing fills)", "hit_rate", _plain_percent),
    _Row("exposure time", "exposure_time", _plain_percent),
)


def metrics_table(result: BacktestResult) -> Table:
    """The strategy's metrics beside the benchmark's, for the console."""
    table = Table(title=f"backtest {result.name}: {result.events:,} events, {_span(result)}")
    table.add_column("metric")
    table.add_column(result.strategy.policy, justify="right")
    table.add_column(f"buy & hold {_targets(result)}", justify="right")
    for row in METRIC_ROWS:
        table.add_row(
            row.label,
            row.render(getattr(result.metrics, row.field)),
            row.render(getattr(result.benchmark_metrics, row.field)),
        )
    return table


def _span(result: BacktestResult) -> str:
    length = _duration((result.end_ns - result.start_ns) / NANOS_PER_SECOND)
    return f"{_iso(result.start_ns)} → {_iso(result.end_ns)} ({length})"


def _targets(result: BacktestResult) -> str:
    return ", ".join(f"{instrument} {target:g}" for instrument, target in result.benchmark_targets.items())


def _iso(ts_ns: int) -> str:
    """UTC time to the microsecond, from integer nanoseconds (no float rounding of the seconds)."""
    seconds, nanos = divmod(ts_ns, NANOS_PER_SECOND)
    stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- metrics.json ---------------------------------------------------------------------------------


def metrics_document(result: BacktestResult) -> dict[str, Any]:
    """Everything ``metrics.json`` holds; nothing in it depends on the wall clock or the machine."""
    return {
        "name": result.name,
        "source": result.source,
        "settings": result.settings,
        "events": result.events,
        "span": {
            "start_ns": result.start_ns,
            "end_ns": result.end_ns,
            "start": _iso(result.start_ns),
            "end": _iso(result.end_ns),
            "days": (result.end_ns - result.start_ns) / NANOS_PER_DAY,
        },
        "fills_sha256": result.fills_sha256,
        "obs_sha256": result.obs_sha256,
        "strategy": _run_document(result.strategy),
        "benchmark": {**_run_document(result.benchmark), "targets": result.benchmark_targets},
        "regime_time_share": regime_time_share(result.regimes, result.end_ns),
    }


def _run_document(run: PolicyRun) -> dict[str, Any]:
    return {
        "policy": run.policy,
        "instruments": list(run.instruments),
        "metrics": run.metrics.to_dict(),
        "fills_sha256": run.fills_sha256,
        "obs_sha256": run.obs_sha256,
        "decisions": run.decisions,
        "orders": len(run.orders),
        "rejected_orders": sum(order.status == "REJECTED" for order in run.orders),
        "final_risk_state": run.risk_state,
    }


def regime_time_share(regimes: Sequence[RegimeMark], end_ns: int) -> dict[str, float]:
    """Share of the labelled time spent in each regime, by name (empty without labels)."""
    if not regimes:
        return {}
    spans: dict[str, int] = {}
    for mark, until in zip(regimes, [*[m.ts_ns for m in regimes[1:]], end_ns], strict=True):
        spans[mark.name] = spans.get(mark.name, 0) + max(until - mark.ts_ns, 0)
    total = sum(spans.values())
    return {name: (span / total if total else math.nan) for name, span in spans.items()}


def _json_ready(value: Any) -> Any:
    """NaN and ±inf become null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def metrics_json(result: BacktestResult) -> str:
    """``metrics.json``'s text: sorted keys, exact floats, a final newline."""
    return json.dumps(_json_ready(metrics_document(result)), sort_keys=True, indent=2, allow_nan=False) + "\n"


# --- CSV files ------------------------------------------------------------------------------------


TRADE_COLUMNS = (
    "seq",
    "ts_ns",
    "time",
    "client_order_id",
    "instrument",
    "side",
    "quantity",
    "price",
    "notional",
    "fee",
    "liquidity",
    "trade_id",
    "realized_pnl",
    "position_after",
    "closing",
)


def write_trades_csv(result: BacktestResult, path: Path) -> None:
    """One row per strategy fill, with the PnL it realised and the position it left."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TRADE_COLUMNS)
        for fill in result.fills:
            writer.writerow(
                (
                    fill.seq,
                    fill.ts_ns,
                    _iso(fill.ts_ns),
                    fill.client_order_id,
                    fill.instrument,
                    fill.side,
                    repr(fill.quantity),
                    repr(fill.price),
                    repr(fill.notional),
                    repr(fill.fee),
                    fill.liquidity,
                    fill.trade_id,
                    repr(fill.realized_pnl),
                    repr(fill.position_after),
                    int(fill.closing),
                )
            )


def write_equity_csv(result: BacktestResult, path: Path) -> None:
    """One row per snapshot: the strategy's books and exposures, buy-and-hold's equity, the regime."""
    strategy = result.strategy
    benchmark_equity = {point.ts_ns: point.equity for point in result.benchmark.equity}
    strategy_drawdown = drawdown(np.array([point.equity for point in strategy.equity]))
    regimes = _regime_at([point.ts_ns for point in strategy.equity], result.regimes)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            (
                "ts_ns",
                "time",
                "equity",
                "cash",
                "unrealized_pnl",
                "realized_pnl",
                "fees",
                "funding",
                "gross_exposure",
                "drawdown",
                *(f"exposure {instrument}" for instrument in strategy.instruments),
                "benchmark_equity",
                "regime",
            )
        )
        for point, dd, regime in zip(strategy.equity, strategy_drawdown, regimes, strict=True):
            held = benchmark_equity.get(point.ts_ns)
            writer.writerow(
                (
                    point.ts_ns,
                    _iso(point.ts_ns),
                    repr(point.equity),
                    repr(point.cash),
                    repr(point.unrealized_pnl),
                    repr(point.realized_pnl),
                    repr(point.fees),
                    repr(point.funding),
                    repr(point.gross_exposure),
                    repr(float(dd)),
                    *(repr(exposure) for exposure in point.exposures),
                    "" if held is None else repr(held),
                    regime,
                )
            )


def _regime_at(ts_ns: Sequence[int], regimes: Sequence[RegimeMark]) -> list[str]:
    """Name of the regime in force at each time ("" before the first label or without labels)."""
    if not regimes:
        return [""] * len(ts_ns)
    starts = np.array([mark.ts_ns for mark in regimes], dtype=np.int64)
    index = np.searchsorted(starts, np.asarray(ts_ns, dtype=np.int64), side="right") - 1
    return [regimes[i].name if i >= 0 else "" for i in index]


# --- plots ----------------------------------------------------------------------------------------


def _times(points: Sequence[EquityPoint]) -> np.ndarray:
    return np.array([point.ts_ns for point in points], dtype="datetime64[ns]")


def _equities(points: Sequence[EquityPoint]) -> np.ndarray:
    return np.array([point.equity for point in points], dtype=float)


def _new_axes(height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(11, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.grid(True, alpha=0.3)
    return figure, axes


def _shade_regimes(axes: Axes, regimes: Sequence[RegimeMark], end_ns: int) -> list[Patch]:
    """Shade each labelled regime's span; returns legend handles, one per regime seen."""
    handles: dict[str, Patch] = {}
    for mark, until in zip(regimes, [*[m.ts_ns for m in regimes[1:]], end_ns], strict=True):
        colour = REGIME_COLOURS[mark.regime % len(REGIME_COLOURS)]
        axes.axvspan(
            np.datetime64(mark.ts_ns, "ns"), np.datetime64(until, "ns"), color=colour, alpha=0.12, lw=0
        )
        handles.setdefault(mark.name, Patch(color=colour, alpha=0.3, label=f"regime: {mark.name}"))
    return list(handles.values())


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_equity(result: BacktestResult) -> str:
    """Equity of the strategy and of buy-and-hold (base64 PNG)."""
    figure, axes = _new_axes(4.2)
    regimes = _shade_regimes(axes, result.regimes, result.end_ns)
    for run, colour, label in _runs(result):
        axes.plot(_times(run.equity), _equities(run.equity), color=colour, lw=1.3, label=label)
    axes.set_ylabel("equity (USDT)")
    axes.set_title("Equity")
    axes.legend(handles=[*axes.get_legend_handles_labels()[0], *regimes], loc="best", fontsize=8)
    return _png(figure)


def plot_drawdown(result: BacktestResult) -> str:
    """Drawdown from the running peak, strategy against buy-and-hold (base64 PNG)."""
    figure, axes = _new_axes(3.2)
    regimes = _shade_regimes(axes, result.regimes, result.end_ns)
    for run, colour, label in _runs(result):
        times = _times(run.equity)
        depth = -100.0 * drawdown(_equities(run.equity))
        axes.fill_between(times, depth, 0.0, color=colour, alpha=0.25, lw=0)
        axes.plot(times, depth, color=colour, lw=1.0, label=label)
    axes.set_ylabel("drawdown (%)")
    axes.set_title("Drawdown")
    axes.legend(handles=[*axes.get_legend_handles_labels()[0], *regimes], loc="lower left", fontsize=8)
    return _png(figure)


def plot_exposure(result: BacktestResult) -> str:
    """The strategy's signed exposure per instrument and its gross exposure (base64 PNG)."""
    figure, axes = _new_axes(3.2)
    regimes = _shade_regimes(axes, result.regimes, result.end_ns)
    points = result.strategy.equity
    times = _times(points)
    for index, instrument in enumerate(result.strategy.instruments):
        exposure = np.array([point.exposures[index] for point in points], dtype=float)
        axes.step(times, exposure, where="post", lw=1.0, label=instrument)
    gross = np.array([point.gross_exposure for point in points], dtype=float)
    axes.step(times, gross, where="post", color="black", lw=1.0, ls="--", label="gross")
    axes.axhline(0.0, color="black", lw=0.5)
    axes.set_ylabel("exposure (× equity)")
    axes.set_title("Exposure")
    axes.legend(handles=[*axes.get_legend_handles_labels()[0], *regimes], loc="best", fontsize=8)
    return _png(figure)


def _runs(result: BacktestResult) -> list[tuple[PolicyRun, str, str]]:
    return [
        (result.benchmark, BENCHMARK_COLOUR, f"buy & hold ({_targets(result)})"),
        (result.strategy, STRATEGY_COLOUR, result.strategy.policy),
    ]


# --- report.html ----------------------------------------------------------------------------------


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { padding: 0.25em 0.9em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f4f8; }
img { width: 100%; border: 1px solid #e4e4e4; margin: 0.6em 0; }
code { font-size: 0.85em; color: #444; }
"""


def report_html(result: BacktestResult) -> str:
    """The self-contained HTML report."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(row.label)}</td><td>{esc(row.render(getattr(result.metrics, row.field)))}</td>"
        f"<td>{esc(row.render(getattr(result.benchmark_metrics, row.field)))}</td></tr>"
        for row in METRIC_ROWS
    )
    source = ", ".join(f"{key} {value}" for key, value in sorted(result.source.items()) if value is not None)
    shares = regime_time_share(result.regimes, result.end_ns)
    regimes = (
        "<p>True regimes of the synthetic market (evaluation only): "
        + ", ".join(f"{esc(name)} {share:.1%}" for name, share in shares.items())
        + " of the time.</p>"
        if shares
        else ""
    )
    plots = "\n".join(
        f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
        for alt, data in (
            ("equity against buy and hold", plot_equity(result)),
            ("drawdown against buy and hold", plot_drawdown(result)),
            ("exposure over time", plot_exposure(result)),
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>volbot backtest {esc(result.name)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Backtest {esc(result.name)}</h1>
<p class="meta">{esc(source)}<br>
{result.events:,} events, {esc(_span(result))}<br>
policy <b>{esc(result.strategy.policy)}</b> on {esc(", ".join(result.strategy.instruments))};
benchmark: buy &amp; hold {esc(_targets(result))}</p>
<table>
<thead><tr><th>metric</th><th>{esc(result.strategy.policy)}</th><th>buy &amp; hold</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{regimes}
{plots}
<p class="meta">fills sha256 <code>{result.fills_sha256}</code><br>
observations sha256 <code>{result.obs_sha256}</code><br>
{len(result.fills):,} fills in <code>trades.csv</code>, {len(result.equity):,} snapshots in
<code>equity.csv</code>, figures in <code>metrics.json</code>.</p>
</body>
</html>
"""


def write_report(result: BacktestResult, directory: Path) -> Path:
    """Write ``metrics.json``, ``trades.csv``, ``equity.csv`` and ``report.html`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(metrics_json(result), encoding="utf-8")
    write_trades_csv(result, directory / "trades.csv")
    write_equity_csv(result, directory / "equity.csv")
    (directory / "report.html").write_text(report_html(result), encoding="utf-8")
    return directory
