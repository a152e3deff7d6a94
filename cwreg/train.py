"""Training and evaluation: task loss + λ·Ω(chosen representation) + weight penalties, pmapped with optax.

The objective of one run is the paper's J̃ = J + λ Ω(z, y) (eq. 7), plus optionally an L1/L2 weight
penalty and He et al.'s weight decay:

    J̃ = mean task loss over the global batch + λ Ω(z over the global batch) + λ_w W(kernels) + wd ½‖w‖²

Data parallelism. The per-device step is a pure function with ``axis_name='batch'`` mapped with
``jax.pmap`` over all local devices (on a single device: ``jit(vmap)``, see ``device_map``). Under
``pmap``, ``jax.grad`` of a device's loss ℓ_d w.r.t. its inputs is ∂(Σ_d ℓ_d)/∂(inputs) (psum and pmean
transpose to psum), so each device minimizes its *share* of J̃:
ℓ_d = (task_d + weight terms) / D + λ Ω, where Ω (``cwreg.penalties`` with ``axis_name``) already has the
global value and a per-device gradient that sums to the global one. Summing the parameter gradients
(``psum``) then gives exactly ∇J̃ — the same update as one device on the whole batch, BatchNorm statistics
(synced through the same axis) included.

Dropout and batch norm (config.model.dropout/batchnorm, MLP and CNN). The dropout rate is a traced per-run
input like λ (weights['dropout']), so runs that differ only in it form one group. Its masks come from a
per-step key that every device shares, fold_in(fold_in(run key, DROPOUT_STREAM), step), and each example's
index in the global batch (models.dropout), and BatchNorm averages its statistics over `AXIS`: a step on D
devices is the step on one, and a resumed run repeats the masks of the uninterrupted one.

Input. Small datasets live in device memory; each epoch's order is a permutation drawn from
(seed, epoch), and ``steps_per_dispatch`` steps run as one ``lax.scan`` so a step never waits on the host.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.metadata
import json
import logging as std_logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
from clu import metric_writers
import flax
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cwreg import data as data_lib
from cwreg import models
from cwreg import optim
from cwreg import penalties

AXIS = 'batch'
OPTIMIZERS = ('adam', 'momentum', 'rmsprop', 'sgd')
KERNEL_INITS = ('lecun_normal', 'glorot_uniform')
SCHEDULES = ('constant', 'piecewise')
NO_PENALTY = 'none'
#: Folded into a run's key for its dropout keys; the augmentation keys fold the step in first, and a step
#: never reaches this value, so the two streams never share a key.
DROPOUT_STREAM = 0x64726F70  # 'drop'


class TrainState(train_state.TrainState):
    batch_stats: Any = None


# ------------------------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong with a config fails here, before any data is loaded.


class ConfigError(ValueError):
    """A config a run cannot use, or that does not match its workdir; the message says what is accepted."""


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
        'init': dict(kernel_init=config.model.get('kernel_init', 'lecun_normal'),
                     bias_init=float(config.model.get('bias_init', 0.0))),
        # dropout: whether the layers exist; their rate is a traced per-run input (weights['dropout']).
        'shaping': dict(dropout=config.model.get('dropout', 0.0) > 0, batchnorm=batchnorm,
                        bn_axis_name=AXIS if batchnorm else None),
    }


def model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> models.nn.Module:
    """Builds the configured model; config.model.width/depth mean what the family's constructor says."""
    name = config.model.name
    _choice('model', name, models.MODELS)
    options = _model_options(config)
    kwargs = {
        'mlp': dict(num_classes=num_classes, width=config.model.width, depth=config.model.depth,
                    **options['init'], **options['shaping']),
        'cnn': dict(num_classes=num_classes, fc_width=config.model.width, **options['init'],
                    **options['shaping']),
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
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _increasing_steps(value) -> bool:
    return (isinstance(value, (tuple, list)) and all(_is_int(b) and b > 0 for b in value)
            and all(a < b for a, b in zip(value, value[1:])))


#: Every field of configs/default.py that has a range (choices are checked in validate_config), with it.
FIELD_RANGES = {
    'scenario': (lambda v: isinstance(v, str) and bool(v), "a non-empty name such as 'mnist_mlp/default'"),
    'seed': (lambda v: _is_int(v) and 0 <= v < 2**31, 'an integer in [0, 2^31 - 1]'),
    'dataset.data_dir': (lambda v: isinstance(v, str), "a directory ('' for tfds's default)"),
    'dataset.validation': (_is_bool, 'True or False'),
    'dataset.train_size': (lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0: every training example)'),
    'dataset.augment': (_is_bool, 'True or False'),
    'dataset.download': (_is_bool, 'True or False'),
    'dataset.standardize': (_is_bool, 'True or False'),
    'model.width': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'model.depth': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'model.kernel_init': (lambda v: v in KERNEL_INITS, f'one of {KERNEL_INITS}'),
    'model.bias_init': (_is_real, 'a finite number'),
    'model.dropout': (lambda v: _is_real(v) and 0 <= v < 1, 'a rate in [0, 1) (0: no dropout)'),
    'model.batchnorm': (_is_bool, 'True or False'),
    'penalty.weight': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'weight_penalty.weight': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'weight_decay': (lambda v: _is_real(v) and v >= 0, 'a finite number >= 0'),
    'optimizer.learning_rate': (lambda v: _is_real(v) and v > 0, 'a finite number > 0'),
    'optimizer.momentum': (lambda v: _is_real(v) and 0 <= v < 1, 'a number in [0, 1)'),
    'optimizer.tf1': (_is_bool, 'True or False'),
    'optimizer.boundaries': (_increasing_steps,
                             'a strictly increasing tuple of steps >= 1, e.g. (32000, 48000)'),
    'optimizer.decay_factor': (lambda v: _is_real(v) and v > 0, 'a finite number > 0'),
    'batch_size': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'num_epochs': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'num_train_steps': (lambda v: _is_int(v) and (v == -1 or v >= 1),
                        '-1 (train num_epochs) or an integer >= 1'),
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
        raise ConfigError('config.model.depth must be 6n + 2 with n >= 1 for a ResNet (e.g. 20, 32, 56, '
                          f'110), got {config.model.depth}.')
    dataset = config.dataset
    if dataset.num_classes:
        total = data_lib.NUM_CLASSES[dataset.name]
        if not (_is_int(dataset.num_classes) and 2 <= dataset.num_classes <= total):
            raise ConfigError(f'config.dataset.num_classes must be 0 (all) or an integer in [2, {total}] for '
                              f'{dataset.name}, got {dataset.num_classes!r}.')


def _check_model_options(config: ml_collections.ConfigDict) -> None:
    """Dropout/batch norm and the initializers only where the model family has them, else ConfigError."""
    name = config.model.name
    if name not in SHAPING_FAMILIES:
        has = {'resnet': ' (the ResNet has batch norm of its own)'}.get(name, '')
        if config.model.dropout:
            raise ConfigError(f'config.model.dropout must be 0 for model {name!r}{has}: only '
                              f'{list(SHAPING_FAMILIES)} have dropout layers, got {config.model.dropout!r}.')
        if config.model.batchnorm:
            raise ConfigError(f'config.model.batchnorm must be False for model {name!r}{has}: only '
                              f'{list(SHAPING_FAMILIES)} take optional batch norm, got True.')
    if name not in INIT_FAMILIES:
        defaults = {'kernel_init': 'lecun_normal', 'bias_init': 0.0}
        for field, default in defaults.items():
            if config.model[field] != default:
                raise ConfigError(f'config.model.{field} must be {default!r} for model {name!r} (He init, '
                                  f'bias-free convolutions): only {list(INIT_FAMILIES)} take it, got '
                                  f'{config.model[field]!r}.')


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
        _choice(f'weight-penalty layer of model {config.model.name!r}', config.weight_penalty.layer,
                ('all', *layers))
    _choice('optimizer', config.optimizer.name, OPTIMIZERS)
    _choice('learning-rate schedule', config.optimizer.schedule, SCHEDULES)
    if config.batch_size % jax.device_count():
        raise ConfigError(f'config.batch_size must be a multiple of the {jax.device_count()} devices, got '
                          f'{config.batch_size}.')
    # eval_batch_size needs no such check: evaluation steps are whole training batches (eval_step_size).
    if config.dataset.train_size and config.batch_size > config.dataset.train_size:
        raise ConfigError(f'config.batch_size must be at most config.dataset.train_size '
                          f'({config.dataset.train_size}), got {config.batch_size}.')


def check_data_fits(config: ml_collections.ConfigDict, num_train: int) -> int:
    """The number of steps the run trains; raises ConfigError where the loaded data cannot give one."""
    if config.batch_size > num_train:
        raise ConfigError(f'config.batch_size must be at most the {num_train} training examples of '
                          f'{config.dataset.name}, got {config.batch_size}.')
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
            opt.learning_rate, {int(b): opt.decay_factor for b in opt.boundaries})
    if opt.name == 'adam':
        return optim.tf1_adam(learning_rate) if opt.tf1 else optax.adam(learning_rate)
    if opt.name == 'momentum':
        return optax.sgd(learning_rate, momentum=opt.momentum)
    if opt.name == 'rmsprop':
        return optim.tf1_rmsprop(learning_rate) if opt.tf1 else optax.rmsprop(learning_rate)
    return optax.sgd(learning_rate)


# ------------------------------------------------------------------------------------------------------------
# The per-device step.


@dataclasses.dataclass(frozen=True)
class Task:
    """What one run optimizes: static (hashable) parts of the config the step is traced with."""
    model: Any
    reconstruction: bool
    num_classes: int
    penalty: Optional[str]
    layer: str
    weight_penalty: Optional[str]
    weight_penalty_layer: str
    weight_decay: float
    augment: bool
    fuse_steps: bool  # lax.scan over steps; off for convnets on CPU (XLA:CPU conv gradients in loops are slow)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> 'Task':
        none_to_null = lambda name: None if name == NO_PENALTY else name
        return cls(
            model=model_from_config(config, num_classes),
            reconstruction=is_reconstruction(config),
            num_classes=num_classes,
            penalty=none_to_null(config.penalty.name),
            layer=config.penalty.layer,
            weight_penalty=none_to_null(config.weight_penalty.name),
            weight_penalty_layer=config.weight_penalty.layer,
            weight_decay=float(config.weight_decay),
            augment=bool(config.dataset.augment),
            fuse_steps=not (jax.default_backend() == 'cpu' and config.model.name in ('cnn', 'resnet')),
        )


def _layer_params(model, params, layer: str):
    """The parameters that produce representation `layer` (all of them for 'all')."""
    if layer == 'all':
        return params
    return {name: params[name] for name in model.param_names(layer)}


def _has_dropout(task: Task) -> bool:
    return bool(getattr(task.model, 'dropout', False))


def _forward(task: Task, params, batch_stats, images, train: bool, dropout_rate=None, dropout_rng=None,
             example_ids=None):
    """(outputs, sown intermediates, new batch_stats); training batch norm uses and updates batch statistics.

    A model with dropout needs, in training, `dropout_rate` (traced), `dropout_rng` and `example_ids` (see
    models.dropout); evaluation (train=False) applies no dropout and uses BN's running averages.
    """
    variables = {'params': params}
    mutable = ['intermediates']
    if batch_stats is not None:
        variables['batch_stats'] = batch_stats
        if train:
            mutable.append('batch_stats')
    kwargs = {}
    if train and _has_dropout(task):
        kwargs = dict(dropout_rate=dropout_rate, example_ids=example_ids, rngs={'dropout': dropout_rng})
    outputs, updates = task.model.apply(variables, images, train=train, mutable=mutable, **kwargs)
    intermediates = {name: value[0] for name, value in updates['intermediates'].items()}
    return outputs, intermediates, updates.get('batch_stats', batch_stats)


def _per_example_loss(task: Task, outputs, images, labels):
    """Per-example cross-entropy and correctness or, for the autoencoder, squared error per pixel (and 0)."""
    outputs = outputs.astype(jnp.float32)
    if task.reconstruction:
        targets = images.reshape(images.shape[0], -1)
        return jnp.mean(jnp.square(outputs - targets), -1), jnp.zeros(outputs.shape[0], bool)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return loss, jnp.argmax(outputs, -1) == labels


def _penalty_value(task: Task, intermediates, labels, axis_name):
    if task.penalty is None:
        return jnp.zeros(())
    # Each device minimizes its share of J̃ and the shares' gradients are psummed: the 'psum' convention.
    return penalties.get_penalty(task.penalty)(intermediates[task.layer], labels, num_classes=task.num_classes,
                                               axis_name=axis_name, grad_reduction='psum')


def _weight_terms(task: Task, params, weights):
    total = jnp.zeros(())
    if task.weight_penalty is not None:
        fn = penalties.WEIGHT_PENALTIES[task.weight_penalty]
        total += weights['weight_penalty'] * fn(_layer_params(task.model, params, task.weight_penalty_layer))
    if task.weight_decay:
        total += task.weight_decay * penalties.l2w(params)
    return total


def train_step(task: Task, state: TrainState, images, labels, weights, rng, axis_name=AXIS, dropout_rng=None):
    """One optimizer step on this device's part of the global batch (inside pmap over `axis_name`).

    Args:
      task: static description of the run.
      state: replicated train state.
      images, labels: this device's examples (local batch).
      weights: {'penalty': λ, 'weight_penalty': λ_w, 'dropout': rate} as traced scalars (so runs can be
        vmapped over them); 'dropout' is read only by a model with dropout.
      rng: per-step key (augmentation).
      dropout_rng: per-step dropout key, the same on every device (default: `rng`). Each example's masks
        are drawn from it and the example's index in the global batch (device · local batch + position),
        so the step does not depend on how many devices share the batch.
    Returns:
      new state and metrics {'loss', 'penalty', 'correct', 'objective'} of the global batch.
    """
    num_devices = lax.axis_size(axis_name)
    local_batch = labels.shape[0]
    example_ids = lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)
    dropout_rate = weights['dropout'] if _has_dropout(task) else None
    dropout_rng = rng if dropout_rng is None else dropout_rng
    if task.augment:
        images = data_lib.augment_cifar(rng, images)

    def objective(params):
        outputs, intermediates, new_batch_stats = _forward(task, params, state.batch_stats, images, True,
                                                           dropout_rate, dropout_rng, example_ids)
        per_example, is_correct = _per_example_loss(task, outputs, images, labels)
        loss, correct = jnp.mean(per_example), jnp.sum(is_correct)
        penalty = _penalty_value(task, intermediates, labels, axis_name)
        share = (loss + _weight_terms(task, params, weights)) / num_devices + weights['penalty'] * penalty
        return share, (loss, correct, penalty, new_batch_stats)

    grads, (loss, correct, penalty, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
    grads = lax.psum(grads, axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        'loss': lax.pmean(loss, axis_name),
        'penalty': penalty,
        'correct': lax.psum(correct, axis_name),
    }
    return state, metrics


def train_chunk(task: Task, num_steps: int, global_batch: int, state: TrainState, images, labels, order,
                first_step, weights, rng, axis_name=AXIS):
    """`num_steps` steps as one scan; step s reads order[(first_step+s)·B : …+B], this device's slice.

    Returns the new state and per-step metrics (num_steps,) so a NaN can be traced to its step.
    """
    local_batch = global_batch // lax.axis_size(axis_name)
    device = lax.axis_index(axis_name)

    def body(state, step_in_chunk):
        offset = (first_step + step_in_chunk) * global_batch + device * local_batch
        index = lax.dynamic_slice_in_dim(order, offset, local_batch)
        step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
        # Not folded with the device: dropout masks are a function of (run, step, example) only.
        dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, DROPOUT_STREAM), state.step)
        return train_step(task, state, images[index], labels[index], weights, step_rng, axis_name,
                          dropout_rng=dropout_rng)

    if task.fuse_steps:
        return lax.scan(body, state, jnp.arange(num_steps))
    # XLA:CPU runs convolution gradients inside a loop 30-50x slower than outside one (jax#12868).
    metrics = []
    for step_in_chunk in range(num_steps):
        state, step_metrics = body(state, step_in_chunk)
        metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


