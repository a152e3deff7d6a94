"""Representation statistics of Table 5 (Choi & Rhee, AAAI 2019, "Quantitative Analysis").

The paper evaluates, on the MNIST test set, the post-ReLU representation ``z`` of the regularized layer and
reports six numbers per model. It says only that "each is calculated using only positive activations and is
the average of representation statistics", e.g. "ACTIVATION AMPLITUDE is the mean of positive activations in
a layer", and that N CW VARIANCE maps "activation range of each hidden unit to [0,10]". The exact formulas
are not published (nor in the authors' released code), so this module fixes one precise reading and applies
it identically to every regularizer. Notation: ``z_ni`` is unit ``i``'s activation for test sample ``n``,
``P_ni = [z_ni > 0]``, ``S_k`` the samples of class ``k``::

  ACTIVATION AMPLITUDE  A      = Σ_{n,i} P_ni z_ni / Σ_{n,i} P_ni

  VARIANCE              v⁺_i   = 1/|U_i| Σ_{n∈U_i} (z_ni − μ⁺_i)²,   U_i = {n : z_ni > 0},
                        μ⁺_i   = 1/|U_i| Σ_{n∈U_i} z_ni                 V = mean_i v⁺_i

  COVARIANCE            c⁺_ij  = 1/|U_ij| Σ_{n∈U_ij} (z_ni − μ_i|j)(z_nj − μ_j|i),   U_ij = U_i ∩ U_j,
                        μ_i|j  = 1/|U_ij| Σ_{n∈U_ij} z_ni                C = mean_{i<j} |c⁺_ij|

  CORRELATION           ρ⁺_ij  = c⁺_ij / sqrt(v_i|j v_j|i),   v_i|j = 1/|U_ij| Σ_{n∈U_ij} (z_ni − μ_i|j)²
                                                               R = mean_{i<j} |ρ⁺_ij|   ∈ [0, 1]

  CW CORRELATION        ρ⁺ᵏ_ij: ρ⁺_ij computed on U_ij ∩ S_k;   R_cw = mean_k mean_{i<j} |ρ⁺ᵏ_ij|   ∈ [0, 1]

  N CW VARIANCE         z̃_ni  = 10 (z_ni − min_n z_ni) / (max_n z_ni − min_n z_ni)   (range over the whole
                        evaluation set, so [0, max] for a ReLU unit that is ever inactive);
                        ṽᵏ_i  = variance of z̃_ni over U_i ∩ S_k;    Ṽ_cw = mean_k mean_i ṽᵏ_i

Why these choices:

* "Only positive activations" is read literally: a second-order statistic of a unit (pair) is computed over
  the samples on which the unit (both units) is active. The ReLU's point mass at 0 would otherwise dominate:
  two units that are often silent together look correlated because of their shared zeros, which measures
  co-activation (sparsity) rather than the linear dependence of activation magnitudes that CR/cw-CR target.
* Variances and covariances use the paper's ``1/N`` normalisation (eqs. 2–6), i.e. population moments.
* Off-diagonal covariances/correlations are averaged in absolute value: CR penalises ``c_ij²``, which is
  sign-blind, and a signed mean would let strongly positive and negative pairs cancel to "decorrelated".
* Class-wise statistics weight classes equally (mean over classes of the per-class mean), mirroring the
  ``1/K`` of Ω_cw-CR and Ω_cw-VR in Table 1.
* N CW VARIANCE divides by each unit's range, so it is invariant to rescaling a unit, which is what removes
  the "activation squashing" effect the paper wants removed.

What is skipped (never NaN): a unit with fewer than 2 positive activations (dead or almost dead) has no
variance; a pair with fewer than 2 co-active samples has no covariance; a pair where either conditional
variance is (numerically) zero has no correlation; a unit with zero range has no normalised variance; a
class with no (or too few) samples simply contributes no terms, and classes absent from ``labels`` are never
visited. Averages run over the remaining terms only; if nothing remains the statistic is 0.0 (the value of
a fully squashed, all-zero layer). ``statistics_coverage`` reports how many terms each average used.

All functions are pure NumPy in float64. Memory and time are O(I²) and O(N·I²) (a few I×I matrices), which
is trivial for the paper's 100–128 unit layers; layers wider than ``MAX_UNITS`` are rejected.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import numpy.typing as npt

# The keys of the dict returned by `representation_statistics`, in Table 5's column order.
STAT_KEYS: tuple[str, ...] = (
    'activation_amplitude',
    'covariance',
    'correlation',
    'cw_correlation',
    'variance',
    'n_cw_variance',
)

# Table 5's column titles for the keys above.
STAT_TITLES: dict[str, str] = {
    'activation_amplitude': 'ACTIVATION AMPLITUDE',
    'covariance': 'COVARIANCE (CR)',
    'correlation': 'CORRELATION (CR)',
    'cw_correlation': 'CW CORRELATION (cw-CR)',
    'variance': 'VARIANCE (VR)',
    'n_cw_variance': 'N CW VARIANCE (cw-VR)',
}

# N CW VARIANCE maps each unit's activation range to [0, NORMALIZED_RANGE] (paper: [0, 10]).
NORMALIZED_RANGE = 10.0

# Pairwise statistics build I×I float64 matrices; beyond this the caller should pass a subset of units.
MAX_UNITS = 8192

# A (conditional) variance at or below this fraction of the unit's squared scale is treated as zero: after
# the float64 moment computation, such a unit is constant up to round-off and has no defined correlation.
_REL_ZERO_VARIANCE = 1e-12

_MIN_SAMPLES = 2


def _as_units(activations: npt.ArrayLike) -> np.ndarray:
    """Returns activations as a finite float64 (N, I) array; (N, ...) inputs are flattened like penalties."""
    z = np.asarray(activations, dtype=np.float64)
    if z.ndim < 2:
        raise ValueError(f'activations must have shape (N, I) or (N, ...), got {z.shape}.')
    z = z.reshape(z.shape[0], -1)
    if z.shape[1] > MAX_UNITS:
        raise ValueError(f'{z.shape[1]} units exceed MAX_UNITS={MAX_UNITS}; pass a subset of units.')
    if not np.all(np.isfinite(z)):
        raise ValueError('activations contain NaN or Inf.')
    return z


def _as_labels(labels: npt.ArrayLike, num_samples: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2:  # Accept one-hot labels too; argmax recovers the class index.
        y = np.argmax(y, axis=1)
    if y.shape != (num_samples,):
        raise ValueError(f'labels must have shape ({num_samples},), got {np.asarray(labels).shape}.')
    return y.astype(np.int64)


def _mean_or_zero(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else 0.0


def _positive_mask(z: np.ndarray) -> np.ndarray:
    return z > 0.0


def _unit_positive_variances(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit variance over its positive activations, and whether each unit has ≥ 2 of them.

    Args:
      z: (N, I) activations.

    Returns:
      ``(v, valid)``, both (I,): ``v_i = 1/|U_i| Σ_{n∈U_i} (z_ni − μ⁺_i)²`` (0 where not valid) and
      ``valid_i = |U_i| ≥ 2``.
    """
    mask = _positive_mask(z)
    count = mask.sum(axis=0)
    safe = np.maximum(count, 1)
    mean = np.where(mask, z, 0.0).sum(axis=0) / safe
    # Two-pass (centred) form: exact for constant units, unlike E[z²] − E[z]².
    centred = np.where(mask, z - mean, 0.0)
    var = (centred**2).sum(axis=0) / safe
    return var, count >= _MIN_SAMPLES


