"""The paper's Figures 1–3 from finished runs, and the layer-dependency runs behind Figure 3.

* Figures 1 and 2: the regularized layer's representation on the test images for the baseline at
  initialization, the trained baseline and each representation regularizer (final run of seed 0 of a
  sweep): per-class histogram of one unit, per-class scatter of two units, top-3 principal components of
  the pre-ReLU representation.
* Figure 3: test error vs the layer the regularizer is applied to. The λ of each regularizer is the one its
  λ search chose on the paper's default layer (the paper does not say how it chose λ per layer).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Mapping, Optional, Sequence

import ml_collections
import numpy as np

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


def run_layer_dependency(
    base: ml_collections.ConfigDict,
    layer_dir: str,
    sweep_dir: str,
    regularizers: Sequence[str],
    layers: Sequence[str],
    seeds: Sequence[int] = (0,),
    max_group: int = 6,
) -> None:
    """Trains each regularizer on each layer with the λ its sweep chose (final protocol, test split)."""
    progress = sweep.Progress(total=len(regularizers) * len(layers) * len(seeds))
    for name in regularizers:
        weight = sweep.chosen_weight(sweep_dir, name, base)  # only λ searches of this very config
        if weight is None:
            raise ValueError(f'{sweep_dir} has no finished λ search for {name} with this config.')
        for layer in layers:
            configs, workdirs = [], []
            for seed in seeds:
                config = ml_collections.ConfigDict(
                    sweep.run_config(base, name, weight, seed, False).to_dict()
                )
                config.penalty.layer = config.weight_penalty.layer = layer
                config.scenario = f'{base.scenario}@{layer}'
                configs.append(config)
                workdirs.append(os.path.join(layer_dir, name, layer, f'final_s{seed}'))
            sweep._train(
                configs,
                workdirs,
                os.path.join(layer_dir, name, layer),
                progress,  # pylint: disable=protected-access
                max_group,
            )


def layer_dependency_results(layer_dir: str, sweep_dir: str) -> dict[str, object]:
    """{regularizer: {layer: (mean, std)}} from the layer runs, plus the baseline's (mean, std)."""
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for run in report.load_runs([layer_dir]).runs:
        per[run.regularizer][run.scenario.split('@')[-1]].append(run.metric)
    results: dict[str, object] = {
        reg: {
            layer: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            for layer, v in layers.items()
        }
        for reg, layers in per.items()
    }
    baseline = [
        r.metric for r in report.load_runs([os.path.join(sweep_dir, 'baseline')]).runs if r.phase == 'final'
    ]
    if baseline:
        results['baseline'] = (
            float(np.mean(baseline)),
            float(np.std(baseline, ddof=1)) if len(baseline) > 1 else 0.0,
        )
    return results


def figure3_title(layer_dir: str, scenario: str) -> str:
    """``Figure 3: <scenario>, 50 epochs`` with the epochs of the layer runs (labelled when short)."""
    loaded = report.load_runs([layer_dir])
    epochs = [r.epochs for r in loaded.runs] + [p.epochs for p in loaded.pending]
    return f'Figure 3: {scenario}, {report.epochs_phrase(scenario, epochs)}'


def layer_dependency_figure(
    layer_dir: str, sweep_dir: str, path: str, layers: Sequence[str], title: str
) -> Mapping[str, object]:
    results = layer_dependency_results(layer_dir, sweep_dir)
    plots.plot_layer_dependency(results, path, title=title, layer_order=list(layers))
    return results
