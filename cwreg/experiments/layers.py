"""Figure 3, layer dependency: the test error of each regularizer applied to each layer, paired by seed.

The paper (Figure 3a) trains each representation regularizer on each layer of the MNIST MLP and reports
that the upper layers gain most. It does not say how λ was chosen per layer; here each regularizer keeps
the λ its sweep chose on the scenario's default layer (the mean validation error over the protocol's
selection seeds), and every other layer is trained on the protocol's final seeds. The default layer's runs
*are* the sweep's final runs (same seeds), so each layer's difference to the default layer and to the
baseline is a paired mean difference over the same seeds.

Layer runs live in ``<layer_dir>/<regularizer>/<layer>/final_s<seed>/`` and record the scenario
``<scenario>@<layer>`` (e.g. ``mnist_mlp/default@layer3``), which keeps them out of the scenario's tables.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from cwreg.experiments import plots, report, sweep
from cwreg.names import DISPLAY_NAMES

LAYER_SEPARATOR = '@'
Errors = dict[int, float]  # final test metric by seed


def layer_config(
    base: ml_collections.ConfigDict, regularizer: str, weight: float, seed: int, layer: str
) -> ml_collections.ConfigDict:
    """The final run of `regularizer` at λ = `weight` and `seed` with its penalty on `layer`."""
    config = ml_collections.ConfigDict(sweep.run_config(base, regularizer, weight, seed, False).to_dict())
    config.penalty.layer = config.weight_penalty.layer = layer
    config.scenario = f'{base.scenario}{LAYER_SEPARATOR}{layer}'
    config.lock()
    return config


def run_layer_dependency(
    base: ml_collections.ConfigDict,
    layer_dir: str,
    sweep_dir: str,
    regularizers: Sequence[str],
    layers: Sequence[str],
    protocol: sweep.Protocol = sweep.POWERED,
    max_group: int = 10,
) -> dict[str, float]:
    """Trains each regularizer on each of `layers` but `base`'s own; returns the λ used per regularizer.

    λ is the one the sweep in `sweep_dir` (of this very `base`) chose over `protocol`'s selection seeds;
    the runs use `protocol`'s final seeds. Resumable like a sweep.

    Raises:
      ValueError: the sweep has no complete λ search of `base` for a regularizer.
    """
    trained = [layer for layer in layers if layer != base.penalty.layer]
    progress = sweep.Progress(total=len(regularizers) * len(trained) * len(protocol.final_seeds))
    weights = {}
    for name in regularizers:
        weights[name] = sweep.chosen_weight(sweep_dir, name, base, protocol.selection_seeds)
        if weights[name] is None:
            raise ValueError(
                f'{sweep_dir} has no finished λ search for {name} with this config over the selection '
                f'seeds {protocol.selection_seeds}: run the sweep first.'
            )
    for name in regularizers:
        for layer in trained:
            root = os.path.join(layer_dir, name, layer)
            sweep._train(  # pylint: disable=protected-access
                [layer_config(base, name, weights[name], s, layer) for s in protocol.final_seeds],
                [os.path.join(root, f'final_s{s}') for s in protocol.final_seeds],
                root,
                progress,
                max_group,
            )
    return weights


def layer_errors(
    runs: Iterable[report.Run], scenario: str, default_layer: str
) -> dict[str, dict[str, Errors]]:
    """``{regularizer: {layer: {seed: metric}}}`` of the final runs of `scenario` and its layer runs.

    Runs of `scenario` itself count as `default_layer`, and so does the baseline (it has no layer).
    """
    out: dict[str, dict[str, Errors]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for run in runs:
        if run.phase != 'final' or run.metric is None:
            continue
        base, _, layer = run.scenario.partition(LAYER_SEPARATOR)
        if base != scenario:
            continue
        if run.regularizer == 'baseline':
            layer = ''
        out[run.regularizer][layer or default_layer][run.seed] = run.metric
    return {reg: dict(per) for reg, per in out.items()}


def layer_scenario(runs: Iterable[report.Run]) -> str:
    """The one scenario whose layer runs (``<scenario>@<layer>``) are among `runs`.

    Raises:
      ValueError: no layer runs, or layer runs of several scenarios.
    """
    found = {r.scenario.partition(LAYER_SEPARATOR)[0] for r in runs if LAYER_SEPARATOR in r.scenario}
    if len(found) != 1:
        raise ValueError(f'Expected the layer runs of one scenario, found {sorted(found) or "none"}.')
    return found.pop()


@dataclasses.dataclass(frozen=True)
class _Figure:
    """What `document` and `figure` show: the same rows, baseline, runs and length."""

    scenario: str
    errors: dict[str, dict[str, Errors]]
    regularizers: list[str]  # rows: trained on a listed layer other than the default one
    baseline: Errors
    used: list[report.Run]  # the runs behind the rows and the baseline (λ selection included)
    length: str  # epochs run, labelled when shorter than the protocol's


def _figure_data(runs: Iterable[report.Run], layers: Sequence[str], default_layer: str) -> _Figure:
    runs = list(runs)
    scenario = layer_scenario(runs)
    errors = layer_errors(runs, scenario, default_layer)
    others = set(layers) - {default_layer}
    regs = report._ordered(  # pylint: disable=protected-access
        reg for reg, per in errors.items() if reg != 'baseline' and set(per) & others
    )
    scenarios = {scenario} | {f'{scenario}{LAYER_SEPARATOR}{layer}' for layer in layers}
    used = [r for r in runs if r.scenario in scenarios and r.regularizer in set(regs) | {'baseline'}]
    return _Figure(
        scenario=scenario,
        errors=errors,
        regularizers=regs,
        baseline=errors.get('baseline', {}).get(default_layer, {}),
        used=used,
        length=report.epochs_phrase(scenario, [r.epochs for r in used]),
    )


def _mean_std(errors: Errors) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1; None for one seed) over the seeds."""
    values = list(errors.values())
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _summary_cell(errors: Errors) -> str:
    return f'{report.format_mean_std(*_mean_std(errors), "error")} (n={len(errors)})'


