"""The penalties as other people's training code calls them: label forms, padding, masks, bad input, numerics.

Every expected value is computed independently: the float64 NumPy oracle of `reference.py` on the batch
without its padded rows, a float64 weighted reference written here (with central differences for its
gradient), or float64 arithmetic on hand-built batches. Each check runs on the CPU branch (segment sums and
gathers) and on the default branch (one-hot products, what GPUs and TPUs run), forced here on CPU.

Mutations tried (each fails tests below): all-zero rows counted in class 0's sums (the old CPU path);
masks ignored in the counts; `where` ignored for VR; hard detection always true (weights taken as ids);
the soft path centring at the weighted global mean; Gram-form gradient switched off at a clamped value;
the power-of-2 rescaling removed (NaN/inf at 1e9); `num_classes` unchecked for float labels.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

from cwreg import penalties  # noqa: E402

NAMES = ref.NAMES
CLASS_WISE = ref.CLASS_WISE
ALL_CLASS = tuple(n for n in NAMES if n not in CLASS_WISE)
# (N, I, K): the covariance form and the Gram form of the class-wise penalties (use_gram_form).
SHAPES = ((40, 4, 3), (12, 30, 3))


@contextlib.contextmanager
def _branch(branch: str):
    """'cpu' leaves lax.platform_dependent alone; 'default' forces its default (accelerator) branch."""
    if branch == 'cpu':
        yield
        return
    original = penalties.lax.platform_dependent

    def default_only(*args, default, **platforms):
        del platforms
        return default(*args)

    penalties.lax.platform_dependent = default_only
    try:
        yield
    finally:
        penalties.lax.platform_dependent = original


def _value_and_grad(name, x, labels=None, **kwargs):
    fn = lambda a, b: getattr(penalties, name)(a, b, **kwargs)
    labels = None if labels is None else jnp.asarray(labels)
    value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x), labels)
    return float(value), np.asarray(grad)


def _batch(n, i, k, seed=0):
    rng = np.random.default_rng(seed)
    x = (np.maximum(rng.normal(size=(n, i)), 0.0) + rng.normal(size=(1, i))).astype(np.float32)
    ids = rng.integers(0, k, size=n)
    return x, ids


def _assert_close(value, grad, expected_value, expected_grad, err=''):
    np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-7, err_msg=f'value {err}')
    atol = 1e-5 * float(np.max(np.abs(expected_grad))) + 1e-12
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=atol, err_msg=f'gradient {err}')


# ---------------------------------------------------------------------------------------------------------
# Label forms.


@pytest.mark.parametrize('branch', ['cpu', 'default'])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('name', CLASS_WISE)
def test_integer_ids_equal_one_hot_and_the_oracle(name, shape, branch):
    n, i, k = shape
    x, ids = _batch(n, i, k)
    one_hot = np.eye(k, dtype=np.float32)[ids]
    with _branch(branch):
        by_ids = _value_and_grad(name, x, ids.astype(np.int32), num_classes=k)
        by_one_hot = _value_and_grad(name, x, one_hot)
        by_bool = _value_and_grad(name, x, one_hot.astype(bool))
    for result in (by_ids, by_one_hot, by_bool):
        _assert_close(*result, ref.VALUES[name](x, one_hot), ref.GRADS[name](x, one_hot))


@pytest.mark.parametrize(
    'weights, hard',
    [
        (np.eye(3)[[0, 2, 1, 1]], True),
        (np.eye(3)[[0, 2, 1, 1]].astype(bool), True),
        (np.asarray(jax.nn.one_hot(np.array([0, -1, 2, 5]), 3)), True),  # zero rows: no class
        (np.array([[0.7, 0.3, 0], [0, 1, 0]]), False),  # mixup
        (np.array([[2.0, 0, 0], [0, 1, 0]]), False),  # not one-hot
        (np.array([[1.0, 1.0, 0], [0, 1, 0]]), False),  # two classes at weight 1
        (np.array([[1.0, 1e-8, 0], [0, 1, 0]]), False),  # a weight that vanishes in a float32 row sum
        (np.array([[-1.0, 0, 0], [0, 1, 0]]), False),  # negative
        (np.array([[np.nan, 0, 0], [0, 1, 0]]), False),
        (np.array([[1.0, np.nan, 0], [0, 1, 0]]), False),
    ],
)
def test_hard_rows_are_recognized(weights, hard):
    """One-hot and zero rows take the hard-label path (K times cheaper than weights); others do not."""
    from cwreg import labels as labels_lib

    read, _ = labels_lib.as_labels(jnp.asarray(weights), len(weights), None, None, 'cw_vr', jnp.float32)
    assert bool(jnp.any(read.soft_rows)) == (not hard)
    if hard:  # each row's class, K for a zero row
        expected = np.where(np.asarray(weights).sum(1) > 0, np.argmax(weights, 1), weights.shape[1])
        np.testing.assert_array_equal(np.asarray(read.ids), expected)


@pytest.mark.parametrize('branch', ['cpu', 'default'])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('name', CLASS_WISE)
@pytest.mark.parametrize('bad_row', [[np.nan, 0, 0], [0, np.nan, np.nan]])
def test_a_label_row_of_nan_gives_nan_not_the_batch_without_it(name, shape, branch, bad_row):
    """A NaN weight is no zero row: the statistics it enters are undefined, so the value is NaN (a row with
    no positive weight is soft, and the hard-label path must see it, not drop it as "no class")."""
    n, i, k = shape
    x, ids = _batch(n, i, k)
    labels = np.eye(k, dtype=np.float32)[ids]
    labels[3] = bad_row
    with _branch(branch):
        value, _ = _value_and_grad(name, x, labels)
    assert np.isnan(value), value


def _padded(x, ids, k, pad, fill):
    """The batch plus `pad` rows of garbage; returns activations, ids with −1 there, and the mask."""
    rng = np.random.default_rng(1)
    garbage = (
        np.full((pad, x.shape[1]), fill, np.float32)
        if fill is not None
        else (1e3 * rng.normal(size=(pad, x.shape[1]))).astype(np.float32)
    )
    rows = np.concatenate([x, garbage])
    order = rng.permutation(len(rows))  # padding interleaved, not only at the end
    padded_ids = np.concatenate([ids, -np.ones(pad, int)])[order]
    where = np.concatenate([np.ones(len(x), bool), np.zeros(pad, bool)])[order]
    return rows[order], padded_ids, where, order


@pytest.mark.parametrize('branch', ['cpu', 'default'])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('name', NAMES)
def test_padding_ids_zero_rows_and_where_give_the_unpadded_penalty(name, shape, branch):
    n, i, k = shape
    x, ids = _batch(n, i, k)
    one_hot = np.eye(k, dtype=np.float32)[ids]
    expected_value, expected_grad = ref.VALUES[name](x, one_hot), ref.GRADS[name](x, one_hot)
    for fill in (None, np.nan):  # random garbage, and NaN in the padded rows
        z, padded_ids, where, order = _padded(x, ids, k, pad=5, fill=fill)
        zero_rows = np.asarray(jax.nn.one_hot(padded_ids, k))  # all-zero rows where the id is −1
        calls = {
            'where': dict(
                labels=np.where(where, padded_ids, 0).astype(np.int32),
                num_classes=k,
                where=jnp.asarray(where),
            )
        }
        if name in CLASS_WISE:
            calls['ids -1'] = dict(labels=padded_ids.astype(np.int32), num_classes=k)
            calls['one_hot(-1)'] = dict(labels=zero_rows)
            calls['where + one-hot'] = dict(
                labels=np.eye(k, dtype=np.float32)[np.where(where, padded_ids, 0)], where=jnp.asarray(where)
            )
        inverse = np.argsort(order)
        for how, kwargs in calls.items():
            labels = kwargs.pop('labels')
            with _branch(branch):
                value, grad = _value_and_grad(name, z, labels, **kwargs)
            grad = grad[inverse]  # back to [batch rows, padded rows]
            err = f'({how}, fill={fill}, {branch})'
            _assert_close(value, grad[:n], expected_value, expected_grad, err)
            np.testing.assert_array_equal(grad[n:], 0.0, err_msg=f'padded rows get a gradient {err}')


def test_measured_bug_one_hot_minus_one_rows_no_longer_join_class_zero():
    """The issue's measurement: cw_vr of a batch padded with 5 one_hot(−1) rows was 0.832, not 0.596."""
    x, ids = _batch(20, 6, 4, seed=3)
    z, padded_ids, _, _ = _padded(x, ids, 4, pad=5, fill=0.0)
    one_hot = np.asarray(jax.nn.one_hot(padded_ids, 4))
    assert np.all(one_hot.sum(1)[padded_ids < 0] == 0)
    for branch in ('cpu', 'default'):
        with _branch(branch):
            value = float(jax.jit(penalties.cw_vr)(jnp.asarray(z), jnp.asarray(one_hot)))
        np.testing.assert_allclose(value, ref.cw_vr(x, np.eye(4)[ids]), rtol=1e-5)


