"""Representation and weight penalties of Choi & Rhee (AAAI 2019).

All representation penalties share one signature::

    penalty(activations, one_hot_labels=None, *, axis_name=None) -> scalar (float32, or float64 for f64 input)

``activations`` has shape ``(N, ...)`` and is flattened to ``(N, I)`` with ``I`` the product of the
non-batch dimensions (every H·W·C position of a conv feature map is a unit, as in the paper).
``one_hot_labels`` has shape ``(N, K)`` with ``K`` the number of classes of the dataset (absent classes
included); every row is one-hot (with K = 1, the whole batch is one class). Statistics are mini-batch
statistics with the paper's ``1/N`` (per class ``1/|S_k|``), eqs. (1)–(6)::

    μ_i = 1/N Σ_n z_in                 c_ij = 1/N Σ_n (z_in − μ_i)(z_jn − μ_j)        v_i = c_ii
    μ^k_i = 1/|S_k| Σ_{n∈S_k} z_in     c^k_ij = 1/|S_k| Σ_{n∈S_k} (z_in − μ^k_i)(z_jn − μ^k_j)

Normalization follows the authors' released code (it equals Table 1 except for CR/cw-CR, where Table 1's
printed 2/(I(I−1)) prefactor disagrees with Table 1's own gradient by a factor 2; code and gradient agree)::

    Ω_CR    = Σ_{i≠j} c_ij² / (I(I−1))              Ω_VR    = Σ_i v_i / I
    Ω_cw-CR = Σ_k Σ_{i≠j} (c^k_ij)² / (K I(I−1))     Ω_cw-VR = Σ_k Σ_i v^k_i / (K I)
    Ω_L1R   = Σ_n Σ_i |z_in| / (N I)

The all-class penalties are the class-wise ones with a single class (K = 1), so each formula lives in one
place. A class absent from the batch, or with a single sample, contributes exactly 0 (the authors' code
returns NaN for an absent class). Activations of any float dtype are accumulated in at least f32 (bf16 in
f32, f64 in f64).

Wide layers: Σ_k ‖C_k‖²_F is computed either from K per-class I×I covariances (cost K·N·I²) or, exactly,
from the N×N Gram matrix of class-centred activations restricted to same-class pairs (cost N²·I), since
‖Z_kᵀ Z_k‖_F = ‖Z_k Z_kᵀ‖_F. The cheaper form is chosen from the static shapes, so cw-CR on a 65,536-unit
conv feature map costs about as much as a forward pass of the layer, and no N×I×I tensor is ever built.

Gradients: CR, cw-CR, VR and cw-VR are differentiated with Table 1's closed form, installed as a JVP
rule, so forward and reverse mode both cost one more product of the forward pass's size for CR/cw-CR
(autodiff of the forward pass takes two) and an elementwise product for VR/cw-VR, and nothing
differentiates the class statistics. Higher derivatives are autodiff of the rule. L1R uses autodiff.
Per-class sums and look-ups are segment sums and gathers on CPU, where thin one-hot products run several
times slower, and one-hot products elsewhere.

Multiple devices: with ``axis_name`` set inside ``jax.pmap`` or ``jax.shard_map``, every statistic is that
of the global batch (all devices along the axis). The returned value is identical on every device and
equals the single-device penalty of the concatenated batch; ``jax.grad`` of it with respect to a device's
activations is that device's slice of the single-device gradient (see ``_replicated``).

Reference: D. Choi and W. Rhee, "Utilizing Class Information for Deep Network Representation Shaping",
AAAI 2019, arXiv:1809.09307. CR is DeCov (Cogswell et al., ICLR 2016).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Protocol

import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Array = jax.Array
AxisName = Optional[Any]

# f32 matmuls at full precision: on GPUs the default may use TF32, which would make the penalty inexact.
_PRECISION = lax.Precision.HIGHEST


class Penalty(Protocol):

  def __call__(self, activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
               axis_name: AxisName = None) -> Array:
    ...


# ----------------------------------------------------------------------------------------------------------
# Shared statistics.


def _dot(a: Array, b: Array) -> Array:
  return jnp.matmul(a, b, precision=_PRECISION)


def _psum(x: Array, axis_name: AxisName) -> Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _axis_size(axis_name: AxisName) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def _as_units(activations: chex.Array) -> Array:
  """(N, ...) -> (N, I) in float32 or wider."""
  activations = jnp.asarray(activations)
  if activations.ndim < 2:
    raise ValueError(
        f'activations must have shape (N, ...) with at least one unit dimension, got shape '
        f'{activations.shape}.')
  chex.assert_type(activations, float)
  # bf16/f16 accumulate in f32; f64 (with jax_enable_x64) stays f64.
  dtype = jnp.promote_types(activations.dtype, jnp.float32)
  return activations.reshape(activations.shape[0], -1).astype(dtype)


def _as_labels(one_hot_labels: Optional[chex.Array], z: Array, name: str) -> Array:
  if one_hot_labels is None:
    raise ValueError(f'{name} is a class-wise penalty: it needs one_hot_labels of shape (N, K).')
  one_hot_labels = jnp.asarray(one_hot_labels)
  chex.assert_rank(one_hot_labels, 2)
  chex.assert_equal_shape_prefix((z, one_hot_labels), prefix_len=1)
  return one_hot_labels.astype(z.dtype)


@jax.custom_jvp
def _abs(x: Array) -> Array:
  """|x| whose derivative is sign(x), 0 at 0 as in Table 1's L1R gradient (jax.grad(jnp.abs)(0.) is 1)."""
  return jnp.abs(x)


