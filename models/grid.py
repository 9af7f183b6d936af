"""The project's fixed implied-volatility grid, defined once.

Every IV surface the bot consumes or a model produces lives on this grid:
``iv[i, j]`` is the implied volatility at ``LOG_MONEYNESS[i]`` (``ln(K/F)``) and
``MATURITIES[j]`` (years). The values follow the seed notebook's 10 strikes
(K/F from 0.8 to 1.5) by 6 tenors (30 to 360 days).
"""

from __future__ import annotations

import numpy as np

MONEYNESS: np.ndarray = np.array([0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5])
LOG_MONEYNESS: np.ndarray = np.log(MONEYNESS)
TENOR_DAYS: np.ndarray = np.array([30.0, 60.0, 90.0, 180.0, 270.0, 360.0])
MATURITIES: np.ndarray = TENOR_DAYS / 365.0

N_STRIKES: int = LOG_MONEYNESS.size
N_MATURITIES: int = MATURITIES.size
SHAPE: tuple[int, int] = (N_STRIKES, N_MATURITIES)

for _array in (MONEYNESS, LOG_MONEYNESS, TENOR_DAYS, MATURITIES):
    _array.setflags(write=False)
