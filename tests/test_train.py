"""Tests of cwreg.training: every paper config trains, configs fail early, pmap = one device, resume, NaN, real data.

Most runs read TFDS through `tfds.testing.mock_data` with our own `as_dataset_fn` (`_mock_tfds`): random
uint8 images of the dataset's real shape and class-balanced labels, deterministic per split, with the
number of train and test examples chosen per test (TFDS's default mock generator gives every split the
same size, and the paper's protocol needs e.g. 50k MNIST training examples while a smoke test wants a
20-image test split). Each test passes its own `data_dir` (under `tmp_path`, never created: the mock
ignores it) because the trainer caches loaded datasets by their arguments.

Equivalence with several devices needs `--xla_force_host_platform_device_count`, which only acts before
JAX starts, so that test runs in a subprocess; so does the kill-and-resume test.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator, Optional

import chex
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if REPO_ROOT not in sys.path:  # `configs` is a top-level package of the repository, not of cwreg.
    sys.path.insert(0, REPO_ROOT)

from configs import (
    cifar10_cnn,  # noqa: E402
    cifar100_cnn,  # noqa: E402
    mnist_autoencoder,  # noqa: E402
    mnist_mlp,  # noqa: E402
    resnet,  # noqa: E402
)
from cwreg import penalties  # noqa: E402
from cwreg.training import config as config_lib  # noqa: E402
from cwreg.training import data as data_lib  # noqa: E402
from cwreg.training import (
    devices,  # noqa: E402
    loop,  # noqa: E402
    rundir,  # noqa: E402
)
from cwreg.training import step as step_lib  # noqa: E402

tf.config.experimental.set_visible_devices([], 'GPU')

RESULT_FIELDS = (
    'scenario',
    'regularizer',
    'weight',
    'seed',
    'phase',
    'eval_split',
    'error',
    'loss',
    'penalty_value',
    'epochs',
    'steps',
    'wall_time_s',
    'status',
    'config',
)


# --------------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------------


def _fake_as_dataset_fn(num_train: int, num_test: int):
    """A `tfds.testing.mock_data(as_dataset_fn=...)` with `num_train` / `num_test` random examples.

    Labels are a permutation of 0, 1, ..., K-1, 0, 1, ... (every class equally often), so the paper's
    first-k-classes scenarios keep enough examples. Deterministic per split.
    """

    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        del decoders, read_config, kwargs
        split = str(split)
        n = {'train': num_train, 'test': num_test}[split]
        features = builder.info.features
        rng = np.random.default_rng({'train': 1, 'test': 2}[split])
        num_classes = features['label'].num_classes
        example = {
            'image': rng.integers(0, 256, (n, *features['image'].shape), dtype=np.uint8),
            'label': (rng.permutation(n) % num_classes).astype(np.int64),
        }
        if 'id' in features:  # CIFAR: the loader sorts by id to recover the original order.
            example['id'] = np.array([f'{split}_{i:05d}' for i in range(n)])
        if 'coarse_label' in features:
            example['coarse_label'] = example['label'] // 5
        return tf.data.Dataset.from_tensor_slices(example)

    return as_dataset


def _mock_tfds(num_train: int, num_test: int):
    return tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset_fn(num_train, num_test))


def _as_json(results: dict[str, Any]) -> dict[str, Any]:
    """`results` as results.json stores it (tuples become lists, numpy floats plain floats)."""
    return json.loads(json.dumps(results, default=str))


def _read_results(workdir: str) -> dict[str, Any]:
    with open(os.path.join(workdir, 'results.json')) as f:
        return json.load(f)


def _checkpoint_steps(group_dir: str) -> list[int]:
    path = os.path.join(group_dir, 'checkpoints')
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _restore_checkpoint(group_dir: str, step: Optional[int] = None) -> dict[str, Any]:
    """The saved {'state', 'epoch', 'diverged'} of a group, as numpy arrays."""
    manager = ocp.CheckpointManager(os.path.join(group_dir, 'checkpoints'))
    restored = manager.restore(manager.latest_step() if step is None else step)
    manager.close()
    return restored


def _small_mlp_config(data_dir: str, regularizer: str = 'cw_vr', **overrides) -> ml_collections.ConfigDict:
    """The paper's MNIST MLP in its 1k-example scenario: 10 steps per epoch at batch 100."""
    config = mnist_mlp.get_config(f'{regularizer},size1k')
    config.dataset.data_dir = data_dir
    config.num_epochs = 3
    config.eval_batch_size = 50
    # 4 steps per dispatch: epochs of 10 steps are chunked 4, 4, 2, so chunking inside an epoch is exercised.
    config.steps_per_dispatch = 4
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split('.')
        for name in path:
            target = target[name]
        target[leaf] = value
    return config


# --------------------------------------------------------------------------------------------------------
# 1. One real training step of every config family and scenario.
# --------------------------------------------------------------------------------------------------------

_FAMILIES = {
    'mnist_mlp': mnist_mlp,
    'mnist_autoencoder': mnist_autoencoder,
    'cifar10_cnn': cifar10_cnn,
    'cifar100_cnn': cifar100_cnn,
    'resnet': resnet,
}
# Every scenario gets a representation penalty and a weight penalty, cycling through all of them.
_SMOKE_CASES = [(family, scenario) for family, module in _FAMILIES.items() for scenario in module.SCENARIOS]
_REPRESENTATION = sorted(penalties.PENALTIES)
_WEIGHT = sorted(penalties.WEIGHT_PENALTIES)
# ResNet-110 takes minutes to compile and step on a CPU; it is checked abstractly (eval_shape) below.
_ABSTRACT_ONLY = {('resnet', 'resnet110')}