@_abs.defjvp
def _abs_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * dx


def _single_class(z: Array) -> Array:
  return jnp.ones((z.shape[0], 1), z.dtype)


# Per-class sums and look-ups. One-hot products are the portable form. XLA:CPU runs thin products (K ≪ N, I)
# several times slower than segment sums and gathers, so it gets those, except for K = 1: there the product
# with the column of ones stays, because XLA:CPU sums over the leading axis of a wide array (a plain sum, or
# the transpose of a broadcast) up to 40× slower (32 ms vs 0.7 ms at 100×65536).


def _class_sums(values: Array, y: Array) -> Array:
  """Σ_{n∈S_k} values_n for every class k: (N, ...) -> (K, ...)."""
  by_product = lambda v, y: jnp.tensordot(y.T, v, axes=1, precision=_PRECISION)
  if y.shape[1] == 1:
    return by_product(values, y)
  return lax.platform_dependent(
      values, y, default=by_product,
      cpu=lambda v, y: jax.ops.segment_sum(v, jnp.argmax(y, axis=1), num_segments=y.shape[1]))


def _of_own_class(class_values: Array, y: Array) -> Array:
  """The entry of each sample's class: (K, ...) -> (N, ...)."""
  by_product = lambda v, y: jnp.tensordot(y, v, axes=1, precision=_PRECISION)
  if y.shape[1] == 1:
    return by_product(class_values, y)
  return lax.platform_dependent(class_values, y, default=by_product,
                                cpu=lambda v, y: v[jnp.argmax(y, axis=1)])


def _same_class(y: Array, other_y: Array) -> Array:
  """(N, M) indicator that sample n of y and sample m of other_y share a class."""
  if y.shape[1] == 1:
    return jnp.ones((y.shape[0], other_y.shape[0]), y.dtype)
  same_index = lambda a, b: jnp.argmax(a, axis=1)[:, None] == jnp.argmax(b, axis=1)[None, :]
  return lax.platform_dependent(y, other_y, default=lambda a, b: _dot(a, b.T),
                                cpu=lambda a, b: same_index(a, b).astype(a.dtype))