def _paired_cell(a: Errors, b: Errors) -> str:
    paired = report.paired_difference(a, b)
    return report.format_gain(paired, None, 'error') if paired else report.MISSING


def _weights(data: _Figure) -> str:
    weights = {}
    for run in data.used:
        if run.phase == 'final' and LAYER_SEPARATOR in run.scenario:
            weights.setdefault(run.regularizer, set()).add(run.weight)
    return ', '.join(
        f'{DISPLAY_NAMES[reg]} {"/".join(report.format_weight(w) for w in sorted(weights.get(reg, ())))}'
        for reg in data.regularizers
    )


def document(
    runs: Iterable[report.Run], layers: Sequence[str], default_layer: str, title: str = 'Figure 3'
) -> str:
    """Figure 3's numbers as markdown: per-layer means, and paired differences to the baseline and to the
    default layer (mean [95 % CI] (n, p); negative = lower error). For classification scenarios (error %).

    Args:
      runs: the scenario's sweep (final runs of `default_layer`, the baseline, λ selection) and its layer
        runs, e.g. ``cwreg.experiments.records.load_records(paths).runs``.
      layers: the x-axis, in order; `default_layer` among them.
      default_layer: the layer of the scenario's own runs.
      title: the heading; the scenario and the epochs run are appended.
    """
    data = _figure_data(runs, layers, default_layer)
    scenarios = [data.scenario] + [f'{data.scenario}{LAYER_SEPARATOR}{layer}' for layer in layers]
    header = ['Regularizer'] + [f'{layer} (default)' if layer == default_layer else layer for layer in layers]
    lines = [f'# {title}: {data.scenario}, {data.length}', '', report.protocol_line(scenarios, data.used), '']
    lines += [
        f"λ on every layer: the sweep's choice on {default_layer} ({_weights(data)}); the paper does not "
        f"say how it chose λ per layer. {default_layer} is the sweep's own final runs; the other layers "
        'were trained on the same seeds.',
        '',
    ]
    if data.baseline:
        lines += [f'Baseline (no regularizer): {_summary_cell(data.baseline)}.', '']

    def to_default(per: Mapping[str, Errors], layer: str) -> str:
        return (
            '(reference)' if layer == default_layer else _paired_cell(per[layer], per.get(default_layer, {}))
        )

    sections = (
        ('Test error (%), mean ± std over the final seeds', lambda per, layer: _summary_cell(per[layer])),
        ('Minus the baseline, paired by seed', lambda per, layer: _paired_cell(per[layer], data.baseline)),
        (f'Minus the same regularizer on {default_layer}, paired by seed', to_default),
    )
    for heading, cell in sections:
        rows = [
            [DISPLAY_NAMES[reg]]
            + [
                cell(data.errors[reg], layer) if layer in data.errors[reg] else report.MISSING
                for layer in layers
            ]
            for reg in data.regularizers
        ]
        lines += [f'## {heading}', '', *report._md_table(header, rows), '']  # pylint: disable=protected-access
    return '\n'.join(lines).rstrip() + '\n'


def figure(
    runs: Iterable[report.Run], layers: Sequence[str], default_layer: str, path: str, title: str = 'Figure 3'
) -> Mapping[str, object]:
    """Figure 3 as a PNG (mean ± std of the test error per layer, the baseline as a band); returns its
    numbers. Its rows and title (scenario, epochs run) are `document`'s."""
    data = _figure_data(runs, layers, default_layer)

    def stat(values: Errors) -> tuple[float, float]:
        mean, std = _mean_std(values)
        return mean, std or 0.0  # one seed: no error bar

    results: dict[str, object] = {
        reg: {layer: stat(data.errors[reg][layer]) for layer in layers if layer in data.errors[reg]}
        for reg in data.regularizers
    }
    if data.baseline:
        results['baseline'] = stat(data.baseline)
    plots.plot_layer_dependency(
        results, path, title=f'{title}: {data.scenario}, {data.length}', layer_order=list(layers)
    )
    return results