def _weighted_reference(name: str, z: np.ndarray, w: np.ndarray) -> float:
    """Float64 weighted statistics: μ^k = Σ w z / Σ w, c^k = Σ w (z − μ^k)(z − μ^k)ᵀ / Σ w."""
    z, w = np.asarray(z, np.float64), np.asarray(w, np.float64)
    num_classes, num_units = w.shape[1], z.shape[1]
    total = 0.0
    for k in range(num_classes):
        weight = w[:, k].sum()
        if weight == 0:
            continue
        centred = z - (w[:, k] @ z) / weight
        covariance = (w[:, k, None] * centred).T @ centred / weight
        if name == 'cw_cr':
            total += np.sum(covariance**2) - np.sum(np.diag(covariance) ** 2)
        else:
            total += np.trace(covariance)
    pairs = num_units * (num_units - 1) if name == 'cw_cr' else num_units
    return total / (num_classes * pairs)


def _central_differences(fn, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    z = np.asarray(z, np.float64)
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (fn(up) - fn(down)) / (2 * h)
    return grad


def _mixup(rng, n, k):
    a, b = rng.integers(0, k, n), rng.integers(0, k, n)
    lam = rng.uniform(0.2, 0.8, size=(n, 1))
    return lam * np.eye(k)[a] + (1 - lam) * np.eye(k)[b]


@pytest.mark.parametrize('branch', ['cpu', 'default'])
@pytest.mark.parametrize('shape', [(12, 4, 3), (6, 20, 3)])  # soft path: covariance and Gram forms
@pytest.mark.parametrize('name', CLASS_WISE)
def test_mixup_and_smoothed_weights_match_a_float64_weighted_reference(name, shape, branch):
    n, i, k = shape
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, i)).astype(np.float32)
    a = rng.integers(0, k, n)
    mixup = _mixup(rng, n, k).astype(np.float32)
    smoothed = (0.9 * np.eye(k)[a] + 0.1 / k).astype(np.float32)
    for weights in (mixup, smoothed):
        with _branch(branch):
            value, grad = _value_and_grad(name, x, weights)
        expected = _weighted_reference(name, x, weights)
        expected_grad = _central_differences(lambda z: _weighted_reference(name, z, weights), x)
        _assert_close(value, grad, expected, expected_grad, f'({branch})')