def _class_centred(z: Array, y: Array, axis_name: AxisName) -> tuple[Array, Array]:
  """Subtracts from each sample the mean of its class (global batch).

  Args:
    z: (N, I) activations.
    y: (N, K) one-hot labels.
    axis_name: optional mapped axis over which the batch is split.

  Returns:
    (z − μ^{k(n)}) of shape (N, I), and the class counts |S_k| of shape (K,).
  """
  if y.shape[1] == 1:  # One class holds the whole batch: its size is static.
    counts = jnp.full((1,), z.shape[0] * _axis_size(axis_name), z.dtype)
  else:
    counts = _psum(jnp.sum(y, axis=0), axis_name)
  # max(·, 1): an absent class has a zero sum and no members, so its (unused) mean is 0, not NaN.
  means = _psum(_class_sums(z, y), axis_name) / jnp.maximum(counts, 1.0)[:, None]
  return z - _of_own_class(means, y), counts


def _replicated(value: Array, activations: Array, axis_name: AxisName) -> Array:
  """Returns ``value`` (already global) with the gradient of the global penalty on each device.

  Under ``jax.pmap`` (and ``shard_map(check_vma=False)``) psum transposes to psum, so ``jax.grad`` of a
  value replicated over D devices gives D times the gradient of the global penalty on each device. Handing
  autodiff the share value/D (while returning the value itself) gives exactly the global gradient. Under
  ``shard_map`` with varying-axis tracking, the replicated value is typed as such and autodiff is already
  exact, so nothing is changed there.
  """
  if axis_name is None:
    return value
  manual = getattr(jax.typeof(activations), 'manual_axis_type', None)
  varying = getattr(manual, 'varying', frozenset())
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  if all(name in varying for name in names):
    return value
  share = value / _axis_size(axis_name)
  return lax.stop_gradient(value) + (share - lax.stop_gradient(share))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3))
def _with_table1_gradient(statistic: Callable[..., tuple[Array, Optional[Array]]], z: Array, y: Array,
                          axis_name: AxisName) -> Array:
  """``statistic(z, y, axis_name, with_gradient=False)[0]``, differentiated with the gradient it returns.

  ``statistic`` computes a global-batch sum and, with ``with_gradient``, its closed-form gradient for this
  device's z (Table 1's). Autodiff would also differentiate every product of the forward pass, the class
  means included, whose share of the gradient is exactly 0. As a JVP rule the closed form serves forward
  and reverse mode alike, and higher derivatives are autodiff of the rule, which is computed with the
  means. Labels get no derivative.
  """
  return statistic(z, y, axis_name, with_gradient=False)[0]


@_with_table1_gradient.defjvp
def _with_table1_gradient_jvp(statistic, axis_name, primals, tangents):
  (z, y), (z_dot, _) = primals, tangents
  value, grad = statistic(z, y, axis_name, with_gradient=True)
  return value, _psum(jnp.sum(grad * z_dot), axis_name)


def _variance_sum(z: Array, y: Array, axis_name: AxisName,
                  with_gradient: bool) -> tuple[Array, Optional[Array]]:
  """Σ_k Σ_i v^k_i over the global batch and, if asked, its gradient 2/|S_k| (z_n − μ^k) for this device.

  The gradient has no μ terms: the means' share of it is −2/|S_k| Σ_{n∈S_k} (z_n − μ^k) = 0.
  """
  centred, counts = _class_centred(z, y, axis_name)
  inv_counts = 1.0 / jnp.maximum(counts, 1.0)
  # Σ_i v^k_i = (1/|S_k|) Σ_{n∈S_k} ‖z_n − μ^k‖²: per-sample squared norms summed per class.
  per_class = _psum(_class_sums(jnp.sum(centred * centred, axis=1), y), axis_name)
  value = jnp.sum(per_class * inv_counts)
  if not with_gradient:
    return value, None
  if y.shape[1] == 1:  # One static count: no per-sample look-up.
    return value, (2.0 * inv_counts[0]) * centred
  return value, _of_own_class(2.0 * inv_counts, y)[:, None] * centred


