"""Figures 1–3 of Choi & Rhee (AAAI 2019): representation plots and layer dependency, as PNG files.

* `plot_representation` — one model's Figure 1 panel: (a) per-class histogram of one unit's post-ReLU
  activations, (b) per-class scatter of two units, (c) 3-D scatter of the top three principal components of
  the pre-ReLU representation (Figure 2's bottom row; Figures 4–5 show the same after ReLU).
* `plot_representation_grid` — Figure 2: one column per model (baseline at init, baseline, CR, cw-CR, VR,
  cw-VR, …), rows histogram / scatter / PCA.
* `plot_layer_dependency` — Figure 3: test error vs. the layer the regularizer is applied to.

Only the object-oriented Matplotlib API is used (``Figure`` + Agg canvas): no pyplot state and no global
backend switch, so importing this module never changes the caller's backend and works headless.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence, Union

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import numpy.typing as npt

from cwreg.names import DISPLAY_NAMES

# Fixed colour per regularizer so that every figure agrees.
REGULARIZER_COLORS: dict[str, str] = {
    'baseline': '#444444',
    'l1w': '#8c564b',
    'l2w': '#e377c2',
    'cr': '#1f77b4',
    'cw_cr': '#17becf',
    'vr': '#d62728',
    'cw_vr': '#2ca02c',
    'l1r': '#ff7f0e',
}

_HIST_BINS = 40


@dataclasses.dataclass(frozen=True)
class PCAResult:
    """Top principal components of a data matrix.

    Attributes:
      scores: (N, k) projections of the centred data on the components.
      components: (k, I) orthonormal principal directions, largest variance first.
      explained_variance: (k,) variance of each score column (``σ²/N``).
      mean: (I,) the mean that was subtracted.
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    mean: np.ndarray


