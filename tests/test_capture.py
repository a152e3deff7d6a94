"""`cwreg.capture`: a named submodule's output from a Linen or NNX model that does not sow it.

Covers: the captured features equal a manual `sow` of the same value, and so does the gradient of a
penalty of them w.r.t. the parameters, under jit (Linen: scope paths as strings and tuples, a nested
path, a `super().__call__`; NNX: attribute paths with list indices, an `nnx.remat` inside the model);
batch statistics and dropout pass through; wrong paths, unused and shared modules give clear errors;
an NNX without `nnx.capture` fails at call time; the README's "In your own training loop" example runs.
"""

from __future__ import annotations

import os
import re

import chex
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cwreg import capture, penalties

N, D, K = 12, 5, 3
X = jax.random.normal(jax.random.key(0), (N, D))
# A padded batch: the last two samples are padding, with id -1 and masked out.
Y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, -1, -1])
WHERE = Y >= 0
LAM = 0.7


def _loss(logits, features):
    """Task loss + λ cw-VR of the features: a penalty whose gradient needs the features' gradient."""
    task = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(Y, 0))
    task = jnp.sum(jnp.where(WHERE, task, 0.0)) / jnp.sum(WHERE)
    return task + LAM * penalties.cw_vr(features, Y, num_classes=K, where=WHERE)


def _close(actual, expected, **kwargs):
    chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-6, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Linen.