def _variance(z: Array, y: Array, axis_name: AxisName) -> Array:
  """Σ_k Σ_i v^k_i / (K I): the cw-VR form; VR is the K = 1 case."""
  num_classes, num_units = y.shape[1], z.shape[1]
  total = _with_table1_gradient(_variance_sum, z, y, axis_name)
  return total / (float(num_classes) * float(num_units))


def use_gram_form(num_samples: int, num_units: int, num_classes: int) -> bool:
  """Whether the N×N Gram form of Σ_k ‖C_k‖²_F is cheaper than K per-class I×I covariances.

  The covariance form costs K·N·I² flops and K·I² memory, the Gram form N²·I flops and N² memory
  (N = global batch size).
  """
  return num_samples * num_samples < num_classes * num_samples * num_units


# Off-diagonal masks up to this many units are baked into the program as constants (≤ 1 MiB); wider ones
# are built from iotas at run time rather than bloat it.
_CONSTANT_MASK_MAX_UNITS = 512


def _off_diagonal_mask(num_units: int, dtype) -> Array:
  if num_units <= _CONSTANT_MASK_MAX_UNITS:
    return jnp.asarray(1.0 - np.eye(num_units), dtype)
  return 1.0 - jnp.eye(num_units, dtype=dtype)


def _off_diagonal_sum(z: Array, y: Array, axis_name: AxisName, with_gradient: bool, *,
                      gram_form: bool) -> tuple[Array, Optional[Array]]:
  """Σ_k Σ_{i≠j} (c^k_ij)² over the global batch and, if asked, its gradient for this device's z.

  The gradient is Table 1's: it has no μ terms, because the means' share of it is exactly 0 (each
  class's gradient is a linear map of its centred activations, which sum to 0 over the class).
  """
  num_units = z.shape[1]
  centred, counts = _class_centred(z, y, axis_name)
  inv_counts = 1.0 / jnp.maximum(counts, 1.0)
  if gram_form:
    # ‖C_k‖²_F = (1/|S_k|²) Σ_{n,m∈S_k} ⟨x_n, x_m⟩²: same-class entries of the Gram matrix.
    if _axis_size(axis_name) == 1:
      others, other_labels = centred, y
    else:
      others = lax.all_gather(centred, axis_name, tiled=True)
      other_labels = lax.all_gather(y, axis_name, tiled=True)
    gram = _dot(centred, others.T)
    # a_nm = 1/|S_k|² if n and m are both in class k, else 0.
    pair_weights = _of_own_class(inv_counts * inv_counts, y)[:, None] * _same_class(y, other_labels)
    weighted = pair_weights * gram
    frobenius = _psum(jnp.sum(weighted * gram), axis_name)
    # Remove the diagonal Σ_k Σ_i (c^k_ii)², from per-class sums of squares (K×I, never K×I×I).
    variances = _psum(_class_sums(centred * centred, y), axis_name) * inv_counts[:, None]
    difference = frobenius - jnp.sum(variances * variances)
    # A sum of squares: clamp the rounding error of the difference (≈1e-7 relative) at 0.
    value = jnp.maximum(difference, 0.0)
    if not with_gradient:
      return value, None
    # ∂/∂x_n = 4 Σ_m a_nm ⟨x_n, x_m⟩ x_m − 4 (c^k_ii/|S_k|)_i ∘ x_n, m over the global batch, n ∈ S_k.
    diagonal = _of_own_class(inv_counts[:, None] * variances, y) * centred
    grad = (4.0 * (difference > 0).astype(z.dtype)) * (_dot(weighted, others) - diagonal)
    return value, grad
  # Small I: per-class covariances, off-diagonal entries summed directly (no cancellation).
  if y.shape[1] == 1:
    scatter = _dot(centred.T, centred)[None]
  else:
    scatter = jnp.einsum('nk,ni,nj->kij', y, centred, centred, precision=_PRECISION)
  off_diagonal = _psum(scatter, axis_name) * (inv_counts[:, None, None] * _off_diagonal_mask(
      num_units, centred.dtype))
  value = jnp.sum(off_diagonal * off_diagonal)
  if not with_gradient:
    return value, None
  # ∂/∂x_n = (4/|S_k|) Σ_{j≠i} c^k_ij x_jn for the class k of n.
  if y.shape[1] == 1:
    return value, _dot(centred, (4.0 * inv_counts) * off_diagonal[0])
  return value, jnp.einsum('nk,kij,nj->ni', (4.0 * inv_counts) * y, off_diagonal, centred,
                           precision=_PRECISION)


