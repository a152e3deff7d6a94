"""Penalties and closed-form gradients with ``axis_name`` on 4 (fake CPU) devices.

For every penalty and every batch split below, inside ``jax.pmap`` and ``jax.shard_map`` (with and
without varying-axis checking):
  * the value is identical on every device and equals the single-device penalty of the concatenated
    batch (and the float64 oracle);
  * ``jax.grad`` w.r.t. each device's activations is that device's slice of the single-device gradient
    (``grad_reduction='psum'`` under pmap and unchecked shard_map; under checked shard_map, where JAX
    types the replicated value as invariant, the default 'pmean' gives the slice);
  * ``cwreg.analytic.<name>(..., axis_name=...)`` is that device's slice of the single-device analytic
    gradient.

Beyond the penalty alone, the data-parallel idioms users write are checked end to end on a small model:
the per-device loss ``task_d + λΩ`` with ``lax.pmean`` of the parameter gradients (default
``grad_reduction='pmean'``), and ``task_d / D + λΩ`` with ``lax.psum`` (``grad_reduction='psum'``), both
equal to the single-device gradient of mean task + λΩ; under checked shard_map JAX sums the gradients of
replicated parameters itself, so the idioms divide that sum by D or keep it. Labels there are integer ids
with −1 padding and a ``where`` mask (global counts). Plain ``jax.jit`` over a batch sharded on a mesh
(Auto and Explicit axis types, no ``axis_name``) gives the global value and gradient.

The device count must be fixed before JAX initializes, and the other test modules of the same pytest
process import JAX first, so the checks run in a subprocess (this file run as a script with
``--worker``, XLA_FLAGS set); the tests below assert on the per-check results it prints as JSON.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import traceback

import pytest

NUM_DEVICES = 4
AXIS = 'b'
NAMES = ('cr', 'cw_cr', 'vr', 'cw_vr', 'l1r')
CLASS_WISE = ('cw_cr', 'cw_vr')
MODES = ('pmap', 'shard_map_vma', 'shard_map_no_vma', 'analytic_pmap', 'analytic_shard_map')
# name -> (local shape per device, K, data kind). Class layouts are in _labels().
SCENARIOS = {
    'tall_random': ((6, 10), 2, 'gauss'),  # global N = 24 > K I = 20: covariance path
    'conv_imbalanced': ((5, 2, 2, 3), 5, 'offset'),  # class only on one device, absent class
    'wide_one_class': ((3, 300), 4, 'relu'),  # I >> N: Gram path; exact zeros; one class
}
CHECKS = [f'{mode}/{scenario}/{name}' for mode in MODES for scenario in SCENARIOS for name in NAMES]
IDIOM_MODES = ('pmap', 'shard_map_vma', 'shard_map_no_vma')
IDIOM_CHECKS = [
    f'idiom_{reduction}/{mode}/{name}'
    for reduction in ('pmean', 'psum')
    for mode in IDIOM_MODES
    for name in NAMES
]
SHARDED_JIT_CHECKS = [f'sharded_jit_{types}/{name}' for types in ('auto', 'explicit') for name in NAMES]
# Mixup rows on every device; and on device 0 only (every device must still take the weighted path).
SOFT_CHECKS = [
    f'{rows}_pmap/{name}' for rows in ('soft_weights', 'soft_rows_on_one_device') for name in CLASS_WISE
]
_RESULT_MARKER = 'MULTIDEVICE_RESULTS='
_TIMEOUT_S = 300


# ----------------------------------------------------------------------------
# pytest side (no JAX needed here).
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def worker_results() -> dict:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get('XLA_FLAGS', '').split()
        if not f.startswith('--xla_force_host_platform_device_count')
    ]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={NUM_DEVICES}'])
    env['JAX_PLATFORMS'] = 'cpu'
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--worker'],
        env=env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f'multi-device worker failed (rc={proc.returncode}).\nstdout:\n{proc.stdout[-4000:]}\n'
            f'stderr:\n{proc.stderr[-4000:]}'
        )
    return json.loads(lines[-1][len(_RESULT_MARKER) :])


def test_worker_ran_on_four_devices(worker_results):
    assert worker_results['_devices'] == NUM_DEVICES
    assert set(CHECKS + IDIOM_CHECKS + SHARDED_JIT_CHECKS + SOFT_CHECKS) <= set(worker_results)


@pytest.mark.parametrize('check', CHECKS + IDIOM_CHECKS + SHARDED_JIT_CHECKS + SOFT_CHECKS)
def test_multidevice(worker_results, check):
    outcome = worker_results[check]
    if outcome != 'ok':
        pytest.fail(f'{check}: {outcome}', pytrace=False)


# ----------------------------------------------------------------------------
# Worker side (runs in the subprocess).
# ----------------------------------------------------------------------------
def _labels(np, rng, scenario: str, num_classes: int, n_local: int):
    """Global (D * n_local, K) one-hot labels, device d owning rows d*n_local:(d+1)*n_local."""
    n = NUM_DEVICES * n_local
    if scenario == 'conv_imbalanced':
        # n_local = 5. Class 0 on every device; class 1 only on device 1; class 2 a single sample on
        # device 3; class 3 absent everywhere; class 4 on devices 0 and 2.
        idx = np.array([0, 0, 4, 4, 0, 1, 1, 1, 0, 0, 4, 0, 0, 4, 0, 0, 0, 2, 0, 0])
    elif scenario == 'wide_one_class':
        idx = np.full(n, 2)  # classes 0, 1, 3 absent everywhere
    else:
        idx = rng.integers(0, num_classes, size=n)
    return np.eye(num_classes, dtype=np.float32)[idx]


def _run_worker() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reference as ref

    from cwreg import analytic, penalties

    results: dict = {'_devices': jax.device_count()}
    if jax.device_count() != NUM_DEVICES:
        return results
    mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
    sharded = NamedSharding(mesh, P(AXIS))

    def per_device_penalties(x, y, reduction='psum'):
        out = {}
        for name in NAMES:
            fn = functools.partial(getattr(penalties, name), axis_name=AXIS, grad_reduction=reduction)
            value, grad = jax.value_and_grad(fn)(x, y)
            out[name] = (jnp.reshape(value, (1,)), grad)
        return out

    def per_device_analytic(x, y):
        return {name: getattr(analytic, name)(x, y, axis_name=AXIS) for name in NAMES}

    single_value = {n: jax.jit(getattr(penalties, n)) for n in NAMES}
    single_grad = {n: jax.jit(jax.grad(getattr(penalties, n))) for n in NAMES}
    single_analytic = {n: jax.jit(getattr(analytic, n)) for n in NAMES}

    def run_mode(mode, x_global, y_global):
        """Returns {name: (values on each device (D,), gradient (N, ...))} for the global batch."""
        n_local = x_global.shape[0] // NUM_DEVICES
        if mode.endswith('pmap'):
            fn = per_device_analytic if mode.startswith('analytic') else per_device_penalties
            split = lambda a: a.reshape((NUM_DEVICES, n_local) + a.shape[1:])
            out = jax.block_until_ready(jax.pmap(fn, axis_name=AXIS)(split(x_global), split(y_global)))
            merge = lambda a: np.asarray(a).reshape((NUM_DEVICES * n_local,) + a.shape[2:])
        else:
            fn = per_device_analytic if mode.startswith('analytic') else per_device_penalties
            check_vma = mode != 'shard_map_no_vma'
            if mode == 'shard_map_vma':
                fn = functools.partial(fn, reduction='pmean')
            mapped = jax.jit(
                jax.shard_map(
                    fn, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS), check_vma=check_vma
                )
            )
            out = jax.block_until_ready(
                mapped(jax.device_put(x_global, sharded), jax.device_put(y_global, sharded))
            )
            merge = np.asarray
        if mode.startswith('analytic'):
            return {name: (None, merge(out[name])) for name in NAMES}
        return {name: (np.asarray(out[name][0]).reshape(-1), merge(out[name][1])) for name in NAMES}

    def check(name, mode, x, y, values, grad):
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        if mode.startswith('analytic'):
            expected = np.asarray(single_analytic[name](xj, yj))
            tols = dict(rtol=1e-4, atol=1e-5 * float(np.max(np.abs(expected))) + 1e-30)
            np.testing.assert_allclose(grad, expected, err_msg='analytic vs single-device analytic', **tols)
            np.testing.assert_allclose(grad, ref.GRADS[name](x, y), err_msg='analytic vs oracle', **tols)
            return
        assert values.shape == (NUM_DEVICES,), values.shape
        assert np.all(values == values[0]), f'value differs across devices: {values.tolist()}'
        atol = ref.value_atol(name, x)
        np.testing.assert_allclose(
            values[0],
            float(single_value[name](xj, yj)),
            rtol=1e-4,
            atol=atol,
            err_msg='value vs single-device value of the concatenated batch',
        )
        np.testing.assert_allclose(
            values[0], ref.VALUES[name](x, y), rtol=1e-4, atol=atol, err_msg='value vs float64 oracle'
        )
        expected = np.asarray(single_grad[name](xj, yj))
        assert grad.shape == x.shape, (grad.shape, x.shape)
        tols = dict(rtol=1e-4, atol=1e-5 * float(np.max(np.abs(expected))) + 1e-30)
        np.testing.assert_allclose(grad, expected, err_msg='grad vs single-device grad', **tols)

    for scenario, (local_shape, num_classes, kind) in SCENARIOS.items():
        rng = np.random.default_rng(sorted(SCENARIOS).index(scenario))
        global_shape = (NUM_DEVICES * local_shape[0],) + local_shape[1:]
        x = ref.make_activations(rng, global_shape, kind)
        y = _labels(np, rng, scenario, num_classes, local_shape[0])
        for mode in MODES:
            try:
                outputs = run_mode(mode, x, y)
            except Exception:  # pylint: disable=broad-except
                message = 'raised:\n' + traceback.format_exc(limit=3)
                for name in NAMES:
                    results[f'{mode}/{scenario}/{name}'] = message
                continue
            for name in NAMES:
                try:
                    check(name, mode, x, y, *outputs[name])
                    results[f'{mode}/{scenario}/{name}'] = 'ok'
                except AssertionError as e:
                    results[f'{mode}/{scenario}/{name}'] = str(e)
    results.update(_idiom_checks(jax, jnp, np, mesh, penalties))
    results.update(_sharded_jit_checks(jax, jnp, np, penalties))
    results.update(_soft_weight_checks(jax, jnp, np, penalties))
    return results


def _soft_weight_checks(jax, jnp, np, penalties) -> dict:
    """Mixup weights (the soft path, global weighted statistics) under pmap equal one device."""
    rng = np.random.default_rng(3)
    n, k = NUM_DEVICES * 5, 3
    x = rng.normal(size=(n, 6)).astype(np.float32)
    lam = rng.uniform(0.2, 0.8, size=(n, 1))
    w = lam * np.eye(k)[rng.integers(0, k, n)] + (1 - lam) * np.eye(k)[rng.integers(0, k, n)]
    one_device = np.where(np.arange(n)[:, None] < n // NUM_DEVICES, w, np.eye(k)[rng.integers(0, k, n)])
    split = lambda a: a.reshape((NUM_DEVICES, -1) + a.shape[1:])
    results = {}
    for (rows, w), name in itertools.product(
        {'soft_weights': w, 'soft_rows_on_one_device': one_device}.items(), CLASS_WISE
    ):
        key = f'{rows}_pmap/{name}'
        w = w.astype(np.float32)
        fn = getattr(penalties, name)
        try:
            value, grad = jax.value_and_grad(fn)(jnp.asarray(x), jnp.asarray(w))
            per_device = lambda a, b: jax.value_and_grad(
                lambda a: fn(a, b, axis_name=AXIS, grad_reduction='psum')
            )(a)
            values, grads = jax.pmap(per_device, axis_name=AXIS)(split(x), split(w))
            np.testing.assert_allclose(np.asarray(values), float(value), rtol=1e-5, err_msg=key)
            e = np.asarray(grad)
            np.testing.assert_allclose(
                np.asarray(grads).reshape(e.shape), e, rtol=1e-4, atol=1e-6 * np.abs(e).max(), err_msg=key
            )
            results[key] = 'ok'
        except Exception as e:  # pylint: disable=broad-except
            results[key] = f'{type(e).__name__}: {e}'[:3000]
    return results


_LAMBDA = 0.7


def _idiom_data(np):
    """A tiny model's inputs and parameters; integer labels with −1 padding and a where mask."""
    rng = np.random.default_rng(7)
    n = NUM_DEVICES * 6
    x = rng.normal(size=(n, 5)).astype(np.float32)
    ids = rng.integers(0, 3, size=n)
    ids[[2, 9, 15]] = -1  # no class (padding ids)
    where = np.ones(n, bool)
    where[[4, 10, 16, 22]] = False  # padded examples, one per device
    params = {'w': rng.normal(size=(5, 7)).astype(np.float32), 'b': rng.normal(size=(7,)).astype(np.float32)}
    return x, ids, where, params


