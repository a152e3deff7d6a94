"""TF 1.x's Adam and RMSProp (cwreg.training.optim) against TensorFlow's own tf.compat.v1 optimizers and NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cwreg.training import optim

STEPS = 30


def _gradients(scale: float) -> np.ndarray:
    """A fixed gradient sequence (STEPS, 4) whose entries span 4 orders of magnitude around `scale`."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((STEPS, 4)) * scale * np.array([1e-2, 1e-1, 1.0, 1e1])).astype(np.float32)


def _run_optax(tx: optax.GradientTransformation, grads: np.ndarray) -> np.ndarray:
    params = jnp.zeros(grads.shape[1], jnp.float32)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params, np.float64)


def _numpy_tf1_adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """TF 1.x ApplyAdam in float64, written from its docstring: lr_t = lr √(1−β₂ᵗ)/(1−β₁ᵗ)."""
    theta = m = v = np.zeros(grads.shape[1])
    for t, g in enumerate(grads.astype(np.float64), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return theta


def _numpy_tf1_rmsprop(grads, lr, decay=0.9, eps=1e-10):
    theta, ms = np.zeros(grads.shape[1]), np.ones(grads.shape[1])
    for g in grads.astype(np.float64):
        ms = decay * ms + (1 - decay) * g * g
        theta = theta - lr * g / np.sqrt(ms + eps)
    return theta


def _tensorflow_v1(name: str, grads: np.ndarray, lr: float) -> np.ndarray:
    tf = pytest.importorskip('tensorflow')
    tf.config.set_visible_devices([], 'GPU')
    var = tf.Variable(np.zeros(grads.shape[1], np.float32))
    opt = {'adam': tf.compat.v1.train.AdamOptimizer, 'rmsprop': tf.compat.v1.train.RMSPropOptimizer}[name](lr)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    return var.numpy().astype(np.float64)


@pytest.mark.parametrize('scale', [1e-9, 1e-6, 1e-2])
def test_tf1_adam_matches_numpy_reference_and_not_optax(scale):
    grads, lr = _gradients(scale), 1e-3
    ours = _run_optax(optim.tf1_adam(lr), grads)
    np.testing.assert_allclose(ours, _numpy_tf1_adam(grads, lr), rtol=2e-5, atol=1e-12)
    if scale <= 1e-6:  # where ε matters, optax's placement is a different optimizer
        assert np.max(np.abs(ours - _run_optax(optax.adam(lr), grads))) > 0.1 * np.max(np.abs(ours))


@pytest.mark.parametrize('scale', [1e-6, 1e-2, 1.0])
def test_tf1_rmsprop_matches_numpy_reference_and_not_optax(scale):
    grads, lr = _gradients(scale), 1e-3
    ours = _run_optax(optim.tf1_rmsprop(lr), grads)
    np.testing.assert_allclose(ours, _numpy_tf1_rmsprop(grads, lr), rtol=2e-5, atol=1e-12)
    if scale <= 1e-2:  # optax's accumulator starts at 0: its early steps are far larger for small gradients
        assert np.max(np.abs(_run_optax(optax.rmsprop(lr), grads))) > 3 * np.max(np.abs(ours))


@pytest.mark.parametrize('name,scale', [('adam', 1e-6), ('adam', 1e-2), ('rmsprop', 1e-2), ('rmsprop', 1.0)])
def test_matches_tensorflow_compat_v1_optimizers(name, scale):
    """The independent reference: TensorFlow's own tf.compat.v1.train optimizers on the same gradients."""
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
    grads, lr = _gradients(scale), 1e-3
    tx = {'adam': optim.tf1_adam, 'rmsprop': optim.tf1_rmsprop}[name](lr)
    np.testing.assert_allclose(_run_optax(tx, grads), _tensorflow_v1(name, grads, lr), rtol=1e-4, atol=1e-12)


def test_schedule_is_accepted():
    schedule = optax.piecewise_constant_schedule(1e-3, {5: 0.1})
    grads = _gradients(1e-2)[:10]
    expected = _numpy_tf1_adam(grads[:5], 1e-3)  # the first 5 steps at the initial rate
    params = _run_optax(optim.tf1_adam(schedule), grads[:5])
    np.testing.assert_allclose(params, expected, rtol=2e-5)