# Module-level (hashable, stable) statistics for the JVP rule's static argument.
_off_diagonal_sum_gram = functools.partial(_off_diagonal_sum, gram_form=True)
_off_diagonal_sum_covariance = functools.partial(_off_diagonal_sum, gram_form=False)


def _covariance(z: Array, y: Array, axis_name: AxisName) -> Array:
  """Σ_k Σ_{i≠j} (c^k_ij)² / (K I(I−1)): the cw-CR form; CR is the K = 1 case."""
  num_classes, num_units = y.shape[1], z.shape[1]
  if num_units < 2:  # No pair of distinct units.
    return jnp.zeros((), z.dtype)
  num_samples = z.shape[0] * _axis_size(axis_name)
  statistic = _off_diagonal_sum_gram if use_gram_form(num_samples, num_units, num_classes) else (
      _off_diagonal_sum_covariance)
  total = _with_table1_gradient(statistic, z, y, axis_name)
  return total / (float(num_classes) * float(num_units) * float(num_units - 1))


# ----------------------------------------------------------------------------------------------------------
# Public penalties.


def cr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
       axis_name: AxisName = None) -> Array:
  r"""Covariance Regularizer (CR, = DeCov of Cogswell et al. 2016).

  .. math::
    Ω_{CR} = \frac{1}{I(I-1)} \sum_{i \ne j} c_{ij}^2, \quad
    c_{ij} = \frac{1}{N} \sum_n (z_{in} - μ_i)(z_{jn} - μ_j)

  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    one_hot_labels: ignored (accepted for a uniform signature).
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.

  Returns:
    Scalar, float32 (float64 for float64 activations). 0 when I = 1.

  References:
    Choi & Rhee, AAAI 2019, Table 1 (normalization of the released code, see module docstring).
  """
  del one_hot_labels
  z = _as_units(activations)
  return _replicated(_covariance(z, _single_class(z), axis_name), activations, axis_name)


def cw_cr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
          axis_name: AxisName = None) -> Array:
  r"""Class-wise Covariance Regularizer (cw-CR).

  .. math::
    Ω_{cw-CR} = \frac{1}{K I(I-1)} \sum_k \sum_{i \ne j} (c^k_{ij})^2, \quad
    c^k_{ij} = \frac{1}{|S_k|} \sum_{n \in S_k} (z_{in} - μ^k_i)(z_{jn} - μ^k_j)

  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    one_hot_labels: (N, K) one-hot labels; K is the number of classes of the dataset.
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.

  Returns:
    Scalar, float32 (float64 for float64 activations). Absent and single-sample classes contribute 0.

  References:
    Choi & Rhee, AAAI 2019, eq. (7) and Table 1.
  """
  z = _as_units(activations)
  y = _as_labels(one_hot_labels, z, 'cw_cr')
  return _replicated(_covariance(z, y, axis_name), activations, axis_name)


def vr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
       axis_name: AxisName = None) -> Array:
  r"""Variance Regularizer (VR).

  .. math::
    Ω_{VR} = \frac{1}{I} \sum_i v_i, \quad v_i = \frac{1}{N} \sum_n (z_{in} - μ_i)^2

  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    one_hot_labels: ignored (accepted for a uniform signature).
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.

  Returns:
    Scalar, float32 (float64 for float64 activations).

  References:
    Choi & Rhee, AAAI 2019, Table 1.
  """
  del one_hot_labels
  z = _as_units(activations)
  return _replicated(_variance(z, _single_class(z), axis_name), activations, axis_name)


