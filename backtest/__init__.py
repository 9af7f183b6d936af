"""Replay backtests and their evaluation.

- :mod:`backtest.engine`: :func:`~backtest.engine.run_backtest` replays a journal or the seeded
  synthetic market through :func:`bot.app.build_engine`, with a buy-and-hold benchmark on the
  same events; :func:`~backtest.engine.backtest_main` is ``main.py --mode backtest``.
- :mod:`backtest.metrics`: performance metrics as pure functions of an equity curve and fills.
- :mod:`backtest.report`: ``metrics.json``, ``trades.csv``, ``equity.csv``, ``report.html`` and
  the console table.

Submodules are imported where they are used, so a light user (the gym environment reading
:mod:`backtest.metrics`) does not load matplotlib.
"""