def _smoke_config(family: str, scenario: str, index: int, data_dir: str) -> ml_collections.ConfigDict:
    representation = _REPRESENTATION[index % len(_REPRESENTATION)]
    config = _FAMILIES[family].get_config(f'{representation},{scenario}')
    config.weight_penalty.name = _WEIGHT[index % len(_WEIGHT)]
    config.weight_penalty.weight = 1e-3
    config.dataset.data_dir = data_dir
    config.num_train_steps = 1
    config.eval_batch_size = 10
    if config.model.name in ('cnn', 'resnet'):
        # Speed: convolution gradients on a CPU; the paper's batches (100, 128, 500) change no code path.
        config.batch_size = 4
    return config


# The fast subset (-m "not slow") steps every MLP/autoencoder scenario and one per convnet family; the other
# convnet scenarios (10-30 s each on a 2-core CPU, mostly compiling) only change sizes, and are slow.
_FAST_SMOKE = {('cifar10_cnn', 'default'), ('cifar100_cnn', 'classes16'), ('resnet', 'resnet32')}


def _smoke_param(case):
    slow = case[0] not in ('mnist_mlp', 'mnist_autoencoder') and case not in _FAST_SMOKE
    return pytest.param(*case, marks=pytest.mark.slow) if slow else pytest.param(*case)


@pytest.mark.parametrize(
    'family,scenario', [_smoke_param(c) for c in _SMOKE_CASES if c not in _ABSTRACT_ONLY]
)
def test_one_step_of_every_config(family, scenario, tmp_path):
    index = _SMOKE_CASES.index((family, scenario))
    config = _smoke_config(family, scenario, index, str(tmp_path / 'tfds'))
    assert config.penalty.name in _REPRESENTATION and config.penalty.weight > 0
    # Mock exactly what the scenario's protocol needs: train_size (50k MNIST, 1k/5k scenarios) or a few
    # batches; CIFAR-100's class scenarios keep 16 of 100 balanced classes, so it gets 2 per class.
    num_train = config.dataset.train_size or (200 if family == 'cifar100_cnn' else 40)
    workdir = str(tmp_path / 'run')
    with _mock_tfds(num_train, num_test=20):
        results = loop.train_and_evaluate(config, workdir)

    assert _as_json(results) == _read_results(workdir)
    assert set(RESULT_FIELDS) <= set(results)
    assert results['scenario'] == config.scenario
    # A representation penalty is on, so it names the run (the weight penalty rides along).
    assert (results['regularizer'], results['weight']) == (config.penalty.name, config.penalty.weight)
    assert (results['seed'], results['phase'], results['eval_split']) == (0, 'final', 'test')
    assert (results['status'], results['steps'], results['epochs']) == ('finished', 1, 1)
    assert results['config'] == config.to_dict()
    assert np.isfinite(results['loss']) and np.isfinite(results['penalty_value'])
    if family == 'mnist_autoencoder':
        assert results['error'] is None  # reconstruction: MSE only
        assert 0.0 < results['loss'] < 1.0  # sigmoid outputs and targets in [0, 1]
    else:
        assert 0.0 <= results['error'] <= 100.0
        assert results['loss'] > 0.0

    assert _checkpoint_steps(workdir) == [1]
    saved = _restore_checkpoint(workdir)
    assert int(saved['epoch']) == 1 and int(saved['state']['step']) == 1
    model = config_lib.model_from_config(
        config, num_classes=config.dataset.num_classes or _NUM_CLASSES[family]
    )
    expected = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, *_IMAGE_SHAPES[family]), np.float32),
    )
    # The checkpoint holds the group's state: one leading run axis on every parameter.
    assert jax.tree.map(lambda x: x.shape[1:], saved['state']['params']) == jax.tree.map(
        lambda x: x.shape, expected['params']
    )


_NUM_CLASSES = {
    'mnist_mlp': 10,
    'mnist_autoencoder': 10,
    'cifar10_cnn': 10,
    'cifar100_cnn': 100,
    'resnet': 10,
}
_IMAGE_SHAPES = {
    'mnist_mlp': (28, 28, 1),
    'mnist_autoencoder': (28, 28, 1),
    'cifar10_cnn': (32, 32, 3),
    'cifar100_cnn': (32, 32, 3),
    'resnet': (32, 32, 3),
}


def test_validation_run_reports_the_selection_phase(tmp_path):
    # The λ search's runs: train on the first 1k, evaluate on the LAST 10k training examples (suppl. A.1),
    # so the training split must hold more than 10k examples.
    config = _small_mlp_config(str(tmp_path / 'tfds'), num_epochs=1, **{'dataset.validation': True})
    with _mock_tfds(num_train=11_000, num_test=20):
        results = loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert (results['phase'], results['eval_split'], results['steps']) == ('select', 'validation', 10)
    assert 0.0 <= results['error'] <= 100.0 and np.isfinite(results['loss'])


def test_resnet110_builds_and_steps_abstractly(tmp_path):
    index = _SMOKE_CASES.index(('resnet', 'resnet110'))
    config = _smoke_config('resnet', 'resnet110', index, str(tmp_path / 'tfds'))
    config_lib.validate_config(config)
    task = step_lib.Task.from_config(config, num_classes=10)
    assert task.model.depth == 110 and task.augment and task.weight_decay > 0
    images = jax.ShapeDtypeStruct((1, config.batch_size, 32, 32, 3), np.float32)
    labels = jax.ShapeDtypeStruct((1, config.batch_size), np.int32)
    variables = jax.eval_shape(
        functools.partial(task.model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
    )
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))
    assert num_params == 1_727_962  # He et al.: 1.7M
    state = jax.eval_shape(
        lambda v: step_lib.TrainState.create(
            apply_fn=task.model.apply,
            params=v['params'],
            tx=config_lib.create_optimizer(config),
            batch_stats=v['batch_stats'],
        ),
        variables,
    )
    replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), state)
    weights = {k: jax.ShapeDtypeStruct((1,), np.float32) for k in ('penalty', 'weight_penalty')}
    rng = jax.ShapeDtypeStruct((1, 2), np.uint32)
    step = jax.pmap(functools.partial(step_lib.train_step, task), axis_name=config_lib.AXIS)
    new_state, metrics = jax.eval_shape(step, replicated, images, labels, weights, rng)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), replicated.params
    )
    assert jax.tree.map(lambda x: x.shape, new_state.batch_stats) == jax.tree.map(
        lambda x: x.shape, replicated.batch_stats
    )
    assert all(m.shape == (1,) for m in jax.tree.leaves(metrics))


