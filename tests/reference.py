"""Float64 NumPy reference for the representation regularizers (test oracle).

Written straight from Choi & Rhee, "Utilizing Class Information for Deep Network
Representation Shaping" (AAAI 2019), eqs. (1)-(6) and Table 1, with the
normalization used by ``cwreg.penalties``:

  Omega_CR    = sum_{i != j} c_ij^2              / (I (I - 1))
  Omega_cw-CR = sum_k sum_{i != j} (c^k_ij)^2    / (K I (I - 1))
  Omega_VR    = sum_i v_i                        / I
  Omega_cw-VR = sum_k sum_i v^k_i                / (K I)
  Omega_L1R   = sum_n sum_i |z_in|               / (N I)

Statistics use 1/N (per class 1/|S_k|). CR and cw-CR are 0 for I = 1 (no
pairs); a class absent from the batch contributes 0.

Nothing here is clever on purpose: every statistic is computed the plain way
(centre, then average products), in float64, and the ``*_loops`` variants spell
the definitions out as Python loops so the vectorised oracle can itself be
checked on tiny inputs. The only concession to size is in the off-diagonal sum
of squared covariances: it is accumulated over row blocks of the covariance
matrix, and above I = 4096 taken from the N x N Gram matrix instead (an identity
the tests verify against the direct form).
"""

from __future__ import annotations

import numpy as np

# Row-block height when accumulating sum_{i != j} c_ij^2 (memory: block * I * 8 B).
_ROW_BLOCK = 2048
# Widest layer for which the oracle builds the covariance matrix itself.
_DIRECT_MAX_UNITS = 4096


def flatten(activations) -> np.ndarray:
    """(N, ...) -> (N, I) float64, I = product of the non-batch dims."""
    z = np.asarray(activations, dtype=np.float64)
    assert z.ndim >= 2, z.shape
    return z.reshape(z.shape[0], -1)


def class_members(one_hot_labels, k: int) -> np.ndarray:
    """Indices of the samples whose (one-hot) label is class k, i.e. S_k."""
    y = np.asarray(one_hot_labels, dtype=np.float64)
    return np.flatnonzero(y[:, k] > 0.5)


def _num_classes(one_hot_labels) -> int:
    y = np.asarray(one_hot_labels)
    assert y.ndim == 2, y.shape
    return y.shape[1]


# ----------------------------------------------------------------------------
# Statistics, eqs. (1)-(3); class-wise (4)-(6) are these applied to z[S_k].
# ----------------------------------------------------------------------------
def mean(z: np.ndarray) -> np.ndarray:
    """mu_i = (1/N) sum_n z_in, eq. (1). z: (N, I) -> (I,)."""
    return z.sum(axis=0) / z.shape[0]


def centred(z: np.ndarray) -> np.ndarray:
    """z_in - mu_i, (N, I)."""
    return z - mean(z)[None, :]


def covariance(z: np.ndarray) -> np.ndarray:
    """c_ij = (1/N) sum_n (z_in - mu_i)(z_jn - mu_j), eq. (2). (N, I) -> (I, I).

    Same as ``np.cov(z, rowvar=False, bias=True)`` (checked in the tests).
    """
    zc = centred(z)
    return zc.T @ zc / z.shape[0]


def variance(z: np.ndarray) -> np.ndarray:
    """v_i = c_ii, eq. (3). (N, I) -> (I,)."""
    zc = centred(z)
    return (zc * zc).sum(axis=0) / z.shape[0]


def offdiag_sq_sum(z: np.ndarray) -> float:
    """sum_{i != j} c_ij^2 of the covariance of z (N, I).

    Built from the I x I covariance (blockwise over rows) up to I = 4096. Above that
    the direct form costs seconds per class, so it switches to the textbook identity
    ||Zc^T Zc||_F = ||Zc Zc^T||_F (see `offdiag_sq_sum_gram`), which the tests check
    against the direct form on both sides of the switch.
    """
    if z.shape[1] > _DIRECT_MAX_UNITS:
        return offdiag_sq_sum_gram(z)
    return offdiag_sq_sum_direct(z)


