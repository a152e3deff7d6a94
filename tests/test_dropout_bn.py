"""Dropout, batch norm and the initializer options of the MLP and CNN, in the models and in the trainer.

Model-level checks run on tiny models (milliseconds); trainer-level ones train the 1k-example MNIST MLP of
tests/test_train.py (mock data, 10 steps per epoch) for one or two epochs. The 4-device check trains in a
subprocess (the device count is fixed before JAX starts) and compares with the same run on this process's
single device.

Each test names the mutation of the code it was seen to catch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for path in (REPO_ROOT, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import test_train as tt  # noqa: E402  (its mock-data helpers; pytest collects only its own module's tests)
from configs import cifar10_cnn, default, mnist_autoencoder, resnet  # noqa: E402
from cwreg import models, train  # noqa: E402
from cwreg.models import CNN, MLP  # noqa: E402

MNIST = (28, 28, 1)


def _images(n: int, shape=MNIST, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32)


def _apply_train(model, variables, x, rate, key, **kwargs):
    """model.apply in training mode: (outputs, sown intermediates, new batch_stats or None)."""
    mutable = ['intermediates'] + (['batch_stats'] if 'batch_stats' in variables else [])
    out, state = model.apply(variables, x, train=True, dropout_rate=rate, rngs={'dropout': key},
                             mutable=mutable, **kwargs)
    return out, {k: v[0] for k, v in state['intermediates'].items()}, state.get('batch_stats')


# ----------------------------------------------------------------------------------------------------------
# Dropout in the model.


def test_dropout_drops_the_rate_and_scales_the_kept_units():
    """Mutations caught: no 1/(1 - rate) scaling; keep = u < rate (the rate kept, not dropped)."""
    h = jnp.full((400, 250), 3.0)
    for rate in (0.1, 0.5, 0.8):
        out = np.asarray(models.dropout(h, jnp.float32(rate), jax.random.key(0), jnp.arange(400)))
        dropped = np.mean(out == 0)
        # 100k Bernoulli(rate) draws: the standard error is < 0.0016.
        assert abs(dropped - rate) < 0.01, (rate, dropped)
        np.testing.assert_allclose(out[out != 0], 3.0 / (1.0 - rate), rtol=1e-6)


def test_each_example_mask_depends_only_on_its_id():
    """An example's mask is a function of (key, its id): not of its batch, not shared with other examples.

    Mutations caught: one mask for the whole batch (every example the same), masks from the position in
    the local batch (example_ids ignored).
    """
    h, ids, key = jnp.ones((6, 50)), jnp.array([7, 3, 12, 0, 5, 9]), jax.random.key(1)
    out = np.asarray(models.dropout(h, 0.5, key, ids))
    assert len({row.tobytes() for row in out}) == 6  # identical inputs, six different masks
    for n in range(6):
        alone = models.dropout(h[n:n + 1], 0.5, key, ids[n:n + 1])
        np.testing.assert_array_equal(alone[0], out[n])
    perm = np.array([4, 2, 0, 5, 1, 3])
    np.testing.assert_array_equal(models.dropout(h[perm], 0.5, key, ids[perm]), out[perm])


def test_dropout_is_active_in_training_and_off_in_evaluation():
    """Mutations caught: dropout applied at evaluation; the same mask at every step (key ignored)."""
    model = MLP(width=64, depth=3, dropout=True)
    plain = MLP(width=64, depth=3)
    x = _images(8)
    variables = model.init(jax.random.key(0), x)
    a, inter_a, _ = _apply_train(model, variables, x, 0.5, jax.random.key(1))
    b, _, _ = _apply_train(model, variables, x, 0.5, jax.random.key(2))
    assert not np.allclose(a, b), 'two dropout keys gave the same outputs'
    again, _, _ = _apply_train(model, variables, x, 0.5, jax.random.key(1))
    np.testing.assert_array_equal(a, again)  # a function of the key
    reference, reference_state = plain.apply(variables, x, train=True, mutable=['intermediates'])
    assert not np.allclose(a, reference)
    # The sown representations are the pre-dropout ones: the first layer's does not see the mask.
    np.testing.assert_array_equal(inter_a['layer1'], reference_state['intermediates']['layer1'][0])
    # Evaluation: no dropout, whatever rate or key is passed, and the model without dropout.
    evaluated = model.apply(variables, x, train=False, dropout_rate=0.5, rngs={'dropout': jax.random.key(1)})
    np.testing.assert_array_equal(evaluated, plain.apply(variables, x))
    np.testing.assert_array_equal(model.apply(variables, x), plain.apply(variables, x))


@pytest.mark.parametrize('make', [lambda **kw: MLP(width=32, depth=2, **kw),
                                  lambda **kw: CNN(fc_width=16, **kw)], ids=['mlp', 'cnn'])
def test_rate_zero_equals_no_dropout_bitwise_values_and_gradients(make):
    """Mutation caught: out = h * keep / (1 - rate + 1e-7) (a 'safe' division that rescales by ~1e-7)."""
    shape = MNIST if make().__class__ is MLP else (8, 8, 3)
    x = _images(4, shape)
    model, plain = make(dropout=True), make()
    variables = plain.init(jax.random.key(0), x)

    def loss(params, with_dropout):
        if with_dropout:
            out = model.apply({'params': params}, x, train=True, dropout_rate=jnp.float32(0.0),
                              rngs={'dropout': jax.random.key(3)})
        else:
            out = plain.apply({'params': params}, x, train=True)
        return jnp.sum(jnp.sin(out))

    got = jax.jit(jax.value_and_grad(functools.partial(loss, with_dropout=True)))(variables['params'])
    want = jax.jit(jax.value_and_grad(functools.partial(loss, with_dropout=False)))(variables['params'])
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_dropout_needs_a_rate_in_training():
    model = MLP(width=8, depth=1, dropout=True)
    variables = model.init(jax.random.key(0), _images(2))
    with pytest.raises(ValueError, match='dropout_rate'):
        model.apply(variables, _images(2), train=True, rngs={'dropout': jax.random.key(0)})


# ----------------------------------------------------------------------------------------------------------
# Batch norm in the model.


def _bn_mlp_after_a_step():
    """An MLP with batch norm whose running averages moved away from (0, 1), and a test batch."""
    model = MLP(width=16, depth=2, batchnorm=True)
    x = _images(32, seed=4)
    variables = model.init(jax.random.key(0), x)
    for _ in range(3):
        _, state = model.apply(variables, x * 2.0 + 0.3, train=True, mutable=['batch_stats'])
        variables = {'params': variables['params'], 'batch_stats': state['batch_stats']}
    return model, variables, _images(8, seed=5)


def test_batchnorm_sits_before_the_relu_and_normalizes_with_batch_statistics_in_training():
    """Mutations caught: BN after the ReLU; momentum 0.99 (flax's default) instead of 0.9."""
    model = MLP(width=16, depth=2, batchnorm=True)
    x = _images(32, seed=4)
    variables = model.init(jax.random.key(0), x)
    assert set(variables['params']) == {'dense1', 'bn1', 'dense2', 'bn2', 'dense3'}
    assert 'bias' not in variables['params']['dense1']  # BN's offset is the hidden layers' bias
    _, inter, stats = _apply_train(model, variables, x, None, jax.random.key(0))
    preact = np.asarray(inter['layer1_preact'])  # BN's output (scale 1, offset 0 at init)
    np.testing.assert_allclose(preact.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(preact.var(0), 1.0, rtol=1e-2)
    np.testing.assert_array_equal(inter['layer1'], np.maximum(preact, 0.0))
    dense = x.reshape(32, -1) @ variables['params']['dense1']['kernel']
    np.testing.assert_allclose(stats['bn1']['mean'], 0.1 * np.asarray(dense).mean(0), rtol=1e-4, atol=1e-6)


def test_batchnorm_evaluation_uses_running_averages():
    """Eval output of an example does not depend on the rest of its batch, and is the running-average
    formula; so are the sown representations. Mutation caught: use_running_average=False at evaluation."""
    model, variables, x = _bn_mlp_after_a_step()
    out, state = model.apply(variables, x, mutable=['intermediates'])
    for n in range(len(x)):
        np.testing.assert_allclose(model.apply(variables, x[n:n + 1])[0], out[n], rtol=1e-6, atol=1e-6)
    stats, params = variables['batch_stats']['bn1'], variables['params']['bn1']
    dense = x.reshape(8, -1) @ variables['params']['dense1']['kernel']
    expected = (dense - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']
    np.testing.assert_allclose(state['intermediates']['layer1_preact'][0], expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(stats['mean'])).max() > 1e-3  # the running averages did move


# ----------------------------------------------------------------------------------------------------------
# Initializers.


def _kernels_and_biases(params):
    kernels = {'/'.join(str(k.key) for k in p[:-1]): v for p, v in jax.tree_util.tree_leaves_with_path(params)
               if p[-1].key == 'kernel'}
    biases = [v for p, v in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == 'bias']
    return kernels, biases


@pytest.mark.parametrize('model,shape', [
    (MLP(width=300, depth=2, kernel_init='glorot_uniform', bias_init=0.25), MNIST),
    (CNN(fc_width=64, kernel_init='glorot_uniform', bias_init=0.25), (32, 32, 3)),
    (models.Autoencoder(kernel_init='glorot_uniform', bias_init=0.25), MNIST),
], ids=['mlp', 'cnn', 'autoencoder'])
def test_glorot_uniform_has_tf_limit_and_variance_and_bias_init_is_constant(model, shape):
    """TF's glorot_uniform: U(-l, l), l = sqrt(6 / (fan_in + fan_out)), fans times the receptive field for
    convolutions; variance l² / 3. Mutations caught: fan_in only (LeCun uniform); a normal draw."""
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))['params']
    kernels, biases = _kernels_and_biases(params)
    for name, w in kernels.items():
        w = np.asarray(w)
        receptive = math.prod(w.shape[:-2])
        fan_in, fan_out = receptive * w.shape[-2], receptive * w.shape[-1]
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit, name
        # max of n uniform draws: within limit·(1 - 10/n) but for a 1e-4 chance
        assert np.abs(w).max() >= limit * (1 - 10.0 / w.size), name
        np.testing.assert_allclose(w.var(), limit**2 / 3, rtol=6 / math.sqrt(w.size) + 1e-3, err_msg=name)
    assert biases and all(np.all(np.asarray(b) == 0.25) for b in biases)


def test_lecun_normal_default_and_batchnorm_layers_have_no_bias():
    """The default is flax's: a truncated normal of variance 1 / fan_in (Dense layers keep their biases)."""
    params = jax.jit(MLP(width=300, depth=1).init)(jax.random.key(0), jnp.zeros((1, *MNIST)))['params']
    w = np.asarray(params['dense1']['kernel'])
    np.testing.assert_allclose(w.var(), 1 / 784, rtol=0.02)
    assert np.abs(w).max() <= 2 / math.sqrt(784) / 0.87962566103423978 + 1e-6  # truncated at 2σ
    bn = jax.jit(CNN(fc_width=8, batchnorm=True, bias_init=0.5).init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert all('bias' not in bn['params'][f'Conv_{i}'] for i in range(1, 5)) and 'bias' not in bn['params']['Dense_fc']
    np.testing.assert_array_equal(bn['params']['Dense_logits']['bias'], 0.5)
    np.testing.assert_array_equal(bn['params']['BatchNorm_fc']['bias'], 0.0)
