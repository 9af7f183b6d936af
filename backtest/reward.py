"""The reinforcement-learning reward: a step's return, less what the return does not show.

A step is the time between two decisions. Its reward, in reward units of ``pnl_scale``
per unit of equity (100: percent), is

    r_t            = (E_t − E_{t−1}) / E_{t−1}                       relative equity change
    − m_t                                                           the market's part of it (optional)
    − turnover     · traded_notional_t / E_{t−1}                    churn beyond the venue's fees
    − drawdown     · max(0, dd_t − max(dd_0..dd_{t−1}))             a new maximum drawdown hurts twice
    − leverage     · max(0, gross_t − 1) · Δt                       gross exposure above 1× equity
    − vol          · (σ̂_t − target_vol)² · Δt                       off the volatility target

each term multiplied by ``pnl_scale``. ``dd_t = 1 − E_t / max(E_0..E_t)`` is the drawdown
from the episode's peak (so the drawdown terms of an episode add up to ``drawdown`` times
its maximum drawdown), ``σ̂_t`` the annualised realised volatility of the last
``vol_window`` step returns (no mean subtracted; no vol term until the window is full,
since a handful of returns says little), ``Δt`` the step in years.

``m_t`` is zero unless ``benchmark`` names an instrument: then it is what holding that
instrument at the portfolio's net exposure made over the step, so the reward is the return in
excess of the market's move. Why: an agent exploring spot against perp otherwise sees its
funding and basis edge (a few bps a step) under the market noise of its exploration (tens of
bps); the realised volatility term still sees the whole return, so outright exposure is still
charged, and the metrics (Sharpe, returns) always use the actual equity.

Why these units: the turnover and drawdown terms are costs per unit of something that
happened (notional traded, maximum drawdown extended), so they are charged when it happens; the
leverage and volatility terms are costs of *holding* a state, so they are annual rates
charged pro rata over the step. Summed over an episode, every term is then a fraction of
equity whatever the decision interval, and comparable with the episode's return.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

SECONDS_PER_YEAR = 365.0 * 86_400.0


class RewardConfig(BaseModel):
    """Weights of the reward's terms (see the module docstring for the formula and units)."""

    model_config = ConfigDict(extra="forbid")

    pnl_scale: float = Field(100.0, gt=0, description="reward units per unit of relative equity change")
    turnover_penalty: float = Field(
        0.0002, ge=0, description="cost per unit of notional traded / equity, on top of the fees"
    )
    drawdown_penalty: float = Field(
        0.5, ge=0, description="extra cost per unit the episode's maximum drawdown grows"
    )
    leverage_penalty: float = Field(
        1.0, ge=0, description="annual cost per unit of gross exposure above 1× equity"
    )
    target_vol: float = Field(0.15, gt=0, description="annualised volatility of step returns aimed at")
    vol_penalty: float = Field(2.0, ge=0, description="annual cost per squared unit of vol off target")
    vol_window: int = Field(60, ge=2, description="step returns in the rolling realised volatility")
    benchmark: str | None = Field(
        None,
        description=(
            "reward the return in excess of holding this instrument at the net exposure of the traded "
            "ones (which must share its underlying); None: the plain return"
        ),
    )


@dataclass(frozen=True, slots=True)
class RewardTerms:
    """One step's reward and its parts, all in reward units (penalties as positive numbers)."""

    reward: float
    pnl: float
    market: float
    turnover: float
    drawdown: float
    leverage: float
    volatility: float
    step_return: float
    realised_vol: float


class RewardEngine:
    """Turns each step's equity, trading and exposure into a reward; one instance per episode stream."""

    def __init__(self, config: RewardConfig | None = None, step_seconds: float = 60.0) -> None:
        if not step_seconds > 0:
            raise ValueError(f"step_seconds must be positive, got {step_seconds}")
        self.config = config if config is not None else RewardConfig()
        self.step_years = step_seconds / SECONDS_PER_YEAR
        self._returns: deque[float] = deque(maxlen=self.config.vol_window)
        self._equity = math.nan
        self._peak = math.nan
        self._drawdown = 0.0
        self._max_drawdown = 0.0

    def reset(self, equity: float) -> None:
        """Start an episode at ``equity`` (its first peak)."""
        if not (math.isfinite(equity) and equity > 0):
            raise ValueError(f"an episode must start with positive finite equity, got {equity}")
        self._returns.clear()
        self._equity = self._peak = float(equity)
        self._drawdown = self._max_drawdown = 0.0

    @property
    def equity_before(self) -> float:
        """Equity at the start of the coming step (the end of the latest one)."""
        return self._equity

    @property
    def drawdown(self) -> float:
        """Drawdown from the episode's peak after the latest step."""
        return self._drawdown

    def step(
        self, equity: float, traded_notional: float, gross_exposure: float, market_return: float = 0.0
    ) -> RewardTerms:
        """Reward of the step that ended at ``equity`` after trading ``traded_notional`` USDT.

        ``market_return`` is ``m_t``, the benchmark's move on the net exposure as a fraction of the
        step's starting equity; it is ignored unless the config names a benchmark.
        """
        previous = self._equity
        if not previous > 0:
            raise ValueError("call reset() with positive equity before step()")
        if not math.isfinite(equity):
            raise ValueError(f"equity must be finite, got {equity}")
        config = self.config
        step_return = (equity - previous) / previous
        self._equity = equity
        self._peak = max(self._peak, equity)
        self._drawdown = 1.0 - equity / self._peak
        extended = max(0.0, self._drawdown - self._max_drawdown)
        self._max_drawdown = max(self._max_drawdown, self._drawdown)
        self._returns.append(step_return)
        full = len(self._returns) == self._returns.maxlen
        mean_square = math.fsum(r * r for r in self._returns) / len(self._returns)
        realised_vol = math.sqrt(mean_square / self.step_years)

        scale = config.pnl_scale
        pnl = scale * step_return
        market = scale * market_return if config.benchmark is not None else 0.0
        if not math.isfinite(market):
            raise ValueError(f"market_return must be finite, got {market_return}")
        turnover = scale * config.turnover_penalty * abs(traded_notional) / previous
        drawdown_cost = scale * config.drawdown_penalty * extended
        leverage = scale * config.leverage_penalty * max(0.0, gross_exposure - 1.0) * self.step_years
        volatility = (
            scale * config.vol_penalty * (realised_vol - config.target_vol) ** 2 * self.step_years
            if full
            else 0.0
        )
        return RewardTerms(
            reward=pnl - market - turnover - drawdown_cost - leverage - volatility,
            pnl=pnl,
            market=market,
            turnover=turnover,
            drawdown=drawdown_cost,
            leverage=leverage,
            volatility=volatility,
            step_return=step_return,
            realised_vol=realised_vol if full else math.nan,
        )