def eval_chunk(task: Task, state: TrainState, images, labels, mask, axis_name=AXIS):
    """Sums over this device's evaluation steps (S, K, B/D, ...): K training-size batches per step.

    Padding examples have mask 0. The penalty is a batch statistic, so it is computed as training computes
    it, over batches of the training batch size (this device's slice of each), and counted on full ones only.
    """

    def body(totals, batch):
        x, y, m = batch
        num_batches, local = y.shape
        merge = lambda a: a.reshape((num_batches * local,) + a.shape[2:])
        outputs, intermediates, _ = _forward(task, state.params, state.batch_stats, merge(x), False)
        per_example, is_correct = _per_example_loss(task, outputs, merge(x), merge(y))
        z = intermediates[task.layer]
        z = z.reshape((num_batches, local) + z.shape[1:])
        penalty = jax.vmap(lambda z_b, y_b: _penalty_value(task, {task.layer: z_b}, y_b, axis_name))(z, y)
        full = lax.pmin(jnp.min(m, axis=1), axis_name)
        totals = jax.tree.map(jnp.add, totals, {
            'loss': jnp.sum(per_example * merge(m)), 'correct': jnp.sum(is_correct * merge(m)),
            'count': jnp.sum(m), 'penalty': jnp.sum(penalty * full), 'penalty_batches': jnp.sum(full)})
        return totals, None

    zeros = {k: jnp.zeros(()) for k in ('loss', 'correct', 'count', 'penalty', 'penalty_batches')}
    totals, _ = lax.scan(body, zeros, (images, labels, mask))
    sums = {k: v for k, v in totals.items() if not k.startswith('penalty')}
    sums = lax.psum(sums, axis_name)
    sums['penalty'] = totals['penalty']
    sums['penalty_batches'] = totals['penalty_batches']
    return sums