# --------------------------------------------------------------------------------------------------------
# 2. Invalid configs fail before any data is read, listing the valid choices.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'field,value,expected_choices',
    [
        ('penalty.name', 'cw_xx', ['cr', 'cw_cr', 'cw_vr', 'l1r', 'vr']),
        ('penalty.layer', 'layer9', ['layer1', 'layer5', 'layer6']),
        ('optimizer.name', 'adagrad', ['adam', 'momentum', 'rmsprop', 'sgd']),
        ('dataset.name', 'imagenet', ['cifar10', 'cifar100', 'mnist']),
        ('weight_penalty.name', 'l3w', ['l1w', 'l2w']),
        ('weight_penalty.layer', 'conv1', ['all', 'layer5']),
        ('model.name', 'vgg', ['autoencoder', 'cnn', 'mlp', 'resnet']),
        ('optimizer.schedule', 'cosine', ['constant', 'piecewise']),
    ],
)
def test_invalid_config_fails_before_loading_data(field, value, expected_choices, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError('data was loaded for an invalid config')

    monkeypatch.setattr(data_lib, 'load_dataset', no_data)
    monkeypatch.setattr(tfds, 'builder', no_data)
    config = _small_mlp_config(str(tmp_path / 'tfds'), **{field: value})
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert repr(value) in message
    for choice in expected_choices:
        assert repr(choice) in message, message
    assert not workdir.exists()
    with pytest.raises(ValueError):  # the same check is public on its own
        config_lib.validate_config(config)


def test_group_of_runs_that_differ_beyond_seed_and_weight_is_rejected(tmp_path):
    data_dir = str(tmp_path / 'tfds')
    with pytest.raises(ValueError, match='differ only in seed and penalty weights'):
        loop.train_group(
            [_small_mlp_config(data_dir), _small_mlp_config(data_dir, **{'model.width': 8})],
            [str(tmp_path / 'a'), str(tmp_path / 'b')],
            str(tmp_path / 'group'),
        )


def _no_data(monkeypatch) -> None:
    def no_data(*args, **kwargs):
        raise AssertionError('data was loaded for an invalid config')

    monkeypatch.setattr(data_lib, 'load_dataset', no_data)
    monkeypatch.setattr(tfds, 'builder', no_data)


# Each field of configs/default.py that has a range, a value out of it (the failure today in brackets:
# caught by removing that field from config_lib.FIELD_RANGES), and a fragment of the valid range the message gives.
_OUT_OF_RANGE = [
    ('scenario', '', 'non-empty'),
    ('seed', -1, '[0, 2^31 - 1]'),
    ('dataset.train_size', -5, '>= 0'),
    ('dataset.validation_size', 0, '>= 1'),
    ('dataset.num_classes', 1, '[2, 10]'),
    ('dataset.num_classes', 11, '[2, 10]'),
    ('model.width', 0, '>= 1'),  # (a Flax shape error after loading)
    ('model.depth', 0, '>= 1'),
    ('model.kernel_init', 'glorot_normal', "'glorot_uniform'"),
    ('model.bias_init', float('nan'), 'finite'),
    ('model.dropout', 1.0, '[0, 1)'),  # (every unit dropped: NaN from 0 / 0)
    ('model.dropout', -0.1, '[0, 1)'),
    ('penalty.weight', float('nan'), 'finite'),
    ('penalty.weight', -0.1, '>= 0'),
    ('weight_penalty.weight', float('inf'), 'finite'),
    ('weight_decay', -1e-4, '>= 0'),
    ('optimizer.learning_rate', 0.0, '> 0'),  # (trains nothing and reports "finished")
    ('optimizer.learning_rate', float('nan'), 'finite'),
    ('optimizer.momentum', 1.0, '[0, 1)'),
    ('optimizer.boundaries', (300, 200), 'strictly increasing'),
    ('optimizer.boundaries', (0,), 'steps >= 1'),
    ('optimizer.decay_factor', 0.0, '> 0'),
    ('batch_size', 0, '>= 1'),  # (ZeroDivisionError)
    ('num_epochs', 0, '>= 1'),  # (trains nothing and reports "finished")
    ('num_epochs', -1, '>= 1'),
    ('num_train_steps', 0, '-1'),  # (trains num_epochs, silently)
    ('num_train_steps', -7, '-1'),
    ('eval_batch_size', 0, '>= 1'),  # (ZeroDivisionError after compiling)
    ('eval_every_epochs', 0, '>= 1'),  # (ZeroDivisionError after the first epoch)
    ('steps_per_dispatch', 0, '>= 1'),  # (loops forever)
    ('model.depth', 7, '6n + 2'),  # with model.name=resnet, below
    ('batch_size', 1001, 'config.dataset.train_size'),  # the 1k scenario keeps 1000 examples
]
_CHOICE_FIELDS = (
    'dataset.name',
    'model.name',
    'penalty.name',
    'penalty.layer',
    'weight_penalty.name',
    'weight_penalty.layer',
    'optimizer.name',
    'optimizer.schedule',
)
_TYPE_ONLY_FIELDS = (
    'dataset.data_dir',
    'dataset.validation',
    'dataset.augment',
    'dataset.download',
    'dataset.standardize',
    'model.batchnorm',
    'optimizer.tf1',
    'checkpoint',
)


def test_every_config_field_is_checked():
    from configs import default  # pylint: disable=g-import-not-at-top

    fields = set(rundir._flatten(default.get_config().to_dict()))
    ranged = set(config_lib.FIELD_RANGES) | {'dataset.num_classes'}
    assert fields == ranged | set(_CHOICE_FIELDS), fields ^ (ranged | set(_CHOICE_FIELDS))
    assert set(_TYPE_ONLY_FIELDS) <= set(config_lib.FIELD_RANGES)
    # Every field with a range beyond its type has an out-of-range case below.
    assert ranged - set(_TYPE_ONLY_FIELDS) <= {f for f, _, _ in _OUT_OF_RANGE}


@pytest.mark.parametrize('field,value,valid', _OUT_OF_RANGE)
def test_out_of_range_field_fails_before_loading_data(field, value, valid, tmp_path, monkeypatch):
    _no_data(monkeypatch)
    overrides = {field: value}
    if field == 'model.depth' and value == 7:
        overrides.update({'model.name': 'resnet', 'penalty.layer': 'stage3', 'weight_penalty.layer': 'all'})
    config = _small_mlp_config(str(tmp_path / 'tfds'), **overrides)
    workdir = tmp_path / 'run'
    with pytest.raises(config_lib.ConfigError) as error:
        loop.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert f'config.{field}' in message and valid in message, message
    assert not workdir.exists()


@pytest.mark.parametrize(
    'field,value',
    [
        ('seed', 1.5),
        ('model.width', True),
        ('checkpoint', 1),
        ('dataset.validation', 'yes'),
        ('num_epochs', 2.5),
    ],
)
def test_wrongly_typed_field_fails(field, value, tmp_path):
    config = _small_mlp_config(str(tmp_path / 'tfds'))
    config.unlock()
    *path, leaf = field.split('.')
    target = config
    for name in path:
        target = target[name]
    del target[leaf]
    target[leaf] = value  # a locked config from the command line keeps types; one built in code may not
    with pytest.raises(config_lib.ConfigError, match=re.escape(f'config.{field}')):
        config_lib.validate_config(config)


def test_batch_larger_than_the_loaded_data_fails_before_compiling(tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError('compiled although the batch does not fit the data')

    monkeypatch.setattr(step_lib, 'initial_states', no_compile)
    config = _small_mlp_config(str(tmp_path / 'tfds'), **{'dataset.train_size': 0})
    with _mock_tfds(num_train=60, num_test=20), pytest.raises(config_lib.ConfigError) as error:
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert 'config.batch_size' in str(error.value) and '60 training examples' in str(error.value)


# --------------------------------------------------------------------------------------------------------
# 2b. A workdir is its whole config.
# --------------------------------------------------------------------------------------------------------


def test_rerun_with_another_config_stops_before_training_listing_the_fields(tmp_path, monkeypatch):
    data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        loop.train_and_evaluate(_small_mlp_config(data_dir, num_epochs=1), workdir)
    before = _read_results(workdir)
    recorded = json.load(open(os.path.join(workdir, rundir.CONFIG_FILE)))
    assert recorded == {'runs': [_as_json(_small_mlp_config(data_dir, num_epochs=1).to_dict())]}
    _no_data(monkeypatch)
    other = _small_mlp_config(data_dir, **{'optimizer.learning_rate': 1e-3, 'model.width': 50})
    with pytest.raises(config_lib.ConfigMismatchError) as error:
        loop.train_and_evaluate(other, workdir)
    message = str(error.value)
    assert workdir in message
    assert 'model.width: 100 -> 50' in message, message
    assert 'optimizer.learning_rate: 0.0001 -> 0.001' in message, message
    assert 'num_epochs' not in message  # a longer run continues the recorded one
    assert _read_results(workdir) == before and _checkpoint_steps(workdir) == [1]
    assert json.load(open(os.path.join(workdir, rundir.CONFIG_FILE))) == recorded


def test_a_workdir_of_before_config_json_is_checked_by_its_results(tmp_path, monkeypatch):
    data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        loop.train_and_evaluate(_small_mlp_config(data_dir, num_epochs=1), workdir)
    os.remove(os.path.join(workdir, rundir.CONFIG_FILE))
    _no_data(monkeypatch)
    with pytest.raises(config_lib.ConfigMismatchError, match='penalty.layer'):
        loop.train_and_evaluate(_small_mlp_config(data_dir, **{'penalty.layer': 'layer3'}), workdir)


def test_execution_fields_may_change_and_a_run_may_grow_but_not_shrink(tmp_path):
    data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        loop.train_and_evaluate(_small_mlp_config(data_dir, num_epochs=2), workdir)
        # Where the data is, how often to evaluate, how steps are dispatched: the same run resumes.
        grown = loop.train_and_evaluate(
            _small_mlp_config(
                str(tmp_path / 'elsewhere'), num_epochs=3, eval_every_epochs=1, steps_per_dispatch=10
            ),
            workdir,
        )
        assert (grown['epochs'], grown['steps']) == (3, 30)
        with pytest.raises(config_lib.ConfigMismatchError, match='trained for 30 steps, more than the 20'):
            loop.train_and_evaluate(_small_mlp_config(data_dir, num_epochs=2), workdir)
    assert _read_results(workdir)['steps'] == 30


def test_eval_penalty_is_over_training_size_batches(tmp_path):
    """The evaluation's Ω is the mean of Ω over the split's full batches of the TRAINING batch size, whatever
    eval_batch_size is (mutation caught: eval batches of eval_batch_size, as before)."""
    config = _small_mlp_config(str(tmp_path / 'tfds'), batch_size=100)
    task = step_lib.Task.from_config(config, num_classes=10)
    rng = np.random.default_rng(0)
    split = data_lib.Split(
        rng.uniform(size=(250, 28, 28, 1)).astype(np.float32), (np.arange(250) % 10).astype(np.int32)
    )
    state = step_lib.initial_states(task, config_lib.create_optimizer(config), split.images, [0])
    p_state = devices.replicate(jax.device_get(state).replace(step=np.asarray(state.step[0])))
    p_eval = devices.device_map(
        jax.vmap(
            functools.partial(step_lib.eval_chunk, task),
            in_axes=(loop._state_axes(p_state), None, None, None),
        )
    )
    variables = {'params': jax.tree.map(lambda x: x[0], state.params)}
    _, inter = task.model.apply(variables, split.images, train=False, mutable=['intermediates'])
    z = inter['intermediates']['layer5'][0]
    # The training step's own penalty function, on the two full batches of 100 (the last 50 do not count).
    expected = np.mean(
        [
            step_lib._penalty_value(task, {'layer5': z[i : i + 100]}, split.labels[i : i + 100], None)
            for i in (0, 100)
        ]
    )
    for eval_batch_size in (30, 100, 250, 1000):
        arrays = devices.shard(
            devices._eval_layout(split, 100, devices.eval_step_size(eval_batch_size, 100), 1)
        )
        got = loop._evaluate(p_eval, p_state, arrays, task)
        np.testing.assert_allclose(got['penalty'][0], expected, rtol=1e-5, err_msg=str(eval_batch_size))


def test_eval_layout_gives_each_device_its_slice_of_every_training_batch():
    split = data_lib.Split(
        np.arange(1001, dtype=np.float32).reshape(1001, 1, 1, 1), np.arange(1001, dtype=np.int32)
    )
    # eval_batch_size 1001 is no multiple of 4 devices: steps are whole batches of 100, 25 per device.
    per_step = devices.eval_step_size(1001, 100)
    images, labels, mask = devices._eval_layout(split, 100, per_step, 4)
    assert per_step == 1000 and labels.shape == (4, 2, 10, 25)
    np.testing.assert_array_equal(labels[1, 0, 3], np.arange(325, 350))  # device 1's slice of batch 3
    assert mask.sum() == 1001 and labels[mask > 0].size == 1001
    np.testing.assert_array_equal(np.sort(labels[mask > 0]), np.arange(1001))


# --------------------------------------------------------------------------------------------------------
# 3. A step pmapped over 4 devices equals the same step on one device holding the whole batch.
# --------------------------------------------------------------------------------------------------------

# Global batch of 32, 8 per device: class 4 only on device 1, class 6 only on device 2, classes 7 and 9
# only on device 3 (9 a single example), class 8 absent, class 0 on three devices.
_IMBALANCED_LABELS = [
    0,
    0,
    1,
    1,
    2,
    2,
    3,
    3,
    0,
    1,
    2,
    3,
    4,
    4,
    4,
    4,
    5,
    5,
    5,
    5,
    5,
    6,
    6,
    1,
    9,
    7,
    7,
    0,
    0,
    0,
    0,
    0,
]

_PMAP_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax
    import numpy as np
    from configs import mnist_mlp, resnet
    from cwreg.training import config as config_lib
    from cwreg.training import step as step_lib
    from cwreg.training import devices
    from cwreg.training import rundir
    from cwreg.training import loop

    assert jax.local_device_count() == 4, jax.devices()
    LABELS = np.array(json.loads(sys.argv[1]), np.int32)

    def replicate(tree, n):
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)

    def compare(name, config, image_shape, update_atol=1e-4, state_atol=1e-6):
        task = step_lib.Task.from_config(config, num_classes=10)
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(len(LABELS),) + image_shape).astype(np.float32)
        variables = task.model.init(jax.random.key(0), images[:1], train=False)
        state = step_lib.TrainState.create(apply_fn=task.model.apply, params=variables['params'],
                                        tx=config_lib.create_optimizer(config),
                                        batch_stats=variables.get('batch_stats'))
        key = jax.random.key_data(jax.random.key(1))  # raw: replicated through numpy
        step = functools.partial(step_lib.train_step, task)
        on4 = jax.pmap(step, axis_name=config_lib.AXIS)
        on1 = jax.pmap(step, axis_name=config_lib.AXIS, devices=jax.devices()[:1])
        # λ such that λΩ = 1 at this batch, like the task loss (ln 10): Ω itself can be ~1e-7 (cw-CR), and a
        # wrong penalty gradient must not hide behind the loss's.
        weights = {'penalty': np.float32(1.0), 'weight_penalty': np.float32(config.weight_penalty.weight)}
        _, probe = on1(replicate(state, 1), images[None], LABELS[None], replicate(weights, 1),
                       replicate(key, 1))
        weights['penalty'] = np.float32(1.0 / float(np.asarray(probe['penalty'])[0]))
        state4, metrics4 = on4(replicate(state, 4), images.reshape((4, -1) + image_shape),
                               LABELS.reshape(4, -1), replicate(weights, 4), replicate(key, 4))
        state1, metrics1 = on1(replicate(state, 1), images[None], LABELS[None], replicate(weights, 1),
                               replicate(key, 1))
        # Every device holds the same new state (gradients and BatchNorm statistics were all-reduced).
        for leaf in jax.tree.leaves(state4):
            leaf = np.asarray(leaf)
            for d in range(1, 4):
                np.testing.assert_array_equal(leaf[d], leaf[0], err_msg=name)
        new4 = jax.tree.map(lambda x: np.asarray(x[0]), state4)
        new1 = jax.tree.map(lambda x: np.asarray(x[0]), state1)
        for part in ('params', 'batch_stats', 'opt_state'):
            atol = state_atol if part != 'batch_stats' else 1e-6  # params and momentum
            jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=atol,
                                           err_msg=f'{name}: {part}'), getattr(new4, part), getattr(new1, part))
        # The update itself (new - old = -lr * gradient for the first SGD/momentum step), relative to its
        # own size: params are dominated by their initial values, the update is what the step computed.
        old = jax.tree.map(np.asarray, state.params)
        for (path, n4), n1, o in zip(jax.tree_util.tree_leaves_with_path(new4.params),
                                     jax.tree.leaves(new1.params), jax.tree.leaves(old)):
            u4, u1 = n4 - o, n1 - o
            scale = max(np.abs(u1).max(), 1e-12)
            np.testing.assert_allclose(u4 / scale, u1 / scale, rtol=0, atol=update_atol,
                                       err_msg=f'{name}: update of {jax.tree_util.keystr(path)}')
        for key_ in ('loss', 'penalty', 'correct'):
            np.testing.assert_allclose(np.asarray(metrics4[key_]), np.broadcast_to(metrics1[key_], (4,)),
                                       rtol=1e-5, atol=1e-7, err_msg=f'{name}: metric {key_}')
        print(f'OK {name}: loss {float(np.asarray(metrics1["loss"])[0]):.4f}, '
              f'λ = {weights["penalty"]:.3g}', flush=True)

    def mlp(regularizer, **weight_terms):
        config = mnist_mlp.get_config(regularizer)
        # First step of plain SGD with rate 1: the update is the gradient, nothing rescales it (Adam's
        # first step is ~lr * sign(g), which hides gradient errors and amplifies float noise near 0).
        config.optimizer.name = 'sgd'
        config.optimizer.learning_rate = 1.0
        for k, v in weight_terms.items():
            if k == 'weight_decay':
                config.weight_decay = v
            else:
                config.weight_penalty.name, config.weight_penalty.layer, config.weight_penalty.weight = v
        return config

    compare('mlp cw_cr layer5', mlp('cw_cr'), (28, 28, 1))
    compare('mlp cw_vr + l2w(all)', mlp('cw_vr', wp=('l2w', 'all', 0.05)), (28, 28, 1))
    compare('mlp cr + l1w(layer5) + weight decay', mlp('cr', wp=('l1w', 'layer5', 0.01), weight_decay=0.05),
            (28, 28, 1))

    config = resnet.get_config('resnet32,cw_vr')
    config.model.depth = 8
    # Augmentation draws per-device crops: a different (valid) batch than one device would see.
    config.dataset.augment = False
    config.weight_decay = 0.05  # He et al.'s 1e-4 would make a wrong 1/D factor invisible
    # Convolutions and BatchNorm backward over 4 images per device and over 16 round differently on some
    # XLA:CPU builds: up to 8e-4 of a leaf's update (AMD EPYC, 2026-12-03; a 1/D error is ≥ 25 %).
    compare('resnet8 (synced BatchNorm) cw_vr + weight decay', config, (16, 16, 3), update_atol=5e-3,
            state_atol=1e-3)