def offdiag_sq_sum_gram(z: np.ndarray) -> float:
    """sum_{i != j} c_ij^2 = ||Zc Zc^T||_F^2 / N^2 - sum_i c_ii^2, Zc = centred z."""
    n = z.shape[0]
    zc = centred(z)
    gram = zc @ zc.T / n  # (N, N)
    return float((gram * gram).sum() - (variance(z) ** 2).sum())


def offdiag_sq_sum_direct(z: np.ndarray) -> float:
    """sum_{i != j} c_ij^2 of the covariance of z (N, I), blockwise over rows."""
    n, num_units = z.shape
    zc = centred(z)
    total = 0.0
    for start in range(0, num_units, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, num_units)
        c_rows = zc[:, start:stop].T @ zc / n  # rows start..stop-1 of C: (b, I)
        diag = c_rows[np.arange(stop - start), np.arange(start, stop)]
        total += float((c_rows * c_rows).sum() - (diag * diag).sum())
    return total


# ----------------------------------------------------------------------------
# Penalty values.
# ----------------------------------------------------------------------------
def cr(activations, one_hot_labels=None) -> float:
    """Omega_CR = sum_{i != j} c_ij^2 / (I (I - 1)); 0 for I = 1."""
    del one_hot_labels
    z = flatten(activations)
    num_units = z.shape[1]
    if num_units < 2:
        return 0.0
    return offdiag_sq_sum(z) / (float(num_units) * float(num_units - 1))


def cw_cr(activations, one_hot_labels) -> float:
    """Omega_cw-CR = sum_k sum_{i != j} (c^k_ij)^2 / (K I (I - 1))."""
    z = flatten(activations)
    num_units = z.shape[1]
    num_classes = _num_classes(one_hot_labels)
    if num_units < 2:
        return 0.0
    total = 0.0
    for k in range(num_classes):
        members = class_members(one_hot_labels, k)
        if members.size == 0:  # absent class: no statistics, contributes 0
            continue
        total += offdiag_sq_sum(z[members])
    return total / (float(num_classes) * float(num_units) * float(num_units - 1))


def vr(activations, one_hot_labels=None) -> float:
    """Omega_VR = sum_i v_i / I."""
    del one_hot_labels
    z = flatten(activations)
    return float(variance(z).sum()) / float(z.shape[1])


def cw_vr(activations, one_hot_labels) -> float:
    """Omega_cw-VR = sum_k sum_i v^k_i / (K I)."""
    z = flatten(activations)
    num_classes = _num_classes(one_hot_labels)
    total = 0.0
    for k in range(num_classes):
        members = class_members(one_hot_labels, k)
        if members.size == 0:
            continue
        total += float(variance(z[members]).sum())
    return total / (float(num_classes) * float(z.shape[1]))


def l1r(activations, one_hot_labels=None) -> float:
    """Omega_L1R = sum_n sum_i |z_in| / (N I)."""
    del one_hot_labels
    z = flatten(activations)
    return float(np.abs(z).sum()) / (float(z.shape[0]) * float(z.shape[1]))


# ----------------------------------------------------------------------------
# Gradients dOmega/dz from Table 1, scaled to the normalization above.
# All return an array shaped like `activations`.
# ----------------------------------------------------------------------------
def _cr_direction(z: np.ndarray) -> np.ndarray:
    """G_in = sum_{j != i} c_ij (z_jn - mu_j) for the samples in z, (N, I)."""
    c = covariance(z)
    c_off = c - np.diag(np.diag(c))  # drop j = i
    return centred(z) @ c_off  # c symmetric: (zc @ c_off)[n, i] = sum_j zc_nj c_ji


def cr_grad(activations, one_hot_labels=None) -> np.ndarray:
    """dOmega_CR/dz_in = 4/(N I(I-1)) sum_{j != i} c_ij (z_jn - mu_j)."""
    del one_hot_labels
    shape = np.shape(activations)
    z = flatten(activations)
    n, num_units = z.shape
    if num_units < 2:
        return np.zeros(shape)
    g = 4.0 / (n * float(num_units) * float(num_units - 1)) * _cr_direction(z)
    return g.reshape(shape)