def principal_components(x: npt.ArrayLike, num_components: int = 3) -> PCAResult:
    """PCA via the thin SVD of the centred data: ``X − μ = U S Vᵀ``, scores ``U S``, components ``Vᵀ``.

    Each component's sign is fixed so that its largest-magnitude loading is positive (SVD signs are
    arbitrary; this keeps plots reproducible). If ``num_components`` exceeds ``min(N, I)`` the extra
    components (and scores) are zero, so a 2-unit layer still yields a 3-D plot.

    Args:
      x: (N, I) data (``(N, ...)`` is flattened).
      num_components: k.

    Returns:
      A `PCAResult`.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    n, units = x.shape
    mean = x.mean(axis=0) if n else np.zeros(units)
    centred = x - mean
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(num_components, vt.shape[0])
    vt = vt[:k]
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)]) if k else np.ones(0)
    signs[signs == 0] = 1.0
    components = np.zeros((num_components, units))
    components[:k] = vt * signs[:, None]
    scores = np.zeros((n, num_components))
    scores[:, :k] = u[:, :k] * s[:k] * signs
    variance = np.zeros(num_components)
    variance[:k] = s[:k] ** 2 / max(n, 1)
    return PCAResult(scores=scores, components=components, explained_variance=variance, mean=mean)


def most_active_units(postact: npt.ArrayLike, num_units: int = 2) -> tuple[int, ...]:
    """Indices of the ``num_units`` units with the largest mean post-ReLU activation (ties: lower index).

    The most active units give informative histograms/scatters; dead units would show a single spike at 0.
    """
    z = np.asarray(postact, dtype=np.float64).reshape(np.shape(postact)[0], -1)
    order = np.argsort(-z.mean(axis=0), kind='stable')
    return tuple(int(i) for i in order[:num_units])


def _class_colors(classes: Sequence[int]) -> dict[int, tuple[float, ...]]:
    cmap = matplotlib.colormaps['tab10' if len(classes) <= 10 else 'tab20']
    n = cmap.N
    return {int(c): cmap(k % n) for k, c in enumerate(classes)}


def _subsample(num: int, max_points: int, seed: int) -> np.ndarray:
    if num <= max_points:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, size=max_points, replace=False))


def _draw_histogram(
    ax,
    values: np.ndarray,
    labels: np.ndarray,
    colors: Mapping[int, tuple[float, ...]],
    unit: int,
    positive_only: bool,
) -> None:
    # The ReLU's spike at 0 would dwarf everything else, so by default only positive activations are binned
    # (as in the paper's Figure 1, whose histograms show the active part of a unit).
    keep = values > 0 if positive_only else np.ones_like(values, dtype=bool)
    top = float(values[keep].max()) if np.any(keep) else 1.0
    bins = np.linspace(0.0, top if top > 0 else 1.0, _HIST_BINS + 1)
    for c, color in colors.items():
        v = values[keep & (labels == c)]
        if v.size:
            ax.hist(
                v, bins=bins, histtype='stepfilled', alpha=0.4, color=color, edgecolor=color, label=str(c)
            )
    ax.set_xlabel(f'unit {unit} activation' + (' (> 0)' if positive_only else ''))
    ax.set_ylabel('count')


def _draw_scatter(
    ax,
    zi: np.ndarray,
    zj: np.ndarray,
    labels: np.ndarray,
    colors: Mapping[int, tuple[float, ...]],
    units: tuple[int, int],
) -> None:
    for c, color in colors.items():
        m = labels == c
        if np.any(m):
            ax.scatter(zi[m], zj[m], s=3, alpha=0.6, color=color, label=str(c), rasterized=True)
    ax.set_xlabel(f'unit {units[0]}')
    ax.set_ylabel(f'unit {units[1]}')


def _draw_pca(ax, scores: np.ndarray, labels: np.ndarray, colors: Mapping[int, tuple[float, ...]]) -> None:
    for c, color in colors.items():
        m = labels == c
        if np.any(m):
            ax.scatter(
                scores[m, 0],
                scores[m, 1],
                scores[m, 2],
                s=2,
                alpha=0.6,
                color=color,
                label=str(c),
                depthshade=False,
            )
    ax.set_xlabel('PC1')
    ax.set_ylabel('PC2')
    ax.set_zlabel('PC3')


def _as_arrays(
    preact: npt.ArrayLike, postact: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pre = np.asarray(preact, dtype=np.float64)
    post = np.asarray(postact, dtype=np.float64)
    pre = pre.reshape(pre.shape[0], -1)
    post = post.reshape(post.shape[0], -1)
    y = np.asarray(labels)
    if y.ndim == 2:
        y = np.argmax(y, axis=1)
    if not pre.shape[0] == post.shape[0] == y.shape[0]:
        raise ValueError(f'Sample counts differ: preact {pre.shape}, postact {post.shape}, labels {y.shape}.')
    return pre, post, y.astype(np.int64)


def _resolve_units(post: np.ndarray, units: Optional[Sequence[int]], name: str) -> tuple[int, int]:
    if units is None:
        chosen = most_active_units(post, 2)
        if len(chosen) < 2:  # a single-unit layer: plot the unit against itself
            chosen = (chosen[0], chosen[0])
        print(f'[cwreg.plots] {name}: plotting units {chosen} (the two most active by mean activation).')
        return chosen[0], chosen[1]
    i, j = (int(u) for u in units)
    for u in (i, j):
        if not 0 <= u < post.shape[1]:
            raise ValueError(f'Unit {u} out of range for a {post.shape[1]}-unit layer.')
    return i, j


def _save(fig: Figure, path: Union[str, os.PathLike], dpi: int) -> None:
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format='png')


def plot_representation(
    preact: npt.ArrayLike,
    postact: npt.ArrayLike,
    labels: npt.ArrayLike,
    path: Union[str, os.PathLike],
    title: str,
    units: Optional[Sequence[int]] = None,
    seed: int = 0,
    max_points: int = 2000,
    positive_only: bool = True,
    dpi: int = 100,
) -> tuple[int, int]:
    """One model's representation panel (Figure 1 plus Figure 2's PCA row), written as a PNG.

    Args:
      preact: (N, I) pre-ReLU activations of the layer (used for PCA, as in Figure 2's bottom row).
      postact: (N, I) post-ReLU activations (histogram and scatter).
      labels: (N,) integer labels (or (N, K) one-hot).
      path: output PNG path (parent directories are created).
      title: figure title (e.g. "cw-VR, epoch 50").
      units: ``(i, j)``: histogram of unit i, scatter of i vs j; default: the two most active units (printed).
      seed: seed of the subsample drawn for the scatter and 3-D plots (the histogram uses all samples).
      max_points: size of that subsample.
      positive_only: histogram only positive activations (the ReLU spike at 0 is left out).
      dpi: resolution.

    Returns:
      The ``(i, j)`` units plotted.
    """
    pre, post, y = _as_arrays(preact, postact, labels)
    i, j = _resolve_units(post, units, title)
    colors = _class_colors(np.unique(y).tolist())
    idx = _subsample(post.shape[0], max_points, seed)
    pca = principal_components(pre, 3)

    fig = Figure(figsize=(15, 4.6))
    ax_hist = fig.add_subplot(1, 3, 1)
    ax_scat = fig.add_subplot(1, 3, 2)
    ax_pca = fig.add_subplot(1, 3, 3, projection='3d')
    _draw_histogram(ax_hist, post[:, i], y, colors, i, positive_only)
    ax_hist.set_title('(a) activation histogram')
    _draw_scatter(ax_scat, post[idx, i], post[idx, j], y[idx], colors, (i, j))
    ax_scat.set_title('(b) two-unit scatter')
    _draw_pca(ax_pca, pca.scores[idx], y[idx], colors)
    ax_pca.set_title('(c) top-3 PCs (pre-ReLU)')
    handles, names = ax_hist.get_legend_handles_labels()
    fig.legend(handles, names, loc='center right', title='class', fontsize='small')
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.92, top=0.85, wspace=0.3)
    _save(fig, path, dpi)
    return i, j


def plot_representation_grid(
    models: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    labels: npt.ArrayLike,
    path: Union[str, os.PathLike],
    title: Optional[str] = None,
    units: Optional[Union[Sequence[int], Mapping[str, Sequence[int]]]] = None,
    seed: int = 0,
    max_points: int = 2000,
    positive_only: bool = True,
    dpi: int = 100,
) -> dict[str, tuple[int, int]]:
    """Figure 2: one column per model, rows = histogram / two-unit scatter / pre-ReLU PCA.

    Args:
      models: ``{column title: (preact (N, I), postact (N, I))}`` in column order, e.g. "Baseline (init)",
        "Baseline", "CR", "cw-CR", "VR", "cw-VR". All share ``labels`` (the same evaluation samples).
      labels: (N,) integer labels.
      path: output PNG path.
      title: optional figure title.
      units: ``(i, j)`` for every model, or ``{name: (i, j)}``; default per model: its two most active units
        (units of different networks are unrelated, so no common choice is more meaningful).
      seed: subsample seed (the same samples in every column).
      max_points: subsample size for the scatter and 3-D rows.
      positive_only: histogram only positive activations.
      dpi: resolution.

    Returns:
      ``{name: (i, j)}``, the units plotted per model.
    """
    if not models:
        raise ValueError('models is empty.')
    y_all = np.asarray(labels)
    if y_all.ndim == 2:
        y_all = np.argmax(y_all, axis=1)
    colors = _class_colors(np.unique(y_all).tolist())
    idx = _subsample(y_all.shape[0], max_points, seed)
    ncols = len(models)
    fig = Figure(figsize=(3.4 * ncols + 1.2, 10.5))
    chosen: dict[str, tuple[int, int]] = {}
    for col, (name, (preact, postact)) in enumerate(models.items()):
        pre, post, y = _as_arrays(preact, postact, y_all)
        model_units = units.get(name) if isinstance(units, Mapping) else units
        i, j = _resolve_units(post, model_units, name)
        chosen[name] = (i, j)
        pca = principal_components(pre, 3)
        ax_hist = fig.add_subplot(3, ncols, col + 1)
        ax_scat = fig.add_subplot(3, ncols, ncols + col + 1)
        ax_pca = fig.add_subplot(3, ncols, 2 * ncols + col + 1, projection='3d')
        _draw_histogram(ax_hist, post[:, i], y, colors, i, positive_only)
        ax_hist.set_title(name)
        _draw_scatter(ax_scat, post[idx, i], post[idx, j], y[idx], colors, (i, j))
        _draw_pca(ax_pca, pca.scores[idx], y[idx], colors)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc='center right', title='class', fontsize='small')
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=1.0 - 1.0 / (3.4 * ncols + 1.2), wspace=0.35, hspace=0.3)
    _save(fig, path, dpi)
    return chosen


Stat = tuple[float, float]


def _baseline_level(entry: Union[Stat, Mapping[str, Stat], None]) -> Optional[Stat]:
    """A baseline given as ``(mean, std)`` or as a single-entry ``{layer: (mean, std)}`` is a reference line."""
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        return tuple(next(iter(entry.values()))) if len(entry) == 1 else None
    return tuple(entry)


def plot_layer_dependency(
    results: Mapping[str, Union[Mapping[str, Stat], Stat]],
    path: Union[str, os.PathLike],
    title: str,
    layer_order: Sequence[str],
    ylabel: str = 'Test error (%)',
    dpi: int = 100,
) -> None:
    """Figure 3: test error vs. the layer a regularizer is applied to, one line per regularizer.

    Args:
      results: ``{regularizer: {layer name: (mean error, std error)}}``. Layers missing for a regularizer are
        left as gaps. ``results['baseline']`` given as one ``(mean, std)`` (or a single-layer dict) is drawn
        as a horizontal line with a ±std band, since the unregularized model has no layer.
      path: output PNG path.
      title: axes title (e.g. "MNIST MLP").
      layer_order: x-axis order of the layer names (e.g. ["layer1", …, "layer5", "output"]).
      ylabel: y-axis label.
      dpi: resolution.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(layer_order))
    baseline = _baseline_level(results.get('baseline'))  # type: ignore[arg-type]
    if baseline is not None:
        mean, std = baseline
        color = REGULARIZER_COLORS['baseline']
        ax.axhline(mean, color=color, linestyle='--', label=DISPLAY_NAMES['baseline'])
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
    offsets = np.linspace(-0.12, 0.12, max(len(results), 1))  # small x-jitter keeps error bars apart
    for k, (reg, per_layer) in enumerate(results.items()):
        if reg == 'baseline' and baseline is not None:
            continue
        if not isinstance(per_layer, Mapping):
            raise ValueError(f'{reg}: expected {{layer: (mean, std)}}, got {per_layer!r}.')
        unknown = set(per_layer) - set(layer_order)
        if unknown:
            raise ValueError(f'{reg}: layers {sorted(unknown)} are not in layer_order.')
        means = np.array([per_layer[l][0] if l in per_layer else np.nan for l in layer_order], dtype=float)
        stds = np.array([per_layer[l][1] if l in per_layer else np.nan for l in layer_order], dtype=float)
        ax.errorbar(
            x + offsets[k],
            means,
            yerr=stds,
            marker='o',
            markersize=4,
            capsize=3,
            color=REGULARIZER_COLORS.get(reg),
            label=DISPLAY_NAMES.get(reg, reg),
        )
    ax.set_xticks(x)
    ax.set_xticklabels(layer_order)
    ax.set_xlabel('regularized layer')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    _save(fig, path, dpi)
