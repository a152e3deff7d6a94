"""The pure per-device step: forward pass, loss, one optimizer step, a fused chunk of steps, evaluation sums.

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

Everything here runs inside the device map (`cwreg.training.devices.device_map`) over `AXIS`; the host loop
is `cwreg.training.loop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cwreg import penalties
from cwreg.names import NO_PENALTY
from cwreg.training import config as config_lib
from cwreg.training import data as data_lib
from cwreg.training.config import AXIS

#: Folded into a run's key for its dropout keys; the augmentation keys fold the step in first, and a step
#: never reaches this value, so the two streams never share a key.
DROPOUT_STREAM = 0x64726F70  # 'drop'


class TrainState(train_state.TrainState):
    batch_stats: Any = None


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
    fuse_steps: (
        bool  # lax.scan over steps; off for convnets on CPU (XLA:CPU conv gradients in loops are slow)
    )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> 'Task':
        none_to_null = lambda name: None if name == NO_PENALTY else name
        return cls(
            model=config_lib.model_from_config(config, num_classes),
            reconstruction=config_lib.is_reconstruction(config),
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


def _forward(
    task: Task,
    params,
    batch_stats,
    images,
    train: bool,
    dropout_rate=None,
    dropout_rng=None,
    example_ids=None,
):
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
    return penalties.get_penalty(task.penalty)(
        intermediates[task.layer],
        labels,
        num_classes=task.num_classes,
        axis_name=axis_name,
        grad_reduction='psum',
    )


def _weight_terms(task: Task, params, weights):
    total = jnp.zeros(())
    if task.weight_penalty is not None:
        fn = penalties.WEIGHT_PENALTIES[task.weight_penalty]
        total += weights['weight_penalty'] * fn(_layer_params(task.model, params, task.weight_penalty_layer))
    if task.weight_decay:
        total += task.weight_decay * penalties.l2w(params)
    return total


def train_step(
    task: Task,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    weights: dict[str, jax.Array],
    rng: jax.Array,
    axis_name: str = AXIS,
    dropout_rng: Optional[jax.Array] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
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
    rng = typed_key(rng)
    dropout_rng = rng if dropout_rng is None else typed_key(dropout_rng)
    if task.augment:
        images = data_lib.augment_cifar(rng, images)

    def objective(params):
        outputs, intermediates, new_batch_stats = _forward(
            task, params, state.batch_stats, images, True, dropout_rate, dropout_rng, example_ids
        )
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


def typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key: `key` itself, or the key whose raw uint32 data it is (as host arrays hold keys)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def train_chunk(
    task: Task,
    num_steps: int,
    global_batch: int,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    first_step: jax.Array,
    weights: dict[str, jax.Array],
    rng: jax.Array,
    axis_name: str = AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_steps` steps as one scan; step s reads order[(first_step+s)·B : …+B], this device's slice.

    `rng`: the run's key, typed or as raw key data. Returns the new state and per-step metrics (num_steps,)
    so a NaN can be traced to its step.
    """
    rng = typed_key(rng)
    local_batch = global_batch // lax.axis_size(axis_name)
    device = lax.axis_index(axis_name)

    def body(state, step_in_chunk):
        offset = (first_step + step_in_chunk) * global_batch + device * local_batch
        index = lax.dynamic_slice_in_dim(order, offset, local_batch)
        step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
        # Not folded with the device: dropout masks are a function of (run, step, example) only.
        dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, DROPOUT_STREAM), state.step)
        return train_step(
            task, state, images[index], labels[index], weights, step_rng, axis_name, dropout_rng=dropout_rng
        )

    if task.fuse_steps:
        return lax.scan(body, state, jnp.arange(num_steps))
    # XLA:CPU runs convolution gradients inside a loop 30-50x slower than outside one (jax#12868).
    metrics = []
    for step_in_chunk in range(num_steps):
        state, step_metrics = body(state, step_in_chunk)
        metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


def eval_chunk(
    task: Task,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    axis_name: str = AXIS,
) -> dict[str, jax.Array]:
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
        totals = jax.tree.map(
            jnp.add,
            totals,
            {
                'loss': jnp.sum(per_example * merge(m)),
                'correct': jnp.sum(is_correct * merge(m)),
                'count': jnp.sum(m),
                'penalty': jnp.sum(penalty * full),
                'penalty_batches': jnp.sum(full),
            },
        )
        return totals, None

    zeros = {k: jnp.zeros(()) for k in ('loss', 'correct', 'count', 'penalty', 'penalty_batches')}
    totals, _ = lax.scan(body, zeros, (images, labels, mask))
    sums = {k: v for k, v in totals.items() if not k.startswith('penalty')}
    sums = lax.psum(sums, axis_name)
    sums['penalty'] = totals['penalty']
    sums['penalty_batches'] = totals['penalty_batches']
    return sums


def initial_states(
    task: Task, tx: optax.GradientTransformation, sample: np.ndarray, seeds: Sequence[int]
) -> TrainState:
    """The initial TrainStates of runs with these seeds, stacked along a leading run axis.

    One compiled program for all runs: initialising op by op compiles every initializer separately (~2 s for
    the MLP). The parameters are bitwise those of `model.init(jax.random.key(seed), ...)` for the MLP,
    autoencoder and CNN (ResNet's may differ in the last bit).
    """

    def create(key):
        variables = task.model.init(key, jnp.asarray(sample[:1]), train=False)
        return TrainState.create(
            apply_fn=task.model.apply,
            params=variables['params'],
            tx=tx,
            batch_stats=variables.get('batch_stats'),
        )

    return jax.jit(jax.vmap(create))(jnp.stack([jax.random.key(seed) for seed in seeds]))


def initial_state(task: Task, tx: optax.GradientTransformation, sample: np.ndarray, seed: int) -> TrainState:
    return jax.tree.map(lambda x: x[0], initial_states(task, tx, sample, [seed]))


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run repeats it."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)
    return np.asarray(jax.random.permutation(key, num_examples), np.int32)
