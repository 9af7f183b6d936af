"""Running normaliser and state builder: statistics, clipping, window, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bot.state import RunningNormalizer, StateBuilder, StateBuilderConfig


def scaled_stream(seed: int, n: int, dim: int = 4) -> np.ndarray:
    """Features of very different scales and offsets, as real ones are."""
    rng = np.random.default_rng(seed)
    scales = np.array([1e-4, 1.0, 300.0, 5e4])[:dim]
    offsets = np.array([2e-4, -0.5, 3600.0, 3e4])[:dim]
    return offsets + scales * rng.standard_normal((n, dim))


def test_normalizer_matches_numpy_mean_and_population_variance() -> None:
    data = scaled_stream(seed=1, n=500)
    normalizer = RunningNormalizer(4)
    for row in data:
        normalizer.update(row)
    assert normalizer.count == 500
    np.testing.assert_allclose(normalizer.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(normalizer.var, data.var(axis=0), rtol=1e-10)
    x = data[-1]
    expected = np.clip((x - data.mean(axis=0)) / data.std(axis=0), -5.0, 5.0)
    np.testing.assert_allclose(normalizer.normalize(x), expected, rtol=1e-10)


def test_builder_updates_statistics_before_normalising_the_current_vector() -> None:
    data = scaled_stream(seed=2, n=30)
    builder = StateBuilder(4, window=4)
    first = builder.update(data[0])
    assert np.all(first == 0.0)  # one sample: no variance yet
    for row in data[1:]:
        state = builder.update(row)
    seen = data  # the last vector is part of the statistics it is normalised with
    np.testing.assert_allclose(state[-1], (data[-1] - seen.mean(axis=0)) / seen.std(axis=0), rtol=1e-10)


def test_constant_feature_maps_to_zero_and_others_are_unaffected() -> None:
    builder = StateBuilder(2, window=2)
    for value in (1.0, 2.0, 3.0, 4.0):
        state = builder.update(np.array([7.5, value]))
    assert state[-1, 0] == 0.0
    assert state[-1, 1] == pytest.approx((4.0 - 2.5) / np.std([1.0, 2.0, 3.0, 4.0]))


def test_z_scores_are_clipped_at_plus_minus_clip() -> None:
    rng = np.random.default_rng(3)
    builder = StateBuilder(2, window=1, clip=5.0)
    for row in rng.standard_normal((200, 2)):
        builder.update(row)
    state = builder.update(np.array([1e6, -1e6]))
    assert state[-1].tolist() == [5.0, -5.0]
    narrow = StateBuilder(1, window=1, clip=0.5)
    for value in (0.0, 1.0, 0.0, 1.0, 10.0):
        state = narrow.update(np.array([value]))
    assert state[-1, 0] == 0.5


def test_window_is_zero_padded_then_rolls_oldest_first() -> None:
    data = scaled_stream(seed=4, n=5, dim=2)
    builder = StateBuilder(2, window=3)
    reference = RunningNormalizer(2)
    expected_rows = []
    for row in data:
        reference.update(row)
        expected_rows.append(reference.normalize(row))
    state = builder.update(data[0])
    assert state.shape == (3, 2) and np.all(state[:2] == 0.0)
    builder.update(data[1])
    state = builder.update(data[2])
    np.testing.assert_array_equal(state, np.stack(expected_rows[:3]))
    builder.update(data[3])
    state = builder.update(data[4])
    np.testing.assert_array_equal(state, np.stack(expected_rows[2:5]))
    np.testing.assert_array_equal(builder.state(), state)


def test_returned_state_is_a_copy() -> None:
    builder = StateBuilder(2, window=2)
    state = builder.update(np.array([1.0, 2.0]))
    state[:] = 99.0
    assert np.all(builder.state() == 0.0)


def test_state_dict_json_round_trip_resumes_bit_for_bit() -> None:
    """One builder runs through; another is saved to JSON mid-way and restored: identical outputs."""
    data = scaled_stream(seed=5, n=60)
    uninterrupted = StateBuilder(4, window=16, schema_hash="abc")
    outputs = [uninterrupted.update(row) for row in data]

    first_half = StateBuilder(4, window=16, schema_hash="abc")
    for row in data[:25]:
        first_half.update(row)
    saved = json.dumps(first_half.state_dict())
    assert isinstance(json.loads(saved)["normalizer"]["count"], int)
    resumed = StateBuilder(4, window=16, schema_hash="abc")
    resumed.load_state_dict(json.loads(saved))
    np.testing.assert_array_equal(resumed.state(), outputs[24])
    for row, expected in zip(data[25:], outputs[25:], strict=True):
        assert resumed.update(row).tobytes() == expected.tobytes()


def test_fresh_builder_differs_from_resumed_one() -> None:
    """Guards the round-trip test: without the restore, outputs would not match."""
    data = scaled_stream(seed=5, n=30)
    resumed = StateBuilder(4, window=4)
    for row in data[:20]:
        resumed.update(row)
    fresh = StateBuilder(4, window=4)
    assert not np.array_equal(resumed.update(data[20]), fresh.update(data[20]))


def test_load_refuses_mismatched_dims_window_or_schema() -> None:
    saved = StateBuilder(4, window=16, schema_hash="abc").state_dict()
    with pytest.raises(ValueError, match="dim=4"):
        StateBuilder(5, window=16).load_state_dict(saved)
    with pytest.raises(ValueError, match="window=16"):
        StateBuilder(4, window=8).load_state_dict(saved)
    with pytest.raises(ValueError, match="feature schema"):
        StateBuilder(4, window=16, schema_hash="def").load_state_dict(saved)
    corrupt = json.loads(json.dumps(saved))
    corrupt["normalizer"]["mean"] = [0.0, 0.0]
    with pytest.raises(ValueError, match="normaliser state"):
        StateBuilder(4, window=16).load_state_dict(corrupt)


def test_update_rejects_wrong_shape_or_non_finite_vectors() -> None:
    builder = StateBuilder(3)
    with pytest.raises(ValueError, match="shape"):
        builder.update(np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        builder.update(np.array([0.0, np.nan, 1.0]))


def test_config_defaults_and_validation() -> None:
    config = StateBuilderConfig()
    assert (config.window, config.clip) == (16, 5.0)
    with pytest.raises(ValueError):
        StateBuilderConfig(window=0)
    with pytest.raises(ValueError):
        StateBuilderConfig(clip=-1.0)


def test_fixed_scale_features_keep_their_level_and_sign() -> None:
    # A funding rate of +1 bp all along and one of −5 bp all along z-score to the same 0;
    # with a fixed scale they read +1 and −5, and the running features are untouched.
    rows = {}
    for funding in (1e-4, -5e-4):
        builder = StateBuilder(2, window=1, fixed_scales=[1e-4, None])
        free = StateBuilder(2, window=1)
        for value in (1.0, 2.0, 3.0):
            state = builder.update(np.array([funding, value]))
            running = free.update(np.array([funding, value]))
        rows[funding] = state[-1]
        assert running[-1, 0] == 0.0  # what the running z-score makes of a constant
        assert state[-1, 1] == running[-1, 1]
    assert rows[1e-4][0] == pytest.approx(1.0) and rows[-5e-4][0] == pytest.approx(-5.0)
    clipped = StateBuilder(1, window=1, clip=5.0, fixed_scales=[1e-4]).update(np.array([-0.01]))
    assert clipped[-1, 0] == -5.0
    with pytest.raises(ValueError, match="fixed scales"):
        StateBuilder(2, fixed_scales=[1.0])


def test_config_matches_fixed_scale_patterns_to_feature_names() -> None:
    config = StateBuilderConfig(fixed_scales={"*.funding": 1e-4, "position.*": 1.0})
    names = ["market.SYNTH:BTCUSDT-PERP.funding", "market.SYNTH:BTCUSDT-PERP.basis", "position.X.exposure"]
    assert config.scales_for(names) == [1e-4, None, 1.0]
    assert StateBuilderConfig().scales_for(["market.P.funding", "market.P.basis", "market.P.ret_1m"]) == [
        1e-4,
        1e-4,
        None,
    ]
    with pytest.raises(ValueError, match="positive"):
        StateBuilderConfig(fixed_scales={"*.funding": 0.0})


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (20, 3), elements=st.floats(-1e12, 1e12, allow_nan=False)))
def test_states_are_always_finite_and_within_clip(data: np.ndarray) -> None:
    builder = StateBuilder(3, window=4, clip=5.0)
    for row in data:
        state = builder.update(row)
        assert np.all(np.isfinite(state)) and np.all(np.abs(state) <= 5.0)