def cw_cr_grad(activations, one_hot_labels) -> np.ndarray:
    """dOmega_cw-CR/dz_in = 4/(K I(I-1)|S_k|) sum_{j != i} c^k_ij (z_jn - mu^k_j), n in S_k."""
    shape = np.shape(activations)
    z = flatten(activations)
    num_units = z.shape[1]
    num_classes = _num_classes(one_hot_labels)
    g = np.zeros_like(z)
    if num_units < 2:
        return g.reshape(shape)
    for k in range(num_classes):
        members = class_members(one_hot_labels, k)
        if members.size == 0:
            continue
        scale = 4.0 / (num_classes * float(num_units) * float(num_units - 1) * members.size)
        g[members] = scale * _cr_direction(z[members])
    return g.reshape(shape)


def vr_grad(activations, one_hot_labels=None) -> np.ndarray:
    """dOmega_VR/dz_in = 2/(N I) (z_in - mu_i)."""
    del one_hot_labels
    shape = np.shape(activations)
    z = flatten(activations)
    n, num_units = z.shape
    return (2.0 / (n * num_units) * centred(z)).reshape(shape)


def cw_vr_grad(activations, one_hot_labels) -> np.ndarray:
    """dOmega_cw-VR/dz_in = 2/(K I |S_k|) (z_in - mu^k_i), n in S_k."""
    shape = np.shape(activations)
    z = flatten(activations)
    num_units = z.shape[1]
    num_classes = _num_classes(one_hot_labels)
    g = np.zeros_like(z)
    for k in range(num_classes):
        members = class_members(one_hot_labels, k)
        if members.size == 0:
            continue
        g[members] = 2.0 / (num_classes * num_units * members.size) * centred(z[members])
    return g.reshape(shape)


def l1r_grad(activations, one_hot_labels=None) -> np.ndarray:
    """dOmega_L1R/dz_in = sign(z_in) / (N I)."""
    del one_hot_labels
    shape = np.shape(activations)
    z = flatten(activations)
    n, num_units = z.shape
    return (np.sign(z) / (n * num_units)).reshape(shape)


VALUES = {'cr': cr, 'cw_cr': cw_cr, 'vr': vr, 'cw_vr': cw_vr, 'l1r': l1r}
GRADS = {'cr': cr_grad, 'cw_cr': cw_cr_grad, 'vr': vr_grad, 'cw_vr': cw_vr_grad, 'l1r': l1r_grad}
CLASS_WISE = ('cw_cr', 'cw_vr')
NAMES = tuple(VALUES)


