"""Dropout, batch norm and the initializer options of the MLP and CNN, in the models and in the trainer.

Model-level checks run on tiny models (milliseconds); trainer-level ones train the 1k-example MNIST MLP of
tests/test_train.py (mock data, 10 steps per epoch) for one or two epochs. The 4-device check trains in a
subprocess (the device count is fixed before JAX starts) and compares with the same run on this process's
single device.

Each test names the mutation of the code it was seen to catch.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for path in (REPO_ROOT, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import test_train as tt  # noqa: E402  (its mock-data helpers; pytest collects only its own module's tests)

from configs import cifar10_cnn, default, mnist_autoencoder, mnist_mlp, resnet  # noqa: E402
from cwreg import names  # noqa: E402
from cwreg.training import config as config_lib  # noqa: E402
from cwreg.training import loop, models, registry  # noqa: E402
from cwreg.training import step as step_lib  # noqa: E402
from cwreg.training.models import CNN, MLP  # noqa: E402

MNIST = (28, 28, 1)


def _images(n: int, shape=MNIST, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32)


def _apply_train(model, variables, x, rate, key, **kwargs):
    """model.apply in training mode: (outputs, sown intermediates, new batch_stats or None)."""
    mutable = ['intermediates'] + (['batch_stats'] if 'batch_stats' in variables else [])
    out, state = model.apply(
        variables, x, train=True, dropout_rate=rate, rngs={'dropout': key}, mutable=mutable, **kwargs
    )
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
        alone = models.dropout(h[n : n + 1], 0.5, key, ids[n : n + 1])
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


@pytest.mark.parametrize(
    'make',
    [lambda **kw: MLP(width=32, depth=2, **kw), lambda **kw: CNN(fc_width=16, **kw)],
    ids=['mlp', 'cnn'],
)
def test_rate_zero_equals_no_dropout_bitwise_values_and_gradients(make):
    """Mutation caught: out = h * keep / (1 - rate + 1e-7) (a 'safe' division that rescales by ~1e-7)."""
    shape = MNIST if make().__class__ is MLP else (8, 8, 3)
    x = _images(4, shape)
    model, plain = make(dropout=True), make()
    variables = plain.init(jax.random.key(0), x)

    def loss(params, with_dropout):
        if with_dropout:
            out = model.apply(
                {'params': params},
                x,
                train=True,
                dropout_rate=jnp.float32(0.0),
                rngs={'dropout': jax.random.key(3)},
            )
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
        np.testing.assert_allclose(model.apply(variables, x[n : n + 1])[0], out[n], rtol=1e-6, atol=1e-6)
    stats, params = variables['batch_stats']['bn1'], variables['params']['bn1']
    dense = x.reshape(8, -1) @ variables['params']['dense1']['kernel']
    expected = (dense - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']
    np.testing.assert_allclose(state['intermediates']['layer1_preact'][0], expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(stats['mean'])).max() > 1e-3  # the running averages did move


# ----------------------------------------------------------------------------------------------------------
# Initializers.


def _kernels_and_biases(params):
    kernels = {
        '/'.join(str(k.key) for k in p[:-1]): v
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if p[-1].key == 'kernel'
    }
    biases = [v for p, v in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == 'bias']
    return kernels, biases


@pytest.mark.parametrize(
    'model,shape',
    [
        (MLP(width=300, depth=2, kernel_init='glorot_uniform', bias_init=0.25), MNIST),
        (CNN(fc_width=64, kernel_init='glorot_uniform', bias_init=0.25), (32, 32, 3)),
        (models.Autoencoder(kernel_init='glorot_uniform', bias_init=0.25), MNIST),
    ],
    ids=['mlp', 'cnn', 'autoencoder'],
)
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
    bn = jax.jit(CNN(fc_width=8, batchnorm=True, bias_init=0.5).init)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3))
    )
    assert (
        all('bias' not in bn['params'][f'Conv_{i}'] for i in range(1, 5))
        and 'bias' not in bn['params']['Dense_fc']
    )
    np.testing.assert_array_equal(bn['params']['Dense_logits']['bias'], 0.5)
    np.testing.assert_array_equal(bn['params']['BatchNorm_fc']['bias'], 0.0)


# ----------------------------------------------------------------------------------------------------------
# Config: the registry, validation, groups.


def test_set_regularizer_turns_on_exactly_one_and_run_identity_reports_it():
    config = default.get_config()
    assert names.REGULARIZERS[:5] == ('baseline', 'l1w', 'l2w', 'dropout', 'batchnorm')
    names.set_regularizer(config, 'dropout', 0.3)
    assert (config.model.dropout, config.model.batchnorm, config.penalty.name) == (0.3, False, 'none')
    assert (
        registry.run_identity(config)['regularizer'] == 'dropout'
        and registry.regularizer_weight(config) == 0.3
    )
    names.set_regularizer(config, 'batchnorm', 0.0)
    assert (config.model.dropout, config.model.batchnorm) == (0.0, True)
    assert (registry.regularizer_name(config), registry.regularizer_weight(config)) == ('batchnorm', 0.0)
    for other, weight in (('cw_vr', 0.1), ('l2w', 1e-3), ('baseline', 0.0)):
        names.set_regularizer(config, 'dropout', 0.3)
        names.set_regularizer(config, other, weight)
        assert (config.model.dropout, config.model.batchnorm) == (0.0, False), other
        assert (registry.regularizer_name(config), registry.regularizer_weight(config)) == (other, weight)
    names.set_regularizer(config, 'batchnorm', 0.0)
    names.set_regularizer(config, 'cr', 0.1)
    assert not config.model.batchnorm
    # results.json of runs recorded before these fields: still named by their penalties.
    old = ml_collections.ConfigDict(default.get_config().to_dict())
    del old.model['dropout'], old.model['batchnorm']
    assert registry.regularizer_name(old) == 'baseline'


def test_model_from_config_builds_the_dropout_and_batchnorm_layers():
    config = default.get_config()
    config.model.dropout, config.model.batchnorm, config.model.kernel_init = 0.2, True, 'glorot_uniform'
    model = config_lib.model_from_config(config, 10)
    assert (model.dropout, model.batchnorm, model.bn_axis_name, model.kernel_init) == (
        True,
        True,
        config_lib.AXIS,
        'glorot_uniform',
    )
    assert config_lib.model_from_config(default.get_config(), 10) == MLP(width=100, depth=5)
    config = cifar10_cnn.get_config('cw_vr')
    config.model.bias_init = 0.1
    config.model.dropout = 0.5
    model = config_lib.model_from_config(config, 10)
    assert (model.dropout, model.batchnorm, model.bias_init) == (True, False, 0.1)


@pytest.mark.parametrize(
    'family,field,value',
    [
        ('resnet', 'dropout', 0.5),
        ('resnet', 'batchnorm', True),
        ('resnet', 'kernel_init', 'glorot_uniform'),
        ('resnet', 'bias_init', 0.1),
        ('autoencoder', 'dropout', 0.5),
        ('autoencoder', 'batchnorm', True),
    ],
)
def test_families_without_the_option_reject_it(family, field, value):
    config = {'resnet': resnet, 'autoencoder': mnist_autoencoder}[family].get_config('cw_vr')
    config.model[field] = value
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate_config(config)
    message = str(error.value)
    assert f'config.model.{field}' in message and repr(family) in message and repr(value) in message, message
    assert "'mlp'" in message, message  # what accepts it


@pytest.mark.parametrize('rate', [1.0, -0.1, 1.5, float('nan')])
def test_dropout_rate_outside_zero_one_is_rejected(rate):
    config = default.get_config()
    names.set_regularizer(config, 'dropout', rate)
    with pytest.raises(config_lib.ConfigError, match=r'config\.model\.dropout must be a rate in \[0, 1\)'):
        config_lib.validate_config(config)


def test_group_key_ignores_the_dropout_rate_but_not_whether_there_is_dropout():
    configs = [default.get_config() for _ in range(3)]
    for config, rate in zip(configs, (0.2, 0.5, 0.0)):
        names.set_regularizer(config, 'dropout', rate)
    keys = [registry._group_key(c) for c in configs]
    assert keys[0] == keys[1] != keys[2]
    bn = default.get_config()
    names.set_regularizer(bn, 'batchnorm', 0.0)
    assert registry._group_key(bn) not in keys


# ----------------------------------------------------------------------------------------------------------
# Training with dropout and batch norm.


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """The 1k MLP of tests/test_train.py (10 steps an epoch, chunks of 4), one epoch, with `overrides`."""
    return tt._small_mlp_config(data_dir, **{'num_epochs': 1, **overrides})


def _final_state(group_dir: str, step: int = 1):
    return tt._restore_checkpoint(group_dir, step=step)['state']


def test_rate_zero_trains_bitwise_as_without_dropout(tmp_path, monkeypatch):
    """A model WITH dropout layers at rate 0 trains (whole train_group) exactly as the model without.

    Mutation caught: the trainer feeding a rate other than config.model.dropout to the layers.
    """
    data_dir, config = str(tmp_path / 'tfds'), _config(str(tmp_path / 'tfds'))
    with tt._mock_tfds(tt._NUM_TRAIN, tt._NUM_TEST):
        plain = loop.train_and_evaluate(config, str(tmp_path / 'plain'))
        built = []
        original = config_lib.model_from_config

        def with_dropout_layers(config, num_classes):
            built.append(original(config, num_classes).clone(dropout=True))
            return built[-1]

        monkeypatch.setattr(config_lib, 'model_from_config', with_dropout_layers)
        dropped = loop.train_and_evaluate(_config(data_dir), str(tmp_path / 'rate0'))
    assert built and all(m.dropout for m in built)
    for key in ('loss', 'error', 'penalty_value', 'steps'):
        assert dropped[key] == plain[key], key
    jax.tree.map(
        np.testing.assert_array_equal,
        _final_state(str(tmp_path / 'rate0')),
        _final_state(str(tmp_path / 'plain')),
    )


def test_resumed_run_with_dropout_and_batchnorm_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """Dropout masks are a function of (seed, step, example), not of the process or of how steps are
    dispatched: resuming after epoch 1 with another steps_per_dispatch ends bitwise equal.

    Mutation caught: the dropout key folded with the step's place in its chunk instead of the step.
    """
    data_dir = str(tmp_path / 'tfds')
    shaping = {'model.dropout': 0.3, 'model.batchnorm': True}
    with tt._mock_tfds(tt._NUM_TRAIN, tt._NUM_TEST):
        reference = loop.train_and_evaluate(_config(data_dir, num_epochs=2, **shaping), str(tmp_path / 'ref'))
        loop.train_and_evaluate(_config(data_dir, **shaping), str(tmp_path / 'run'))
        with tt._record_epochs(monkeypatch) as epochs:
            resumed = loop.train_and_evaluate(
                _config(data_dir, num_epochs=2, steps_per_dispatch=10, **shaping), str(tmp_path / 'run')
            )
    assert epochs == [1]
    for key in ('loss', 'error', 'penalty_value', 'steps'):
        assert resumed[key] == reference[key], key
    final = _final_state(str(tmp_path / 'run'), step=2)
    assert final['batch_stats'] is not None
    jax.tree.map(np.testing.assert_array_equal, final, _final_state(str(tmp_path / 'ref'), step=2))


def test_group_of_dropout_rates_equals_the_runs_trained_one_by_one(tmp_path):
    """Runs with different dropout rates (and batch norm) train as one vmapped group, each as it trains alone.

    Mutation caught: one rate (the first run's) for the whole group.
    """
    data_dir = str(tmp_path / 'tfds')
    configs = [
        _config(data_dir, **{'model.dropout': 0.2, 'model.batchnorm': True}),
        _config(data_dir, seed=1, **{'model.dropout': 0.6, 'model.batchnorm': True}),
    ]
    with tt._mock_tfds(tt._NUM_TRAIN, tt._NUM_TEST):
        grouped = loop.train_group(
            configs, [str(tmp_path / f'g{i}') for i in range(2)], str(tmp_path / 'group')
        )
        separate = [loop.train_and_evaluate(c, str(tmp_path / f's{i}')) for i, c in enumerate(configs)]
    group_state = _final_state(str(tmp_path / 'group'))
    for r, (g, s) in enumerate(zip(grouped, separate)):
        assert (
            (g['regularizer'], g['weight'])
            == (s['regularizer'], s['weight'])
            == ('cw_vr', mnist_mlp.WEIGHTS['cw_vr'])
        )
        assert g['config']['model']['dropout'] == configs[r].model.dropout
        np.testing.assert_allclose(g['loss'], s['loss'], rtol=1e-5)
        alone = _final_state(str(tmp_path / f's{r}'))
        for part in ('params', 'batch_stats'):
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a[r], b[0], rtol=1e-5, atol=1e-6),
                group_state[part],
                alone[part],
            )
    assert grouped[0]['loss'] != grouped[1]['loss']


_DEVICES_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax
    import test_dropout_bn as T
    from cwreg.training import config as config_lib
    from cwreg.training import step as step_lib
    from cwreg.training import registry
    from cwreg.training import loop
    from cwreg import names
    assert jax.device_count() == 4, jax.devices()
    with T.tt._mock_tfds(T.tt._NUM_TRAIN, T.tt._NUM_TEST):
        loop.train_and_evaluate(T._multidevice_config(sys.argv[2]), sys.argv[3])
""")