def _idiom_loss(jnp, penalties, name, params, x, ids, where, axis_name=None, reduction='pmean', scale=1.0):
    """scale · (masked mean task loss of this device) + λ Ω(z of the global batch)."""
    z = jnp.tanh(x @ params['w'] + params['b'])
    per_example = jnp.sum((z - 0.3) ** 2, axis=1)
    task = jnp.sum(jnp.where(where, per_example, 0.0)) / jnp.sum(where)
    penalty = getattr(penalties, name)(
        z, ids, num_classes=3, where=where, axis_name=axis_name, grad_reduction=reduction
    )
    return scale * task + _LAMBDA * penalty


def _idiom_checks(jax, jnp, np, mesh, penalties) -> dict:
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, ids, where, params = _idiom_data(np)
    n_local = x.shape[0] // NUM_DEVICES
    # Every device holds the same number of unmasked examples, so the mean of the per-device means is the
    # global mean and the single-device objective is well defined as mean task + λΩ.
    counts = where.reshape(NUM_DEVICES, n_local).sum(1)
    assert np.all(counts == counts[0]), counts
    results = {}
    for name in NAMES:
        loss = functools.partial(_idiom_loss, jnp, penalties, name)

        # The single-device objective: the mean of the per-device task losses + λΩ of the global batch.
        def single(p):
            z = jnp.tanh(jnp.asarray(x) @ p['w'] + p['b'])
            per_example = jnp.sum((z - 0.3) ** 2, axis=1).reshape(NUM_DEVICES, n_local)
            w = jnp.asarray(where).reshape(NUM_DEVICES, n_local)
            task = jnp.mean(jnp.sum(jnp.where(w, per_example, 0.0), 1) / jnp.sum(w, 1))
            return task + _LAMBDA * getattr(penalties, name)(
                z, jnp.asarray(ids), num_classes=3, where=jnp.asarray(where)
            )

        expected = jax.grad(single)(params)
        for reduction in ('pmean', 'psum'):
            scale = 1.0 if reduction == 'pmean' else 1.0 / NUM_DEVICES
            combine = lax.pmean if reduction == 'pmean' else lax.psum

            def per_device(p, x, i, w, reduction=reduction, scale=scale, combine=combine):
                g = jax.grad(loss)(p, x, i, w, AXIS, reduction, scale)
                return combine(g, AXIS)

            def per_device_checked(p, x, i, w, reduction=reduction, scale=scale):
                # Checked shard_map: the gradient of replicated parameters is already the sum over devices.
                g = jax.grad(loss)(p, x, i, w, AXIS, reduction, scale)
                return g if reduction == 'psum' else jax.tree.map(lambda a: a / NUM_DEVICES, g)

            for mode in IDIOM_MODES:
                key = f'idiom_{reduction}/{mode}/{name}'
                try:
                    if mode == 'pmap':
                        split = lambda a: a.reshape((NUM_DEVICES, n_local) + a.shape[1:])
                        out = jax.pmap(per_device, axis_name=AXIS, in_axes=(None, 0, 0, 0))(
                            params, split(x), split(ids), split(where)
                        )
                        got = jax.tree.map(lambda a: np.asarray(a)[0], out)
                    else:
                        checked = mode == 'shard_map_vma'
                        fn = per_device_checked if checked else per_device
                        mapped = jax.jit(
                            jax.shard_map(
                                fn,
                                mesh=mesh,
                                in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                                out_specs=P(),
                                check_vma=checked,
                            )
                        )
                        put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))
                        got = mapped(params, put(x), put(ids), put(where))
                    for k in expected:
                        e = np.asarray(expected[k])
                        np.testing.assert_allclose(
                            np.asarray(got[k]),
                            e,
                            rtol=1e-4,
                            atol=1e-6 * np.abs(e).max(),
                            err_msg=f'{key}: gradient of {k} vs single device',
                        )
                    results[key] = 'ok'
                except Exception as e:  # pylint: disable=broad-except
                    results[key] = f'{type(e).__name__}: {e}'[:3000]
    return results