def cw_vr(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
          axis_name: AxisName = None) -> Array:
  r"""Class-wise Variance Regularizer (cw-VR).

  .. math::
    Ω_{cw-VR} = \frac{1}{K I} \sum_k \sum_i v^k_i, \quad
    v^k_i = \frac{1}{|S_k|} \sum_{n \in S_k} (z_{in} - μ^k_i)^2

  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    one_hot_labels: (N, K) one-hot labels; K is the number of classes of the dataset.
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.

  Returns:
    Scalar, float32 (float64 for float64 activations). Absent and single-sample classes contribute 0.

  References:
    Choi & Rhee, AAAI 2019, Table 1.
  """
  z = _as_units(activations)
  y = _as_labels(one_hot_labels, z, 'cw_vr')
  return _replicated(_variance(z, y, axis_name), activations, axis_name)


def l1r(activations: chex.Array, one_hot_labels: Optional[chex.Array] = None, *,
        axis_name: AxisName = None) -> Array:
  r"""L1 representation regularizer (L1R; Glorot et al. 2011).

  .. math:: Ω_{L1R} = \frac{1}{N I} \sum_n \sum_i |z_{in}|

  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    one_hot_labels: ignored (its class-wise counterpart is the same function, paper's Discussion).
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.

  Returns:
    Scalar, float32 (float64 for float64 activations).

  References:
    Choi & Rhee, AAAI 2019, Discussion and Conclusion.
  """
  del one_hot_labels
  z = _as_units(activations)
  num_samples = z.shape[0] * _axis_size(axis_name)
  value = _psum(jnp.sum(_abs(z)), axis_name) / (float(num_samples) * float(z.shape[1]))
  return _replicated(value, activations, axis_name)


PENALTIES: Mapping[str, Penalty] = {
    'cr': cr,
    'cw_cr': cw_cr,
    'vr': vr,
    'cw_vr': cw_vr,
    'l1r': l1r,
}


def get_penalty(name: str) -> Penalty:
  """Looks up a representation penalty by its registry name."""
  try:
    return PENALTIES[name]
  except KeyError:
    raise ValueError(
        f'Unknown representation penalty {name!r}; valid names: {sorted(PENALTIES)}.') from None


# ----------------------------------------------------------------------------------------------------------
# Weight penalties.


def _kernels(params: chex.ArrayTree) -> list[Array]:
  """The 'kernel' leaves (Dense/Conv weight matrices); biases, BatchNorm scales and offsets don't count."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [leaf for path, leaf in leaves
          if getattr(path[-1], 'key', getattr(path[-1], 'name', None)) == 'kernel']


def l1w(params: chex.ArrayTree) -> Array:
  r"""L1 weight penalty :math:`Σ_w |w|` over the 'kernel' leaves of a params pytree.

  Pass a subtree (e.g. ``params['layer5']``) to penalize one layer's weights, as in the paper.
  """
  return sum((jnp.sum(jnp.abs(w.astype(jnp.float32))) for w in _kernels(params)), jnp.zeros(()))


def l2w(params: chex.ArrayTree) -> Array:
  r"""L2 weight penalty :math:`\frac{1}{2} Σ_w w^2` over the 'kernel' leaves (``tf.nn.l2_loss``).

  Pass a subtree (e.g. ``params['layer5']``) to penalize one layer's weights, as in the paper.
  """
  return 0.5 * sum((jnp.sum(jnp.square(w.astype(jnp.float32))) for w in _kernels(params)),
                   jnp.zeros(()))


WEIGHT_PENALTIES: Mapping[str, Callable[[chex.ArrayTree], Array]] = {'l1w': l1w, 'l2w': l2w}
