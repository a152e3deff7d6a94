"""Config checks and what a config builds: the model, the optimizer; every error a config can cause fails here.

Everything that can be wrong with a config raises ConfigError (a ValueError naming the field and what it
accepts) in `validate_config`, before any data is loaded; `check_data_fits` checks what needs the data.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from cwreg import penalties
from cwreg.names import NO_PENALTY, ConfigError
from cwreg.training import data as data_lib
from cwreg.training import models, optim

#: The name of the mapped device axis: the step's collectives and synced batch norm reduce over it.
AXIS = 'batch'
OPTIMIZERS = ('adam', 'momentum', 'rmsprop', 'sgd')
SCHEDULES = ('constant', 'piecewise')


class ConfigMismatchError(ConfigError):
    """The workdir holds a run of another config; the message lists the fields that differ."""


def _choice(kind: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f'Unknown {kind} {value!r}; valid choices: {sorted(valid)}.')


#: Families with the optional dropout and batch-norm layers (the ResNet has its own BN, no dropout).
SHAPING_FAMILIES = ('mlp', 'cnn')
#: Families whose Dense/Conv initializers config.model.kernel_init/bias_init set (the ResNet: He init).
INIT_FAMILIES = ('mlp', 'cnn', 'autoencoder')


def _model_options(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """Constructor options of config.model's dropout/batchnorm/init fields, per group of families.

    `get` with the defaults: configs recorded before these fields existed (results.json) build the
    models they trained.
    """
    batchnorm = bool(config.model.get('batchnorm', False))
    return {
        'init': dict(
            kernel_init=config.model.get('kernel_init', 'lecun_normal'),
            bias_init=float(config.model.get('bias_init', 0.0)),
        ),
        # dropout: whether the layers exist; their rate is a traced per-run input (weights['dropout']).
        'shaping': dict(
            dropout=config.model.get('dropout', 0.0) > 0,
            batchnorm=batchnorm,
            bn_axis_name=AXIS if batchnorm else None,
        ),
    }


def model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> models.nn.Module:
    """Builds the configured model; config.model.width/depth mean what the family's constructor says."""
    name = config.model.name
    _choice('model', name, models.MODELS)
    options = _model_options(config)
    kwargs = {
        'mlp': dict(
            num_classes=num_classes,
            width=config.model.width,
            depth=config.model.depth,
            **options['init'],
            **options['shaping'],
        ),
        'cnn': dict(
            num_classes=num_classes, fc_width=config.model.width, **options['init'], **options['shaping']
        ),
        'resnet': dict(num_classes=num_classes, depth=config.model.depth, bn_axis_name=AXIS),
        'autoencoder': dict(**options['init']),
    }[name]
    try:
        return models.create_model(name, **kwargs)
    except ValueError as e:  # e.g. a ResNet depth that is not 6n + 2
        raise ConfigError(f'config.model: {e}') from None


def is_reconstruction(config: ml_collections.ConfigDict) -> bool:
    return config.model.name == 'autoencoder'


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _increasing_steps(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and all(_is_int(b) and b > 0 for b in value)
        and all(a < b for a, b in zip(value, value[1:]))
    )


#: Every field of configs/default.py that has a range (choices are checked in validate_config), with it.
FIELD_RANGES = {
    'scenario': (lambda v: isinstance(v, str) and bool(v), "a non-empty name such as 'mnist_mlp/default'"),
    'seed': (lambda v: _is_int(v) and 0 <= v < 2**31, 'an integer in [0, 2^31 - 1]'),
    'dataset.data_dir': (lambda v: isinstance(v, str), "a directory ('' for tfds's default)"),
    'dataset.validation': (_is_bool, 'True or False'),
    'dataset.validation_size': (
        lambda v: _is_int(v) and v >= 1,
        'an integer >= 1 (training examples held out)',
    ),
    'dataset.train_size': (lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0: every training example)'),
    'dataset.augment': (_is_bool, 'True or False'),
    'dataset.download': (_is_bool, 'True or False'),
    'dataset.standardize': (_is_bool, 'True or False'),
    'model.width': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'model.depth': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'model.kernel_init': (lambda v: v in models.KERNEL_INITS, f'one of {tuple(models.KERNEL_INITS)}'),
    'model.bias_init': (_is_real, 'a finite number'),
    'model.dropout': (lambda v: _is_real(v) and 0 <= v < 1, 'a rate in [0, 1) (0: no dropout)'),
    'model.batchnorm': (_is_bool, 'True or False'),
    'penalty.weight': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'weight_penalty.weight': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'weight_decay': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'optimizer.learning_rate': (lambda v: _is_real(v) and v > 0, 'a finite number > 0'),
    'optimizer.momentum': (lambda v: _is_real(v) and 0 <= v < 1, 'a number in [0, 1)'),
    'optimizer.tf1': (_is_bool, 'True or False'),
    'optimizer.boundaries': (
        _increasing_steps,
        'a strictly increasing tuple of steps >= 1, e.g. (32000, 48000)',
    ),
    'optimizer.decay_factor': (lambda v: _is_real(v) and v > 0, 'a finite number > 0'),
    'batch_size': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'num_epochs': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'num_train_steps': (
        lambda v: _is_int(v) and (v == -1 or v >= 1),
        '-1 (train num_epochs) or an integer >= 1',
    ),
    'eval_batch_size': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'eval_every_epochs': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'steps_per_dispatch': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'checkpoint': (_is_bool, 'True or False'),
}