def test_weighted_statistics_reduce_to_the_paper_for_one_hot_rows():
    x, ids = _batch(30, 5, 3)
    one_hot = np.eye(3)[ids]
    for name in CLASS_WISE:
        np.testing.assert_allclose(
            _weighted_reference(name, x, one_hot), ref.VALUES[name](x, one_hot), rtol=1e-12
        )


@pytest.mark.parametrize('shape', [(8, 3, 2), (4, 12, 2)])  # covariance and Gram forms
@pytest.mark.parametrize('name', CLASS_WISE)
def test_mixup_weights_higher_derivatives_match_finite_differences(name, shape):
    """Second derivatives differentiate the statistic itself, so they go through the hard/soft choice's own
    rule: they must be the weighted statistic's, not the ids' path's (float64 central differences)."""
    n, i, k = shape
    rng = np.random.default_rng(11)
    x, weights = rng.normal(size=(n, i)), _mixup(rng, n, k)
    with jax.enable_x64(True):
        w64 = jnp.asarray(weights, jnp.float64)
        f = jax.jit(lambda a: getattr(penalties, name)(a, w64))
        if f(jnp.asarray(x, jnp.float64)).dtype != jnp.float64:
            pytest.skip('no float64 on this platform')
        check_grads(
            f, (jnp.asarray(x, jnp.float64),), order=2, modes=['fwd', 'rev'], eps=1e-6, atol=1e-7, rtol=1e-7
        )


@pytest.mark.parametrize('name', CLASS_WISE)
def test_vmap_over_hard_and_soft_label_batches_equals_each_alone(name):
    """Under vmap one member with mixup weights sends the whole batch down the weighted path: the member
    with one-hot rows must still get its own (hard) value and gradient."""
    n, i, k = 12, 5, 3
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, n, i)).astype(np.float32)
    labels = np.stack([np.eye(k)[rng.integers(0, k, n)], _mixup(rng, n, k)]).astype(np.float32)
    fn = jax.value_and_grad(getattr(penalties, name))
    values, grads = jax.jit(jax.vmap(fn))(jnp.asarray(x), jnp.asarray(labels))
    for member in range(2):
        expected = _weighted_reference(name, x[member], labels[member])
        expected_grad = _central_differences(
            lambda z: _weighted_reference(name, z, labels[member]), x[member]
        )
        _assert_close(
            float(values[member]), np.asarray(grads[member]), expected, expected_grad, f'member {member}'
        )