class _Scaled(nn.Dense):
    """A layer whose __call__ calls its parent's: both are one call of one module."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class _Backbone(nn.Module):
    sow_features: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        h = nn.Dense(6)(x)  # Dense_1: the layer captured.
        if self.sow_features:
            self.sow('intermediates', 'features', h)
        return nn.relu(h)


class _LinenNet(nn.Module):
    sow_features: bool = False

    @nn.compact
    def __call__(self, x):
        x = _Backbone(self.sow_features, name='backbone')(x)
        return nn.Dense(K)(x)


@pytest.mark.parametrize('path', ['backbone/Dense_1', ('backbone', 'Dense_1')])
def test_linen_equals_sow_value_and_gradient(path):
    variables = _LinenNet().init(jax.random.key(1), X)

    @jax.jit
    def captured(params):
        logits, features = capture.linen_apply(_LinenNet(), {'params': params}, X, path=path)
        return _loss(logits, features), (logits, features)

    @jax.jit
    def sown(params):
        logits, state = _LinenNet(sow_features=True).apply({'params': params}, X, mutable='intermediates')
        (features,) = state['intermediates']['backbone']['features']
        return _loss(logits, features), (logits, features)

    (value, aux), grads = jax.value_and_grad(captured, has_aux=True)(variables['params'])
    (value_sown, aux_sown), grads_sown = jax.value_and_grad(sown, has_aux=True)(variables['params'])
    assert aux[1].shape == (N, 6)
    _close((value, aux), (value_sown, aux_sown))
    _close(grads, grads_sown)


def test_linen_super_call_is_one_call_and_root_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(K)(_Scaled(4, name='scaled')(x))

    variables = Net().init(jax.random.key(2), X)
    output, features = capture.linen_apply(Net(), variables, X, path='scaled')
    dense = variables['params']['scaled']
    _close(features, 2.0 * (X @ dense['kernel'] + dense['bias']))
    output_root, features_root = capture.linen_apply(Net(), variables, X, path='')
    _close(features_root, output)
    _close(output_root, output)


class _LinenTrainNet(nn.Module):
    sow_features: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        if self.sow_features:
            self.sow('intermediates', 'features', h)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
        return nn.Dense(K)(x)


def test_linen_batch_stats_and_dropout_pass_through():
    variables = _LinenTrainNet().init(jax.random.key(3), X, train=False)
    rngs = {'dropout': jax.random.key(4)}

    @jax.jit
    def captured(variables):
        return capture.linen_apply(
            _LinenTrainNet(), variables, X, train=True, path='BatchNorm_0', mutable=['batch_stats'], rngs=rngs
        )

    output, features, updates = captured(variables)
    output_sown, state = _LinenTrainNet(sow_features=True).apply(
        variables, X, train=True, mutable=['batch_stats', 'intermediates'], rngs=rngs
    )
    assert list(updates) == ['batch_stats']  # The capture's own collection does not leak.
    _close(
        (output, features, updates['batch_stats']),
        (output_sown, state['intermediates']['features'][0], state['batch_stats']),
    )
    assert not np.allclose(
        updates['batch_stats']['BatchNorm_0']['mean'], variables['batch_stats']['BatchNorm_0']['mean']
    )
    # Dropout ran with the given key: another key gives another output.
    other, _, _ = capture.linen_apply(
        _LinenTrainNet(),
        variables,
        X,
        train=True,
        path='BatchNorm_0',
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(5)},
    )
    assert not np.allclose(other, output)
    # Evaluation: nothing mutable, a pair back; mutable=True returns every collection but the capture's.
    result = capture.linen_apply(_LinenTrainNet(), variables, X, train=False, path='BatchNorm_0')
    assert len(result) == 2
    _close(result[0], _LinenTrainNet().apply(variables, X, train=False))
    *_, everything = capture.linen_apply(
        _LinenTrainNet(), variables, X, train=False, path='Dense_0', mutable=True
    )
    assert sorted(everything) == ['batch_stats', 'params']


def test_linen_wrong_path_unused_and_shared_modules():
    variables = _LinenNet().init(jax.random.key(1), X)
    with pytest.raises(ValueError, match=r'Dense_7.*called:.*backbone/Dense_1'):
        capture.linen_apply(_LinenNet(), variables, X, path='backbone/Dense_7')
    with pytest.raises(ValueError, match='backbone/Dense_0'):
        capture.linen_apply(_LinenNet(), variables, X, path='Dense_1')  # Dense_1 is inside the backbone.

    class Shared(nn.Module):
        def setup(self):
            self.dense = nn.Dense(D)
            self.unused = nn.Dense(2)

        def __call__(self, x):
            return self.dense(jnp.tanh(self.dense(x)))

    variables = Shared().init(jax.random.key(6), X)
    with pytest.raises(ValueError, match='unused.*called'):
        capture.linen_apply(Shared(), variables, X, path='unused')
    with pytest.raises(ValueError, match='called 2 times.*call_index'):
        capture.linen_apply(Shared(), variables, X, path='dense')
    output, last = capture.linen_apply(Shared(), variables, X, path='dense', call_index=-1)
    _, first = capture.linen_apply(Shared(), variables, X, path='dense', call_index=0)
    _close(last, output)
    dense = variables['params']['dense']
    _close(first, X @ dense['kernel'] + dense['bias'])
    with pytest.raises(ValueError, match='call_index=2'):
        capture.linen_apply(Shared(), variables, X, path='dense', call_index=2)


# ----------------------------------------------------------------------------------------------------------
# NNX.


class _NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sow_features: bool = False, remat: bool = False):
        self.layers = nnx.List([nnx.Linear(D, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)])
        self.head = nnx.Linear(6, K, rngs=rngs)
        self.sow_features = sow_features
        self.remat = remat

    def __call__(self, x):
        x = nnx.relu(self.layers[0](x))
        if self.remat:  # A transform inside the model calls a copy of the captured layer.
            h = nnx.remat(lambda layer, x: layer(x))(self.layers[1], x)
        else:
            h = self.layers[1](x)
        if self.sow_features:
            self.sow(nnx.Intermediate, 'features', h)
        return self.head(nnx.relu(h))


@pytest.mark.parametrize('path, remat', [('layers/1', False), (('layers', 1), True)])
def test_nnx_equals_sow_value_and_gradient(path, remat):

    def captured(model):
        logits, features = capture.nnx_call(model, X, path=path)
        return _loss(logits, features), (logits, features)

    def sown(model):
        logits, state = nnx.capture(model, nnx.Intermediate)(X)
        (features,) = state['features'].get_value()
        return _loss(logits, features), (logits, features)

    model = _NnxNet(nnx.Rngs(0), remat=remat)
    model_sown = _NnxNet(nnx.Rngs(0), sow_features=True, remat=remat)
    (value, aux), grads = nnx.jit(nnx.value_and_grad(captured, has_aux=True))(model)
    (value_sown, aux_sown), grads_sown = nnx.jit(nnx.value_and_grad(sown, has_aux=True))(model_sown)
    assert aux[1].shape == (N, 6)
    _close((value, aux), (value_sown, aux_sown))
    _close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_sown))
    # The class patch is undone: the layer's class computes without sowing again.
    assert not hasattr(nnx.Linear.__call__, '__wrapped__')
    _close(model(X), aux[0])


class _NnxTrainNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sow_features: bool = False):
        self.linear = nnx.Linear(D, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(8, K, rngs=rngs)
        self.sow_features = sow_features

    def __call__(self, x):
        h = self.norm(self.linear(x))
        if self.sow_features:
            self.sow(nnx.Intermediate, 'features', h)
        return self.head(self.dropout(nnx.relu(h)))


def test_nnx_batch_stats_and_dropout_pass_through():
    model, model_sown = _NnxTrainNet(nnx.Rngs(0)), _NnxTrainNet(nnx.Rngs(0), sow_features=True)
    mean_before = model.norm.mean[...]
    output, features = nnx.jit(lambda m: capture.nnx_call(m, X, path='norm'))(model)
    output_sown, state = nnx.jit(lambda m: nnx.capture(m, nnx.Intermediate)(X))(model_sown)
    _close((output, features), (output_sown, state['features'].get_value()[0]))
    for kind in (nnx.BatchStat, nnx.RngCount):  # Both models advanced alike.
        _close(nnx.to_pure_dict(nnx.state(model, kind)), nnx.to_pure_dict(nnx.state(model_sown, kind)))
    assert not np.allclose(model.norm.mean[...], mean_before)  # Batch statistics were updated in place.
    again, _ = nnx.jit(lambda m: capture.nnx_call(m, X, path='norm'))(model)
    assert not np.allclose(again, output)  # The dropout RNG stream advanced too.
    model.eval()
    evaluated, features = capture.nnx_call(model, X, path='linear')
    _close(evaluated, model(X))
    _close(features, model.linear(X))


def test_nnx_wrong_path_unused_and_shared_modules(monkeypatch):
    model = _NnxNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r'layers/2.*paths:.*layers/1'):
        capture.nnx_call(model, X, path='layers/2')

    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(D, D, rngs=rngs)
            self.unused = nnx.Linear(D, 2, rngs=rngs)

        def __call__(self, x):
            return self.linear(jnp.tanh(self.linear(x)))

    model = Shared(nnx.Rngs(1))
    with pytest.raises(ValueError, match='unused.*not called'):
        capture.nnx_call(model, X, path='unused')
    with pytest.raises(ValueError, match='called 2 times.*call_index'):
        capture.nnx_call(model, X, path='linear')
    output, last = capture.nnx_call(model, X, path='linear', call_index=1)
    _, first = capture.nnx_call(model, X, path=('linear',), call_index=0)
    _close(last, output)
    _close(first, model.linear(X))
    output_root, root = capture.nnx_call(model, X, path='')
    _close((output_root, root), (output, output))
    # A flax without nnx.capture fails when called, with a message that says so.
    monkeypatch.delattr(nnx, 'capture')
    with pytest.raises(ImportError, match='nnx.capture'):
        capture.nnx_call(model, X, path='linear')


# ----------------------------------------------------------------------------------------------------------
# The README's example.


def test_readme_own_training_loop_example_runs():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
    with open(readme, encoding='utf-8') as f:
        text = f.read()
    section = text.split('\n## In your own training loop\n', 1)
    assert len(section) == 2, 'README.md has no "## In your own training loop" section'
    section = section[1].split('\n## ', 1)[0]
    block = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert block, 'no ```python block in the README section "In your own training loop"'
    assert len(block.group(1).splitlines()) <= 45
    exec(compile(block.group(1), 'README.md (In your own training loop)', 'exec'), {'__name__': '__readme__'})