""")


@pytest.mark.slow
def test_pmap_over_4_devices_equals_one_device(tmp_path):
    script = tmp_path / 'pmap_equivalence.py'
    script.write_text(_PMAP_SCRIPT)
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=4',
        JAX_PLATFORMS='cpu',
        PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
        CUDA_VISIBLE_DEVICES='',
    )
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(_IMBALANCED_LABELS)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count('OK ') == 4, proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(real_data_dir, tmp_path):
    """launch/train.py --distributed: 2 processes of 1 CPU device each (gloo collectives, one shared workdir)
    end with the parameters of 1 process with 2 devices, and only process 0 writes results.json."""
    args = [
        sys.executable,
        'launch/train.py',
        '--config=configs/mnist_mlp.py:cw_vr',
        f'--config.dataset.data_dir={real_data_dir}',
        '--config.dataset.train_size=1000',
        '--config.num_epochs=2',
        '--config.steps_per_dispatch=4',
        '--config.eval_batch_size=500',
    ]
    env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
    reference, distributed = str(tmp_path / 'reference'), str(tmp_path / 'distributed')
    coordinator = f'--coordinator_address=127.0.0.1:{_free_port()}'
    logs = [open(tmp_path / f'{name}.log', 'w') for name in ('reference', 'process0', 'process1')]
    try:
        procs = [
            subprocess.Popen(
                args + [f'--workdir={reference}'],
                cwd=REPO_ROOT,
                stdout=logs[0],
                stderr=subprocess.STDOUT,
                env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
            )
        ]
        procs += [
            subprocess.Popen(
                args
                + [
                    f'--workdir={distributed}',
                    '--distributed',
                    coordinator,
                    '--num_processes=2',
                    f'--process_id={i}',
                ],
                cwd=REPO_ROOT,
                stdout=logs[1 + i],
                stderr=subprocess.STDOUT,
                env=env,
            )
            for i in range(2)
        ]
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f'{name}.log').read_text() for name in ('reference', 'process0', 'process1')]
    assert codes == [0, 0, 0], '\n\n'.join(out[-3000:] for out in outputs)
    assert 'JAX process 1/2' in outputs[2] and 'JAX process 0/1' in outputs[0]
    assert os.listdir(distributed).count('results.json') == 1
    ours, theirs = _read_results(distributed), _read_results(reference)
    assert ours['error'] == theirs['error']
    np.testing.assert_allclose(ours['loss'], theirs['loss'], rtol=1e-5)
    chex.assert_trees_all_close(
        _restore_checkpoint(distributed, step=2)['state']['params'],
        _restore_checkpoint(reference, step=2)['state']['params'],
        rtol=1e-5,
        atol=1e-7,
    )


# --------------------------------------------------------------------------------------------------------
# 4. Resuming from a checkpoint gives exactly the uninterrupted run.
# --------------------------------------------------------------------------------------------------------

_NUM_TRAIN, _NUM_TEST = 1000, 100


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory) -> tuple[str, dict[str, Any]]:
    """3 epochs of the 1k MLP (cw-VR) without interruption: (workdir, results)."""
    root = tmp_path_factory.mktemp('uninterrupted')
    config = _small_mlp_config(str(root / 'tfds'))
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        results = loop.train_and_evaluate(config, str(root / 'run'))
    return str(root / 'run'), results


@contextlib.contextmanager
def _record_epochs(monkeypatch) -> Iterator[list[int]]:
    """Records the epochs a run trains (the trainer draws each epoch's example order once)."""
    epochs = []
    original = step_lib.epoch_order

    def recording(seed, epoch, num_examples):
        epochs.append(epoch)
        return original(seed, epoch, num_examples)

    monkeypatch.setattr(step_lib, 'epoch_order', recording)
    yield epochs
    monkeypatch.setattr(step_lib, 'epoch_order', original)


def _assert_same_run(workdir: str, reference_workdir: str) -> None:
    results, reference = _read_results(workdir), _read_results(reference_workdir)
    for key in ('error', 'loss', 'penalty_value', 'steps', 'epochs', 'status'):
        assert results[key] == reference[key], key
    final = _restore_checkpoint(workdir, step=3)['state']
    reference_final = _restore_checkpoint(reference_workdir, step=3)['state']
    jax.tree.map(np.testing.assert_array_equal, final, reference_final)


def test_resume_after_first_epoch_equals_uninterrupted_run(uninterrupted_run, tmp_path, monkeypatch):
    reference_workdir, reference = uninterrupted_run
    assert (reference['steps'], reference['epochs']) == (30, 3)
    data_dir = str(tmp_path / 'tfds')
    workdir = str(tmp_path / 'run')
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        first = loop.train_and_evaluate(_small_mlp_config(data_dir, num_epochs=1), workdir)
        assert (first['steps'], first['epochs']) == (10, 1)
        assert _checkpoint_steps(workdir) == [1]
        with _record_epochs(monkeypatch) as epochs:
            loop.train_and_evaluate(_small_mlp_config(data_dir), workdir)
    assert epochs == [1, 2]  # resumed: epoch 0 was not trained again
    assert _checkpoint_steps(workdir) == [2, 3]  # max_to_keep=2
    _assert_same_run(workdir, reference_workdir)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import test_train as T
    from cwreg.training import config as config_lib
    from cwreg.training import step as step_lib
    from cwreg.training import devices
    from cwreg.training import rundir
    from cwreg.training import loop

    original = step_lib.epoch_order
    def slow_epoch_order(*args):  # a slow epoch, so that the parent can kill the run between checkpoints
        time.sleep(2.0)
        return original(*args)
    step_lib.epoch_order = slow_epoch_order
    with T._mock_tfds(T._NUM_TRAIN, T._NUM_TEST):
        loop.train_and_evaluate(T._small_mlp_config(sys.argv[2]), sys.argv[3])
""")


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(uninterrupted_run, tmp_path, monkeypatch):
    reference_workdir, _ = uninterrupted_run
    data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
    script = tmp_path / 'killed_run.py'
    script.write_text(_KILL_SCRIPT)
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        CUDA_VISIBLE_DEVICES='',
        PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
    )
    log_path = tmp_path / 'killed_run.log'
    with open(log_path, 'w') as log:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(
            [sys.executable, str(script), TESTS_DIR, data_dir, workdir],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 300
            while not _checkpoint_steps(workdir):  # orbax renames a checkpoint to its step once committed
                assert proc.poll() is None, (
                    f'the run ended before its first checkpoint: {log_path.read_text()[-4000:]}'
                )
                assert time.time() < deadline, 'no checkpoint after 300 s'
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_checkpoint_steps(workdir))
    assert killed_at < 3 and not os.path.exists(os.path.join(workdir, 'results.json'))

    with _mock_tfds(_NUM_TRAIN, _NUM_TEST), _record_epochs(monkeypatch) as epochs:
        loop.train_and_evaluate(_small_mlp_config(data_dir), workdir)
    assert epochs == list(range(killed_at, 3))
    _assert_same_run(workdir, reference_workdir)


# --------------------------------------------------------------------------------------------------------
# 5. Divergence.
# --------------------------------------------------------------------------------------------------------

_HUGE_WEIGHT = 1e6  # with SGD at rate 0.1, cw-VR's gradient blows layer 5 up within a few steps


def _diverging_config(data_dir: str, weight: float) -> ml_collections.ConfigDict:
    return _small_mlp_config(
        data_dir,
        **{
            'optimizer.name': 'sgd',
            'optimizer.learning_rate': 0.1,
            'penalty.weight': weight,
            'num_epochs': 2,
        },
    )


def test_nonfinite_loss_raises_or_is_recorded_while_the_group_trains_on(tmp_path):
    data_dir = str(tmp_path / 'tfds')
    configs = [_diverging_config(data_dir, 0.1), _diverging_config(data_dir, _HUGE_WEIGHT)]
    workdirs = [str(tmp_path / 'fine'), str(tmp_path / 'diverged')]
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        with pytest.raises(loop.NonFiniteLossError) as error:
            loop.train_and_evaluate(configs[1], str(tmp_path / 'alone'))
        fine, diverged = loop.train_group(configs, workdirs, str(tmp_path / 'group'), on_nonfinite='record')
        alone = loop.train_and_evaluate(configs[0], str(tmp_path / 'fine_alone'))

    # on_nonfinite='raise' (train_and_evaluate): the message says which run and when.
    message = str(error.value)
    assert 'cw_vr' in message and f'λ={_HUGE_WEIGHT}' in message, message
    match = re.search(r'step (\d+)', message)
    assert match and 1 <= int(match.group(1)) <= 20, message
    assert not os.path.exists(tmp_path / 'alone' / 'results.json')

    # on_nonfinite='record' (a group): the diverged run is marked, at the same step, the other finishes.
    assert [_as_json(fine), _as_json(diverged)] == [_read_results(w) for w in workdirs]
    assert diverged['status'] == 'diverged' and diverged['diverged_at_step'] == int(match.group(1))
    assert diverged['loss'] is None and diverged['error'] is None and diverged['penalty_value'] is None
    assert diverged['weight'] == _HUGE_WEIGHT
    assert fine['status'] == 'finished' and fine['steps'] == 20 and fine['diverged_at_step'] is None
    # The NaNs of its neighbour did not leak into the finished run.
    assert np.isfinite(fine['loss']) and np.isfinite(fine['penalty_value'])
    np.testing.assert_allclose(fine['loss'], alone['loss'], rtol=1e-4)
    assert abs(fine['error'] - alone['error']) <= 1.0  # at most one of the 100 test images


# --------------------------------------------------------------------------------------------------------
# 6. Real data: the models learn.
# --------------------------------------------------------------------------------------------------------


def _scalar_series(logdir: str, tag: str) -> dict[int, float]:
    """{step: value} of one scalar the trainer's clu writer logged to TensorBoard event files."""
    series = {}
    for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    series[event.step] = (
                        float(tf.make_ndarray(value.tensor))
                        if value.HasField('tensor')
                        else value.simple_value
                    )
    return series


@pytest.mark.slow
def test_mnist_mlp_learns_on_real_data(real_data_dir, tmp_path):
    config = mnist_mlp.get_config('cw_vr')
    config.dataset.data_dir = real_data_dir
    config.dataset.train_size = 2000  # 20 steps per epoch: epoch 1 = steps 1-20, epoch 10 = steps 181-200
    config.num_train_steps = 200
    config.eval_every_epochs = 100
    workdir = str(tmp_path / 'run')
    results = loop.train_and_evaluate(config, workdir)

    train_loss = _scalar_series(workdir, 'train_loss')
    assert sorted(train_loss) == list(range(20, 201, 20))
    first, last = train_loss[20], train_loss[200]  # means over steps 1-20 and 181-200
    assert last < 0.5 * first, train_loss
    assert first > 1.5  # ≈ ln 10 = 2.3 at initialization: the first epoch starts from chance
    assert results['error'] < 25.0, results  # on the real 10k test images (chance: 90 %)
    assert results['loss'] < first


@pytest.mark.slow
def test_cifar_cnn_beats_chance_on_real_test_images(real_data_dir, tmp_path):
    config = cifar10_cnn.get_config('cw_vr')
    config.dataset.name = 'cifar10_partial'
    config.dataset.data_dir = real_data_dir
    config.optimizer.learning_rate = 1e-3  # brief training: 10x the paper's Adam rate
    config.num_train_steps = 60
    config.eval_every_epochs = 100
    results = loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['status'] == 'finished' and results['steps'] == 60
    assert results['error'] < 80.0, results  # chance is 90 % on the 10 CIFAR-10 classes


# --------------------------------------------------------------------------------------------------------
# 7. A vmapped group equals its runs trained one by one.
# --------------------------------------------------------------------------------------------------------


def test_group_equals_separate_runs(uninterrupted_run, tmp_path):
    reference_workdir, reference = uninterrupted_run  # the first config, trained alone
    data_dir = str(tmp_path / 'tfds')
    base = _small_mlp_config(data_dir)
    configs = [
        base,
        _small_mlp_config(data_dir, **{'penalty.weight': 10 * base.penalty.weight}),
        _small_mlp_config(data_dir, seed=1),
    ]
    with _mock_tfds(_NUM_TRAIN, _NUM_TEST):
        grouped = loop.train_group(
            configs, [str(tmp_path / f'g{i}') for i in range(3)], str(tmp_path / 'group')
        )
        separate = [reference] + [
            loop.train_and_evaluate(c, str(tmp_path / f's{i}')) for i, c in enumerate(configs) if i > 0
        ]
    for g, s, c in zip(grouped, separate, configs):
        assert (g['weight'], g['seed'], g['steps'], g['status']) == (c.penalty.weight, c.seed, 30, 'finished')
        assert (s['weight'], s['seed'], s['steps'], s['status']) == (c.penalty.weight, c.seed, 30, 'finished')
        assert g['runs_in_group'] == 3 and s['runs_in_group'] == 1
        np.testing.assert_allclose(g['loss'], s['loss'], rtol=1e-4)
        np.testing.assert_allclose(g['penalty_value'], s['penalty_value'], rtol=1e-3, atol=1e-7)
        assert abs(g['error'] - s['error']) <= 1.0  # at most one of the 100 test images
    # Final parameters (the group's checkpoint has a leading run axis), to float tolerance: vmapping may
    # reorder reductions on other backends (on XLA:CPU they come out bitwise equal).
    group_params = _restore_checkpoint(str(tmp_path / 'group'), step=3)['state']['params']
    separate_dirs = [reference_workdir, str(tmp_path / 's1'), str(tmp_path / 's2')]
    for r, workdir in enumerate(separate_dirs):
        alone = _restore_checkpoint(workdir, step=3)['state']['params']
        jax.tree.map(
            lambda g, s: np.testing.assert_allclose(g[r], s[0], rtol=1e-5, atol=1e-6), group_params, alone
        )
    # The three runs really are different runs (λ and seed reach their own copy of the program).
    losses = [g['loss'] for g in grouped]
    assert len(set(losses)) == 3, losses


def test_a_field_added_later_compares_as_the_value_runs_had_without_it():
    """Runs recorded before `dataset.validation_size` existed held out 10,000: the same run now."""
    asked = mnist_mlp.get_config('cw_vr')
    recorded = asked.to_dict()
    del recorded['dataset']['validation_size']
    assert rundir.config_differences(recorded, asked) == []
    other = ml_collections.ConfigDict(asked.to_dict())
    other.dataset.validation_size = 5_000
    assert rundir.config_differences(recorded, other) == ['dataset.validation_size: 10000 -> 5000']
