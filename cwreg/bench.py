"""Benchmarks behind launch/benchmark.py: medians of repeated, blocked timings, compared in one process.

The comparison point for the penalties is the straightforward masked formulation, the complexity of the
authors' released TF code: one mask per class, K per-class I×I covariance matrices (O(K·N·I²) time,
O(K·I²) memory), written in JAX and jitted the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cwreg import penalties

PENALTY_SHAPES = ((100, 100, 10), (500, 128, 100), (100, 4096, 10), (100, 65536, 10))
# The masked cw-CR builds (and differentiates through) K I×I matrices: skip it above this many floats.
MASKED_MAX_FLOATS = 4e8


def median_time(fn: Callable[[], object], repeats: int, min_time: float = 0.2) -> float:
    """Median wall time (s) of `fn()` after one warm-up call, at least `repeats` runs or `min_time` s."""
    jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 100):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- The masked formulation (reference for speed; same values). -------------------------------------------


def _masked_class_statistics(z, y):
    """Per-class means via masks, one class at a time (vmapped): (K, N, I) centred-and-masked samples."""

    def one_class(mask):
        count = jnp.maximum(mask.sum(), 1.0)
        mean = (mask[:, None] * z).sum(0) / count
        return (z - mean) * mask[:, None], count

    return jax.vmap(one_class, in_axes=1)(y)


def masked_cw_cr(z, y):
    z = z.reshape(z.shape[0], -1)
    centred, counts = _masked_class_statistics(z, y)
    covariances = jnp.einsum('kni,knj->kij', centred, centred) / counts[:, None, None]
    num_classes, num_units = y.shape[1], z.shape[1]
    off = covariances * (1.0 - jnp.eye(num_units))
    return jnp.sum(off * off) / (num_classes * num_units * (num_units - 1.0))


def masked_cw_vr(z, y):
    z = z.reshape(z.shape[0], -1)
    centred, counts = _masked_class_statistics(z, y)
    return jnp.sum(jnp.sum(centred * centred, axis=1) / counts[:, None]) / (y.shape[1] * z.shape[1])


def masked_cr(z, y=None):
    z = z.reshape(z.shape[0], -1)
    centred = z - z.mean(0)
    covariance = centred.T @ centred / z.shape[0]
    num_units = z.shape[1]
    off = covariance * (1.0 - jnp.eye(num_units))
    return jnp.sum(off * off) / (num_units * (num_units - 1.0))


def masked_vr(z, y=None):
    z = z.reshape(z.shape[0], -1)
    return jnp.mean(jnp.var(z, axis=0))


def masked_l1r(z, y=None):
    return jnp.mean(jnp.abs(z))


MASKED = {'cr': masked_cr, 'cw_cr': masked_cw_cr, 'vr': masked_vr, 'cw_vr': masked_cw_vr, 'l1r': masked_l1r}


def _masked_floats(name: str, n: int, i: int, k: int) -> float:
    if name == 'cw_cr':
        return k * (i * i + n * i)
    if name == 'cr':
        return i * i
    if name == 'cw_vr':
        return k * n * i
    return n * i


def penalty_rows(shapes: Sequence[tuple[int, int, int]] = PENALTY_SHAPES,
                 names: Sequence[str] = tuple(penalties.PENALTIES), repeats: int = 5,
                 seed: int = 0) -> list[dict]:
    """Median time of jitted value+grad of each penalty, ours vs the masked formulation."""
    rows = []
    for n, i, k in shapes:
        rng = np.random.default_rng(seed)
        z = jnp.asarray(np.maximum(rng.normal(size=(n, i)), 0.0).astype(np.float32))
        y = jax.nn.one_hot(jnp.asarray(rng.integers(0, k, n)), k)
        for name in names:
            ours = jax.jit(jax.value_and_grad(lambda a, b, f=penalties.PENALTIES[name]: f(a, b)))
            row = {'penalty': name, 'N': n, 'I': i, 'K': k,
                   'ours_ms': 1e3 * median_time(lambda: ours(z, y), repeats)}
            if _masked_floats(name, n, i, k) <= MASKED_MAX_FLOATS:
                masked = jax.jit(jax.value_and_grad(MASKED[name]))
                row['masked_ms'] = 1e3 * median_time(lambda: masked(z, y), repeats)
                row['ratio'] = row['masked_ms'] / row['ours_ms']
                value, reference = float(ours(z, y)[0]), float(masked(z, y)[0])
                row['rel_diff'] = abs(value - reference) / max(abs(reference), 1e-30)
            rows.append(row)
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats to 3 significant digits, missing cells as '—'."""

    def cell(value: Optional[object]) -> str:
        if value is None:
            return '—'
        if isinstance(value, float):
            return f'{value:.3g}'
        return str(value)

    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(cell(row.get(c)) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)
