import numpy as np

from models import grid


def test_grid_is_sorted_and_read_only():
    assert np.all(np.diff(grid.LOG_MONEYNESS) > 0)
    assert np.all(np.diff(grid.MATURITIES) > 0)
    assert grid.SHAPE == (10, 6)
    assert not grid.LOG_MONEYNESS.flags.writeable
