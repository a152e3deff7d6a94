"""Gradients: jax.grad of `cwreg.penalties` vs the closed forms in `cwreg.analytic` (paper Table 1)
vs the float64 NumPy oracle, plus finite-difference checks (jax.test_util.check_grads).

The oracle's Table-1 gradients are themselves checked against float64 central differences of the
oracle's values, so the three implementations are tied to the penalty definitions, not to each other.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

from cwreg import analytic, penalties  # noqa: E402

NAMES = ref.NAMES
CLASS_WISE = ref.CLASS_WISE
SHAPE_ERRORS = (AssertionError, ValueError, TypeError)

AUTODIFF = {name: jax.jit(jax.grad(getattr(penalties, name))) for name in NAMES}
ANALYTIC = {name: jax.jit(getattr(analytic, name)) for name in NAMES}
# Both gradients of all five penalties in one program: one compilation per case.
_BOTH = jax.jit(
    lambda x, y: {
        name: (jax.grad(getattr(penalties, name))(x, y), getattr(analytic, name)(x, y)) for name in NAMES
    }
)

# (shape, K, label pattern, data kind). The analytic forms build K x I x I covariances, so I stays
# moderate; (6, 1024) is still wide enough for the Gram path of the penalties.
CASES = [
    ((10, 7), 3, 'random', 'gauss'),
    ((40, 6), 4, 'random', 'offset'),  # N > I
    ((6, 1024), 3, 'random', 'gauss'),  # I >> N
    ((12, 2, 2, 3), 5, 'absent', 'relu'),  # conv-like, absent classes, exact zeros
    ((9, 16), 6, 'singletons', 'offset'),  # singleton classes
    ((16, 12), 2, 'one_class', 'gauss'),
    ((100, 8), 100, 'random', 'gauss'),  # K = 100 at N = 100
    ((1, 5), 3, 'random', 'gauss'),  # one sample
    ((8, 1), 2, 'random', 'offset'),  # one unit
]


@functools.lru_cache(maxsize=None)
def _both_gradients(shape, num_classes, pattern, kind):
    x, y = _data(shape, num_classes, pattern, kind)
    return _BOTH(jnp.asarray(x), jnp.asarray(y))


def _data(shape, num_classes, pattern, kind):
    rng = np.random.default_rng(zlib.crc32(repr((shape, num_classes, pattern, kind)).encode()))
    return ref.make_activations(rng, shape, kind), ref.make_labels(rng, shape[0], num_classes, pattern)


def _grad_tols(expected: np.ndarray) -> dict:
    # f32 vs f32/f64: relative to the largest entry, since entries near 0 carry absolute error only.
    return dict(rtol=1e-4, atol=1e-5 * float(np.max(np.abs(expected))) + 1e-30)


# ----------------------------------------------------------------------------
# The oracle's Table-1 gradients.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
    'shape,num_classes,pattern',
    [((5, 3), 3, 'random'), ((6, 2, 2), 4, 'absent'), ((4, 1), 2, 'random'), ((5, 4), 5, 'singletons')],
)
def test_reference_grads_equal_literal_loops(name, shape, num_classes, pattern):
    x, y = _data(shape, num_classes, pattern, 'offset')
    np.testing.assert_allclose(ref.GRADS[name](x, y), ref.grad_loops(name, x, y), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
    'shape,num_classes,pattern',
    [((7, 4), 3, 'random'), ((6, 2, 3), 4, 'absent'), ((5, 5), 5, 'singletons'), ((9, 3), 1, 'one_class')],
)
def test_reference_grads_are_derivatives_of_reference_values(name, shape, num_classes, pattern):
    """Table 1 (scaled) == central differences of eqs. (1)-(6) + normalization, all in float64."""
    x, y = _data(shape, num_classes, pattern, 'gauss')
    x = x.astype(np.float64)
    if name == 'l1r':
        x = x + np.sign(x) * 0.1  # keep |z| away from the kink
    h = 1e-6
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (ref.VALUES[name](plus, y) - ref.VALUES[name](minus, y)) / (2 * h)
    analytic_grad = ref.GRADS[name](x, y)
    np.testing.assert_allclose(
        analytic_grad, numeric, rtol=1e-6, atol=1e-8 * float(np.max(np.abs(analytic_grad))) + 1e-12
    )


# ----------------------------------------------------------------------------
# jax.grad vs cwreg.analytic vs the oracle.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('shape,num_classes,pattern,kind', CASES)
@pytest.mark.parametrize('name', NAMES)
def test_autodiff_equals_analytic_equals_reference(name, shape, num_classes, pattern, kind):
    x, y = _data(shape, num_classes, pattern, kind)
    expected = ref.GRADS[name](x, y)
    auto, closed = _both_gradients(shape, num_classes, pattern, kind)[name]
    assert closed.shape == x.shape and closed.dtype == jnp.float32
    assert auto.shape == x.shape and auto.dtype == jnp.float32
    tols = _grad_tols(expected)
    np.testing.assert_allclose(closed, expected, err_msg=f'analytic.{name}', **tols)
    chex.assert_trees_all_close(auto, closed, **tols)
    np.testing.assert_allclose(auto, expected, err_msg=f'jax.grad(penalties.{name})', **tols)


def test_l1r_autodiff_at_exact_zero_is_table1_sign():
    # ReLU activations are exactly 0 often. Table 1 takes sign(0) = 0 there; jax.grad(jnp.abs)(0.)
    # would be 1 (also a subgradient), so this pins the documented choice.
    x = jnp.asarray(np.array([[0.0, 1.0], [-2.0, 0.0]], np.float32))
    np.testing.assert_array_equal(AUTODIFF['l1r'](x, None), np.array([[0, 1], [-1, 0]]) / 4.0)
    np.testing.assert_array_equal(analytic.l1r(x), np.array([[0, 1], [-1, 0]]) / 4.0)


@pytest.mark.parametrize('name', NAMES)
def test_analytic_eager_equals_jit_and_ignores_or_requires_labels(name):
    x, y = _data((7, 2, 3), 3, 'random', 'gauss')
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    f = getattr(analytic, name)
    eager = np.asarray(f(xj, yj))
    # Entries 100× below the largest round differently under jit on some CPUs: tolerance of the scale.
    np.testing.assert_allclose(eager, ANALYTIC[name](xj, yj), rtol=1e-6, atol=1e-6 * np.max(np.abs(eager)))
    if name in CLASS_WISE:
        with pytest.raises(SHAPE_ERRORS):
            f(xj)
        with pytest.raises(SHAPE_ERRORS):
            f(xj, yj[:5])
    else:
        np.testing.assert_array_equal(f(xj), f(xj, yj))


# ----------------------------------------------------------------------------
# Finite differences on the JAX penalties themselves.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
    'shape,num_classes,pattern,max_order', [((6, 4), 2, 'random', 2), ((4, 40), 3, 'singletons', 1)]
)
def test_check_grads_f32(name, shape, num_classes, pattern, max_order):
    x, y = _data(shape, num_classes, pattern, 'gauss')
    if name == 'l1r':
        x = x + np.sign(x) * 0.1  # finite differences must not straddle the kink at 0
    yj = jnp.asarray(y)
    f = jax.jit(lambda a: getattr(penalties, name)(a, yj))
    # CR and cw-CR are quartic and VR quadratic in z: order 2 checks the Hessian-vector products too.
    # L1R is piecewise linear (Hessian 0 a.e.), so order 1.
    order = 1 if name == 'l1r' else max_order
    check_grads(f, (jnp.asarray(x),), order=order, modes=['fwd', 'rev'], eps=1e-3, atol=2e-3, rtol=2e-3)


def _supports_float64() -> bool:
    with jax.enable_x64(True):
        x = jnp.ones((3, 2), jnp.float64)
        return penalties.vr(x).dtype == jnp.float64


# Covariance path (K > 1, K = 1) and Gram path (K > 1, K = 1), see penalties.use_gram_form. The all-class
# penalties ignore labels, so one shape per path suffices for them (K = 1 is a code path of cw-CR/cw-VR only).
_F64_SHAPES = {'cov': ((20, 3), 2), 'cov-k1': ((12, 3), 1), 'gram': ((4, 40), 3), 'gram-k1': ((5, 30), 1)}
_F64_CASES = [
    pytest.param(name, *case, id=f'{name}-{path}')
    for name in NAMES
    for path, case in _F64_SHAPES.items()
    if name in CLASS_WISE or not path.endswith('k1')
]


@pytest.mark.parametrize('name,shape,num_classes', _F64_CASES)
def test_check_grads_f64_if_supported(name, shape, num_classes):
    # CR, cw-CR, VR and cw-VR are differentiated through a JVP rule (Table 1's gradient); its own derivatives
    # come from autodiff of the rule, so orders 2 and 3 check the rule's derivatives (for CR/cw-CR on both
    # covariance paths; VR's third derivative is 0).
    if not _supports_float64():
        pytest.skip('penalties accumulate in float32 by design (float64 input -> float32 value)')
    x, y = _data(shape, num_classes, 'random', 'offset')
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64) + (0.1 * np.sign(x) if name == 'l1r' else 0.0)
        y64 = jnp.asarray(y, jnp.float64)
        f = jax.jit(lambda a: getattr(penalties, name)(a, y64))
        order = 1 if name == 'l1r' else 3
        # Each mode to order 3 on its own: mixing them (modes=['fwd', 'rev']) also checks all 8 fwd/rev
        # chains of order 3, compositions of the same rules, at 4× the time (39 s vs 15 s for cw_cr-gram).
        for mode in ('fwd', 'rev'):
            check_grads(f, (x64,), order=order, modes=[mode], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize(
    'shape,num_classes,pattern,kind',
    [
        ((16, 300), 3, 'random', 'offset'),  # Gram path
        ((64, 8), 2, 'random', 'offset'),  # covariance path
        ((12, 2, 2, 3), 5, 'absent', 'relu'),
        ((9, 16), 6, 'singletons', 'gauss'),
    ],
)
def test_f64_values_and_gradients_match_reference_tightly_if_supported(shape, num_classes, pattern, kind):
    """In float64 the only differences left are rounding: catches small formula errors f32 would hide."""
    if not _supports_float64():
        pytest.skip('penalties accumulate in float32 by design (float64 input -> float32 value)')
    x, y = _data(shape, num_classes, pattern, kind)
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        xj, yj = jnp.asarray(x), jnp.asarray(y, jnp.float64)
        outputs = jax.jit(
            lambda a, b: {
                name: (jax.value_and_grad(getattr(penalties, name))(a, b), getattr(analytic, name)(a, b))
                for name in NAMES
            }
        )(xj, yj)
        for name in NAMES:
            (value, auto), closed = outputs[name]
            assert value.dtype == jnp.float64 and auto.dtype == jnp.float64 and closed.dtype == jnp.float64
            expected_value = ref.VALUES[name](x, y)
            np.testing.assert_allclose(
                value, expected_value, rtol=1e-10, atol=1e-9 * ref.value_atol(name, x), err_msg=name
            )
            expected = ref.GRADS[name](x, y)
            tols = dict(rtol=1e-9, atol=1e-12 * float(np.max(np.abs(expected))) + 1e-300)
            np.testing.assert_allclose(auto, expected, err_msg=f'jax.grad {name}', **tols)
            np.testing.assert_allclose(closed, expected, err_msg=f'analytic {name}', **tols)