def test_soft_weights_are_centred_per_class():
    """A sample with weight in two classes is centred at each class's mean (not at a shared one)."""
    x = np.array([[0.0], [2.0], [10.0], [14.0], [1.0]], np.float32)
    w = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0.5, 0.5]], np.float32)
    # Class 0: weights (1, 1, .5) at (0, 2, 1) -> mean 1, variance (1 + 1 + 0) / 2.5 = 0.8.
    # Class 1: weights (1, 1, .5) at (10, 14, 1) -> mean 9.8, variance (0.04 + 17.64 + 38.72) / 2.5 = 22.56.
    np.testing.assert_allclose(float(penalties.cw_vr(x, w)), (0.8 + 22.56) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear, early errors naming what is accepted.

_ACCEPTED = re.escape('integer class ids of shape (N,)')


@pytest.mark.parametrize('name', CLASS_WISE)
@pytest.mark.parametrize(
    'labels, kwargs, message',
    [
        (None, {}, _ACCEPTED),
        (np.zeros((8, 1), np.int32), dict(num_classes=3), r'shape \(N,\); got shape \(8, 1\)'),
        (np.zeros((8,), np.int32), {}, r'need num_classes'),
        (np.zeros((8,), np.int32), dict(num_classes=0), r'need num_classes'),
        (np.zeros((8,), np.float32), {}, _ACCEPTED),
        (np.zeros((8, 3, 1), np.float32), {}, _ACCEPTED),
        (np.zeros((7, 3), np.float32), {}, r'7 samples but activations have 8'),
        (np.zeros((7,), np.int32), dict(num_classes=3), r'7 samples but activations have 8'),
        (np.zeros((8, 3), np.float32), dict(num_classes=4), r'num_classes=4 disagrees'),
    ],
)
@pytest.mark.parametrize('jit', [False, True])
def test_bad_labels_raise_naming_the_accepted_forms(name, labels, kwargs, message, jit):
    fn = lambda x, y: getattr(penalties, name)(x, y, **kwargs)
    if jit:
        fn = jax.jit(fn)
    with pytest.raises(ValueError, match=message):
        fn(jnp.ones((8, 4)), None if labels is None else jnp.asarray(labels))


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('where', [np.ones(8, np.float32), np.ones((8, 1), bool), np.ones(7, bool)])
def test_bad_where_raises(name, where):
    with pytest.raises(ValueError, match=r'where must be a boolean array of shape \(N,\) = \(8,\)'):
        getattr(penalties, name)(jnp.ones((8, 4)), jnp.zeros(8, jnp.int32), num_classes=2, where=where)


@pytest.mark.parametrize('name', NAMES)
def test_bad_grad_reduction_raises(name):
    with pytest.raises(ValueError, match=r"grad_reduction must be one of \('pmean', 'psum'\)"):
        getattr(penalties, name)(
            jnp.ones((8, 4)), jnp.zeros(8, jnp.int32), num_classes=2, grad_reduction='sum'
        )


def test_all_masked_and_empty_classes_are_exactly_zero():
    x, ids = _batch(10, 4, 3)
    nobody = jnp.zeros(10, bool)
    for name in NAMES:
        value, grad = _value_and_grad(name, x, ids.astype(np.int32), num_classes=3, where=nobody)
        assert value == 0.0 and np.all(grad == 0.0), name


# ---------------------------------------------------------------------------------------------------------
# Numerics against float64.


def _float64_parts(name: str, z: np.ndarray, labels: np.ndarray):
    """Ω, its gradient, and the scale of the bounds: Σ_k ‖C_k‖²_F normalized like Ω, and its gradient."""
    z = np.asarray(z, np.float64)
    num_classes, num_units = labels.shape[1], z.shape[1]
    total, total_grad = 0.0, np.zeros_like(z)
    for k in range(num_classes):
        members = labels[:, k] > 0
        if members.sum() == 0:
            continue
        centred = z[members] - z[members].mean(0)
        covariance = centred.T @ centred / members.sum()
        total += np.sum(covariance**2)
        total_grad[members] += 4 * centred @ covariance / members.sum()
    divisor = num_classes * num_units * (num_units - 1)
    return ref.VALUES[name](z, labels), ref.GRADS[name](z, labels), total / divisor, total_grad / divisor


def _decorrelated(n, i, k, rng):
    """Classes whose centred units are exactly orthogonal (c^k_ij = 0), then perturbed by 1e-5."""
    ids = np.arange(n) % k
    z = np.zeros((n, i))
    for c in range(k):
        rows = np.flatnonzero(ids == c)
        a = rng.normal(size=(len(rows), i))
        a -= a.mean(0)
        q, _ = np.linalg.qr(a)  # orthonormal columns, each orthogonal to the ones vector
        z[rows] = q * np.linspace(1.0, 3.0, i) + 5.0 * rng.normal()
    return z + 1e-5 * rng.normal(size=z.shape), ids


def _numeric_cases(i_over_n: bool):
    rng = np.random.default_rng(11)
    shapes = (
        [((12, 40, 3), 'cw_cr'), ((16, 64, 1), 'cr'), ((10, 2048, 3), 'cw_cr'), ((8, 4096, 1), 'cr')]
        if (i_over_n)
        else [((240, 8, 3), 'cw_cr'), ((96, 12, 1), 'cr')]
    )
    for (n, i, k), name in shapes:
        ids = rng.integers(0, k, n)
        base = np.maximum(rng.normal(size=(n, i)), 0.0) + 0.1 * rng.normal(size=(n, i))
        scaled = base.copy()
        scaled[:, 0] *= 1000.0  # one unit 1000× larger than the others
        yield name, 'relu', base, ids, k
        yield name, 'badly scaled', scaled, ids, k
        yield name, 'large magnitude', 1e9 * base + 3e9, ids, k
        if not i_over_n:
            z, d_ids = _decorrelated(n, i, k, rng)
            yield name, 'nearly decorrelated', z, d_ids, k


def _check_bounds(name, z, ids, k, value_bound, small_bound, **kwargs):
    z32 = np.asarray(z, np.float32)
    labels = np.eye(k)[ids]
    value, grad = _value_and_grad(name, z32, labels.astype(np.float32) if name == 'cw_cr' else None, **kwargs)
    expected, expected_grad, total, total_grad = _float64_parts(name, z32, labels)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    if value_bound is not None and expected >= 1e-3 * total:
        assert abs(value - expected) <= value_bound * expected, (value, expected)
        assert np.max(np.abs(grad - expected_grad)) <= value_bound * np.max(np.abs(expected_grad))
    else:
        assert abs(value - expected) <= small_bound * total, (value, expected, total)
        assert np.max(np.abs(grad - expected_grad)) <= small_bound * np.max(np.abs(total_grad))
    return expected / total


@pytest.mark.parametrize('case', list(_numeric_cases(i_over_n=False)), ids=lambda c: f'{c[0]}-{c[1]}')
def test_covariance_form_meets_the_float64_bounds(case):
    name, _, z, ids, k = case
    n, i = z.shape
    assert not penalties.use_gram_form(n, i, k)
    _check_bounds(name, z, ids, k, value_bound=1e-4, small_bound=1e-7)


def test_covariance_form_cases_include_a_tiny_off_diagonal():
    fractions = []
    for name, _, z, ids, k in _numeric_cases(i_over_n=False):
        _, _, total, _ = _float64_parts(name, z, np.eye(k)[ids])
        fractions.append(ref.VALUES[name](z, np.eye(k)[ids]) / total)
    assert min(fractions) < 1e-8 and max(fractions) > 1e-3, fractions


@pytest.mark.parametrize('case', list(_numeric_cases(i_over_n=True)), ids=lambda c: f'{c[0]}-{c[1]}')
def test_gram_form_meets_its_stated_bound(case):
    name, _, z, ids, k = case
    n, i = z.shape
    assert penalties.use_gram_form(n, i, k)
    # The Gram form's bound is relative to the total Σ_k ‖C_k‖²_F whatever the off-diagonal share.
    _check_bounds(name, z, ids, k, value_bound=None, small_bound=penalties.gram_form_error_bound(i))


@pytest.mark.parametrize(
    'case',
    [c for c in _numeric_cases(i_over_n=True) if c[0] == 'cr' and c[2].shape[1] > 128],
    ids=lambda c: f'{c[2].shape}-{c[1]}',
)
def test_gram_form_meets_its_stated_bound_in_column_blocks(case, monkeypatch):
    # CR with `where` is one weighted class: its Gram products are summed over blocks of 128 columns.
    name, _, z, ids, k = case
    monkeypatch.setattr(penalties, 'COLUMN_BLOCK_ELEMENTS', 128 * z.shape[0])
    where = jnp.ones(z.shape[0], bool)
    _check_bounds(name, z, ids, k, None, penalties.gram_form_error_bound(z.shape[1]), where=where)


def _decorrelated_low_rank(n, i, k, rng):
    """Classes of fewer samples than units: W_k − 1 orthogonal centred units, the others constant."""
    ids = np.arange(n) % k
    z = np.full((n, i), 5.0)
    for c in range(k):
        rows = np.flatnonzero(ids == c)
        active = rng.choice(i, size=len(rows) - 1, replace=False)
        a = rng.normal(size=(len(rows), len(active)))
        a -= a.mean(0)
        q, _ = np.linalg.qr(a)
        z[np.ix_(rows, active)] = q * np.linspace(1.0, 3.0, len(active)) + 5.0
    return z + 1e-5 * rng.normal(size=z.shape), ids


def _affordable_gram_cases():
    """Gram-form shapes where the covariance form is affordable: MNIST's cw-CR layer among them."""
    rng = np.random.default_rng(12)
    for (n, i, k), name in (((100, 100, 10), 'cw_cr'), ((40, 30, 2), 'cw_cr'), ((24, 48, 1), 'cr')):
        ids = rng.integers(0, k, n)
        base = np.maximum(rng.normal(size=(n, i)), 0.0) + 0.1 * rng.normal(size=(n, i))
        scaled = base.copy()
        scaled[:, 0] *= 1000.0
        yield name, 'relu', base, ids, k
        yield name, 'badly scaled', scaled, ids, k
        yield name, 'large magnitude', 1e9 * base + 3e9, ids, k
        z, d_ids = _decorrelated_low_rank(n, i, k, rng)
        yield name, 'nearly decorrelated', z, d_ids, k


@pytest.mark.parametrize('case', list(_affordable_gram_cases()), ids=lambda c: f'{c[0]}-{c[2].shape}-{c[1]}')
def test_gram_form_meets_the_covariance_bounds_where_the_covariance_form_is_affordable(case):
    name, _, z, ids, k = case
    n, i = z.shape
    assert penalties.use_gram_form(n, i, k) and penalties.use_exact_fallback(n, i, k)
    _check_bounds(name, z, ids, k, value_bound=1e-4, small_bound=1e-7)


def test_affordable_gram_cases_include_a_tiny_off_diagonal():
    fractions = [
        ref.VALUES[name](z, np.eye(k)[ids]) / _float64_parts(name, z, np.eye(k)[ids])[2]
        for name, _, z, ids, k in _affordable_gram_cases()
    ]
    assert min(fractions) < 1e-8 and max(fractions) > 0.5, fractions


def test_exact_fallback_keeps_vmapped_penalties_in_one_branch_and_exact():
    # Under vmap the fallback is taken for the whole batch when any member needs it; each member's result
    # is its own, as computed alone.
    rng = np.random.default_rng(13)
    z, ids = _decorrelated_low_rank(40, 30, 2, rng)
    relu = np.maximum(rng.normal(size=z.shape), 0.0)
    batch = jnp.asarray(np.stack([z, relu]), jnp.float32)
    fn = lambda a: penalties.cw_cr(a, ids.astype(np.int32), num_classes=2)
    # The predicate is unbatched, so the conditional stays one (a batched one runs both branches).
    flags = jax.vmap(lambda x: penalties._any_in_batch(x > 0))(jnp.array([-1.0, 1.0, -2.0]))
    np.testing.assert_array_equal(np.asarray(flags), [True, True, True])
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(fn)))(batch)
    for member in range(2):
        expected, expected_grad, total, total_grad = _float64_parts('cw_cr', batch[member], np.eye(2)[ids])
        small = expected < 1e-3 * total
        tol = 1e-7 * total if small else 1e-4 * expected
        assert abs(float(values[member]) - expected) <= tol, member
        grad_scale = np.max(np.abs(total_grad if small else expected_grad))
        assert (
            np.max(np.abs(np.asarray(grads[member]) - expected_grad))
            <= (1e-7 if small else 1e-4) * grad_scale
        )


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('scale', [1e9, 1e15])
def test_large_magnitudes_are_finite_and_jit_equals_eager(name, scale):
    x, ids = _batch(20, 30, 3)
    z = (x * scale).astype(np.float32)
    labels = np.eye(3)[ids]
    expected = ref.VALUES[name](z, labels)
    if expected > 1e37:
        pytest.skip('float64 value outside float32 range')
    fn = lambda a: getattr(penalties, name)(a, ids.astype(np.int32), num_classes=3)
    jitted = jax.jit(jax.value_and_grad(fn))(jnp.asarray(z))
    eager = jax.value_and_grad(fn)(jnp.asarray(z))
    for value, grad in (jitted, eager):
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), name
        np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-5)
    grad_scale = float(np.max(np.abs(np.asarray(eager[1]))))
    np.testing.assert_allclose(np.asarray(jitted[1]), np.asarray(eager[1]), rtol=1e-4, atol=1e-5 * grad_scale)


