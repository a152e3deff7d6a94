"""Tests for cwreg.experiments.stats (Table 5 representation statistics)."""

from __future__ import annotations

import itertools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

from cwreg.experiments import stats

# ----------------------------------------------------------------------------------------------------------
# A plain-loop oracle written from the module docstring's formulas (independent of the vectorised code).


def _pos(values):
    return [v for v in values if v > 0]


def _pvar(values):
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def _loop_stats(z, y):
    n, units = z.shape
    positives = [v for v in z.ravel() if v > 0]
    amplitude = sum(positives) / len(positives) if positives else 0.0

    variances = []
    for i in range(units):
        p = _pos(z[:, i])
        if len(p) >= 2:
            variances.append(_pvar(p))

    def pair_terms(rows):
        covs, cors = [], []
        for i, j in itertools.combinations(range(units), 2):
            both = [r for r in rows if z[r, i] > 0 and z[r, j] > 0]
            if len(both) < 2:
                continue
            a = [z[r, i] for r in both]
            b = [z[r, j] for r in both]
            ma, mb = sum(a) / len(a), sum(b) / len(b)
            c = sum((u - ma) * (v - mb) for u, v in zip(a, b)) / len(a)
            covs.append(abs(c))
            va, vb = _pvar(a), _pvar(b)
            if va > 1e-12 and vb > 1e-12:
                cors.append(abs(c) / math.sqrt(va * vb))
        return covs, cors

    covs, cors = pair_terms(range(n))
    cw = []
    for k in sorted(set(y.tolist())):
        _, ck = pair_terms([r for r in range(n) if y[r] == k])
        if ck:
            cw.append(sum(ck) / len(ck))

    ncw = []
    lo, hi = z.min(axis=0), z.max(axis=0)
    for k in sorted(set(y.tolist())):
        per_unit = []
        for i in range(units):
            if hi[i] <= lo[i]:
                continue
            vals = [10 * (z[r, i] - lo[i]) / (hi[i] - lo[i]) for r in range(n) if y[r] == k and z[r, i] > 0]
            if len(vals) >= 2:
                per_unit.append(_pvar(vals))
        if per_unit:
            ncw.append(sum(per_unit) / len(per_unit))

    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {
        'activation_amplitude': amplitude,
        'covariance': mean(covs),
        'correlation': mean(cors),
        'cw_correlation': mean(cw),
        'variance': mean(variances),
        'n_cw_variance': mean(ncw),
    }


def _relu_data(seed, n=60, units=5, classes=4, dead=(3,)):
    rng = np.random.default_rng(seed)
    pre = rng.normal(size=(n, units)) @ rng.normal(size=(units, units)) + rng.normal(size=units)
    z = np.maximum(pre, 0.0)
    z[:, list(dead)] = 0.0
    y = rng.integers(0, classes, size=n)
    return z, y


# ----------------------------------------------------------------------------------------------------------
# Hand-computed values.

# Two units, four samples. Unit 0 positives: 1, 2, 3; unit 1 positives: 4, 2, 6.
# Co-active samples (rows 1, 2): unit 0 = (2, 3), unit 1 = (4, 2).
_Z_SMALL = np.array([[1.0, 0.0], [2.0, 4.0], [3.0, 2.0], [0.0, 6.0]])


def test_activation_amplitude_hand():
    # (1 + 2 + 3 + 4 + 2 + 6) / 6 = 3.
    assert stats.activation_amplitude(_Z_SMALL) == pytest.approx(3.0)


def test_variance_hand():
    # var(1, 2, 3) = 2/3, var(4, 2, 6) = 8/3 (population); mean = 5/3.
    assert stats.variance(_Z_SMALL) == pytest.approx(5.0 / 3.0)


def test_covariance_and_correlation_hand():
    # Over rows 1, 2: means 2.5 and 3; cov = ((-.5)(1) + (.5)(-1)) / 2 = -0.5; |cov| = 0.5.
    assert stats.covariance(_Z_SMALL) == pytest.approx(0.5)
    # Conditional variances 0.25 and 1 -> |rho| = 0.5 / sqrt(0.25) = 1 (two points are always collinear).
    assert stats.correlation(_Z_SMALL) == pytest.approx(1.0)


def test_correlation_hand_three_points():
    # Co-active rows 0..2: a = (1, 2, 3), b = (1, 3, 2); unit 1 also fires alone on row 3 (ignored).
    z = np.array([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0], [0.0, 9.0]])
    # cov = ((-1)(-1) + 0 + (1)(0)) / 3 = 1/3; var_a = 2/3, var_b = 2/3 -> rho = 0.5.
    assert stats.covariance(z) == pytest.approx(1.0 / 3.0)
    assert stats.correlation(z) == pytest.approx(0.5)


