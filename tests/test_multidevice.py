"""Penalties and closed-form gradients with ``axis_name`` on 4 (fake CPU) devices.

For every penalty and every batch split below, inside ``jax.pmap`` and ``jax.shard_map`` (with and
without varying-axis checking):
  * the value is identical on every device and equals the single-device penalty of the concatenated
    batch (and the float64 oracle);
  * ``jax.grad`` w.r.t. each device's activations is that device's slice of the single-device gradient;
  * ``cwreg.analytic.<name>(..., axis_name=...)`` is that device's slice of the single-device analytic
    gradient.

The device count must be fixed before JAX initializes, and the other test modules of the same pytest
process import JAX first, so the checks run in a subprocess (this file run as a script with
``--worker``, XLA_FLAGS set); the tests below assert on the per-check results it prints as JSON.
"""

from __future__ import annotations

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
    'tall_random': ((6, 10), 2, 'gauss'),            # global N = 24 > K I = 20: covariance path
    'conv_imbalanced': ((5, 2, 2, 3), 5, 'offset'),  # class only on one device, absent class
    'wide_one_class': ((3, 300), 4, 'relu'),         # I >> N: Gram path; exact zeros; one class
}
CHECKS = [f'{mode}/{scenario}/{name}' for mode in MODES for scenario in SCENARIOS for name in NAMES]
_RESULT_MARKER = 'MULTIDEVICE_RESULTS='
_TIMEOUT_S = 300


# ----------------------------------------------------------------------------
# pytest side (no JAX needed here).
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def worker_results() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={NUM_DEVICES}'])
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker'], env=env,
                        capture_output=True, text=True, timeout=_TIMEOUT_S)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_MARKER)]
  if proc.returncode != 0 or not lines:
    pytest.fail(f'multi-device worker failed (rc={proc.returncode}).\nstdout:\n{proc.stdout[-4000:]}\n'
                f'stderr:\n{proc.stderr[-4000:]}')
  return json.loads(lines[-1][len(_RESULT_MARKER):])


def test_worker_ran_on_four_devices(worker_results):
  assert worker_results['_devices'] == NUM_DEVICES
  assert set(CHECKS) <= set(worker_results)


@pytest.mark.parametrize('check', CHECKS)
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
    idx = np.array([0, 0, 4, 4, 0,
                    1, 1, 1, 0, 0,
                    4, 0, 0, 4, 0,
                    0, 0, 2, 0, 0])
  elif scenario == 'wide_one_class':
    idx = np.full(n, 2)  # classes 0, 1, 3 absent everywhere
  else:
    idx = rng.integers(0, num_classes, size=n)
  return np.eye(num_classes, dtype=np.float32)[idx]


def _run_worker() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import reference as ref
  from cwreg import analytic, penalties

  results: dict = {'_devices': jax.device_count()}
  if jax.device_count() != NUM_DEVICES:
    return results
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  sharded = NamedSharding(mesh, P(AXIS))

  def per_device_penalties(x, y):
    out = {}
    for name in NAMES:
      value, grad = jax.value_and_grad(getattr(penalties, name))(x, y, axis_name=AXIS)
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
      mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS),
                                     check_vma=check_vma))
      out = jax.block_until_ready(mapped(jax.device_put(x_global, sharded),
                                         jax.device_put(y_global, sharded)))
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
    np.testing.assert_allclose(values[0], float(single_value[name](xj, yj)), rtol=1e-4, atol=atol,
                               err_msg='value vs single-device value of the concatenated batch')
    np.testing.assert_allclose(values[0], ref.VALUES[name](x, y), rtol=1e-4, atol=atol,
                               err_msg='value vs float64 oracle')
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
  return results


if __name__ == '__main__' and '--worker' in sys.argv:
  print(_RESULT_MARKER + json.dumps(_run_worker()), flush=True)