@pytest.mark.parametrize('masked', [False, True])
def test_l1r_of_entries_whose_sum_overflows_is_finite(masked):
    # 3000 entries of ≈ 1e38: their sum is beyond float32, their mean is not.
    rng = np.random.default_rng(5)
    x = (rng.uniform(0.5, 3.0, size=(30, 100)) * np.sign(rng.normal(size=(30, 100))) * 1e38).astype(
        np.float32
    )
    where = np.arange(30) % 3 != 0 if masked else None
    kept = x if where is None else x[where]
    expected = np.mean(np.abs(kept.astype(np.float64)))
    expected_grad = np.sign(x) / kept.size * (np.ones((30, 1)) if where is None else where[:, None])
    fn = lambda a: penalties.l1r(a, where=where)
    jitted = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x))
    eager = jax.value_and_grad(fn)(jnp.asarray(x))
    batched = jax.jit(jax.vmap(jax.value_and_grad(fn)))(jnp.stack([jnp.asarray(x), jnp.asarray(x) * 1e-30]))
    for value, grad in (jitted, eager, (batched[0][0], batched[1][0])):
        np.testing.assert_allclose(float(value), expected, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-6)
    np.testing.assert_allclose(float(batched[0][1]), expected * 1e-30, rtol=1e-5)


