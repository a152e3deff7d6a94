"""Penalty values of `cwreg.penalties` against the float64 NumPy oracle in `reference.py`.

Covers: values over random shapes / label patterns (hypothesis) and explicit wide (Gram) and tall
(covariance) layers; edge cases (absent and singleton classes, one-class batches, K=100 at N=100,
N=1, I=1); finiteness of values and gradients; bf16 inputs; normalizers at I=16384 (no int overflow);
trace-time shape checks; jit and vmap; the registry; the weight penalties l1w/l2w.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

from cwreg import penalties  # noqa: E402

NAMES = ref.NAMES
CLASS_WISE = ref.CLASS_WISE
ALL_CLASS = tuple(n for n in NAMES if n not in CLASS_WISE)
SHAPE_ERRORS = (AssertionError, ValueError, TypeError)


def _fn(name):
    return getattr(penalties, name)


# Compiled once per shape: most tests below draw many shapes, and op-by-op eager dispatch would
# recompile every primitive per shape (several times slower). Eager calls are covered by
# test_jit_equals_eager and the class edge-case tests.
VALUE = {name: jax.jit(_fn(name)) for name in NAMES}
# All five in one program: one compilation per shape instead of five.
ALL_VALUES = jax.jit(lambda x, y: {name: _fn(name)(x, y) for name in NAMES})
ALL_VALUES_AND_GRADS = jax.jit(lambda x, y: {name: jax.value_and_grad(_fn(name))(x, y) for name in NAMES})


def _assert_matches_reference(name, x, y, value=None, rtol=1e-4, err=''):
    """Penalty `name` on (x, y) equals the float64 oracle to f32 accuracy."""
    if value is None:
        value = VALUE[name](jnp.asarray(x), None if y is None else jnp.asarray(y))
    value = np.asarray(value)
    assert value.shape == () and value.dtype == np.float32, (name, value.shape, value.dtype)
    expected = ref.VALUES[name](x, y)
    np.testing.assert_allclose(
        value,
        expected,
        rtol=rtol,
        atol=ref.value_atol(name, x),
        err_msg=f'{name} {err} x{np.shape(x)} y{np.shape(y)}',
    )


# ----------------------------------------------------------------------------
# The oracle itself.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
    'shape,num_classes,pattern',
    [
        ((5, 3), 3, 'random'),
        ((6, 2, 2), 4, 'absent'),
        ((4, 1), 2, 'random'),
        ((1, 3), 2, 'random'),
        ((5, 4), 5, 'singletons'),
    ],
)
def test_reference_values_equal_literal_loops(name, shape, num_classes, pattern):
    rng = np.random.default_rng(0)
    x = ref.make_activations(rng, shape, 'offset')
    y = ref.make_labels(rng, shape[0], num_classes, pattern)
    np.testing.assert_allclose(ref.VALUES[name](x, y), ref.value_loops(name, x, y), rtol=1e-12, atol=1e-14)


def test_reference_covariance_is_np_cov_and_blocks_agree(monkeypatch):
    rng = np.random.default_rng(1)
    z = ref.flatten(ref.make_activations(rng, (7, 9), 'offset'))
    np.testing.assert_allclose(ref.covariance(z), np.cov(z, rowvar=False, bias=True), rtol=1e-12)
    c = ref.covariance(z)
    full = float((c**2).sum() - (np.diag(c) ** 2).sum())
    monkeypatch.setattr(ref, '_ROW_BLOCK', 4)  # several ragged row blocks
    np.testing.assert_allclose(ref.offdiag_sq_sum(z), full, rtol=1e-12)


@pytest.mark.parametrize('shape', [(1, 10), (50, 40), (3, 4100), (40, 4097)])
def test_reference_gram_form_equals_direct_form(shape):
    rng = np.random.default_rng(13)
    z = ref.flatten(ref.make_activations(rng, shape, 'offset'))
    direct = ref.offdiag_sq_sum_direct(z)
    np.testing.assert_allclose(
        ref.offdiag_sq_sum_gram(z), direct, rtol=1e-10, atol=1e-12 * float(ref.variance(z).sum()) ** 2
    )
    np.testing.assert_allclose(
        ref.offdiag_sq_sum(z), direct, rtol=1e-10, atol=1e-12 * float(ref.variance(z).sum()) ** 2
    )


# ----------------------------------------------------------------------------
# Values vs the oracle.
# ----------------------------------------------------------------------------
@st.composite
def _cases(draw):
    n = draw(st.integers(1, 64))
    if draw(st.booleans()):
        shape = (n, draw(st.one_of(st.integers(1, 8), st.integers(9, 300))))
    else:
        shape = (n, draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 16)))
    num_classes = draw(st.integers(1, 12))
    pattern = draw(st.sampled_from(ref.LABEL_PATTERNS))
    kind = draw(st.sampled_from(ref.DATA_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, num_classes, pattern, kind, seed


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(_cases())
def test_values_match_reference_random_cases(case):
    shape, num_classes, pattern, kind, seed = case
    rng = np.random.default_rng(seed)
    x = ref.make_activations(rng, shape, kind)
    y = ref.make_labels(rng, shape[0], num_classes, pattern)
    values = ALL_VALUES(jnp.asarray(x), jnp.asarray(y))
    for name in NAMES:
        _assert_matches_reference(name, x, y, value=values[name], err=f'case={case}')


# (shape, K, pattern, data kind). Wide layers (I >> N) take the Gram path of the implementation,
# tall ones (N > I) the covariance path; both are checked against the same oracle.
EXPLICIT_CASES = [
    ((16, 4096), 10, 'random', 'gauss'),  # wide dense layer
    ((8, 8, 8, 64), 4, 'random', 'relu'),  # wide conv feature map, I = 4096
    ((16, 1500), 12, 'singletons', 'offset'),
    ((64, 8), 10, 'random', 'offset'),  # N > I
    ((64, 2, 2, 3), 3, 'absent', 'relu'),  # N > I, conv-like
    ((48, 20), 1, 'one_class', 'gauss'),
    ((100, 32), 100, 'random', 'relu'),  # K = 100 at N = 100
    ((100, 256), 100, 'singletons', 'gauss'),
    ((1, 10), 5, 'random', 'offset'),  # one sample
    ((12, 1), 3, 'random', 'gauss'),  # one unit: no pairs
    ((9, 1, 1, 1), 2, 'random', 'offset'),
    ((33, 300), 7, 'absent', 'offset'),
]


def test_explicit_cases_cover_both_covariance_paths():
    chooser = getattr(penalties, 'use_gram_form', None)
    if chooser is None:
        pytest.skip('implementation exposes no path chooser')
    used = {bool(chooser(s[0], int(np.prod(s[1:])), k)) for s, k, _, _ in EXPLICIT_CASES}
    assert used == {True, False}


@pytest.mark.parametrize('shape,num_classes,pattern,kind', EXPLICIT_CASES)
def test_values_match_reference_explicit_cases(shape, num_classes, pattern, kind):
    rng = np.random.default_rng(zlib.crc32(repr((shape, num_classes, pattern, kind)).encode()))
    x = ref.make_activations(rng, shape, kind)
    y = ref.make_labels(rng, shape[0], num_classes, pattern)
    values = ALL_VALUES(jnp.asarray(x), jnp.asarray(y))
    for name in NAMES:
        _assert_matches_reference(name, x, y, value=values[name])


def test_accelerator_branch_equals_cpu_branch_and_reference(monkeypatch):
    """The class sums and lookups are segment sums and gathers on CPU, one-hot products elsewhere.

    CI has only a CPU, so the products are forced here (what GPUs and TPUs run) and compared with the oracle
    and with the CPU branch, values and gradients, on both covariance paths.
    """
    cases = [EXPLICIT_CASES[i] for i in (0, 4, 5, 6)] + [((33, 300), 7, 'absent', 'offset')]
    assert {penalties.use_gram_form(s[0], int(np.prod(s[1:])), k) for s, k, _, _ in cases} == {True, False}
    data = []
    for shape, num_classes, pattern, kind in cases:
        rng = np.random.default_rng(zlib.crc32(repr((shape, num_classes, pattern, kind)).encode()))
        data.append(
            (ref.make_activations(rng, shape, kind), ref.make_labels(rng, shape[0], num_classes, pattern))
        )
    fn = lambda x, y: {name: jax.value_and_grad(_fn(name))(x, y) for name in NAMES}
    on_cpu = [jax.jit(fn)(jnp.asarray(x), jnp.asarray(y)) for x, y in data]
    calls = []

    def default_branch(*args, default, **platforms):
        calls.append(sorted(platforms))
        return default(*args)

    monkeypatch.setattr(penalties.lax, 'platform_dependent', default_branch)
    for (x, y), cpu in zip(data, on_cpu):
        products = jax.jit(lambda x, y: fn(x, y))(jnp.asarray(x), jnp.asarray(y))  # a new trace
        for name in NAMES:
            _assert_matches_reference(name, x, y, value=products[name][0], err='(product branch)')
            chex.assert_trees_all_close(
                products[name], cpu[name], rtol=1e-5, atol=1e-6 * float(np.max(np.abs(cpu[name][1]))) + 1e-30
            )
    assert calls and all(platforms == ['cpu'] for platforms in calls)


@pytest.mark.parametrize('name', ALL_CLASS)
def test_all_class_penalties_ignore_labels(name):
    rng = np.random.default_rng(2)
    x = jnp.asarray(ref.make_activations(rng, (10, 6), 'gauss'))
    y = jnp.asarray(ref.make_labels(rng, 10, 3))
    f = _fn(name)
    np.testing.assert_array_equal(f(x), f(x, y))
    np.testing.assert_array_equal(f(x), f(x, None))


# ----------------------------------------------------------------------------
# Class edge cases.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', CLASS_WISE)
def test_absent_classes_contribute_exactly_zero(name):
    rng = np.random.default_rng(3)
    x = ref.make_activations(rng, (20, 12), 'offset')
    used = ref.make_labels(rng, 20, 2, 'random')  # K = 2, both present
    padded = np.concatenate([used, np.zeros((20, 3), np.float32)], axis=1)  # K = 5, 3 absent
    f = VALUE[name]
    v_used, v_padded = (
        float(f(jnp.asarray(x), jnp.asarray(used))),
        float(f(jnp.asarray(x), jnp.asarray(padded))),
    )
    # Only the 1/K normalizer may differ: absent classes add nothing (no NaN, no bias).
    np.testing.assert_allclose(v_padded * 5, v_used * 2, rtol=1e-6)
    _assert_matches_reference(name, x, padded)
    # Every class absent but one, and that one used by all samples, with the empty columns first.
    one = np.zeros((20, 6), np.float32)
    one[:, 5] = 1
    np.testing.assert_allclose(
        float(f(jnp.asarray(x), jnp.asarray(one))) * 6,
        float(VALUE[name.replace('cw_', '')](jnp.asarray(x), None)),
        rtol=1e-5,
    )


@pytest.mark.parametrize('name', CLASS_WISE)
def test_singleton_class_contributes_zero(name):
    rng = np.random.default_rng(4)
    x = ref.make_activations(rng, (15, 10), 'offset')
    idx = np.array([0] * 7 + [1] * 7 + [2])  # class 2 has one sample (the last)
    y = np.eye(4, dtype=np.float32)[idx]  # class 3 absent
    f = VALUE[name]
    with_singleton = float(f(jnp.asarray(x), jnp.asarray(y)))
    without = float(f(jnp.asarray(x[:-1]), jnp.asarray(y[:-1])))  # same K = 4
    np.testing.assert_allclose(with_singleton, without, rtol=1e-6)
    _assert_matches_reference(name, x, y)
    # All classes singletons: every class-wise statistic is zero.
    xs = ref.make_activations(rng, (6, 10), 'offset')
    ys = np.eye(8, dtype=np.float32)[rng.permutation(8)[:6]]
    assert abs(float(f(jnp.asarray(xs), jnp.asarray(ys)))) <= ref.value_atol(name, xs) * 1e-2


@pytest.mark.parametrize('name', CLASS_WISE)
@pytest.mark.parametrize('num_classes', [1, 7])
def test_one_class_batch_equals_all_class_penalty_over_k(name, num_classes):
    rng = np.random.default_rng(5)
    x = jnp.asarray(ref.make_activations(rng, (24, 3, 3, 2), 'relu'))
    y = np.zeros((24, num_classes), np.float32)
    y[:, num_classes - 1] = 1
    cw = float(VALUE[name](x, jnp.asarray(y)))
    all_class = float(VALUE[name.replace('cw_', '')](x, None))
    np.testing.assert_allclose(cw * num_classes, all_class, rtol=1e-5)


@pytest.mark.parametrize('name', CLASS_WISE)
def test_k100_batch100_each_class_once_is_zero(name):
    rng = np.random.default_rng(6)
    x = ref.make_activations(rng, (100, 64), 'gauss')
    y = np.eye(100, dtype=np.float32)[rng.permutation(100)]
    value = float(VALUE[name](jnp.asarray(x), jnp.asarray(y)))
    assert np.isfinite(value) and abs(value) <= ref.value_atol(name, x) * 1e-2


# ----------------------------------------------------------------------------
# Finite values and gradients for every finite input.
# ----------------------------------------------------------------------------
def _finite_inputs():
    rng = np.random.default_rng(7)
    k = 4
    cases = {
        'zeros': (np.zeros((8, 6), np.float32), ref.make_labels(rng, 8, k)),
        'all_equal': (np.full((8, 6), 3.25, np.float32), ref.make_labels(rng, 8, k)),
        'one_sample': (ref.make_activations(rng, (1, 6)), ref.make_labels(rng, 1, k)),
        'one_sample_conv': (ref.make_activations(rng, (1, 2, 2, 3)), ref.make_labels(rng, 1, k)),
        'one_unit': (ref.make_activations(rng, (8, 1)), ref.make_labels(rng, 8, k)),
        'singletons_absent': (ref.make_activations(rng, (3, 6)), ref.make_labels(rng, 3, 6, 'singletons')),
        'wide_zeros': (np.zeros((4, 2048), np.float32), ref.make_labels(rng, 4, k)),
        'wide_equal_rows': (
            np.tile(ref.make_activations(rng, (1, 2048)), (4, 1)),
            ref.make_labels(rng, 4, k, 'one_class'),
        ),
        'large': (1e3 * ref.make_activations(rng, (8, 6)), ref.make_labels(rng, 8, k)),
        'tiny': (1e-20 * ref.make_activations(rng, (8, 6)), ref.make_labels(rng, 8, k)),
        'relu_dead_units': (
            np.concatenate([ref.make_activations(rng, (8, 3), 'relu'), np.zeros((8, 3), np.float32)], 1),
            ref.make_labels(rng, 8, k, 'absent'),
        ),
    }
    return cases


_FINITE = _finite_inputs()


@functools.lru_cache(maxsize=None)
def _finite_outputs(case):
    return ALL_VALUES_AND_GRADS(*(jnp.asarray(a) for a in _FINITE[case]))


@pytest.mark.parametrize('case', sorted(_FINITE))
@pytest.mark.parametrize('name', NAMES)
def test_finite_value_and_gradient(name, case):
    x, y = (jnp.asarray(a) for a in _FINITE[case])
    value, grad = _finite_outputs(case)[name]
    assert np.isfinite(np.asarray(value)), (name, case, value)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(grad))), (name, case)
    if case in ('zeros', 'all_equal', 'wide_zeros', 'one_sample', 'one_sample_conv') and name != 'l1r':
        # No spread at all: every (class-wise) statistic is exactly representable as 0.
        np.testing.assert_allclose(np.asarray(value), 0.0, atol=1e-6 * (1 + float(jnp.mean(x * x))))


# ----------------------------------------------------------------------------
# dtypes and normalizer scale.
# ----------------------------------------------------------------------------
_BF16_ALL = jax.jit(
    lambda xb, x32, y: {name: (jax.value_and_grad(_fn(name))(xb, y), _fn(name)(x32, y)) for name in NAMES}
)


@functools.lru_cache(maxsize=None)
def _bf16_case(shape):
    rng = np.random.default_rng(8)
    x32 = jnp.asarray(ref.make_activations(rng, shape, 'offset'))
    y = jnp.asarray(ref.make_labels(rng, shape[0], 3))
    xb = x32.astype(jnp.bfloat16)
    return xb, y, _BF16_ALL(xb, x32, y)


@pytest.mark.parametrize('shape', [(16, 2, 3, 4), (6, 1024)])
@pytest.mark.parametrize('name', NAMES)
def test_bf16_activations_accumulate_in_f32(name, shape):
    xb, y, outputs = _bf16_case(shape)
    (value, grad), value32 = outputs[name]
    assert value.dtype == jnp.float32 and value.shape == ()
    # Same inputs upcast: only summation order may differ when statistics are accumulated in f32.
    upcast = np.asarray(xb.astype(jnp.float32))
    _assert_matches_reference(name, upcast, np.asarray(y), value=value, rtol=1e-3)
    # And close to the f32 penalty of the un-rounded activations (bf16 keeps ~3 significant digits).
    np.testing.assert_allclose(value, value32, rtol=5e-2, atol=ref.value_atol(name, upcast) * 1e2)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad.astype(jnp.float32))))


@pytest.mark.parametrize(
    'name,shape,num_classes,pattern',
    [
        ('cr', (6, 16384), 1, 'random'),
        ('cw_cr', (8, 16384), 12, 'absent'),  # K I (I-1) = 3.2e9 > 2**31
        ('cw_cr', (4, 16, 16, 64), 100, 'random'),  # K I (I-1) = 2.7e10
        ('vr', (6, 16384), 1, 'random'),
        ('cw_vr', (8, 16, 16, 64), 100, 'random'),
        ('l1r', (8, 16384), 1, 'random'),
    ],
)
def test_normalizers_do_not_overflow_at_i16384(name, shape, num_classes, pattern):
    rng = np.random.default_rng(9)
    x = ref.make_activations(rng, shape, 'gauss')
    y = ref.make_labels(rng, shape[0], num_classes, pattern)
    value = VALUE[name](jnp.asarray(x), jnp.asarray(y))
    assert np.isfinite(np.asarray(value))
    _assert_matches_reference(name, x, y, value=value)


# ----------------------------------------------------------------------------
# Trace-time shape checks.
# ----------------------------------------------------------------------------
_X = np.ones((4, 3), np.float32)
_Y = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]


_BAD_ACTIVATIONS = {
    'x_rank1': (np.ones((4,), np.float32), _Y),
    'x_rank0': (np.float32(1.0), None),
}
_BAD_LABELS = {  # only the class-wise penalties read labels
    'y_rank1': (_X, np.array([0, 1, 0, 1], np.float32)),  # class indices, not one-hot
    'y_rank3': (_X, np.ones((4, 2, 1), np.float32)),
    'n_mismatch': (_X, _Y[:3]),
    'n_mismatch_conv': (np.ones((5, 2, 2), np.float32), _Y),
}
_BAD = {**_BAD_ACTIVATIONS, **_BAD_LABELS}


@pytest.mark.parametrize(
    'name,case',
    [(n, c) for n in NAMES for c in _BAD_ACTIVATIONS] + [(n, c) for n in CLASS_WISE for c in _BAD_LABELS],
)
@pytest.mark.parametrize('jit', [False, True])
def test_bad_shapes_raise_at_trace_time(name, case, jit):
    x, y = _BAD[case]
    f = _fn(name)
    if jit:
        f = jax.jit(f)
    with pytest.raises(SHAPE_ERRORS):
        jax.block_until_ready(f(jnp.asarray(x), None if y is None else jnp.asarray(y)))


@pytest.mark.parametrize('name', CLASS_WISE)
@pytest.mark.parametrize('jit', [False, True])
def test_class_wise_without_labels_raises(name, jit):
    f = jax.jit(_fn(name)) if jit else _fn(name)
    with pytest.raises(SHAPE_ERRORS):
        f(jnp.asarray(_X))
    with pytest.raises(SHAPE_ERRORS):
        f(jnp.asarray(_X), None)


# ----------------------------------------------------------------------------
# jit and vmap.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('shape', [(6, 2, 3, 4)])
def test_jit_equals_eager(name, shape):
    rng = np.random.default_rng(10)
    x = jnp.asarray(ref.make_activations(rng, shape, 'relu'))
    y = jnp.asarray(ref.make_labels(rng, shape[0], 4))
    f = _fn(name)
    np.testing.assert_allclose(jax.jit(f)(x, y), f(x, y), rtol=1e-6, atol=1e-12)
    if name in ALL_CLASS:
        np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-6, atol=1e-12)


_VMAPPED = jax.jit(
    lambda xs, ys: {
        name: (
            jax.vmap(_fn(name))(xs, ys),
            jax.vmap(_fn(name), in_axes=(0, None))(xs, None) if name in ALL_CLASS else None,
        )
        for name in NAMES
    }
)


@functools.lru_cache(maxsize=None)
def _vmap_case(shape):
    rng = np.random.default_rng(11)
    b = 3
    xs = jnp.asarray(ref.make_activations(rng, (b,) + shape, 'offset'))
    ys = jnp.asarray(
        np.stack([ref.make_labels(rng, shape[0], 4, p) for p in ('random', 'absent', 'singletons')])
    )
    looped = [ALL_VALUES(xs[i], ys[i]) for i in range(b)]
    return xs, ys, _VMAPPED(xs, ys), looped


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('shape', [(10, 7), (5, 2, 2, 3), (4, 600)])
def test_vmap_over_independent_batches_equals_loop(name, shape):
    xs, ys, vmapped, looped_all = _vmap_case(shape)
    b = xs.shape[0]
    with_labels, without_labels = vmapped[name]
    looped = np.stack([np.asarray(looped_all[i][name]) for i in range(b)])
    np.testing.assert_allclose(with_labels, looped, rtol=1e-5, atol=1e-12)
    if name in ALL_CLASS:
        np.testing.assert_allclose(without_labels, looped, rtol=1e-5, atol=1e-12)
    # And the loop matches the oracle, so vmap is not just consistently wrong.
    for i in range(b):
        _assert_matches_reference(name, np.asarray(xs[i]), np.asarray(ys[i]), value=looped[i])


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------
def test_registry():
    assert set(penalties.PENALTIES) == set(NAMES)
    for name in NAMES:
        assert penalties.PENALTIES[name] is _fn(name)
        assert penalties.get_penalty(name) is _fn(name)


@pytest.mark.parametrize('bad', ['cwcr', 'CR', '', 'l2w', 'decov'])
def test_get_penalty_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        penalties.get_penalty(bad)
    message = str(info.value)
    for name in NAMES:
        assert name in message


# ----------------------------------------------------------------------------
# Weight penalties: only leaves named 'kernel' count; l1w = sum |w|, l2w = 1/2 sum w^2
# (tf.nn.l2_loss, as documented in cwreg.penalties).
# ----------------------------------------------------------------------------
def _params(rng):
    return {
        'Conv_0': {
            'kernel': rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
            'bias': rng.standard_normal((4,)).astype(np.float32),
        },
        'Dense_0': {
            'kernel': rng.standard_normal((36, 5)).astype(np.float32),
            'bias': rng.standard_normal((5,)).astype(np.float32),
        },
        'BatchNorm_0': {'scale': rng.standard_normal((4,)).astype(np.float32)},
        'Embed_0': {'embedding': rng.standard_normal((7, 3)).astype(np.float32)},
        'Block': {
            'Dense_1': {
                'kernel': rng.standard_normal((5, 5)).astype(np.float32),
                'bias': np.ones((5,), np.float32),
            },
            'kernel_size': np.float32(3.0),
        },  # name contains 'kernel' but is not one
    }


def _kernels(params):
    return [params['Conv_0']['kernel'], params['Dense_0']['kernel'], params['Block']['Dense_1']['kernel']]


def test_l1w_l2w_count_only_kernels():
    rng = np.random.default_rng(12)
    params = _params(rng)
    ks = [k.astype(np.float64) for k in _kernels(params)]
    jparams = jax.tree.map(jnp.asarray, params)
    l1, l2 = penalties.l1w(jparams), penalties.l2w(jparams)
    assert l1.shape == () and l2.shape == ()
    np.testing.assert_allclose(l1, sum(np.abs(k).sum() for k in ks), rtol=1e-5)
    np.testing.assert_allclose(l2, 0.5 * sum((k * k).sum() for k in ks), rtol=1e-5)
    # Subtree = one layer, as the paper penalizes one layer's weights.
    np.testing.assert_allclose(penalties.l2w(jparams['Dense_0']), 0.5 * (ks[1] ** 2).sum(), rtol=1e-5)
    # Gradients: sign(w) / w on kernels, exactly 0 elsewhere.
    g1, g2 = jax.jit(jax.grad(penalties.l1w))(jparams), jax.jit(jax.grad(penalties.l2w))(jparams)
    np.testing.assert_allclose(g1['Dense_0']['kernel'], np.sign(params['Dense_0']['kernel']))
    np.testing.assert_allclose(g2['Conv_0']['kernel'], params['Conv_0']['kernel'], rtol=1e-6)
    for g in (g1, g2):
        for path in (
            ('Conv_0', 'bias'),
            ('BatchNorm_0', 'scale'),
            ('Embed_0', 'embedding'),
            ('Block', 'kernel_size'),
            ('Block', 'Dense_1', 'bias'),
        ):
            leaf = g
            for p in path:
                leaf = leaf[p]
            np.testing.assert_array_equal(leaf, 0.0)


def test_l1w_l2w_flax_params_and_no_kernels():
    import flax.linen as nn  # only here: the penalty library must not need flax at import

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    variables = Net().init(jax.random.key(0), jnp.ones((2, 5, 5, 1)))
    params = variables['params']
    kernels = [params['Conv_0']['kernel'], params['Dense_0']['kernel']]
    np.testing.assert_allclose(penalties.l1w(params), sum(jnp.abs(k).sum() for k in kernels), rtol=1e-5)
    np.testing.assert_allclose(penalties.l2w(params), 0.5 * sum((k * k).sum() for k in kernels), rtol=1e-5)
    np.testing.assert_allclose(penalties.l2w({'bias': jnp.ones(3)}), 0.0)
    np.testing.assert_allclose(penalties.l1w(jax.jit(lambda p: p)(params)), penalties.l1w(params), rtol=1e-6)
    chex.assert_trees_all_equal_shapes(jax.grad(penalties.l2w)(params), params)


def test_penalty_library_does_not_import_tensorflow():
    # Users import the penalties into their own JAX code: the training stack must stay optional.
    import subprocess
    import sys

    code = (
        'import sys, cwreg.penalties, cwreg.analytic; '
        'print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