def _get(config: ml_collections.ConfigDict, field: str):
    for name in field.split('.'):
        config = config[name]
    return config


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    for field, (valid, description) in FIELD_RANGES.items():
        value = _get(config, field)
        if not valid(value):
            raise ConfigError(f'config.{field} must be {description}, got {value!r}.')
    if config.model.name == 'resnet' and (config.model.depth < 8 or (config.model.depth - 2) % 6):
        raise ConfigError(
            'config.model.depth must be 6n + 2 with n >= 1 for a ResNet (e.g. 20, 32, 56, '
            f'110), got {config.model.depth}.'
        )
    dataset = config.dataset
    if dataset.num_classes:
        total = data_lib.NUM_CLASSES[dataset.name]
        if not (_is_int(dataset.num_classes) and 2 <= dataset.num_classes <= total):
            raise ConfigError(
                f'config.dataset.num_classes must be 0 (all) or an integer in [2, {total}] for '
                f'{dataset.name}, got {dataset.num_classes!r}.'
            )


def _check_model_options(config: ml_collections.ConfigDict) -> None:
    """Dropout/batch norm and the initializers only where the model family has them, else ConfigError."""
    name = config.model.name
    if name not in SHAPING_FAMILIES:
        has = {'resnet': ' (the ResNet has batch norm of its own)'}.get(name, '')
        if config.model.dropout:
            raise ConfigError(
                f'config.model.dropout must be 0 for model {name!r}{has}: only '
                f'{list(SHAPING_FAMILIES)} have dropout layers, got {config.model.dropout!r}.'
            )
        if config.model.batchnorm:
            raise ConfigError(
                f'config.model.batchnorm must be False for model {name!r}{has}: only '
                f'{list(SHAPING_FAMILIES)} take optional batch norm, got True.'
            )
    if name not in INIT_FAMILIES:
        defaults = {'kernel_init': 'lecun_normal', 'bias_init': 0.0}
        for field, default in defaults.items():
            if config.model[field] != default:
                raise ConfigError(
                    f'config.model.{field} must be {default!r} for model {name!r} (He init, '
                    f'bias-free convolutions): only {list(INIT_FAMILIES)} take it, got '
                    f'{config.model[field]!r}.'
                )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (a ValueError), naming the field and what it accepts, for anything a run cannot use.

    Checks every field before any data is loaded; what needs the data (batch vs dataset size) is checked
    by `check_data_fits` as soon as it is loaded, before anything is compiled.
    """
    _choice('dataset', config.dataset.name, data_lib.DATASETS)
    _check_ranges(config)
    _check_model_options(config)
    model = model_from_config(config, num_classes=10)
    _choice('representation penalty', config.penalty.name, (NO_PENALTY, *penalties.PENALTIES))
    layers = model.layer_names()
    _choice(f'layer of model {config.model.name!r}', config.penalty.layer, layers)
    _choice('weight penalty', config.weight_penalty.name, (NO_PENALTY, *penalties.WEIGHT_PENALTIES))
    if config.weight_penalty.layer != 'all':
        _choice(
            f'weight-penalty layer of model {config.model.name!r}',
            config.weight_penalty.layer,
            ('all', *layers),
        )
    _choice('optimizer', config.optimizer.name, OPTIMIZERS)
    _choice('learning-rate schedule', config.optimizer.schedule, SCHEDULES)
    if config.batch_size % jax.device_count():
        raise ConfigError(
            f'config.batch_size must be a multiple of the {jax.device_count()} devices, got '
            f'{config.batch_size}.'
        )
    # eval_batch_size needs no such check: evaluation steps are whole training batches (eval_step_size).
    if config.dataset.train_size and config.batch_size > config.dataset.train_size:
        raise ConfigError(
            f'config.batch_size must be at most config.dataset.train_size '
            f'({config.dataset.train_size}), got {config.batch_size}.'
        )


def check_data_fits(config: ml_collections.ConfigDict, num_train: int) -> int:
    """The number of steps the run trains; raises ConfigError where the loaded data cannot give one."""
    if config.batch_size > num_train:
        raise ConfigError(
            f'config.batch_size must be at most the {num_train} training examples of '
            f'{config.dataset.name}, got {config.batch_size}.'
        )
    if config.num_train_steps > 0:
        return config.num_train_steps
    return config.num_epochs * (num_train // config.batch_size)


# ------------------------------------------------------------------------------------------------------------
# Optimizer.


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    opt = config.optimizer
    if opt.schedule == 'constant':
        learning_rate = opt.learning_rate
    else:  # He et al. 2016: divide by 10 at the given step boundaries.
        learning_rate = optax.piecewise_constant_schedule(
            opt.learning_rate, {int(b): opt.decay_factor for b in opt.boundaries}
        )
    if opt.name == 'adam':
        return optim.tf1_adam(learning_rate) if opt.tf1 else optax.adam(learning_rate)
    if opt.name == 'momentum':
        return optax.sgd(learning_rate, momentum=opt.momentum)
    if opt.name == 'rmsprop':
        return optim.tf1_rmsprop(learning_rate) if opt.tf1 else optax.rmsprop(learning_rate)
    return optax.sgd(learning_rate)