# ----------------------------------------------------------------------------
# Literal loop versions (tiny inputs only) used to check the oracle itself.
# ----------------------------------------------------------------------------
def _stats_loops(rows: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """mu_i and c_ij of a list of samples (each a list of I floats), eqs. (1)-(2)."""
    n = len(rows)
    num_units = len(rows[0])
    mu = [sum(rows[s][i] for s in range(n)) / n for i in range(num_units)]
    c = [
        [sum((rows[s][i] - mu[i]) * (rows[s][j] - mu[j]) for s in range(n)) / n for j in range(num_units)]
        for i in range(num_units)
    ]
    return mu, c


def _class_rows(z: np.ndarray, one_hot_labels, k: int) -> list[list[float]]:
    return [list(map(float, z[s])) for s in range(z.shape[0]) if float(one_hot_labels[s][k]) == 1.0]


def value_loops(name: str, activations, one_hot_labels=None) -> float:
    """Penalty value by literal loops over n, i, j (and k)."""
    z = flatten(activations)
    n, num_units = z.shape
    all_rows = [list(map(float, z[s])) for s in range(n)]
    if name == 'l1r':
        return sum(abs(v) for row in all_rows for v in row) / (n * num_units)
    if name in CLASS_WISE:
        num_classes = len(one_hot_labels[0])
        groups = [_class_rows(z, one_hot_labels, k) for k in range(num_classes)]
        groups = [g for g in groups if g]
    else:
        num_classes = 1
        groups = [all_rows]
    total = 0.0
    for rows in groups:
        _, c = _stats_loops(rows)
        for i in range(num_units):
            for j in range(num_units):
                if name in ('cr', 'cw_cr') and i != j:
                    total += c[i][j] ** 2
                if name in ('vr', 'cw_vr') and i == j:
                    total += c[i][i]
    if name in ('cr', 'cw_cr'):
        if num_units < 2:
            return 0.0
        return total / (num_classes * num_units * (num_units - 1))
    return total / (num_classes * num_units)


def grad_loops(name: str, activations, one_hot_labels=None) -> np.ndarray:
    """Table-1 gradient by literal loops over n, i, j (and k)."""
    shape = np.shape(activations)
    z = flatten(activations)
    n, num_units = z.shape
    g = np.zeros((n, num_units))
    if name == 'l1r':
        for s in range(n):
            for i in range(num_units):
                g[s, i] = float(z[s, i] > 0) - float(z[s, i] < 0)
        return (g / (n * num_units)).reshape(shape)
    if name in CLASS_WISE:
        num_classes = len(one_hot_labels[0])
        groups = [[s for s in range(n) if float(one_hot_labels[s][k]) == 1.0] for k in range(num_classes)]
    else:
        num_classes = 1
        groups = [list(range(n))]
    for members in groups:
        if not members:
            continue
        rows = [list(map(float, z[s])) for s in members]
        mu, c = _stats_loops(rows)
        size = len(members)
        for s in members:
            for i in range(num_units):
                if name in ('vr', 'cw_vr'):
                    g[s, i] = 2.0 / (num_classes * num_units * size) * (z[s, i] - mu[i])
                elif num_units > 1:
                    acc = sum(c[i][j] * (z[s, j] - mu[j]) for j in range(num_units) if j != i)
                    g[s, i] = 4.0 / (num_classes * num_units * (num_units - 1) * size) * acc
    return g.reshape(shape)


# ----------------------------------------------------------------------------
# Test data shared by the test modules (not part of the oracle).
# ----------------------------------------------------------------------------
LABEL_PATTERNS = ('random', 'one_class', 'absent', 'singletons')
DATA_KINDS = ('gauss', 'relu', 'offset')


def make_activations(rng: np.random.Generator, shape, kind: str = 'gauss') -> np.ndarray:
    """float32 activations: 'gauss' N(0,1); 'relu' max(0, .) with exact zeros;
    'offset' a per-unit mean up to 5 std away from 0 (centring matters)."""
    z = rng.standard_normal(shape)
    if kind == 'relu':
        z = np.maximum(z, 0.0)
    elif kind == 'offset':
        z = z * rng.uniform(0.5, 2.0) + rng.uniform(-5.0, 5.0, size=shape[1:])
    elif kind != 'gauss':
        raise ValueError(kind)
    return z.astype(np.float32)


def make_labels(rng: np.random.Generator, n: int, num_classes: int, pattern: str = 'random') -> np.ndarray:
    """float32 one-hot labels (n, num_classes) with the given class pattern.

    random: iid uniform classes; one_class: every sample in one class;
    absent: only the first ceil(K/2) classes occur; singletons: the first
    min(n, K) samples each open their own class, the rest go to class 0 (so
    classes 1.. hold exactly one sample when n >= 2).
    """
    if pattern == 'random':
        idx = rng.integers(0, num_classes, size=n)
    elif pattern == 'one_class':
        idx = np.full(n, rng.integers(0, num_classes))
    elif pattern == 'absent':
        idx = rng.integers(0, (num_classes + 1) // 2, size=n)
    elif pattern == 'singletons':
        idx = np.zeros(n, dtype=np.int64)
        m = min(n, num_classes)
        idx[:m] = np.arange(m)
    else:
        raise ValueError(pattern)
    return np.eye(num_classes, dtype=np.float32)[idx]


def value_atol(name: str, activations) -> float:
    """Absolute tolerance for an f32 penalty value vs this f64 oracle.

    Scaled to the size of the summed terms: v ~ mean variance (plus a small
    share of the mean square, which bounds f32 rounding in the centring), so
    VR-type terms ~ v, CR-type terms c_ij^2 <= v_i v_j ~ v^2, L1R ~ mean |z|.
    """
    z = flatten(activations)
    mean_sq = float((z * z).mean())
    v = float(variance(z).mean()) + 1e-2 * mean_sq
    if name in ('cr', 'cw_cr'):
        scale = v * v
    elif name in ('vr', 'cw_vr'):
        scale = v
    else:
        scale = float(np.abs(z).mean())
    return 1e-5 * scale + 1e-30