# ------------------------------------------------------------------------------------------------------------
# Host side. A *group* is a set of runs that differ only in seed and λ: they are trained together as one
# vmapped program (one run is a group of one), which is what makes a λ search cheap on an accelerator.


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """The dataset a config asks for (cached: a sweep's groups share it)."""
    d = config.dataset
    dataset = _load_data(d.name, d.data_dir or None, bool(d.validation), d.train_size or None,
                         d.num_classes or None, bool(d.get('download', False)))
    return data_lib.standardized(dataset) if d.get('standardize', False) else dataset


@functools.lru_cache(maxsize=2)
def _load_data(name, data_dir, validation, train_size, num_classes, download) -> data_lib.Dataset:
    return data_lib.load_dataset(name, data_dir=data_dir, validation=validation, train_size=train_size,
                                 num_classes=num_classes, download=download)


def device_map(fn, donate_argnums: tuple[int, ...] = ()):
    """`jax.pmap(fn, axis_name=AXIS)` over the local devices, mapping axis 0 of every argument and output.

    With a single device in the whole job it is instead `jit(vmap(fn, axis_name=AXIS))` over the size-1
    device axis: the same computation (collectives over one participant are identities), but XLA:CPU runs
    the jitted program ~13 % faster than the pmapped one (the MNIST MLP step: 0.80 vs 0.93 ms). The two
    round differently (≈1e-7 after 500 steps), so a run is bitwise reproducible on the same device count.
    """
    if jax.device_count() == 1:
        return jax.jit(jax.vmap(fn, axis_name=AXIS), donate_argnums=donate_argnums)
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)