def test_cw_correlation_hand():
    # Class 0: perfectly correlated pair (rho = 1); class 1: rho = -0.5 -> |rho| = 0.5. Mean over classes 0.75.
    z = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [1.0, 1.0], [2.0, 0.5], [3.0, 0.5]])
    # Class 1: a = (1, 2, 3), b = (1, .5, .5): cov = ((-1)(1/3) + 0 + (1)(-1/6)) / 3 = -1/6,
    # var_a = 2/3, var_b = (1/9 + 1/36 + 1/36) / 3 = 1/18 -> rho = -(1/6) / sqrt(1/27) = -sqrt(27)/6.
    y = np.array([0, 0, 0, 1, 1, 1])
    expected = (1.0 + math.sqrt(27.0) / 6.0) / 2.0
    assert stats.cw_correlation(z, y) == pytest.approx(expected)


def test_n_cw_variance_hand():
    # One unit, range [0, 4] -> scale 10/4. Class 0 positives (1, 3) -> mapped (2.5, 7.5): var 6.25.
    # Class 1 positives (4, 2) -> mapped (10, 5): var 6.25; class 2 has a single positive sample (skipped).
    z = np.array([[1.0], [3.0], [0.0], [4.0], [2.0], [2.0], [0.0]])
    y = np.array([0, 0, 0, 1, 1, 2, 2])
    assert stats.n_cw_variance(z, y) == pytest.approx(6.25)


def test_n_cw_variance_uses_full_range_not_positive_range():
    # Unit never silent: range [2, 6] maps 2 -> 0, 6 -> 10; the value 2 still counts as a positive sample.
    z = np.array([[2.0], [6.0], [4.0], [4.0]])
    y = np.array([0, 0, 1, 1])
    # Class 0: (0, 10) -> var 25; class 1: (5, 5) -> var 0; mean 12.5.
    assert stats.n_cw_variance(z, y) == pytest.approx(12.5)


# ----------------------------------------------------------------------------------------------------------
# Agreement with the loop oracle on random ReLU data (dead unit and an absent class included).


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_loop_oracle(seed):
    z, y = _relu_data(seed)
    y[y == 2] = 3  # class 2 absent
    got = stats.representation_statistics(z, y)
    want = _loop_stats(z, y)
    assert list(got) == list(stats.STAT_KEYS)
    for key in stats.STAT_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_one_hot_labels_accepted():
    z, y = _relu_data(3)
    one_hot = np.eye(4)[y]
    assert stats.representation_statistics(z, one_hot) == stats.representation_statistics(z, y)


def test_values_are_plain_floats():
    z, y = _relu_data(4)
    out = stats.representation_statistics(z.astype(np.float32), y)
    assert all(type(v) is float for v in out.values())


# ----------------------------------------------------------------------------------------------------------
# Invariances.


def test_scaling_one_unit():
    z, y = _relu_data(5, n=200, dead=())
    scaled = z.copy()
    scaled[:, 1] *= 7.5
    before = stats.representation_statistics(z, y)
    after = stats.representation_statistics(scaled, y)
    for key in ('correlation', 'cw_correlation', 'n_cw_variance'):
        assert after[key] == pytest.approx(before[key], rel=1e-10), key
    for key in ('activation_amplitude', 'covariance', 'variance'):
        assert after[key] > before[key], key


def test_scaling_whole_layer():
    z, y = _relu_data(6, n=200, dead=())
    a = 0.1  # "activation squashing"
    before = stats.representation_statistics(z, y)
    after = stats.representation_statistics(a * z, y)
    assert after['activation_amplitude'] == pytest.approx(a * before['activation_amplitude'])
    assert after['covariance'] == pytest.approx(a**2 * before['covariance'])
    assert after['variance'] == pytest.approx(a**2 * before['variance'])
    for key in ('correlation', 'cw_correlation', 'n_cw_variance'):
        assert after[key] == pytest.approx(before[key], rel=1e-10), key


def test_permutations():
    z, y = _relu_data(7, n=80)
    rng = np.random.default_rng(0)
    rows = rng.permutation(z.shape[0])
    cols = rng.permutation(z.shape[1])
    relabel = np.array([2, 0, 3, 1])[y]  # renaming classes changes nothing either
    base = stats.representation_statistics(z, y)
    other = stats.representation_statistics(z[rows][:, cols], relabel[rows])
    for key in stats.STAT_KEYS:
        assert other[key] == pytest.approx(base[key], rel=1e-10), key


def test_zeros_do_not_create_correlation():
    # Both units are silent on the same half of the samples and independent elsewhere: with zeros counted,
    # their Pearson correlation would be large; over co-active samples it is near 0.
    rng = np.random.default_rng(8)
    active = rng.uniform(1.0, 2.0, size=(4000, 2))
    z = np.concatenate([active, np.zeros((4000, 2))])
    with_zeros = abs(np.corrcoef(z.T)[0, 1])
    assert with_zeros > 0.8
    assert stats.correlation(z) < 0.05


