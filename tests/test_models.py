"""Tests for cwreg.training.models: shapes, sown names, parameter counts, BatchNorm behaviour, registry.

Parameter counts are recomputed here from the architectures (paper appendix A.2/A.3, He et al. 2016 sec. 4.2)
rather than copied from the implementation. Batches are 2 images; ResNet-32/110 are only traced with
``jax.eval_shape`` (names, shapes, counts), and ResNet behaviour (BN, shortcuts, jit) is run on a ResNet-8
(n=1) with 16x16 images so the file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cwreg.training import models
from cwreg.training.models import CNN, MLP, MODELS, PREACT_SUFFIX, Autoencoder, ResNet, create_model

N = 2
MNIST_SHAPE = (N, 28, 28, 1)
CIFAR_SHAPE = (N, 32, 32, 3)
SMALL = 16  # Spatial size of the ResNet-8 behavioural tests, to keep them fast.


def _images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv3x3(c_in: int, c_out: int, bias: bool = True) -> int:
    return 9 * c_in * c_out + (c_out if bias else 0)


def _expected_resnet_params(depth: int, num_classes: int = 10) -> int:
    """He et al. 2016 sec. 4.2: bias-free convs, BN (scale + offset), option-A shortcuts (no params)."""
    n = (depth - 2) // 6
    bn = lambda c: 2 * c  # noqa: E731
    total = _conv3x3(3, 16, bias=False) + bn(16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += _conv3x3(c_in, c, bias=False) + bn(c) + _conv3x3(c, c, bias=False) + bn(c)
            c_in = c
    return total + _dense(64, num_classes)


# Exact counts asserted below; the formula above reproduces them and they round to He et al.'s figures.
RESNET32_PARAMS = 464_154
RESNET110_PARAMS = 1_727_962


def _init_shapes(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))


@pytest.fixture(scope='module')
def mlp_run():
    model = MLP()
    x = _images(MNIST_SHAPE)
    variables = model.init(jax.random.key(1), x)
    out, state = model.apply(variables, x, mutable=['intermediates'])
    return model, variables, x, out, state


@pytest.fixture(scope='module')
def cnn_run():
    model = CNN()
    x = _images(CIFAR_SHAPE)
    variables = model.init(jax.random.key(2), x)
    out, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(variables, x)
    return model, variables, x, out, state


@pytest.fixture(scope='module')
def autoencoder_run():
    model = Autoencoder()
    x = _images(MNIST_SHAPE)
    variables = model.init(jax.random.key(3), x)
    out, state = model.apply(variables, x, mutable=['intermediates'])
    return model, variables, x, out, state


@pytest.fixture(scope='module')
def resnet32_shapes():
    """ResNet-32 traced abstractly (no compilation): enough for names, shapes and parameter counts."""
    model = ResNet(depth=32)
    x = jax.ShapeDtypeStruct(CIFAR_SHAPE, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(4), x)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, x)
    return model, variables, x, out, state


@pytest.fixture(scope='module')
def resnet8():
    """A small ResNet (n=1) for behavioural tests; its parameters do not depend on the image size."""
    model = ResNet(depth=8)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SMALL, SMALL, 3)))
    return model, variables


@pytest.fixture(scope='module')
def resnet8_run(resnet8):
    model, variables = resnet8
    x = _images((N, SMALL, SMALL, 3), seed=10)
    out, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(variables, x)
    return model, variables, x, out, state


# ----------------------------------------------------------------------------------------------------------
# Sown names and shapes.


def _sown_shapes(state) -> dict[str, tuple[int, ...]]:
    inter = state['intermediates']
    # The documented flax 0.12.8 layout: a flat dict, each value a 1-tuple holding the array.
    for name, value in inter.items():
        assert isinstance(value, tuple) and len(value) == 1, (name, type(value))
    return {name: tuple(value[0].shape) for name, value in inter.items()}


def test_mlp_sown_names_and_shapes(mlp_run):
    model, variables, _, out, state = mlp_run
    expected = {f'layer{i}': (N, 100) for i in range(1, 6)}
    expected.update({f'layer{i}_preact': (N, 100) for i in range(1, 6)})
    expected['layer6'] = (N, 10)
    assert _sown_shapes(state) == expected
    assert out.shape == (N, 10)
    assert model.layer_names() == MLP.LAYERS == ('layer1', 'layer2', 'layer3', 'layer4', 'layer5', 'layer6')
    assert set(model.preact_names()) == {f'layer{i}{PREACT_SUFFIX}' for i in range(1, 6)}
    np.testing.assert_array_equal(state['intermediates']['layer6'][0], out)
    assert set(variables) == {'params'}  # init does not return 'intermediates'.


def test_mlp_names_follow_depth():
    model = MLP(depth=2, width=7, num_classes=3)
    x = _images((N, 4, 4, 1))
    variables = model.init(jax.random.key(0), x)
    out, state = model.apply(variables, x, mutable=['intermediates'])
    assert model.layer_names() == ('layer1', 'layer2', 'layer3')
    assert _sown_shapes(state) == {
        'layer1': (N, 7),
        'layer1_preact': (N, 7),
        'layer2': (N, 7),
        'layer2_preact': (N, 7),
        'layer3': (N, 3),
    }
    np.testing.assert_array_equal(state['intermediates']['layer3'][0], out)
    assert _count(variables['params']) == _dense(16, 7) + _dense(7, 7) + _dense(7, 3)


def test_cnn_sown_names_and_shapes(cnn_run):
    model, _, _, out, state = cnn_run
    post = {
        'conv1': (N, 32, 32, 32),
        'conv2': (N, 32, 32, 64),
        'conv3': (N, 16, 16, 128),
        'conv4': (N, 8, 8, 128),
        'fc': (N, 128),
    }
    expected = dict(post)
    expected.update({f'{k}_preact': v for k, v in post.items()})
    expected['logits'] = (N, 10)
    assert _sown_shapes(state) == expected
    assert out.shape == (N, 10)
    assert model.layer_names() == CNN.LAYERS == ('conv1', 'conv2', 'conv3', 'conv4', 'fc', 'logits')
    assert set(model.preact_names()) == {f'{k}_preact' for k in post}
    np.testing.assert_array_equal(state['intermediates']['logits'][0], out)


def test_autoencoder_sown_names_and_shapes(autoencoder_run):
    model, _, _, out, state = autoencoder_run
    widths = (400, 200, 100, 200, 400)
    expected = {f'layer{i}': (N, w) for i, w in enumerate(widths, start=1)}
    expected.update({f'layer{i}_preact': (N, w) for i, w in enumerate(widths, start=1)})
    expected['layer6'] = (N, 784)
    assert _sown_shapes(state) == expected
    assert model.layer_names() == Autoencoder.LAYERS
    assert state['intermediates']['layer3'][0].shape == (N, 100)  # The regularized code.
    assert out.shape == (N, 784)
    np.testing.assert_array_equal(state['intermediates']['layer6'][0], out)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_resnet_sown_names_and_shapes(resnet32_shapes):
    model, variables, _, out, state = resnet32_shapes
    post = {'stage1': (N, 32, 32, 16), 'stage2': (N, 16, 16, 32), 'stage3': (N, 8, 8, 64)}
    expected = dict(post)
    expected.update({f'{k}_preact': v for k, v in post.items()})
    expected.update({'pool': (N, 64), 'logits': (N, 10)})
    assert _sown_shapes(state) == expected
    assert out.shape == (N, 10)
    assert model.layer_names() == ResNet.LAYERS == ('stage1', 'stage2', 'stage3', 'pool', 'logits')
    assert set(variables) == {'params', 'batch_stats'}


def test_resnet_sown_values(resnet8_run):
    model, _, _, out, state = resnet8_run
    inter = {k: v[0] for k, v in state['intermediates'].items()}
    assert set(inter) == set(model.layer_names()) | set(model.preact_names())
    np.testing.assert_array_equal(inter['logits'], out)
    np.testing.assert_allclose(inter['pool'], inter['stage3'].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('run', ['mlp_run', 'cnn_run', 'autoencoder_run', 'resnet8_run'])
def test_preact_is_post_activation_before_relu(run, request):
    model, *_, state = request.getfixturevalue(run)
    inter = state['intermediates']
    for pre in model.preact_names():
        post = pre[: -len(PREACT_SUFFIX)]
        np.testing.assert_array_equal(jax.nn.relu(inter[pre][0]), inter[post][0])
        assert float(inter[pre][0].min()) < 0.0  # Genuinely pre-ReLU, not a copy of the output.


# ----------------------------------------------------------------------------------------------------------
# Parameter counts.


def test_mlp_param_count(mlp_run):
    _, variables, *_ = mlp_run
    expected = _dense(784, 100) + 4 * _dense(100, 100) + _dense(100, 10)
    assert _count(variables['params']) == expected == 119_910


def test_cnn_param_count(cnn_run):
    _, variables, *_ = cnn_run
    conv = _conv3x3(3, 32) + _conv3x3(32, 64) + _conv3x3(64, 128) + _conv3x3(128, 128)
    flat = (32 // 8) * (32 // 8) * 128  # Three 2x2 stride-2 pools on a 32x32 input.
    expected = conv + _dense(flat, 128) + _dense(128, 10)
    assert _count(variables['params']) == expected == 504_394


@pytest.mark.parametrize('fc_width', [32, 512])
def test_cnn_fc_width_and_cifar100(fc_width):
    shapes = _init_shapes(CNN(num_classes=100, fc_width=fc_width), CIFAR_SHAPE)
    conv = _conv3x3(3, 32) + _conv3x3(32, 64) + _conv3x3(64, 128) + _conv3x3(128, 128)
    assert _count(shapes['params']) == conv + _dense(2048, fc_width) + _dense(fc_width, 100)


def test_autoencoder_param_count(autoencoder_run):
    _, variables, *_ = autoencoder_run
    sizes = (784, 400, 200, 100, 200, 400, 784)
    expected = sum(_dense(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    assert _count(variables['params']) == expected == 829_284


@pytest.mark.parametrize(
    'depth, exact, paper_millions', [(32, RESNET32_PARAMS, 0.46), (110, RESNET110_PARAMS, 1.7)]
)
def test_resnet_param_count(depth, exact, paper_millions):
    shapes = _init_shapes(ResNet(depth=depth), CIFAR_SHAPE)
    assert _count(shapes['params']) == _expected_resnet_params(depth) == exact
    # He et al. 2016 Table 6 reports 0.46M / 1.7M.
    digits = 2 if paper_millions < 1 else 1
    assert round(exact / 1e6, digits) == paper_millions
    # Running mean and variance for each BN layer: stem + 2 per block.
    n_bn_channels = 16 + 2 * (depth - 2) // 6 * (16 + 32 + 64)
    assert _count(shapes['batch_stats']) == 2 * n_bn_channels


def test_resnet_conv_layer_count_and_no_conv_bias():
    shapes = _init_shapes(ResNet(depth=110), CIFAR_SHAPE)
    kernels = [
        path
        for path, _ in jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
        if 'conv' in jax.tree_util.keystr(path)
    ]
    assert len(kernels) == 109  # 110 weighted layers = 109 convs + 1 dense.
    assert all(jax.tree_util.keystr(p).endswith("['kernel']") for p in kernels)


def test_resnet_he_normal_fan_out_init(resnet8):
    _, variables = resnet8
    # Stage-2 first conv: 3x3, 16 -> 32, so fan_in = 144 (std 0.118) and fan_out = 288 (std 0.083).
    kernel = np.asarray(variables['params']['stage2_block1']['conv1']['kernel'])
    assert kernel.shape == (3, 3, 16, 32)
    assert abs(kernel.std() - math.sqrt(2.0 / 288)) < 0.005
    assert abs(kernel.mean()) < 0.005


@pytest.mark.parametrize('depth', [0, 7, 31, 33, 111])
def test_resnet_rejects_invalid_depth(depth):
    with pytest.raises(ValueError, match=r'6n \+ 2'):
        ResNet(depth=depth)


# ----------------------------------------------------------------------------------------------------------
# ResNet shortcuts and BatchNorm.


def test_resnet_option_a_shortcut(resnet8):
    """With all block convs zeroed (eval mode), each block is identity/subsample+zero-pad on its input."""
    model, variables = resnet8
    x = _images((1, SMALL, SMALL, 3), seed=5)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if 'block' in jax.tree_util.keystr(p) else a, variables['params']
    )
    _, state = jax.jit(lambda v: model.apply(v, x, mutable=['intermediates']))(
        {'params': params, 'batch_stats': variables['batch_stats']}
    )
    s1, s2, s3 = (state['intermediates'][f'stage{i}'][0] for i in (1, 2, 3))
    assert float(jnp.abs(s1).max()) > 0.0
    np.testing.assert_allclose(s2[..., :16], s1[:, ::2, ::2, :], rtol=1e-6)
    np.testing.assert_array_equal(s2[..., 16:], 0.0)
    np.testing.assert_allclose(s3[..., :32], s2[:, ::2, ::2, :], rtol=1e-6)
    np.testing.assert_array_equal(s3[..., 32:], 0.0)


def test_resnet_batchnorm_train_updates_stats(resnet8):
    model, variables = resnet8
    x = _images((N, SMALL, SMALL, 3), seed=9)
    out_eval = model.apply(variables, x)
    stats = variables['batch_stats']
    np.testing.assert_array_equal(stats['stem_bn']['mean'], 0.0)
    np.testing.assert_array_equal(stats['stem_bn']['var'], 1.0)

    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
    out_train, new_state = apply_train(variables, x)
    assert set(new_state) == {'batch_stats'}
    assert jax.tree.structure(new_state['batch_stats']) == jax.tree.structure(stats)
    assert not np.allclose(out_train, out_eval)  # Train mode normalizes with batch statistics.

    # Momentum 0.9: running = 0.9 * running + 0.1 * batch, checked on the stem BN against its conv output.
    kernel = variables['params']['stem_conv']['kernel']
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    batch_mean = conv.mean(axis=(0, 1, 2))
    batch_var = conv.var(axis=(0, 1, 2))
    new_stem = new_state['batch_stats']['stem_bn']
    np.testing.assert_allclose(new_stem['mean'], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_stem['var'], 0.9 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)
    for path_stats in jax.tree.leaves(
        jax.tree.map(lambda a, b: bool(np.allclose(a, b)), new_state['batch_stats'], stats)
    ):
        assert not path_stats  # Every BN layer's statistics moved.


def test_resnet_eval_uses_running_stats_per_example(resnet8):
    model, variables = resnet8
    x = _images((N, SMALL, SMALL, 3), seed=6)
    apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
    full = apply(variables, x)
    single = apply(variables, x[:1])
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)
    full_train, _ = apply(variables, x, train=True, mutable=('batch_stats',))
    single_train, _ = apply(variables, x[:1], train=True, mutable=('batch_stats',))
    assert not np.allclose(full_train[:1], single_train, atol=1e-4)  # Batch statistics depend on the batch.


def test_resnet_bn_axis_name_syncs_statistics(resnet8):
    """Two 1-image shards under a named axis give the statistics of the 2-image batch."""
    _, variables = resnet8
    x = _images((2, SMALL, SMALL, 3), seed=7)
    synced = ResNet(depth=8, bn_axis_name='devices')

    def train_stats(model, v, x):
        return model.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats']

    whole = jax.jit(lambda v, x: train_stats(ResNet(depth=8), v, x))(variables, x)
    sharded = jax.jit(
        jax.vmap(lambda v, x: train_stats(synced, v, x), in_axes=(None, 0), axis_name='devices')
    )(variables, x.reshape(2, 1, SMALL, SMALL, 3))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b[1], a, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# jit, dtype, registry.


@pytest.mark.parametrize('run', ['mlp_run', 'cnn_run', 'autoencoder_run'])
def test_jit_matches_eager(run, request):
    model, variables, x, *_ = request.getfixturevalue(run)
    eager = model.apply(variables, x)
    jitted = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_resnet_jit_matches_eager(resnet8):
    model, variables = resnet8
    x = _images((N, SMALL, SMALL, 3), seed=8)
    eager, eager_state = model.apply(variables, x, train=True, mutable=['batch_stats'])
    jitted, jit_state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
        variables, x
    )
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jit_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_computation_keeps_float32_params():
    model = MLP(dtype=jnp.bfloat16)
    x = _images(MNIST_SHAPE)
    variables = model.init(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    out, state = model.apply(variables, x, mutable=['intermediates'])
    assert out.dtype == jnp.bfloat16
    assert state['intermediates']['layer5'][0].dtype == jnp.bfloat16
    ref = MLP().apply(variables, x)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.1, atol=0.1)


def test_registry_and_create_model():
    assert MODELS == {'mlp': MLP, 'cnn': CNN, 'resnet': ResNet, 'autoencoder': Autoencoder}
    model = create_model('cnn', num_classes=100, fc_width=32)
    assert isinstance(model, CNN) and model.num_classes == 100 and model.fc_width == 32
    assert isinstance(create_model('resnet', depth=110), ResNet)
    assert create_model('mlp').layer_names() == MLP.LAYERS
    assert isinstance(create_model('autoencoder'), Autoencoder)
    with pytest.raises(ValueError) as excinfo:
        create_model('vgg')
    message = str(excinfo.value)
    assert 'vgg' in message
    for name in MODELS:
        assert name in message
    with pytest.raises(ValueError, match=r'6n \+ 2'):
        create_model('resnet', depth=30)


def test_every_model_lists_its_sown_names():
    for cls in MODELS.values():
        assert isinstance(cls.LAYERS, tuple) and all(isinstance(n, str) for n in cls.LAYERS)
        assert not any(n.endswith(PREACT_SUFFIX) for n in cls.LAYERS)
    assert models.__all__  # Public API is declared.


# ----------------------------------------------------------------------------------------------------------
# The dropout / batch-norm / initializer options are off by default: the models are bitwise the ones before.


class _MLPBefore(nn.Module):
    """cwreg.training.models.MLP as it was before dropout, batchnorm, kernel_init and bias_init were added."""

    num_classes: int = 10
    width: int = 100
    depth: int = 5

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for i in range(1, self.depth + 1):
            h = nn.Dense(self.width, name=f'dense{i}')(h)
            self.sow('intermediates', f'layer{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'layer{i}', h)
        logits = nn.Dense(self.num_classes, name=f'dense{self.depth + 1}')(h)
        self.sow('intermediates', f'layer{self.depth + 1}', logits)
        return logits


class _CNNBefore(nn.Module):
    """cwreg.training.models.CNN as it was before those options."""

    num_classes: int = 10
    fc_width: int = 128

    @nn.compact
    def __call__(self, x):
        h = x
        for i, (features, pool) in enumerate(CNN.CONVS, start=1):
            h = nn.Conv(features, kernel_size=(3, 3), strides=(1, 1), padding='SAME', name=f'Conv_{i}')(h)
            self.sow('intermediates', f'conv{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'conv{i}', h)
            if pool:
                h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding='VALID')
        h = nn.Dense(self.fc_width, name='Dense_fc')(h.reshape((h.shape[0], -1)))
        self.sow('intermediates', f'fc{PREACT_SUFFIX}', h)
        h = nn.relu(h)
        self.sow('intermediates', 'fc', h)
        logits = nn.Dense(self.num_classes, name='Dense_logits')(h)
        self.sow('intermediates', 'logits', logits)
        return logits


class _AutoencoderBefore(nn.Module):
    """cwreg.training.models.Autoencoder as it was before kernel_init and bias_init."""

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for i, units in enumerate((400, 200, 100, 200, 400), start=1):
            h = nn.Dense(units, name=f'dense{i}')(h)
            self.sow('intermediates', f'layer{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'layer{i}', h)
        recon = nn.sigmoid(nn.Dense(784, name='dense6')(h))
        self.sow('intermediates', 'layer6', recon)
        return recon


@pytest.mark.parametrize(
    'new,before,shape',
    [
        (MLP(), _MLPBefore(), MNIST_SHAPE),
        (MLP(width=7, depth=2, num_classes=3), _MLPBefore(width=7, depth=2, num_classes=3), MNIST_SHAPE),
        (CNN(), _CNNBefore(), CIFAR_SHAPE),
        (Autoencoder(), _AutoencoderBefore(), MNIST_SHAPE),
    ],
)
def test_default_options_give_the_models_of_before_bitwise(new, before, shape):
    x = _images(shape, seed=5)
    variables = jax.jit(new.init)(jax.random.key(6), x)
    jax.tree.map(np.testing.assert_array_equal, variables, jax.jit(before.init)(jax.random.key(6), x))
    assert set(variables) == {'params'}  # no batch_stats without batchnorm
    for train in (False, True):  # train=True changes nothing without dropout and batch norm
        got = jax.jit(lambda v, x: new.apply(v, x, train=train, mutable=['intermediates']))(variables, x)
        want = jax.jit(lambda v, x: before.apply(v, x, mutable=['intermediates']))(variables, x)
        jax.tree.map(np.testing.assert_array_equal, got, want)