def shard(tree):
    """Puts arrays with a leading axis of size local_device_count() one slice per device, as pmap expects."""
    devices = jax.local_devices()
    # pmap returns arrays sharded over a mesh axis named after its axis_name: inputs laid out the same way
    # let a step's first call reuse the program of its later calls (else it compiles twice, ~0.8 s each).
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))
    return jax.device_put(tree, sharding)


def replicate(tree):
    """One copy of every array on each local device (leading device axis), as pmap expects."""
    count = jax.local_device_count()
    return shard(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count,) + np.shape(x)), tree))


def unreplicate(tree):
    """The first device's copy of replicated arrays."""
    return jax.tree.map(lambda x: x[0], tree)


def eval_step_size(eval_batch_size: int, batch_size: int) -> int:
    """Examples per evaluation step: the largest multiple of the training batch up to eval_batch_size, and at
    least one training batch, so that the evaluation's penalty is over training-size batches."""
    return max(1, eval_batch_size // batch_size) * batch_size


def _eval_layout(split: data_lib.Split, batch_size: int, per_step: int, num_devices: int):
    """(D, S, K, B/D, ...) arrays (zero-padded, with a mask): S steps of K batches of the training size B,
    each device holding its slice of every batch, as in training."""
    n = len(split.labels)
    steps = math.ceil(n / per_step)
    pad = steps * per_step - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.float32)])
    labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
    mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    shape = (steps, per_step // batch_size, num_devices, batch_size // num_devices)

    def arrange(a):
        return np.moveaxis(a.reshape(shape + a.shape[1:]), 2, 0)

    return arrange(images), arrange(labels), arrange(mask)


def initial_states(task: Task, tx: optax.GradientTransformation, sample: np.ndarray,
                   seeds: Sequence[int]) -> TrainState:
    """The initial TrainStates of runs with these seeds, stacked along a leading run axis.

    One compiled program for all runs: initialising op by op compiles every initializer separately (~2 s for
    the MLP). The parameters are bitwise those of `model.init(PRNGKey(seed), ...)` for the MLP,
    autoencoder and CNN (ResNet's may differ in the last bit).
    """
    def create(key):
        variables = task.model.init(key, jnp.asarray(sample[:1]), train=False)
        return TrainState.create(apply_fn=task.model.apply, params=variables['params'], tx=tx,
                                 batch_stats=variables.get('batch_stats'))

    return jax.jit(jax.vmap(create))(jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]))


def initial_state(task: Task, tx: optax.GradientTransformation, sample: np.ndarray, seed: int) -> TrainState:
    return jax.tree.map(lambda x: x[0], initial_states(task, tx, sample, [seed]))


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run repeats it."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 1), epoch)
    return np.asarray(jax.random.permutation(key, num_examples), np.int32)


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the message names the penalty, λ and step."""


def describe(config: ml_collections.ConfigDict) -> str:
    shaping = ''.join([f', dropout {config.model.dropout}' if config.model.dropout else '',
                       ', batch norm' if config.model.batchnorm else ''])
    return (f'{config.scenario} seed {config.seed}: penalty {config.penalty.name} (λ={config.penalty.weight}, '
            f'layer {config.penalty.layer}), weight penalty {config.weight_penalty.name} '
            f'(λ={config.weight_penalty.weight}){shaping}')


# ------------------------------------------------------------------------------------------------------------
# A run is its whole config: a workdir records the configs it was started with, and refuses others.

#: Fields that change how a run is executed or reported, not what it trains: a workdir resumes with them
#: changed, and a sweep reuses a run whatever they were.
EXECUTION_FIELDS = ('dataset.data_dir', 'dataset.download', 'checkpoint', 'eval_every_epochs',
                    'steps_per_dispatch', 'eval_batch_size')
#: How long a run trains. A workdir's run may be continued into a longer one: its first epochs are the same.
LENGTH_FIELDS = ('num_epochs', 'num_train_steps')
CONFIG_FILE = 'config.json'
SAVER_THREADS = 'cwreg-checkpoint-save'
_ABSENT = '(absent)'


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def training_config(config) -> dict[str, Any]:
    """The fields of a config (or its to_dict()) that decide what a run trains: flat, as JSON stores them."""
    tree = config if isinstance(config, dict) else config.to_dict()
    flat = json.loads(json.dumps(_flatten(tree), default=str))  # tuples and lists compare equal
    return {k: v for k, v in flat.items() if k not in EXECUTION_FIELDS}


def config_differences(recorded, asked, ignore: Sequence[str] = ()) -> list[str]:
    """'field: recorded -> asked' for each field that decides what a run trains and differs in the two."""
    old, new = training_config(recorded), training_config(asked)
    return [f'{k}: {old.get(k, _ABSENT)!r} -> {new.get(k, _ABSENT)!r}' for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _read_json(path: str) -> Optional[Any]:
    """The contents of a JSON file; None, with a warning naming it, if it is truncated or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logging.warning('%s is unreadable (%s: %s); ignoring it.', path, type(e).__name__, e)
        return None


