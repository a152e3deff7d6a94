"""Inputs of the representation penalties: activations, labels in the forms pipelines make, masks.

Shared by :mod:`cwreg.penalties` and :mod:`cwreg.analytic`, so that both read every input the same way.

Accepted labels (``num_classes`` is a static Python int)::

    integer class ids      shape (N,),   any int dtype, with num_classes=K   -> hard labels
    one-hot rows           shape (N, K), float or bool                       -> hard labels
    per-class weights      shape (N, K), non-negative floats (mixup targets) -> weighted statistics

An id outside [0, K) (e.g. −1 padding) and an all-zero row (what ``jax.nn.one_hot(-1, K)`` gives) mean
"no class". An optional boolean ``where`` of shape (N,) removes samples from every statistic and count.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
AxisName = Optional[Any]

ACCEPTED_LABELS = (
    'integer class ids of shape (N,) with num_classes=K, one-hot rows of shape (N, K), or non-negative '
    'per-class weights of shape (N, K)'
)


def psum(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def pmax(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmax(x, axis_name)


def axis_size(axis_name: AxisName) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def as_units(activations: chex.Array) -> Array:
    """(N, ...) -> (N, I) in float32 or wider (bf16/f16 accumulate in f32; f64 stays f64)."""
    activations = jnp.asarray(activations)
    if activations.ndim < 2:
        raise ValueError(
            f'activations must have shape (N, ...) with at least one unit dimension, got shape '
            f'{activations.shape}.'
        )
    chex.assert_type(activations, float)
    dtype = jnp.promote_types(activations.dtype, jnp.float32)
    return activations.reshape(activations.shape[0], -1).astype(dtype)


def as_mask(where: Optional[chex.Array], num_samples: int) -> Optional[Array]:
    """Validates ``where``: None, or a boolean array of shape (N,)."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != (num_samples,):
        raise ValueError(
            f'where must be a boolean array of shape (N,) = ({num_samples},) marking the samples that count; '
            f'got dtype {where.dtype} and shape {where.shape}.'
        )
    return where


class Labels(NamedTuple):
    """Labels of a class-wise penalty, read into the two forms the statistics use.

    Attributes:
      ids: (N,) int32 class of each sample, ``num_classes`` for "no class" (absent, padded or masked).
      weights: (N, K) per-class weights with the mask applied, or None for integer labels.
      soft_rows: (N,) bool, the weight rows that are neither one-hot nor zero; None for integer labels.
    """

    ids: Array
    weights: Optional[Array]
    soft_rows: Optional[Array] = None


def as_labels(
    labels: Optional[chex.Array],
    num_samples: int,
    num_classes: Optional[int],
    where: Optional[Array],
    name: str,
    dtype,
) -> tuple[Labels, int]:
    """Validates and reads labels of a class-wise penalty; returns them and K."""
    if labels is None:
        raise ValueError(f'{name} is a class-wise penalty: it needs labels, {ACCEPTED_LABELS}.')
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.ndim != 1:
            raise ValueError(
                f'{name}: integer labels are class ids and must have shape (N,); got shape {labels.shape}. '
                f'Accepted: {ACCEPTED_LABELS}.'
            )
        if num_classes is None or int(num_classes) < 1:
            raise ValueError(
                f'{name}: integer class ids need num_classes=K (a positive int), got {num_classes!r}.'
            )
        num_classes = int(num_classes)
        ids = labels.astype(jnp.int32)
        valid = (ids >= 0) & (ids < num_classes)
        if where is not None:
            valid = valid & where
        ids = jnp.where(valid, ids, num_classes)
        weights = soft_rows = None
    else:
        if labels.ndim != 2:
            raise ValueError(f'{name}: labels of shape {labels.shape} are not accepted; {ACCEPTED_LABELS}.')
        if num_classes is not None and int(num_classes) != labels.shape[1]:
            raise ValueError(
                f'{name}: num_classes={num_classes} disagrees with labels of shape {labels.shape} (N, K).'
            )
        num_classes = labels.shape[1]
        weights = labels.astype(dtype)
        if where is not None:
            weights = jnp.where(where[:, None], weights, 0)
        ids, soft_rows = _read_rows(weights)
    if labels.shape[0] != num_samples:
        raise ValueError(
            f'{name}: labels have {labels.shape[0]} samples but activations have {num_samples} (shapes must '
            f'agree on N).'
        )
    return Labels(ids, weights, soft_rows), num_classes


def _read_rows(weights: Array) -> tuple[Array, Array]:
    """Each row's class (its first non-zero entry; K for a zero row) and whether it is neither one-hot nor
    zero, from one reduction over the rows: a row is one-hot when it has one non-zero entry and that entry,
    its sum, is 1. A soft row's class is only a stand-in (its statistics take the weighted path).

    One reduction with a combiner of three scalar operations: XLA:CPU runs each operation as a task of about
    1 µs, and sets up every scalar of a combiner on each call (with a combiner that also kept the largest
    weight, one-hot cw-VR at 100×100 units measured about 3 % slower, in runs not paired with this one).
    """
    num_classes = weights.shape[1]
    nonzero = weights != 0  # NaN is non-zero: its row is soft.
    index = jnp.where(nonzero, lax.broadcasted_iota(jnp.int32, weights.shape, 1), num_classes)

    def combine(a, b):
        return lax.min(a[0], b[0]), a[1] + b[1], a[2] + b[2]

    init = (jnp.asarray(num_classes, jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), weights.dtype))
    ids, nonzeros, sums = lax.reduce((index, nonzero.astype(jnp.int32), weights), init, combine, (1,))
    return ids, (nonzeros > 1) | ((nonzeros == 1) & (sums != 1))


def one_hot(ids: Array, num_classes: int, dtype) -> Array:
    """(N, K) rows of the hard labels; the "no class" id K gives a zero row."""
    return jax.nn.one_hot(ids, num_classes, dtype=dtype)
