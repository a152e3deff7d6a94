"""Does training as TF 1.x did change the MNIST results? Two variants of the same runs, side by side.

Issue #12 asks whether the paper's TF 1.5 defaults, which differ from Flax's and optax's (Glorot-uniform
instead of LeCun-normal kernels; Adam's ε added before the bias correction, `cwreg.training.optim`), move the baseline
or the gains. Input: the records (`cwreg.experiments.records`) of one small sweep per variant with the same regularizers,
λ and final seeds. Output: a markdown table with, per regularizer, each variant's final test error, their
difference (Welch's t; the variants share seeds, hence data order, but not initial weights), each variant's
paired gain over its own baseline, and the difference of the gains (SEs added, Welch–Satterthwaite dof).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from cwreg.experiments import records, report
from cwreg.names import DISPLAY_NAMES, REGULARIZERS


def final_errors(records_path: str) -> dict[str, dict[int, float]]:
    """{regularizer: {seed: final test metric}} of one variant's records."""
    finals: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for run in records.load_records([records_path]).runs:
        if run.phase == 'final':
            finals[run.regularizer][run.seed] = run.metric
    return finals


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """mean(b) − mean(a), its 95 % half-width and two-sided p (Welch's unequal-variance t-test)."""
    diff = float(np.mean(b) - np.mean(a))
    terms = [(np.var(x, ddof=1) / len(x), len(x) - 1) for x in (a, b)]
    return (diff, *report.welch(diff, terms))


def _gain_difference(ga: report.Paired, gb: report.Paired) -> tuple[float, float, float]:
    """gb − ga of two paired gains, each mean with its own SE: Welch's test of the difference."""
    diff = gb.mean - ga.mean
    return (diff, *report.welch(diff, [(g.se**2, g.n - 1) for g in (ga, gb)]))


def _interval(diff: float, half: float, p: float) -> str:
    return f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}] ({report.format_p(p)})'


def _gain_text(gain: Optional[report.Paired]) -> str:
    return (
        report.MISSING
        if gain is None or gain.se is None
        else _interval(gain.mean, gain.high - gain.mean, gain.p)
    )


def final_weights(records_path: str) -> dict[str, float]:
    """{regularizer: λ of its final runs}; raises ValueError if one regularizer has finals at two λ."""
    weights: dict[str, set[float]] = collections.defaultdict(set)
    for run in records.load_records([records_path]).runs:
        if run.phase == 'final':
            weights[run.regularizer].add(run.weight)
    if any(len(w) > 1 for w in weights.values()):
        raise ValueError(f'{records_path}: final runs of one regularizer at several λ: {dict(weights)}')
    return {reg: w.pop() for reg, w in weights.items()}


def render(names: Sequence[str], paths: Sequence[str]) -> str:
    """Markdown comparing exactly two variants: their names and records files (same regularizers and λ)."""
    (name_a, name_b), (path_a, path_b) = names, paths
    a, b = final_errors(path_a), final_errors(path_b)
    weights = final_weights(path_a)
    if weights != final_weights(path_b):
        raise ValueError(f'The variants ran other λ: {weights} vs {final_weights(path_b)}.')
    header = [
        'Regularizer',
        'λ',
        f'{name_a}: error (%)',
        f'{name_b}: error (%)',
        f'{name_b} − {name_a}',
        f'gain over baseline, {name_a}',
        f'gain over baseline, {name_b}',
        'difference of the gains',
    ]
    rows = []
    for reg in REGULARIZERS:
        if reg not in a or reg not in b or 'baseline' not in a or 'baseline' not in b:
            continue
        ea, eb = list(a[reg].values()), list(b[reg].values())
        row = [
            DISPLAY_NAMES[reg],
            report.format_weight(weights.get(reg, 0.0)) if reg != 'baseline' else '—',
            _mean_sd(ea),
            _mean_sd(eb),
            _interval(*_welch(ea, eb)),
        ]
        if reg == 'baseline':
            row += ['—', '—', '—']
        else:
            ga = report.paired_difference(a[reg], a['baseline'])
            gb = report.paired_difference(b[reg], b['baseline'])
            row += [_gain_text(ga), _gain_text(gb), _interval(*_gain_difference(ga, gb))]
        rows.append(row)
    return '\n'.join(report._md_table(header, rows)) + '\n'  # pylint: disable=protected-access


def _mean_sd(values: Sequence[float]) -> str:
    return f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n={len(values)})'


#: A final error at or above this (%) is a network that did not train (chance is 88.65 % on MNIST's test set).
UNTRAINED_ERROR = 80.0


def baselines(names: Sequence[str], paths: Sequence[str]) -> str:
    """Markdown of baseline-only variants (e.g. the width-2 hypotheses): per-seed errors and how many trained."""
    header = ['Variant', 'final test error (%) per seed', 'mean ± std', 'trained', 'mean of the trained']
    rows = []
    for name, path in zip(names, paths):
        by_seed = final_errors(path)['baseline']
        errors = [by_seed[s] for s in sorted(by_seed)]
        trained = [e for e in errors if e < UNTRAINED_ERROR]
        rows.append(
            [
                name,
                ', '.join(f'{e:.2f}' for e in errors),
                _mean_sd(errors),
                f'{len(trained)}/{len(errors)}',
                f'{np.mean(trained):.2f}' if trained else report.MISSING,
            ]
        )
    return '\n'.join(report._md_table(header, rows)) + '\n'  # pylint: disable=protected-access


def document(names: Sequence[str], paths: Sequence[str], title: Optional[str] = None) -> str:
    """The committed markdown: a title, each variant's `Runs:` line (epochs, seeds, commit), the table.

    Two variants of the same regularizers get the comparison of `render`; variants with baseline runs
    only (any number of them) get the table of `baselines`.
    """
    only_baselines = all(set(final_errors(p)) == {'baseline'} for p in paths)
    title = title or (' / '.join(names) if only_baselines else f'{names[1]} vs {names[0]}')
    lines = [f'# {title}', '']
    for name, path in zip(names, paths):
        loaded = records.load_records([path])
        scenarios = sorted({r.scenario for r in loaded.runs})
        lines.append(f'{name}: {report.protocol_line(scenarios, loaded.runs)}')
        lines.append('')
    table = baselines(names, paths) if only_baselines else render(names, paths)
    return '\n'.join(lines) + '\n' + table