def _write_json(path: str, value: Any) -> None:
    """Writes whole or not at all: a reader (or a kill) never sees half a file."""
    partial = f'{path}.{os.getpid()}.tmp'
    with open(partial, 'w') as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(partial, path)


def recorded_configs(group_dir: str) -> Optional[list[dict[str, Any]]]:
    """The configs a group directory was started with (config.json; results.json of a workdir without)."""
    recorded = None
    if os.path.exists(os.path.join(group_dir, CONFIG_FILE)):
        recorded = _read_json(os.path.join(group_dir, CONFIG_FILE))
        recorded = recorded.get('runs') if isinstance(recorded, dict) else None
    elif os.path.exists(os.path.join(group_dir, 'results.json')):
        result = _read_json(os.path.join(group_dir, 'results.json'))
        recorded = [result['config']] if isinstance(result, dict) and 'config' in result else None
    return recorded if isinstance(recorded, list) and all(isinstance(c, dict) for c in recorded) else None


def check_workdir_config(group_dir: str, configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigMismatchError, listing the fields that differ, if `group_dir` holds another config."""
    recorded = recorded_configs(group_dir)
    if recorded is None:
        return
    if len(recorded) != len(configs):
        raise ConfigMismatchError(f'{group_dir} holds a group of {len(recorded)} run(s), not of these '
                                  f'{len(configs)}. Use another directory, or delete this one to start over.')
    for r, (old, new) in enumerate(zip(recorded, configs)):
        differences = config_differences(old, new, ignore=LENGTH_FIELDS)
        if differences:
            which = f' (run {r} of its group)' if len(configs) > 1 else ''
            raise ConfigMismatchError(
                f'{group_dir} holds a run of another config{which}; fields that differ (recorded -> asked): '
                f'{"; ".join(differences)}. Use another workdir, or delete this one to start over.')


def _record_configs(group_dir: str, configs: Sequence[ml_collections.ConfigDict]) -> None:
    if jax.process_index() == 0:
        _write_json(os.path.join(group_dir, CONFIG_FILE), {'runs': [c.to_dict() for c in configs]})


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, metrics, provenance.


def _group_key(config: ml_collections.ConfigDict) -> str:
    """Everything but seed, the penalty weights and the dropout rate: runs sharing it can be one group.

    Of each weight and the rate only whether it is > 0 counts: that decides the program (a penalty term,
    dropout layers); the values are traced per-run inputs.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = 0
    config.penalty.weight = float(config.penalty.weight > 0)
    config.weight_penalty.weight = float(config.weight_penalty.weight > 0)
    config.model.dropout = float(config.model.dropout > 0)
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


class _OrbaxInfoFilter(std_logging.Filter):
    """Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def _quiet_orbax() -> None:
    absl_logger = std_logging.getLogger('absl')
    if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxInfoFilter())


class _BackendProbeFilter(std_logging.Filter):
    """JAX logs each accelerator backend it does not find ("Unable to initialize backend 'tpu'") at INFO."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or 'Unable to initialize backend' not in record.getMessage())


def quiet_backend_probing() -> None:
    """Drops JAX's INFO lines about absent backends (noise on a CPU); call before the first device query."""
    probe_logger = std_logging.getLogger('jax._src.xla_bridge')
    if not any(isinstance(f, _BackendProbeFilter) for f in probe_logger.filters):
        probe_logger.addFilter(_BackendProbeFilter())


class _RunFiles:
    """A group's checkpoint manager, metric writer and save worker; a `with` block closes them on every exit.

    Saves are synchronous, but run on a worker thread (one at a time) while training goes on: orbax's own
    async mode still blocks the training loop ~30 ms per save, 5 % of an MNIST epoch.
    """

    def __init__(self, group_dir: str):
        self.group_dir = group_dir
        # Only TensorBoard: clu's logging writer would repeat every epoch's progress line on stderr.
        self.writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(group_dir)])
                       if jax.process_index() == 0 else metric_writers.MultiWriter([]))
        self.checkpoints = ocp.CheckpointManager(
            os.path.join(group_dir, 'checkpoints'),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                 enable_async_checkpointing=False))
        self._saver = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                            thread_name_prefix=SAVER_THREADS)
        self._pending = None
        self.saved_epoch = None  # the newest epoch whose checkpoint is committed

    def restore(self, target: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The newest checkpoint that restores into `target`'s structure, or None if none does.

        An unreadable one (truncated, corrupt) is moved aside to `corrupt_checkpoints/`, with a warning.
        """
        for step in sorted(self.checkpoints.all_steps(), reverse=True):
            try:
                restored = self.checkpoints.restore(step, args=ocp.args.StandardRestore(target))
                self.saved_epoch = int(restored['epoch'])
                return restored
            except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
                self._move_aside(step, e)
        self.checkpoints.reload()
        return None

    def _move_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.group_dir, 'checkpoints', str(step))
        stamp = time.strftime('%Y%m%d-%H%M%S')
        aside = os.path.join(self.group_dir, 'corrupt_checkpoints', f'{step}-{stamp}')
        logging.warning('Checkpoint %s is unreadable (%s: %s); moved to %s, resuming from an older one or '
                        'from the start.', path, type(error).__name__, str(error)[:300], aside)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(path, aside)
        self.checkpoints.reload()

    def save(self, epoch: int, snapshot: dict[str, Any]) -> None:
        self.wait()
        self._pending = (epoch, self._saver.submit(self.checkpoints.save, epoch,
                                                   args=ocp.args.StandardSave(snapshot)))

    def wait(self) -> None:
        """Blocks until the pending save is committed; re-raises its error."""
        if self._pending is not None:
            (epoch, future), self._pending = self._pending, None
            future.result()
            self.saved_epoch = epoch

    def __enter__(self) -> '_RunFiles':
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self.wait()
        except Exception as save_error:  # pylint: disable=broad-except
            if error is None:
                raise
            # Another error stops the run already: report the save's too rather than lose it.
            logging.error('The checkpoint save pending when the run stopped failed too: %r', save_error)
        finally:
            self._saver.shutdown()
            self.checkpoints.close()
            self.writer.close()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; str() says where, and what a rerun resumes from."""


def _interrupted(files: _RunFiles, epoch: int, num_epochs: int, step: int, num_steps: int,
                 checkpointing: bool) -> TrainingInterrupted:
    try:
        files.wait()  # the save under way is what a rerun resumes from
    except Exception as e:  # pylint: disable=broad-except
        logging.error('The checkpoint save under way when the run was stopped failed: %r', e)
    where = f'Stopped in epoch {epoch + 1}/{num_epochs} at step {step}/{num_steps} of {files.group_dir}'
    if not checkpointing:
        return TrainingInterrupted(f'{where}; config.checkpoint is off, so the same command starts it over.')
    if files.saved_epoch is None:
        return TrainingInterrupted(f'{where}, before its first checkpoint; the same command starts it over.')
    return TrainingInterrupted(f'{where}; the same command resumes it from its checkpoint of epoch '
                               f'{files.saved_epoch}.')


def run_command(main: Callable[[], Any]) -> Any:
    """Runs a launch script's work so that what a user causes ends in one line on stderr, not a traceback.

    Ctrl-C and SIGTERM say where the run stopped and that the same command resumes it (exit status 130 and
    143); a config the run cannot use, or a dataset not prepared, prints what to change (status 2).
    """
    stopped_by = []

    def on_sigterm(signum, frame):
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main()
    except KeyboardInterrupt as e:
        message = str(e) if isinstance(e, TrainingInterrupted) else (
            'Stopped before training began; the same command starts it again (from its last checkpoint, '
            'if it has one).')
        print(message, file=sys.stderr, flush=True)
        sys.exit(128 + (stopped_by[0] if stopped_by else signal.SIGINT))
    except (ConfigError, data_lib.DatasetNotPreparedError) as e:
        print(f'Error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _git_commit(directory: str) -> Optional[str]:
    """HEAD of the git checkout holding `directory` ('-dirty' with uncommitted changes), if there is one."""
    try:
        head = subprocess.run(['git', '-C', directory, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(['git', '-C', directory, 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ('-dirty' if dirty else '') if head else None


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """What produced a result: code versions and the devices it ran on (recorded in results.json)."""
    try:
        version = importlib.metadata.version('cwreg')
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        'cwreg': version,
        'git_commit': _git_commit(os.path.dirname(os.path.abspath(__file__))),
        'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
        'optax': optax.__version__, 'orbax_checkpoint': ocp.__version__,
        'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
        'process_count': jax.process_count(), 'backend': jax.default_backend(),
    }


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}'


def _steps_per_second(rate: float) -> str:
    return f'{rate:,.0f}' if rate >= 100 else f'{rate:.3g}'


def progress_line(epoch: int, num_epochs: int, step: int, num_steps: int, summary: dict[str, np.ndarray],
                  rate: float) -> str:
    """The one line a run prints per epoch: where it is, the epoch's metrics, speed and time left."""
    values = '  '.join(f'{k} {_brief(v)}' for k, v in summary.items())
    eta = (num_steps - step) / rate if rate > 0 else float('nan')
    return (f'epoch {epoch + 1}/{num_epochs}  step {step}/{num_steps}  {values}  '
            f'{_steps_per_second(rate)} steps/s  ETA {_duration(eta)}')


# ------------------------------------------------------------------------------------------------------------
# Training.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains one run, checkpointing every epoch (resumes from `workdir`), and writes results.json.

    Raises ConfigError before training for a config it cannot run or a workdir holding another config's run,
    NonFiniteLossError as soon as the loss is not finite, and TrainingInterrupted on Ctrl-C or SIGTERM.
    """
    return train_group([config], [workdir], workdir, on_nonfinite='raise')[0]


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str], group_dir: str,
                on_nonfinite: str = 'raise', save_variables: bool = False) -> list[dict[str, Any]]:
    """Trains runs that differ only in seed and λ as one vmapped program; writes each run's results.json.

    Args:
      configs: one config per run; all equal except `seed`, `penalty.weight`, `weight_penalty.weight` and
        `model.dropout` (each > 0 in all runs or in none).
      workdirs: one directory per run (results.json goes there).
      group_dir: where the group's config.json, checkpoints and metrics go (a resumed group continues from
        there; one holding other configs raises ConfigMismatchError).
      on_nonfinite: 'raise' stops at the first non-finite loss; 'record' marks that run 'diverged' (its
        results.json says so) and trains the others on.
      save_variables: also write each run's final variables to `<workdir>/final_variables.msgpack`.
    Returns:
      the results dict of each run.
    """
    _quiet_orbax()
    for config in configs:
        validate_config(config)
    if len({_group_key(c) for c in configs}) > 1:
        raise ConfigError('Runs of a group may differ only in seed and penalty weights (and dropout rate).')
    group_dir = os.path.abspath(group_dir)
    check_workdir_config(group_dir, configs)
    os.makedirs(group_dir, exist_ok=True)
    with _RunFiles(group_dir) as files:
        return _train_group(configs, workdirs, files, on_nonfinite, save_variables)


def _train_group(configs, workdirs, files: _RunFiles, on_nonfinite: str, save_variables: bool):
    start_time = time.time()
    config = configs[0]
    num_runs = len(configs)
    group_dir = files.group_dir
    writer = files.writer
    writer.write_hparams(_flat_hparams(config))

    dataset = load_data(config)
    num_train = len(dataset.train.labels)
    num_steps = check_data_fits(config, num_train)
    task = Task.from_config(config, dataset.num_classes)
    num_devices = jax.local_device_count()
    global_batch = config.batch_size
    steps_per_epoch = num_train // global_batch
    num_epochs = math.ceil(num_steps / steps_per_epoch)

    tx = create_optimizer(config)
    state = jax.device_get(initial_states(task, tx, dataset.train.images, [c.seed for c in configs]))
    state = state.replace(step=np.asarray(state.step[0]))  # one step counter for the whole group
    weights = {'penalty': np.array([c.penalty.weight if task.penalty else 0.0 for c in configs], np.float32),
               'weight_penalty': np.array([c.weight_penalty.weight for c in configs], np.float32),
               'dropout': np.array([c.model.dropout for c in configs], np.float32)}
    rngs = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(c.seed), 2)) for c in configs])
    diverged = [None] * num_runs

    first_epoch = 0
    restored = files.restore({'state': state, 'epoch': 0, 'diverged': np.zeros(num_runs, np.int64)})
    if restored is not None:
        if int(restored['state'].step) > num_steps:
            raise ConfigMismatchError(
                f'{group_dir} holds a run trained for {int(restored["state"].step)} steps, more than the '
                f'{num_steps} asked for (num_epochs={config.num_epochs}, num_train_steps='
                f'{config.num_train_steps}). Use another workdir, or delete this one to start over.')
        state, first_epoch = restored['state'], int(restored['epoch'])
        diverged = [int(s) or None for s in restored['diverged']]
        logging.info('Resumed %s at epoch %d (step %d).', group_dir, first_epoch, int(state.step))
    _record_configs(group_dir, configs)

    images, labels = replicate(dataset.train.images), replicate(dataset.train.labels)
    eval_arrays = shard(_eval_layout(dataset.eval, global_batch,
                                     eval_step_size(config.eval_batch_size, global_batch), num_devices))
    p_state, p_weights = replicate(state), replicate(weights)
    p_rngs = replicate(rngs)
    # Runs are vmapped (axis 0 of state, order, weights, rng); devices are mapped around them.
    p_eval = device_map(jax.vmap(functools.partial(eval_chunk, task),
                                 in_axes=(_state_axes(p_state), None, None, None)))
    compiled = {}

    def run_steps(p_state, p_order, first_step, count):
        if count not in compiled:
            chunk = functools.partial(train_chunk, task, count, global_batch)
            compiled[count] = device_map(
                jax.vmap(chunk, in_axes=(_state_axes(p_state), None, None, 0, None, 0, 0),
                         out_axes=(_state_axes(p_state), 0)),
                donate_argnums=(0,))
        return compiled[count](p_state, images, labels, p_order, replicate(np.int32(first_step)), p_weights,
                               p_rngs)

    step = int(state.step)
    logging.info('Training %d run(s) of %s: %d epochs × %d steps, batch %d on %d device(s).', num_runs,
                 describe(config), num_epochs, steps_per_epoch, global_batch, num_devices)
    timer, first_step, epoch = time.time(), step, first_epoch
    try:
        for epoch in range(first_epoch, num_epochs):
            p_order = replicate(np.stack([epoch_order(c.seed, epoch, num_train) for c in configs]))
            in_epoch, epoch_metrics = 0, []
            while in_epoch < steps_per_epoch and step < num_steps:
                per_dispatch = config.steps_per_dispatch if task.fuse_steps else 1
                count = min(per_dispatch, steps_per_epoch - in_epoch, num_steps - step)
                p_state, metrics = run_steps(p_state, p_order, in_epoch, count)
                # Fetching blocks, which also paces XLA's CPU collectives (they deadlock if 100+ are queued).
                metrics = jax.tree.map(lambda m: np.asarray(m[0]), metrics)  # (runs, steps)
                _check_finite(metrics, step, diverged, configs, on_nonfinite)
                epoch_metrics.append(metrics)
                in_epoch += count
                step += count
            summary = _epoch_summary(task, epoch_metrics, global_batch)
            if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == num_epochs:
                summary.update(_evaluate(p_eval, p_state, eval_arrays, task, prefix='eval_'))
            rate = (step - first_step) / max(time.time() - timer, 1e-9)
            for r in range(num_runs):
                writer.write_scalars(step, {f'{k}/run{r}' if num_runs > 1 else k: v[r]
                                            for k, v in summary.items()})
            writer.write_scalars(step, {'steps_per_sec': rate})
            if jax.process_index() == 0:
                print(progress_line(epoch, num_epochs, step, num_steps, summary, rate), flush=True)
            if config.checkpoint:
                # A host copy: the next dispatch donates p_state's buffers.
                files.save(epoch + 1, {'state': jax.device_get(unreplicate(p_state)), 'epoch': epoch + 1,
                                       'diverged': np.array([d or 0 for d in diverged], np.int64)})
        files.wait()  # results only once every checkpoint is safe
    except KeyboardInterrupt:
        raise _interrupted(files, epoch, num_epochs, step, num_steps, bool(config.checkpoint)) from None
    train_seconds = time.time() - timer
    final = _evaluate(p_eval, p_state, eval_arrays, task)
    writer.flush()
    final_state = unreplicate(p_state)
    results = []
    for r, (run_config, workdir) in enumerate(zip(configs, workdirs)):
        result = {
            **run_identity(run_config),
            'eval_split': 'validation' if run_config.dataset.validation else 'test',
            'error': None if task.reconstruction or diverged[r] else final['error'][r],
            'loss': None if diverged[r] else final['loss'][r],
            'penalty_value': None if diverged[r] else final['penalty'][r],
            'epochs': num_epochs,
            'steps': step,
            'wall_time_s': (time.time() - start_time) / num_runs,
            'train_loop_s': train_seconds,
            'runs_in_group': num_runs,
            'status': 'diverged' if diverged[r] else 'finished',
            'diverged_at_step': diverged[r],
            'config': run_config.to_dict(),
            'provenance': provenance(),
        }
        if jax.process_index() == 0:
            _write_results(workdir, result, final_state, r if save_variables else None)
        logging.info('Final %s of %s: error=%s loss=%s penalty=%s', result['eval_split'],
                     describe(run_config), result['error'], result['loss'], result['penalty_value'])
        results.append(result)
    return results


def _check_finite(metrics, step: int, diverged: list, configs, on_nonfinite: str) -> None:
    """Marks runs whose loss or penalty went non-finite in this chunk; raises instead for 'raise'."""
    for r in range(len(configs)):
        bad = np.flatnonzero(~np.isfinite(metrics['loss'][r] + metrics['penalty'][r]))
        if bad.size and diverged[r] is None:
            diverged[r] = step + int(bad[0]) + 1
            message = (f'Non-finite training loss at step {diverged[r]}: {describe(configs[r])}; '
                       f'loss={metrics["loss"][r][bad[0]]}, penalty={metrics["penalty"][r][bad[0]]}.')
            if on_nonfinite == 'raise':
                raise NonFiniteLossError(message)
            logging.warning('%s The run is recorded as diverged.', message)


def _write_results(workdir: str, result: dict[str, Any], final_state, run: Optional[int]) -> None:
    """results.json (and, for `run` not None, that run's final variables) in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    if run is not None:
        variables = {'params': final_state.params, 'batch_stats': final_state.batch_stats}
        variables = jax.tree.map(lambda x: np.asarray(x[run]), variables)
        with open(os.path.join(workdir, 'final_variables.msgpack'), 'wb') as f:
            f.write(flax.serialization.msgpack_serialize(
                {k: v for k, v in variables.items() if v is not None}))
    _write_json(os.path.join(workdir, 'results.json'), result)


def _state_axes(state):
    """vmap axes of a group's TrainState: every leaf is per run except the shared step counter."""
    axes = jax.tree.map(lambda _: 0, state)
    return axes.replace(step=None)


def _brief(values) -> str:
    values = np.atleast_1d(values)
    return ','.join(f'{v:.4g}' for v in values[:4]) + ('…' if len(values) > 4 else '')


def _epoch_summary(task: Task, epoch_metrics: list[dict], global_batch: int) -> dict[str, np.ndarray]:
    metrics = {k: np.concatenate([m[k] for m in epoch_metrics], axis=-1) for k in epoch_metrics[0]}
    summary = {'train_loss': metrics['loss'].mean(-1), 'train_penalty': metrics['penalty'].mean(-1)}
    if not task.reconstruction:
        summary['train_error'] = 100.0 * (1.0 - metrics['correct'].sum(-1) / (metrics['correct'].shape[-1]
                                                                             * global_batch))
    return summary


def _evaluate(p_eval, p_state, eval_arrays, task: Task, prefix: str = '') -> dict[str, np.ndarray]:
    """Error (%), mean loss and mean per-batch penalty on the evaluation split, one value per run."""
    sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64), p_eval(p_state, *eval_arrays))
    count = np.maximum(sums['count'], 1.0)
    out = {'loss': sums['loss'] / count,
           'penalty': sums['penalty'] / np.maximum(sums['penalty_batches'], 1.0)}
    if not task.reconstruction:
        out['error'] = 100.0 * (1.0 - sums['correct'] / count)
    return {prefix + k: v for k, v in out.items()}


#: The paper's regularizers (plus L1R): weight penalties, the two non-penalty regularizers it compares
#: with (dropout, batch norm), representation penalties, and 'baseline'.
REGULARIZERS = ('baseline', *penalties.WEIGHT_PENALTIES, 'dropout', 'batchnorm', *penalties.PENALTIES)


def set_regularizer(config: ml_collections.ConfigDict, regularizer: str, weight: float) -> None:
    """Turns on exactly one of REGULARIZERS with weight λ (baseline: none), in place.

    'dropout' takes the rate as its weight (config.model.dropout); 'batchnorm' has no strength and
    ignores the weight (config.model.batchnorm = True). Every other regularizer turns both off.
    """
    _choice('regularizer', regularizer, REGULARIZERS)
    config.penalty.name, config.penalty.weight = NO_PENALTY, 0.0
    config.weight_penalty.name, config.weight_penalty.weight = NO_PENALTY, 0.0
    config.model.dropout, config.model.batchnorm = 0.0, False
    if regularizer in penalties.PENALTIES:
        config.penalty.name, config.penalty.weight = regularizer, float(weight)
    elif regularizer in penalties.WEIGHT_PENALTIES:
        config.weight_penalty.name, config.weight_penalty.weight = regularizer, float(weight)
    elif regularizer == 'dropout':
        config.model.dropout = float(weight)
    elif regularizer == 'batchnorm':
        config.model.batchnorm = True


def regularizer_name(config: ml_collections.ConfigDict) -> str:
    """The regularizer a config trains with (a penalty first, then dropout, then batch norm)."""
    if config.penalty.name != NO_PENALTY and config.penalty.weight > 0:
        return config.penalty.name
    if config.weight_penalty.name != NO_PENALTY and config.weight_penalty.weight > 0:
        return config.weight_penalty.name
    if config.model.get('dropout', 0.0) > 0:  # `get`: results.json of before these fields
        return 'dropout'
    if config.model.get('batchnorm', False):
        return 'batchnorm'
    return 'baseline'


def regularizer_weight(config: ml_collections.ConfigDict) -> float:
    """λ of regularizer_name's regularizer: the rate for dropout, 0 for batch norm and the baseline."""
    name = regularizer_name(config)
    if name in penalties.PENALTIES:
        return float(config.penalty.weight)
    if name in penalties.WEIGHT_PENALTIES:
        return float(config.weight_penalty.weight)
    if name == 'dropout':
        return float(config.model.dropout)
    return 0.0


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Which run of a scenario's protocol `config` is, as its results.json records it."""
    return {'scenario': config.scenario, 'regularizer': regularizer_name(config),
            'weight': regularizer_weight(config), 'seed': config.seed,
            'phase': 'select' if config.dataset.validation else 'final'}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(f'{prefix}{key}.', value)
            elif isinstance(value, (int, float, str, bool)):
                flat[prefix + key] = value

    visit('', config.to_dict())
    return flat
