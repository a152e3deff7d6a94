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

They exist to check ``jax.grad`` of the penalties and to explain the regularizers: VR pulls each activation
towards its unit's mean, cw-VR towards its class mean; CR and cw-CR do the same weighted by the covariances
c_ij. They are written from the formulas (per-class I×I covariance matrices), not for speed: use them on
layers of up to a few thousand units. (The penalties differentiate CR, cw-CR, VR and cw-VR with the same
closed forms, written for speed: for CR/cw-CR the Gram or covariance form, one product; all are checked
against the float64 oracle.) With ``axis_name`` the statistics are those of the global batch and each
device gets its slice of the global gradient.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from jax import lax

from cwreg.penalties import AxisName, _as_labels, _as_units, _axis_size, _psum, _single_class

Array = jax.Array
_PRECISION = lax.Precision.HIGHEST


def _statistics(z: Array, y: Array, axis_name: AxisName) -> tuple[Array, Array, Array]:
  """Eqs. (4)–(5) over the global batch.

  Returns:
    centred (N, I): z_n − μ^{k(n)}; counts (K,): |S_k|; covariances (K, I, I): c^k_ij (0 for absent k).
  """
  counts = _psum(jnp.sum(y, axis=0), axis_name)
  safe_counts = jnp.maximum(counts, 1.0)
  means = _psum(jnp.einsum('nk,ni->ki', y, z, precision=_PRECISION), axis_name) / safe_counts[:, None]
  centred = z - jnp.einsum('nk,ki->ni', y, means, precision=_PRECISION)
  scatter = _psum(jnp.einsum('nk,ni,nj->kij', y, centred, centred, precision=_PRECISION), axis_name)
  return centred, counts, scatter / safe_counts[:, None, None]


def _covariance_gradient(activations: chex.Array, y: Array, axis_name: AxisName) -> Array:
  z = _as_units(activations)
  num_classes, num_units = y.shape[1], z.shape[1]
  if num_units < 2:
    return jnp.zeros_like(activations)
  centred, counts, covariances = _statistics(z, y, axis_name)
  off_diagonal = covariances * (1.0 - jnp.eye(num_units, dtype=z.dtype))
  # Σ_{j≠i} c^k_ij (z_jn − μ^k_j) for the class k of sample n, scaled by 1/|S_k|.
  scale = 4.0 / (num_classes * num_units * (num_units - 1.0) * jnp.maximum(counts, 1.0))
  grad = jnp.einsum('nk,kij,nj->ni', y * scale, off_diagonal, centred, precision=_PRECISION)
  return grad.reshape(activations.shape).astype(activations.dtype)


def _variance_gradient(activations: chex.Array, y: Array, axis_name: AxisName) -> Array:
  z = _as_units(activations)
  num_classes, num_units = y.shape[1], z.shape[1]
  centred, counts, _ = _statistics(z, y, axis_name)
  scale = 2.0 / (num_classes * num_units * jnp.maximum(counts, 1.0))
  grad = centred * jnp.einsum('nk,k->n', y, scale)[:, None]
  return grad.reshape(activations.shape).astype(activations.dtype)


def cr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
       axis_name: AxisName = None) -> Array:
  """∂Ω_CR/∂z = 4/(N I(I−1)) Σ_{j≠i} c_ij (z_jn − μ_j); labels are ignored."""
  del one_hot_labels
  return _covariance_gradient(activations, _single_class(_as_units(activations)), axis_name)


def cw_cr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
          axis_name: AxisName = None) -> Array:
  """∂Ω_cw-CR/∂z = 4/(K I(I−1)|S_k|) Σ_{j≠i} c^k_ij (z_jn − μ^k_j), n ∈ S_k."""
  y = _as_labels(one_hot_labels, _as_units(activations), 'cw_cr')
  return _covariance_gradient(activations, y, axis_name)


def vr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
       axis_name: AxisName = None) -> Array:
  """∂Ω_VR/∂z = 2/(N I) (z_in − μ_i); labels are ignored."""
  del one_hot_labels
  return _variance_gradient(activations, _single_class(_as_units(activations)), axis_name)


def cw_vr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
          axis_name: AxisName = None) -> Array:
  """∂Ω_cw-VR/∂z = 2/(K I |S_k|) (z_in − μ^k_i), n ∈ S_k."""
  y = _as_labels(one_hot_labels, _as_units(activations), 'cw_vr')
  return _variance_gradient(activations, y, axis_name)


def l1r(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
        axis_name: AxisName = None) -> Array:
  """∂Ω_L1R/∂z = sign(z_in)/(N I), N the global batch size; labels are ignored."""
  del one_hot_labels
  z = _as_units(activations)
  num_samples = z.shape[0] * _axis_size(axis_name)
  grad = jnp.sign(z) / (float(num_samples) * float(z.shape[1]))
  return grad.reshape(activations.shape).astype(activations.dtype)