@pytest.mark.parametrize('branch', ['cpu', 'default'])
@pytest.mark.parametrize('form', ['all-class', 'ids', 'one-hot', 'mixup', 'where'])
def test_variance_of_rows_whose_squared_norm_overflows_is_finite(form, branch):
    # Entries of 1e18 over 4096 units: each ‖z_n − μ‖² is ≈ 4e39, beyond float32, but the variances, means
    # over samples and units, are ≈ 1e36.
    n, i, k = 24, 4096, 3
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(n, i)) * 1e18).astype(np.float32)
    ids = rng.integers(0, k, n)
    weights = np.eye(k, dtype=np.float32)[ids]
    kwargs, name, labels = {}, 'cw_vr', weights
    if form == 'all-class':
        name, labels = 'vr', None
    elif form == 'ids':
        labels, kwargs = ids.astype(np.int32), {'num_classes': k}
    elif form == 'mixup':
        lam = rng.uniform(0.2, 0.8, size=(n, 1))
        labels = (lam * weights + (1 - lam) * np.eye(k)[rng.integers(0, k, n)]).astype(np.float32)
    elif form == 'where':
        kwargs = {'where': np.arange(n) % 4 != 0}
    kept = kwargs.get('where', np.ones(n, bool))
    if name == 'vr':
        expected = ref.VALUES['vr'](x.astype(np.float64), None)
    else:
        expected = _weighted_reference(
            'cw_vr', x.astype(np.float64), _labels_matrix(labels, k) * kept[:, None]
        )
    assert np.any(np.sum(np.square(x.astype(np.float64) - x.mean(0)), axis=1) > np.finfo(np.float32).max)
    fn = lambda a: getattr(penalties, name)(a, labels, **kwargs)
    with _branch(branch):
        jitted = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x))
        eager = jax.value_and_grad(fn)(jnp.asarray(x))
    for value, grad in (jitted, eager):
        assert np.all(np.isfinite(np.asarray(grad))), form
        np.testing.assert_allclose(float(value), expected, rtol=1e-5, err_msg=form)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)


