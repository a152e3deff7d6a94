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
    """

    ids: Array
    weights: Optional[Array]


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
        weights = None
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
        has_class = jnp.any(weights > 0, axis=1)
        ids = jnp.where(has_class, jnp.argmax(weights, axis=1), num_classes).astype(jnp.int32)
    if labels.shape[0] != num_samples:
        raise ValueError(
            f'{name}: labels have {labels.shape[0]} samples but activations have {num_samples} (shapes must '
            f'agree on N).'
        )
    return Labels(ids, weights), num_classes


def are_hard(labels: Labels, axis_name: AxisName) -> Array:
    """Whether every weight row is one-hot or zero, on all devices (so every device takes one branch)."""
    # ids are each row's argmax (K for rows without a positive weight): a row is hard iff it is their one-hot.
    hard = jnp.all(labels.weights == one_hot(labels.ids, labels.weights.shape[1], labels.weights.dtype))
    if axis_name is None:
        return hard
    return lax.pmin(hard.astype(jnp.int32), axis_name) > 0


def one_hot(ids: Array, num_classes: int, dtype) -> Array:
    """(N, K) rows of the hard labels; the "no class" id K gives a zero row."""
    return jax.nn.one_hot(ids, num_classes, dtype=dtype)