def _coactive_moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moments of every unit pair over the samples where both units are positive.

    With ``M = [z > 0]`` and ``X = M ⊙ (z − s)`` for a per-unit shift ``s`` (the mean positive activation,
    which leaves all central moments unchanged but removes most float cancellation)::

      n_ij = (MᵀM)_ij,  m_i|j = (XᵀM)_ij / n_ij,  c_ij = (XᵀX)_ij / n_ij − m_i|j m_j|i,
      v_i|j = ((X⊙X)ᵀM)_ij / n_ij − m_i|j²

    Args:
      z: (N, I) activations.

    Returns:
      ``(n, cov, var_i_given_j, var_j_given_i)``, each (I, I); entries with ``n_ij = 0`` are 0.
    """
    mask = _positive_mask(z).astype(np.float64)
    count = mask.sum(axis=0)
    shift = np.where(count > 0, (z * mask).sum(axis=0) / np.maximum(count, 1), 0.0)
    x = mask * (z - shift)
    n = mask.T @ mask
    safe = np.maximum(n, 1.0)
    m = (x.T @ mask) / safe  # m[i, j] = mean of unit i over U_ij.
    cov = (x.T @ x) / safe - m * m.T
    var_ij = np.maximum(((x * x).T @ mask) / safe - m**2, 0.0)
    return n, cov, var_ij, var_ij.T


def _pair_covariances(z: np.ndarray) -> np.ndarray:
    """|c⁺_ij| for the valid pairs i < j (those with ≥ 2 co-active samples), as a flat array."""
    n, cov, _, _ = _coactive_moments(z)
    iu = np.triu_indices(z.shape[1], k=1)
    valid = n[iu] >= _MIN_SAMPLES
    return np.abs(cov[iu][valid])


def _pair_correlations(z: np.ndarray) -> np.ndarray:
    """|ρ⁺_ij| for the valid pairs i < j, as a flat array with values in [0, 1]."""
    n, cov, var_ij, var_ji = _coactive_moments(z)
    iu = np.triu_indices(z.shape[1], k=1)
    scale2 = np.max(z, axis=0, initial=0.0) ** 2
    zero_i = var_ij <= _REL_ZERO_VARIANCE * scale2[:, None]
    zero_j = var_ji <= _REL_ZERO_VARIANCE * scale2[None, :]
    valid = (n >= _MIN_SAMPLES) & ~zero_i & ~zero_j
    valid = valid[iu]
    denom = np.sqrt(var_ij[iu][valid] * var_ji[iu][valid])
    rho = cov[iu][valid] / denom
    return np.clip(np.abs(rho), 0.0, 1.0)


def _class_indices(labels: np.ndarray) -> list[np.ndarray]:
    """Sample indices of each class present in ``labels`` (absent classes are never visited)."""
    return [np.flatnonzero(labels == k) for k in np.unique(labels)]


def activation_amplitude(activations: npt.ArrayLike) -> float:
    """ACTIVATION AMPLITUDE (Table 5): the mean of the positive activations of the layer.

    ``A = Σ_{n,i} [z_ni > 0] z_ni / Σ_{n,i} [z_ni > 0]``; 0.0 if no activation is positive.

    Args:
      activations: (N, I) post-ReLU activations (``(N, ...)`` is flattened).

    Returns:
      A float ≥ 0.
    """
    z = _as_units(activations)
    positive = z[_positive_mask(z)]
    return _mean_or_zero(positive)


def variance(activations: npt.ArrayLike) -> float:
    """VARIANCE (Table 5, the VR statistic): mean over units of the variance of their positive activations.

    ``V = mean_i 1/|U_i| Σ_{n∈U_i} (z_ni − μ⁺_i)²`` over units with ``|U_i| ≥ 2``, ``U_i = {n: z_ni > 0}``.

    Args:
      activations: (N, I) post-ReLU activations.

    Returns:
      A float ≥ 0; dead units are skipped; 0.0 if every unit is skipped.
    """
    z = _as_units(activations)
    var, valid = _unit_positive_variances(z)
    return _mean_or_zero(var[valid])


def covariance(activations: npt.ArrayLike) -> float:
    """COVARIANCE (Table 5, the CR statistic): mean absolute off-diagonal covariance over co-active samples.

    ``C = mean_{i<j} |c⁺_ij|``, ``c⁺_ij = 1/|U_ij| Σ_{n∈U_ij} (z_ni − μ_i|j)(z_nj − μ_j|i)``, over pairs with
    ``|U_ij| ≥ 2`` where ``U_ij = {n: z_ni > 0 and z_nj > 0}``.

    Args:
      activations: (N, I) post-ReLU activations.

    Returns:
      A float ≥ 0; 0.0 if no pair has two co-active samples (e.g. I = 1 or all units dead).
    """
    z = _as_units(activations)
    return _mean_or_zero(_pair_covariances(z))


def correlation(activations: npt.ArrayLike) -> float:
    """CORRELATION (Table 5): mean absolute Pearson correlation of unit pairs over co-active samples.

    ``R = mean_{i<j} |c⁺_ij| / sqrt(v_i|j v_j|i)`` where the conditional variances are taken over the same
    co-active set ``U_ij``; pairs with ``|U_ij| < 2`` or a (numerically) zero conditional variance are skipped.

    Args:
      activations: (N, I) post-ReLU activations.

    Returns:
      A float in [0, 1]; invariant to rescaling any unit by a positive factor.
    """
    z = _as_units(activations)
    return _mean_or_zero(_pair_correlations(z))


def cw_correlation(activations: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """CW CORRELATION (Table 5, the cw-CR statistic): `correlation` within each class, averaged over classes.

    ``R_cw = mean_k mean_{i<j} |ρ⁺ᵏ_ij|``, with ``ρ⁺ᵏ_ij`` the correlation over ``U_ij ∩ S_k``; the outer mean
    runs over the classes that have at least one valid pair (each class weighs the same).

    Args:
      activations: (N, I) post-ReLU activations.
      labels: (N,) integer labels (or (N, K) one-hot).

    Returns:
      A float in [0, 1]; 0.0 if no class has a valid pair.
    """
    z = _as_units(activations)
    y = _as_labels(labels, z.shape[0])
    per_class = []
    for idx in _class_indices(y):
        rho = _pair_correlations(z[idx])
        if rho.size:
            per_class.append(float(np.mean(rho)))
    return _mean_or_zero(np.asarray(per_class))


def normalize_unit_range(
    activations: npt.ArrayLike, target: float = NORMALIZED_RANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Maps each unit's activation range over the given samples to [0, target].

    ``z̃_ni = target (z_ni − min_n z_ni) / (max_n z_ni − min_n z_ni)``.

    Args:
      activations: (N, I) activations.
      target: upper end of the mapped range (the paper uses 10).

    Returns:
      ``(z̃, valid)``: (N, I) mapped activations (0 for units with zero range) and (I,) ``range_i > 0``.
    """
    z = _as_units(activations)
    lo = np.min(z, axis=0, initial=np.inf) if z.shape[0] else np.zeros(z.shape[1])
    hi = np.max(z, axis=0, initial=-np.inf) if z.shape[0] else np.zeros(z.shape[1])
    span = hi - lo
    valid = span > 0.0
    mapped = np.where(valid, target * (z - lo) / np.where(valid, span, 1.0), 0.0)
    return mapped, valid