def _labels_matrix(labels, k):
    labels = np.asarray(labels)
    return np.eye(k)[labels] if labels.dtype.kind == 'i' else labels.astype(np.float64)


def test_precision_can_be_lowered_and_defaults_to_highest():
    x, ids = _batch(16, 64, 3)
    for name in ('cr', 'cw_cr'):
        fn = getattr(penalties, name)
        highest = float(fn(x, ids, num_classes=3))
        assert highest == float(fn(x, ids, num_classes=3, precision=jax.lax.Precision.HIGHEST))
        np.testing.assert_allclose(float(fn(x, ids, num_classes=3, precision='default')), highest, rtol=1e-2)


def test_docstring_examples_run():
    import doctest

    from cwreg import capture

    for module in (penalties, capture):
        failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__


def test_gram_form_gradient_survives_a_value_rounded_to_zero():
    """A tiny off-diagonal part rounds the Gram form's value to ≤ 0; the gradient must stay Table 1's.

    Catches: the gradient multiplied by (difference > 0), as before this change.
    """
    z = np.array([[1.0, 1e-4, 0.0], [-1.0, -1e-4, 0.0]]) + 3.0
    assert penalties.use_gram_form(2, 3, 1)
    _check_bounds(
        'cr', z, np.zeros(2, int), 1, value_bound=None, small_bound=penalties.gram_form_error_bound(3)
    )
    _, grad = _value_and_grad('cr', z.astype(np.float32))
    assert np.all(grad[:, 1] != 0)  # the off-diagonal pull on the small unit