def _sharded_jit_checks(jax, jnp, np, penalties) -> dict:
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, ids, where, _ = _idiom_data(np)
    x = np.maximum(x, 0.0) @ np.ones((5, 9), np.float32) * np.linspace(0.5, 2, 9, dtype=np.float32)
    results = {}
    for types in ('auto', 'explicit'):
        axis_type = AxisType.Auto if types == 'auto' else AxisType.Explicit
        mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(axis_type,))
        for name in NAMES:
            key = f'sharded_jit_{types}/{name}'
            fn = lambda a, i, w, name=name: getattr(penalties, name)(a, i, num_classes=3, where=w)
            try:
                expected = jax.jit(jax.value_and_grad(fn))(
                    jnp.asarray(x), jnp.asarray(ids), jnp.asarray(where)
                )
                with jax.set_mesh(mesh):
                    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))
                    value, grad = jax.jit(jax.value_and_grad(fn))(put(x), put(ids), put(where))
                assert len(grad.sharding.device_set) == NUM_DEVICES, grad.sharding
                np.testing.assert_allclose(float(value), float(expected[0]), rtol=1e-5, err_msg=key)
                e = np.asarray(expected[1])
                np.testing.assert_allclose(
                    np.asarray(grad), e, rtol=1e-4, atol=1e-6 * np.abs(e).max(), err_msg=key
                )
                results[key] = 'ok'
            except Exception as e:  # pylint: disable=broad-except
                results[key] = f'{type(e).__name__}: {e}'[:3000]
    return results


if __name__ == '__main__' and '--worker' in sys.argv:
    print(_RESULT_MARKER + json.dumps(_run_worker()), flush=True)