def n_cw_variance(activations: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """N CW VARIANCE (Table 5, the cw-VR statistic): class-wise variance after range normalisation.

    Each unit's range over all samples is mapped to [0, 10] (`normalize_unit_range`), then
    ``Ṽ_cw = mean_k mean_i 1/|Uᵏ_i| Σ_{n∈Uᵏ_i} (z̃_ni − μ̃ᵏ_i)²`` with ``Uᵏ_i = {n ∈ S_k: z_ni > 0}``, over
    (class, unit) pairs with ``|Uᵏ_i| ≥ 2`` and units with non-zero range; classes without any such unit are
    skipped.

    Args:
      activations: (N, I) post-ReLU activations.
      labels: (N,) integer labels (or (N, K) one-hot).

    Returns:
      A float in [0, 25] (a variance of values in [0, 10]); invariant to rescaling any unit.
    """
    z = _as_units(activations)
    y = _as_labels(labels, z.shape[0])
    mapped, valid_unit = normalize_unit_range(z)
    # Positivity is decided on the raw activations: z̃ = 0 also for the smallest positive value of a unit that
    # is never silent, which must still count as an active sample.
    masked = np.where(_positive_mask(z), mapped, -1.0)
    per_class = []
    for idx in _class_indices(y):
        zk = masked[idx]
        mask = zk >= 0.0
        count = mask.sum(axis=0)
        safe = np.maximum(count, 1)
        mean = np.where(mask, zk, 0.0).sum(axis=0) / safe
        var = (np.where(mask, zk - mean, 0.0) ** 2).sum(axis=0) / safe
        ok = (count >= _MIN_SAMPLES) & valid_unit
        if np.any(ok):
            per_class.append(float(np.mean(var[ok])))
    return _mean_or_zero(np.asarray(per_class))


def representation_statistics(activations: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    """All six Table 5 statistics of one layer's representation on an evaluation set.

    Args:
      activations: (N, I) post-ReLU activations of the regularized layer (``(N, ...)`` is flattened).
      labels: (N,) integer labels (or (N, K) one-hot).

    Returns:
      ``{activation_amplitude, covariance, correlation, cw_correlation, variance, n_cw_variance}`` as Python
      floats (JSON-serialisable), never NaN; see the module docstring for the formulas.
    """
    z = _as_units(activations)
    y = _as_labels(labels, z.shape[0])
    return {
        'activation_amplitude': activation_amplitude(z),
        'covariance': covariance(z),
        'correlation': correlation(z),
        'cw_correlation': cw_correlation(z, y),
        'variance': variance(z),
        'n_cw_variance': n_cw_variance(z, y),
    }


def statistics_coverage(activations: npt.ArrayLike, labels: Optional[npt.ArrayLike] = None) -> dict[str, int]:
    """How many terms each average of `representation_statistics` used (what was skipped).

    Args:
      activations: (N, I) post-ReLU activations.
      labels: optional (N,) labels for the class-wise counts.

    Returns:
      ``num_units``, ``num_dead_units`` (no positive activation), ``num_variance_units`` (≥ 2 positive),
      ``num_pairs`` (I(I−1)/2), ``num_covariance_pairs``, ``num_correlation_pairs`` and, with labels,
      ``num_classes`` (present), ``num_cw_correlation_classes``, ``num_n_cw_variance_classes``.
    """
    z = _as_units(activations)
    num_units = z.shape[1]
    _, valid = _unit_positive_variances(z)
    out = {
        'num_units': num_units,
        'num_dead_units': int(np.sum(~np.any(_positive_mask(z), axis=0))),
        'num_variance_units': int(np.sum(valid)),
        'num_pairs': num_units * (num_units - 1) // 2,
        'num_covariance_pairs': int(_pair_covariances(z).size),
        'num_correlation_pairs': int(_pair_correlations(z).size),
    }
    if labels is not None:
        y = _as_labels(labels, z.shape[0])
        classes = _class_indices(y)
        out['num_classes'] = len(classes)
        out['num_cw_correlation_classes'] = sum(_pair_correlations(z[idx]).size > 0 for idx in classes)
        _, valid_unit = normalize_unit_range(z)
        positive = _positive_mask(z)
        out['num_n_cw_variance_classes'] = sum(
            bool(np.any((positive[idx].sum(axis=0) >= _MIN_SAMPLES) & valid_unit)) for idx in classes
        )
    return out