@pytest.mark.parametrize('name', ['cw_cr', 'cw_vr'])
@pytest.mark.parametrize('units', [6, 40])  # covariance and Gram forms
def test_mixup_rows_beside_nan_padding_give_the_unpadded_penalty(name, units):
    # Padded rows hold NaN; they are out through all-zero weights and through `where`. The weighted path
    # (one class at a time) must keep them out of every product, value and gradient alike.
    rng = np.random.default_rng(21)
    n, pad, k = 12, 4, 3
    x = rng.normal(size=(n + pad, units)).astype(np.float32)
    x[n:] = np.nan
    weights = np.concatenate([_mixup(rng, n, k), np.zeros((pad, k))]).astype(np.float32)
    expected = _weighted_reference(name, x[:n], weights[:n])
    fn = getattr(penalties, name)
    for labels, where in (
        (weights, None),
        (np.where(np.arange(n + pad)[:, None] < n, weights, 1.0), np.arange(n + pad) < n),
    ):
        value, grad = jax.jit(jax.value_and_grad(lambda a: fn(a, labels.astype(np.float32), where=where)))(
            jnp.asarray(x)
        )
        np.testing.assert_allclose(float(value), expected, rtol=1e-4)
        assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[n:] == 0)


def _weighted_cw_cr_jnp(z, w):
    """The float64 weighted reference above for cw_cr (CR: one class of weights w), in jnp for jax.grad."""
    total = 0.0
    for k in range(w.shape[1]):
        weight = jnp.sum(w[:, k])
        centred = z - (w[:, k] @ z) / weight
        covariance = (w[:, k, None] * centred).T @ centred / weight
        total = total + jnp.sum(covariance**2) - jnp.sum(jnp.diag(covariance) ** 2)
    return total / (w.shape[1] * z.shape[1] * (z.shape[1] - 1))


@pytest.mark.parametrize('units', [256, 300])  # 2 blocks of 128 columns; and a rest of 44
@pytest.mark.parametrize('name', ['cw_cr', 'cr'])
def test_column_blocks_of_one_weighted_class_match_a_float64_reference(name, units, monkeypatch):
    # One weighted class on one device (the weighted path of float labels; CR with `where`) computes the
    # Gram form's products a block of columns at a time. Padded rows hold NaN and are out by weight 0.
    n, pad, k = 12, 4, 3
    monkeypatch.setattr(penalties, 'COLUMN_BLOCK_ELEMENTS', 128 * (n + pad))
    rng = np.random.default_rng(22)
    x = (rng.normal(size=(n + pad, units)) + rng.normal(size=(1, units))).astype(np.float32)
    x[n:] = np.nan
    where = np.arange(n + pad) < n
    if name == 'cw_cr':
        labels = np.concatenate([_mixup(rng, n, k), np.zeros((pad, k))])
        weights = labels[:n]
        fn = lambda a: penalties.cw_cr(a, jnp.asarray(labels, jnp.float32))
    else:
        weights = np.ones((n, 1))
        fn = lambda a: penalties.cr(a, where=where)
    members = penalties._OneClass(jnp.asarray(where, jnp.float32), n + pad, jnp.float32, None)
    rows, _ = penalties._centred_rows(members, jnp.asarray(x), None)
    assert isinstance(rows, penalties._CentredRowsInBlocks)
    value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x))
    with jax.enable_x64(True):
        z64, w64 = jnp.asarray(x[:n], jnp.float64), jnp.asarray(weights, jnp.float64)
        expected, expected_grad = jax.value_and_grad(_weighted_cw_cr_jnp)(z64, w64)
    _assert_close(float(value), np.asarray(grad)[:n], float(expected), np.asarray(expected_grad))
    assert np.all(np.asarray(grad)[n:] == 0)