def test_covariance_detects_linear_dependence():
    rng = np.random.default_rng(9)
    x = rng.uniform(1.0, 2.0, size=1000)
    independent = np.stack([x, rng.uniform(1.0, 2.0, size=1000)], axis=1)
    dependent = np.stack([x, 3.0 * x], axis=1)
    assert stats.correlation(dependent) == pytest.approx(1.0)
    assert stats.correlation(independent) < 0.1
    assert stats.covariance(dependent) == pytest.approx(3.0 * np.var(x))


def test_cw_variance_smaller_for_class_compact_units():
    # Same marginal distribution; in `compact` each class occupies its own narrow interval.
    rng = np.random.default_rng(10)
    y = np.repeat(np.arange(5), 200)
    compact = (y + rng.uniform(0.0, 0.2, size=y.size) + 1.0)[:, None]
    mixed = rng.permutation(compact.ravel())[:, None]
    assert stats.n_cw_variance(compact, y) < 0.1 * stats.n_cw_variance(mixed, y)


# ----------------------------------------------------------------------------------------------------------
# Degenerate inputs: never NaN.


def test_all_zero_layer():
    z = np.zeros((20, 4))
    y = np.arange(20) % 3
    out = stats.representation_statistics(z, y)
    assert out == {key: 0.0 for key in stats.STAT_KEYS}
    cov = stats.statistics_coverage(z, y)
    assert cov['num_dead_units'] == 4 and cov['num_covariance_pairs'] == 0


def test_single_unit_and_single_sample():
    z = np.array([[1.0], [2.0], [4.0]])
    out = stats.representation_statistics(z, np.array([0, 0, 1]))
    assert out['covariance'] == 0.0 and out['correlation'] == 0.0 and out['cw_correlation'] == 0.0
    assert out['variance'] == pytest.approx(np.var([1.0, 2.0, 4.0]))
    one = stats.representation_statistics(np.array([[1.0, 2.0]]), np.array([3]))
    assert all(np.isfinite(v) for v in one.values())
    assert one['activation_amplitude'] == pytest.approx(1.5)


def test_constant_unit_has_no_correlation():
    z = np.array([[5.0, 1.0], [5.0, 2.0], [5.0, 3.0]])
    assert stats.correlation(z) == 0.0  # skipped, not NaN
    assert stats.covariance(z) == pytest.approx(0.0, abs=1e-12)
    assert stats.statistics_coverage(z)['num_correlation_pairs'] == 0


def test_dead_units_are_skipped_not_averaged_in():
    z, y = _relu_data(11, dead=())
    with_dead = np.concatenate([z, np.zeros((z.shape[0], 3))], axis=1)
    a = stats.representation_statistics(z, y)
    b = stats.representation_statistics(with_dead, y)
    for key in stats.STAT_KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key


def test_coverage_counts():
    z, y = _relu_data(12, units=5, classes=4, dead=(3,))
    cov = stats.statistics_coverage(z, y)
    assert cov['num_units'] == 5 and cov['num_dead_units'] == 1 and cov['num_pairs'] == 10
    assert cov['num_covariance_pairs'] <= 6  # pairs with the dead unit are skipped
    assert cov['num_classes'] == len(np.unique(y))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        stats.representation_statistics(np.ones(5), np.zeros(5))
    with pytest.raises(ValueError):
        stats.representation_statistics(np.ones((5, 2)), np.zeros(4))
    with pytest.raises(ValueError):
        stats.activation_amplitude(np.array([[np.nan, 1.0]]))


def test_conv_shaped_input_is_flattened():
    z, y = _relu_data(13, units=8, dead=())
    out = stats.representation_statistics(z.reshape(-1, 2, 2, 2), y)
    assert out == stats.representation_statistics(z, y)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    z=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=7),
        elements=st.one_of(st.just(0.0), st.floats(0.0, 50.0)),
    ),
    seed=st.integers(0, 10_000),
)
def test_bounds_and_finiteness(z, seed):
    y = np.random.default_rng(seed).integers(0, 3, size=z.shape[0])
    out = stats.representation_statistics(z, y)
    assert all(np.isfinite(v) and v >= 0.0 for v in out.values())
    assert out['correlation'] <= 1.0 and out['cw_correlation'] <= 1.0
    assert out['n_cw_variance'] <= 25.0 + 1e-9
    positives = z[z > 0]
    if positives.size:
        assert positives.min() - 1e-9 <= out['activation_amplitude'] <= positives.max() + 1e-9