def _multidevice_config(data_dir: str) -> ml_collections.ConfigDict:
    """Dropout and batch norm, plain SGD (its update is the gradient), 6 steps in chunks of 4 and 2."""
    return _config(
        data_dir,
        num_train_steps=6,
        **{
            'model.dropout': 0.4,
            'model.batchnorm': True,
            'optimizer.name': 'sgd',
            'optimizer.learning_rate': 0.1,
        },
    )


def test_four_devices_train_as_one_with_dropout_and_batchnorm(tmp_path):
    """Dropout masks drawn per global example with a key shared by the devices, and batch statistics
    averaged over them: 4 devices (25 examples each) end with 1 device's parameters and statistics.

    Mutations caught: the dropout key folded with the device index; BatchNorm without axis_name.
    """
    workdirs = {n: str(tmp_path / f'devices{n}') for n in (1, 4)}
    script = tmp_path / 'four_devices.py'
    script.write_text(_DEVICES_SCRIPT)
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=4',
        JAX_PLATFORMS='cpu',
        CUDA_VISIBLE_DEVICES='',
        PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), TESTS_DIR, str(tmp_path / 'tfds4'), workdirs[4]],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:  # the one-device run trains meanwhile
        config = _multidevice_config(str(tmp_path / 'tfds1'))
        with tt._mock_tfds(tt._NUM_TRAIN, tt._NUM_TEST):
            one = loop.train_and_evaluate(config, workdirs[1])
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-6000:]
    four = tt._read_results(workdirs[4])
    np.testing.assert_allclose(four['loss'], one['loss'], rtol=1e-5)
    assert four['error'] == one['error']
    states = {n: tt._restore_checkpoint(w)['state'] for n, w in workdirs.items()}
    initial = step_lib.initial_state(
        step_lib.Task.from_config(config, 10),
        config_lib.create_optimizer(config),
        np.zeros((1, *MNIST), np.float32),
        config.seed,
    )
    for (path, p4), p1, p0 in zip(
        jax.tree_util.tree_leaves_with_path(states[4]['params']),
        jax.tree.leaves(states[1]['params']),
        jax.tree.leaves(initial.params),
    ):
        update4, update1 = p4[0] - np.asarray(p0), p1[0] - np.asarray(p0)
        scale = np.abs(update1).max()
        np.testing.assert_allclose(
            update4 / scale,
            update1 / scale,
            rtol=0,
            atol=1e-4,
            err_msg=f'update of {jax.tree_util.keystr(path)}',
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        states[4]['batch_stats'],
        states[1]['batch_stats'],
    )
