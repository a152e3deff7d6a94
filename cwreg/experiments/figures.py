"""The paper's Figures 1 and 2 from a finished sweep (Figure 3, layer dependency: `cwreg.experiments.layers`).

The regularized layer's representation on the test images for the baseline at initialization, the trained
baseline and each representation regularizer (final runs of one seed of a sweep, by default the baseline's
lowest): per-class histogram of one unit, per-class scatter of two units, top-3 principal components of the
pre-ReLU representation.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import ml_collections

from cwreg.experiments import plots, report, sweep
from cwreg.names import DISPLAY_NAMES
from cwreg.training import loop


def _config_of(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, 'results.json')) as f:
        return ml_collections.ConfigDict(json.load(f)['config'])


def _epochs_of(workdir: str) -> Optional[int]:
    """The epochs a run trained, from its results.json (`epochs`, else `config.num_epochs`)."""
    with open(os.path.join(workdir, 'results.json')) as f:
        return report.normalize_result(json.load(f))['epochs']


def _length(scenario: str, workdirs: Sequence[str]) -> str:
    # Titles state the epochs actually run, so a short run never passes for the paper's 50-epoch figure.
    return report.epochs_phrase(scenario, [_epochs_of(w) for w in workdirs])


def representation_figures(
    sweep_dir: str,
    out_dir: str,
    regularizers: Sequence[str] = ('cr', 'cw_cr', 'vr', 'cw_vr'),
    seed: Optional[int] = None,
) -> list[str]:
    """Writes Figure 1 (baseline at init, baseline, cw-CR) and Figure 2 (all) as PNGs; returns their paths.

    `seed`: the final seed whose models are drawn; None: the baseline's lowest final seed in `sweep_dir`.
    """
    if seed is None:
        seeds = [
            r.seed for r in report.load_runs([os.path.join(sweep_dir, 'baseline')]).runs if r.phase == 'final'
        ]
        if not seeds:
            raise ValueError(f'{sweep_dir} has no finished final run of the baseline to draw.')
        seed = min(seeds)
    baseline_dir = sweep.run_dir(sweep_dir, 'baseline', 'final', seed=seed)
    config = _config_of(baseline_dir)
    dataset = loop.load_data(config)
    layer = config.penalty.layer
    layers = [layer, f'{layer}_preact']

    def reps(workdir: Optional[str]):
        variables = None if workdir is None else sweep.load_variables(workdir)
        out = sweep.representations(config, variables, dataset.eval.images, layers, dataset.num_classes)
        return out[f'{layer}_preact'], out[layer]

    columns = {'Baseline (init)': reps(None), 'Baseline (trained)': reps(baseline_dir)}
    trained = {'Baseline (trained)': baseline_dir}
    for name in regularizers:
        workdir = sweep.run_dir(sweep_dir, name, 'final', seed=seed)
        if sweep.status(workdir) == 'finished':
            columns[DISPLAY_NAMES[name]] = reps(workdir)
            trained[DISPLAY_NAMES[name]] = workdir
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    figure1 = {k: v for k, v in columns.items() if k in ('Baseline (init)', 'Baseline (trained)', 'cw-CR')}
    length1 = _length(config.scenario, [w for k, w in trained.items() if k in figure1])
    length2 = _length(config.scenario, list(trained.values()))
    for filename, models, title in (
        ('figure1.png', figure1, f'Figure 1: {layer} on the MNIST test set, {length1}'),
        ('figure2.png', columns, f'Figure 2: {layer} on the MNIST test set, {length2}'),
    ):
        path = os.path.join(out_dir, filename)
        plots.plot_representation_grid(models, dataset.eval.labels, path, title=title)
        paths.append(path)
    return paths
