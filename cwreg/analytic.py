"""Closed-form gradients ∂Ω/∂z of the representation penalties (Choi & Rhee, AAAI 2019, Table 1).

Each function has the signature of its namesake in :mod:`cwreg.penalties` and returns ∂Ω/∂activations with
the shape and dtype of ``activations``. The formulas are Table 1's, scaled to the normalization used in
:mod:`cwreg.penalties` (that of the authors' released code), with z_jn − μ_j written as the centred
activation and S_k the samples of class k::

    ∂Ω_CR/∂z_in    = 4 / (N I(I−1))       Σ_{j≠i} c_ij   (z_jn − μ_j)
    ∂Ω_cw-CR/∂z_in = 4 / (K I(I−1)|S_k|)  Σ_{j≠i} c^k_ij (z_jn − μ^k_j),   n ∈ S_k
    ∂Ω_VR/∂z_in    = 2 / (N I)            (z_in − μ_i)
    ∂Ω_cw-VR/∂z_in = 2 / (K I |S_k|)      (z_in − μ^k_i),                  n ∈ S_k
    ∂Ω_L1R/∂z_in   = sign(z_in) / (N I)   (the subgradient 0 at z_in = 0)

With weighted labels (module docstring of :mod:`cwreg.penalties`), 1/|S_k| is w_nk/W_k and every class
a sample has weight in contributes, centred at its own mean.

They exist to check ``jax.grad`` of the penalties and to explain the regularizers: VR pulls each
activation towards its unit's mean, cw-VR towards its class mean; CR and cw-CR do the same weighted by the
covariances c_ij. They are written from the formulas (per-class I×I covariance matrices), not for speed: use them on
layers of up to a few thousand units. (The penalties differentiate CR, cw-CR, VR and cw-VR with the same
closed forms, written for speed: for CR/cw-CR the Gram or covariance form, one product; all are checked
against the float64 oracle.) With ``axis_name`` the statistics are those of the global batch and each
device gets its slice of the global gradient.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
from jax import lax
import jax.numpy as jnp

from cwreg import labels as labels_lib
from cwreg.labels import AxisName, psum

Array = jax.Array
_PRECISION = lax.Precision.HIGHEST


def _weights(activations, labels, num_classes, where, name: Optional[str]) -> tuple[Array, Array]:
    """(N, I) activations and dense (N, K) weights: one-hot rows for ids, the mask applied (K=1: all-class)."""
    z = labels_lib.as_units(activations)
    mask = labels_lib.as_mask(where, z.shape[0])
    if name is None:
        weights = jnp.ones((z.shape[0], 1), z.dtype)
        return z, weights if mask is None else weights * mask[:, None]
    read, k = labels_lib.as_labels(labels, z.shape[0], num_classes, mask, name, z.dtype)
    weights = labels_lib.one_hot(read.ids, k, z.dtype) if read.weights is None else read.weights
    return z, weights


def _statistics(z: Array, w: Array, axis_name: AxisName) -> tuple[Array, Array, Array]:
    """Weighted eqs. (4)–(5) over the global batch, one class at a time.

    Returns:
      centred (K, N, I): z_n − μ^k; counts (K,): W_k; covariances (K, I, I): c^k_ij (0 for empty k).
    """
    counts = psum(jnp.sum(w, axis=0), axis_name)
    safe_counts = jnp.where(counts > 0, counts, 1.0)
    means = psum(jnp.einsum('nk,ni->ki', w, z, precision=_PRECISION), axis_name) / safe_counts[:, None]
    centred = jnp.where((w.T > 0)[:, :, None], z[None] - means[:, None, :], 0)
    scatter = psum(jnp.einsum('kn,kni,knj->kij', w.T, centred, centred, precision=_PRECISION), axis_name)
    return centred, counts, scatter / safe_counts[:, None, None]


def _covariance_gradient(activations, w: Array, z: Array, axis_name: AxisName) -> Array:
    num_classes, num_units = w.shape[1], z.shape[1]
    if num_units < 2:
        return jnp.zeros_like(activations)
    centred, counts, covariances = _statistics(z, w, axis_name)
    off_diagonal = covariances * (1.0 - jnp.eye(num_units, dtype=z.dtype))
    # Σ_k w_nk/W_k Σ_{j≠i} c^k_ij (z_jn − μ^k_j).
    scale = 4.0 / (num_classes * num_units * (num_units - 1.0) * jnp.where(counts > 0, counts, 1.0))
    grad = jnp.einsum('nk,kij,knj->ni', w * scale, off_diagonal, centred, precision=_PRECISION)
    return grad.reshape(activations.shape).astype(activations.dtype)


def _variance_gradient(activations, w: Array, z: Array, axis_name: AxisName) -> Array:
    num_classes, num_units = w.shape[1], z.shape[1]
    centred, counts, _ = _statistics(z, w, axis_name)
    scale = 2.0 / (num_classes * num_units * jnp.where(counts > 0, counts, 1.0))
    grad = jnp.einsum('nk,kni->ni', w * scale, centred, precision=_PRECISION)
    return grad.reshape(activations.shape).astype(activations.dtype)


def cr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
) -> Array:
    """∂Ω_CR/∂z = 4/(N I(I−1)) Σ_{j≠i} c_ij (z_jn − μ_j); labels are ignored."""
    del labels, num_classes
    z, w = _weights(activations, None, None, where, None)
    return _covariance_gradient(activations, w, z, axis_name)


def cw_cr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
) -> Array:
    """∂Ω_cw-CR/∂z = 4/(K I(I−1)|S_k|) Σ_{j≠i} c^k_ij (z_jn − μ^k_j), n ∈ S_k."""
    z, w = _weights(activations, labels, num_classes, where, 'cw_cr')
    return _covariance_gradient(activations, w, z, axis_name)


def vr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
) -> Array:
    """∂Ω_VR/∂z = 2/(N I) (z_in − μ_i); labels are ignored."""
    del labels, num_classes
    z, w = _weights(activations, None, None, where, None)
    return _variance_gradient(activations, w, z, axis_name)


def cw_vr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
) -> Array:
    """∂Ω_cw-VR/∂z = 2/(K I |S_k|) (z_in − μ^k_i), n ∈ S_k."""
    z, w = _weights(activations, labels, num_classes, where, 'cw_vr')
    return _variance_gradient(activations, w, z, axis_name)


def l1r(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
) -> Array:
    """∂Ω_L1R/∂z = sign(z_in)/(N I), N the global count of unmasked samples; labels are ignored."""
    del labels, num_classes
    z, w = _weights(activations, None, None, where, None)
    count = jnp.maximum(psum(jnp.sum(w), axis_name), 1.0)
    grad = w * jnp.sign(z) / (count * float(z.shape[1]))
    return grad.reshape(activations.shape).astype(activations.dtype)
