"""Markdown results tables in the layout of Choi & Rhee (AAAI 2019), next to the paper's numbers.

Input: sweep directories holding one ``results.json`` per training run (any depth; found with
``**/results.json``; directory names are never parsed, only the fields)::

  {"scenario": "mnist_mlp/default", "regularizer": "cw_vr", "weight": 0.1, "seed": 0,
   "phase": "select" | "final", "eval_split": "validation" | "test", "error": 2.42, "loss": 0.08,
   "status": "finished", ...}

plus optionally a ``stats.json`` (`cwreg.experiments.stats.representation_statistics`) next to a final run's
``results.json`` for Table 5. Runs whose ``status`` is not ``"finished"`` (in progress, ``"diverged"``, …)
are treated as missing: they never enter a mean, but their status is shown (``n=3, 2 diverged`` in a cell,
``diverged`` in the λ-search table). Unreadable files are skipped and listed (relative to their sweep).
The same runs can come from records files instead (`cwreg.experiments.records`: one JSONL line per run); both sources go
through `normalize_result` and `run_of_record`, and the markdown shows only what the runs record (no paths,
no clock), so a report from records equals the one from the sweep directories.

Conventions (also printed in the report):

* Metric: ``error`` (test/validation error in %); where ``error`` is null (the autoencoder) ``loss`` (MSE).
* λ selection: per (scenario, regularizer), the select-phase λ with the lowest mean validation metric (mean
  over seeds if several); ties (equal within 1e-9 relative) go to the smaller λ, the weaker regularization.
* Cells: ``mean ± std (n=…)`` over the finished final runs, std is the sample std (ddof=1, the unbiased
  variance; the paper does not say which it used); with n=1 no std is shown. The chosen λ and the paper's
  number follow. Bold marks the lowest mean of each column at display precision (all cells of a tie);
  partially finished cells count. Missing cells are ``—``.
* ResNet-110 (Table 4) follows the paper's ``best (mean ± std)`` and is bolded by the best run.
* Each table states its runs' epochs, final seeds, λ-selection protocol and commits; a table of runs
  shorter than the scenario family's protocol (`PROTOCOL`) says so in its title.
* Gains tables: regularizer − baseline (and cw-CR − CR, cw-VR − VR) paired by seed, with a Student-t 95 % CI
  and paired t-test p, beside the paper's gain ± SE; † = differs from the paper's (`differs_from_paper`).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

from cwreg import names
from cwreg.experiments import stats as stats_lib
from cwreg.names import DISPLAY_NAMES

# Regularizers without a λ: only final runs, no λ note in their cells. (Dropout's λ is its rate.)
NO_LAMBDA: frozenset[str] = frozenset(names.UNSEARCHED)

# The training length of each scenario family's protocol, the one place it is stated: (unit, length, whose).
# A table or figure of shorter runs says so in its title. MNIST: "50 epochs" (paper, Figure 2's text); the
# CIFAR CNNs: the paper gives no length, configs/ use 50 epochs; ResNet: He et al.'s 64k iterations.
PROTOCOL: dict[str, tuple[str, int, str]] = {
    'mnist_mlp': ('epochs', 50, "the paper's"),
    'mnist_autoencoder': ('epochs', 50, "the paper's"),
    'cifar10_cnn': ('epochs', 50, "the protocol's"),
    'cifar100_cnn': ('epochs', 50, "the protocol's"),
    'resnet32': ('steps', 64000, "the protocol's"),
    'resnet110': ('steps', 64000, "the protocol's"),
}

# The paper reports mean ± std over this many runs where it does not say otherwise.
PAPER_RUNS = 5
SIGNIFICANCE = 0.05

PAPER_RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results.json')

MISSING = '—'
_TIE_RTOL = 1e-9

_log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished training run (one ``results.json``, or one line of a records file)."""

    scenario: str
    regularizer: str
    weight: float
    seed: int
    phase: str
    eval_split: str
    error: Optional[float]
    loss: Optional[float]
    path: str
    stats: Optional[dict[str, float]] = None
    epochs: Optional[int] = None
    steps: Optional[int] = None
    commit: Optional[str] = None

    @property
    def metric(self) -> Optional[float]:
        """Error in % for classification; the loss (MSE) where ``error`` is null (autoencoder)."""
        return self.error if self.error is not None else self.loss


@dataclasses.dataclass(frozen=True)
class Pending:
    """A ``results.json`` whose status is not ``finished`` (``running``, ``diverged``, …): a missing value."""

    scenario: str
    regularizer: str
    weight: float
    seed: int
    phase: str
    status: str
    epochs: Optional[int] = None
    steps: Optional[int] = None
    commit: Optional[str] = None


@dataclasses.dataclass
class LoadedRuns:
    runs: list[Run]
    num_files: int = 0
    num_unfinished: int = 0
    pending: list[Pending] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)
    # `unreadable` as the report shows them: relative to their sweep directory (no absolute paths).
    unreadable_shown: list[str] = dataclasses.field(default_factory=list)


def _optional_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def read_stats(results_path: str) -> Optional[dict[str, float]]:
    """The Table 5 statistics in the ``stats.json`` beside ``results_path``; None if absent or unreadable."""
    path = os.path.join(os.path.dirname(results_path), 'stats.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        return {k: float(raw[k]) for k in stats_lib.STAT_KEYS if k in raw}
    except (OSError, ValueError, TypeError) as e:
        _log.warning('Skipping unreadable %s: %s', path, e)
        return None


_read_stats = read_stats  # the old private name


RECORD_FIELDS: tuple[str, ...] = (
    'scenario',
    'regularizer',
    'weight',
    'seed',
    'phase',
    'eval_split',
    'epochs',
    'steps',
    'error',
    'loss',
    'penalty_value',
    'status',
    'wall_time_s',
    'commit',
    'stats',
)


def normalize_result(raw: Mapping[str, Any], stats: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """The flat record (`RECORD_FIELDS`) of one ``results.json``: what the report and the records file keep.

    Both `load_runs` and `cwreg.experiments.records` go through this one function, so a report built from records equals
    the one built from the sweep directories. ``epochs`` falls back to ``config.num_epochs``; ``commit`` is
    ``provenance.git_commit``; non-finite numbers become null (the report treats them as missing anyway).

    Raises:
      KeyError, ValueError, TypeError, AttributeError: when ``raw`` lacks scenario, regularizer or phase.
    """
    config = raw.get('config') or {}
    epochs = raw.get('epochs')
    return {
        'scenario': str(raw['scenario']),
        'regularizer': str(raw['regularizer']),
        'weight': float(raw.get('weight') or 0.0),
        'seed': int(raw.get('seed', 0)),
        'phase': str(raw['phase']),
        'eval_split': str(raw.get('eval_split', '')),
        'epochs': _optional_int(epochs if epochs is not None else config.get('num_epochs')),
        'steps': _optional_int(raw.get('steps')),
        'error': _optional_float(raw.get('error')),
        'loss': _optional_float(raw.get('loss')),
        'penalty_value': _optional_float(raw.get('penalty_value')),
        'status': str(raw.get('status')),
        'wall_time_s': _optional_float(raw.get('wall_time_s')),
        'commit': (raw.get('provenance') or {}).get('git_commit'),
        'stats': stats if raw.get('phase') == 'final' else None,
    }


def run_of_record(record: Mapping[str, Any], path: str) -> Run | Pending:
    """The `Run` (status finished) or `Pending` (any other status) of a `normalize_result` record.

    Raises:
      ValueError: a finished record with neither error nor loss.
    """
    common = dict(
        scenario=record['scenario'],
        regularizer=record['regularizer'],
        weight=record['weight'],
        seed=record['seed'],
        phase=record['phase'],
    )
    extra = dict(epochs=record.get('epochs'), steps=record.get('steps'), commit=record.get('commit'))
    if record['status'] != 'finished':
        return Pending(**common, status=record['status'], **extra)
    run = Run(
        **common,
        eval_split=record['eval_split'],
        error=record['error'],
        loss=record['loss'],
        path=path,
        stats=record.get('stats') if record['phase'] == 'final' else None,
        **extra,
    )
    if run.metric is None:
        raise ValueError('finished but has neither error nor loss')
    return run


def collect(items: Iterable[tuple[str, str, Mapping[str, Any]]], out: LoadedRuns) -> LoadedRuns:
    """Adds ``(path, shown path, record)`` triples to ``out``.

    A repeated run key keeps the last one (the earlier one is listed as a duplicate). The shown path is the one
    the report may print (relative: never an absolute path).
    """
    by_key: dict[tuple[Any, ...], Run] = {
        (r.scenario, r.regularizer, r.phase, r.weight, r.seed): r for r in out.runs
    }
    for path, shown, record in items:
        out.num_files += 1
        try:
            run = run_of_record(record, path)
        except ValueError as e:
            _log.warning('Skipping %s: %s.', path, e)
            out.unreadable.append(path)
            out.unreadable_shown.append(shown)
            continue
        if isinstance(run, Pending):
            out.num_unfinished += 1
            out.pending.append(run)
            continue
        key = (run.scenario, run.regularizer, run.phase, run.weight, run.seed)
        if key in by_key:
            out.duplicates.append(by_key[key].path)
        by_key[key] = run
    out.runs = list(by_key.values())
    return out


def results_files(sweep_dirs: Sequence[str]) -> list[tuple[str, str]]:
    """``(absolute path, path relative to its sweep directory)`` of every results.json, sorted by path."""
    found: dict[str, str] = {}
    for d in sweep_dirs:
        if not os.path.isdir(d):
            _log.warning('Sweep directory %s does not exist.', d)
            continue
        for p in glob.glob(os.path.join(d, '**', 'results.json'), recursive=True):
            found.setdefault(os.path.abspath(p), os.path.relpath(p, d))
    return sorted(found.items())


def read_results(sweep_dirs: Sequence[str], out: LoadedRuns) -> list[tuple[str, str, dict[str, Any]]]:
    """``(path, shown path, normalized record)`` of every readable results.json, sorted by path.

    Unreadable files (and unfinished ones too incomplete to place) are only counted in ``out``.
    """
    items = []
    for path, shown in results_files(sweep_dirs):
        try:
            with open(path) as f:
                raw = json.load(f)
            if raw.get('status') != 'finished':
                try:
                    items.append((path, shown, normalize_result(raw)))
                except (KeyError, ValueError, TypeError, AttributeError):
                    out.num_files += 1  # counted as unfinished; too incomplete to place in a table
                    out.num_unfinished += 1
                continue
            stats = read_stats(path) if raw.get('phase') == 'final' else None
            items.append((path, shown, normalize_result(raw, stats)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            _log.warning('Skipping unreadable %s: %r', path, e)
            out.num_files += 1
            out.unreadable.append(path)
            out.unreadable_shown.append(shown)
    return items


def load_runs(sweep_dirs: Sequence[str]) -> LoadedRuns:
    """Reads every ``results.json`` below ``sweep_dirs``.

    A run identified by (scenario, regularizer, phase, λ, seed) that appears more than once (e.g. the same
    sweep passed twice) is counted once: the file with the lexicographically last path wins.

    Args:
      sweep_dirs: directories to search recursively.

    Returns:
      The finished runs and bookkeeping (files seen, unfinished, unreadable, duplicates).
    """
    out = LoadedRuns(runs=[])
    return collect(read_results(sweep_dirs, out), out)


def load_paper_results(path: str = PAPER_RESULTS_PATH) -> dict[str, Any]:
    """The paper's transcribed numbers (`cwreg/experiments/paper_results.json`)."""
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# Aggregation.


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1; None for n < 2), n and minimum of a set of values."""

    mean: float
    std: Optional[float]
    n: int
    best: float


def summarize(values: Sequence[float]) -> Optional[Summary]:
    """`Summary` of ``values``; None when empty."""
    if not values:
        return None
    x = np.asarray(values, dtype=np.float64)
    std = float(np.std(x, ddof=1)) if x.size > 1 else None
    return Summary(mean=float(np.mean(x)), std=std, n=int(x.size), best=float(np.min(x)))


def select_weight(runs: Iterable[Run]) -> tuple[Optional[float], dict[float, Summary]]:
    """The select-phase λ with the lowest mean validation metric.

    Args:
      runs: runs of one (scenario, regularizer); only ``phase == 'select'`` ones are used.

    Returns:
      ``(λ, {λ: summary of the validation metric})``; λ is None without select runs. Ties (equal within a
      relative 1e-9) go to the smaller λ.
    """
    by_weight: dict[float, list[float]] = collections.defaultdict(list)
    for run in runs:
        if run.phase == 'select' and run.metric is not None:
            by_weight[run.weight].append(run.metric)
    summaries = {w: summarize(v) for w, v in sorted(by_weight.items())}
    chosen = None
    for w, s in summaries.items():  # ascending λ, so a tie keeps the smaller λ
        if chosen is None or s.mean < summaries[chosen].mean - _TIE_RTOL * max(1.0, abs(s.mean)):
            chosen = w
    return chosen, summaries


@dataclasses.dataclass(frozen=True)
class Cell:
    """Everything the report shows for one (scenario, regularizer)."""

    final: Optional[Summary]
    chosen_weight: Optional[float]
    final_weights: tuple[float, ...]
    select: dict[float, Summary]
    stats: dict[str, Summary]
    pending_final: dict[str, int] = dataclasses.field(default_factory=dict)  # status -> count
    pending_select: dict[float, str] = dataclasses.field(default_factory=dict)  # λ -> status
    final_by_seed: dict[int, float] = dataclasses.field(default_factory=dict)  # what paired tests pair
    stats_by_seed: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # Table 5, paired


def build_cells(runs: Iterable[Run], pending: Iterable[Pending] = ()) -> dict[str, dict[str, Cell]]:
    """Groups runs into ``{scenario: {regularizer: Cell}}``; ``pending`` runs are only counted."""
    grouped: dict[str, dict[str, list[Run]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for run in runs:
        grouped[run.scenario][run.regularizer].append(run)
    waiting: dict[tuple[str, str], list[Pending]] = collections.defaultdict(list)
    finished_keys = {(r.scenario, r.regularizer, r.phase, r.weight, r.seed) for r in grouped_runs(grouped)}
    for p in pending:
        if (p.scenario, p.regularizer, p.phase, p.weight, p.seed) not in finished_keys:
            waiting[(p.scenario, p.regularizer)].append(p)
            grouped[p.scenario].setdefault(p.regularizer, [])
    cells: dict[str, dict[str, Cell]] = {}
    for scenario, by_reg in grouped.items():
        cells[scenario] = {}
        for reg, reg_runs in by_reg.items():
            wait = waiting.get((scenario, reg), [])
            finals = [r for r in reg_runs if r.phase == 'final']
            chosen, select = select_weight(reg_runs)
            stat_values: dict[str, list[float]] = collections.defaultdict(list)
            for r in finals:
                for k, v in (r.stats or {}).items():
                    stat_values[k].append(v)
            cells[scenario][reg] = Cell(
                final=summarize([r.metric for r in finals]),
                chosen_weight=chosen,
                final_weights=tuple(sorted({r.weight for r in finals})),
                select=select,
                stats={k: summarize(v) for k, v in stat_values.items()},
                pending_final=dict(collections.Counter(p.status for p in wait if p.phase == 'final')),
                pending_select={p.weight: p.status for p in wait if p.phase == 'select'},
                final_by_seed=_final_by_seed(finals, chosen),
                stats_by_seed=_stats_by_seed(finals, chosen),
            )
    return cells


def _stats_by_seed(finals: Sequence[Run], chosen: Optional[float]) -> dict[str, dict[int, float]]:
    """{statistic: {seed: value}} of the final runs at `_paired_weight` (Table 5's paired differences)."""
    weight = _paired_weight(finals, chosen)
    out: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for r in finals:
        if weight is not None and r.weight == weight:
            for key, value in (r.stats or {}).items():
                out[key][r.seed] = value
    return dict(out)


def _paired_weight(finals: Sequence[Run], chosen: Optional[float]) -> Optional[float]:
    """The λ whose final runs paired tests pair: the chosen one, else the only one; None when ambiguous."""
    weights = {r.weight for r in finals}
    if chosen in weights:
        return chosen
    return next(iter(weights)) if len(weights) == 1 else None  # several λ, none chosen: no honest pairing


def _final_by_seed(finals: Sequence[Run], chosen: Optional[float]) -> dict[int, float]:
    """{seed: metric} of the final runs at `_paired_weight`; {} when ambiguous."""
    weight = _paired_weight(finals, chosen)
    return {r.seed: r.metric for r in finals if weight is not None and r.weight == weight}


def grouped_runs(grouped: Mapping[str, Mapping[str, list[Run]]]) -> list[Run]:
    return [r for by_reg in grouped.values() for runs in by_reg.values() for r in runs]


# ----------------------------------------------------------------------------------------------------------
# Table layout.


@dataclasses.dataclass(frozen=True)
class Column:
    scenario: str
    title: str
    style: str = 'mean_std'  # or 'best_mean_std' (ResNet-110: "best (mean±std)")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    columns: tuple[Column, ...]
    metric: str = 'error'  # 'error' (%) or 'mse'
    with_l1r: bool = True  # paper order + L1R (L1R has no paper numbers)


_C = Column
TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        '2',
        'Table 2: Error (%) for CIFAR-10 CNN model (optimizers)',
        (_C('cifar10_cnn/default', 'Adam'), _C('cifar10_cnn/momentum', 'Momentum')),
    ),
    TableSpec(
        '3',
        'Table 3: Error (%) for CIFAR-100 CNN model (number of classes)',
        (
            _C('cifar100_cnn/classes16', '16 classes'),
            _C('cifar100_cnn/classes64', '64 classes'),
            _C('cifar100_cnn/default', '100 classes'),
        ),
    ),
    TableSpec(
        '4',
        'Table 4: Error (%) for ResNet-32/110 (CIFAR-10)',
        (_C('resnet32/default', 'ResNet-32'), _C('resnet110/default', 'ResNet-110', 'best_mean_std')),
        with_l1r=False,
    ),
    TableSpec(
        '5',
        'Table 5: Quantitative evaluations of representation characteristics (MNIST MLP)',
        (_C('mnist_mlp/default', 'Test error (%)'),),
    ),
    TableSpec(
        '7',
        'Table 7: Error (%) for MNIST MLP model',
        (
            _C('mnist_mlp/default', 'Default'),
            _C('mnist_mlp/size1k', 'Data size 1k'),
            _C('mnist_mlp/size5k', 'Data size 5k'),
            _C('mnist_mlp/width2', 'Layer width 2'),
            _C('mnist_mlp/width8', 'Layer width 8'),
        ),
    ),
    TableSpec(
        '8',
        'Table 8: Error (%) for CIFAR-10 CNN model',
        (
            _C('cifar10_cnn/default', 'Default'),
            _C('cifar10_cnn/size1k', 'Data size 1k'),
            _C('cifar10_cnn/size5k', 'Data size 5k'),
            _C('cifar10_cnn/width32', 'Layer width 32'),
            _C('cifar10_cnn/width512', 'Layer width 512'),
            _C('cifar10_cnn/momentum', 'Momentum'),
            _C('cifar10_cnn/rmsprop', 'RMSProp'),
        ),
    ),
    TableSpec(
        '9',
        'Table 9: Error (%) for CIFAR-100 CNN model',
        (
            _C('cifar100_cnn/default', 'Default'),
            _C('cifar100_cnn/size1k', 'Data size 1k'),
            _C('cifar100_cnn/size5k', 'Data size 5k'),
            _C('cifar100_cnn/width32', 'Layer width 32'),
            _C('cifar100_cnn/width512', 'Layer width 512'),
            _C('cifar100_cnn/classes4', '4 classes'),
            _C('cifar100_cnn/classes16', '16 classes'),
            _C('cifar100_cnn/classes64', '64 classes'),
        ),
    ),
    TableSpec(
        '10',
        'Table 10: Mean squared error of deep autoencoder (MNIST)',
        (_C('mnist_autoencoder/default', 'Mean Squared Error'),),
        metric='mse',
        with_l1r=False,
    ),
)


def _ordered(regs: Iterable[str]) -> list[str]:
    regs = set(regs)
    # Paper order (cwreg.names.REGULARIZERS), then any other regularizer found.
    known = [r for r in names.REGULARIZERS if r in regs]
    return known + sorted(regs - set(names.REGULARIZERS))


# ----------------------------------------------------------------------------------------------------------
# Formatting.


def format_weight(weight: float) -> str:
    return f'{weight:g}'


def format_number(x: float, metric: str) -> str:
    return f'{x:.2e}' if metric == 'mse' else f'{x:.2f}'


def _format_stat(x: float) -> str:
    return f'{x:.2f}' if abs(x) >= 0.1 or x == 0.0 else f'{x:.3f}'


def format_mean_std(mean: float, std: Optional[float], metric: str) -> str:
    if std is None:
        return format_number(mean, metric)
    return f'{format_number(mean, metric)} ± {format_number(std, metric)}'


def _format_paper(entry: Optional[Mapping[str, Any]], metric: str, style: str) -> Optional[str]:
    if not entry:
        return None
    if style == 'best_mean_std' and entry.get('best') is not None:
        return f'{format_number(entry["best"], metric)} ({format_mean_std(entry["mean"], entry.get("std"), metric)})'
    text = format_mean_std(entry['mean'], entry.get('std'), metric)
    if entry.get('std') is None and entry.get('n'):
        text += f' (mean of {entry["n"]})'
    return text


def _format_ours(summary: Summary, metric: str, style: str) -> str:
    if style == 'best_mean_std':
        return f'{format_number(summary.best, metric)} ({format_mean_std(summary.mean, summary.std, metric)})'
    return format_mean_std(summary.mean, summary.std, metric)


def _rank_value(summary: Summary, metric: str, style: str) -> float:
    # Compare at display precision so that cells that read the same are bolded together.
    return float(format_number(summary.best if style == 'best_mean_std' else summary.mean, metric))


def _weight_note(cell: Cell, regularizer: str) -> Optional[str]:
    if regularizer in NO_LAMBDA:
        return None
    if cell.chosen_weight is None:
        if cell.final_weights:
            return 'λ=' + ','.join(format_weight(w) for w in cell.final_weights) + ' (no select runs)'
        return None
    note = f'λ={format_weight(cell.chosen_weight)}'
    if cell.final_weights and cell.final_weights != (cell.chosen_weight,):
        note += ' (final runs used λ=' + ','.join(format_weight(w) for w in cell.final_weights) + ')'
    return note


def format_cell(
    cell: Optional[Cell],
    regularizer: str,
    paper_entry: Optional[Mapping[str, Any]],
    metric: str,
    style: str = 'mean_std',
    bold: bool = False,
) -> str:
    """``**mean ± std** (n=5, λ=0.1; paper 2.42 ± 0.06)``, or ``— (…)`` when there is no final run."""
    details = []
    if cell is not None and cell.final is not None:
        value = _format_ours(cell.final, metric, style)
        value = f'**{value}**' if bold else value
        details.append(f'n={cell.final.n}')
    else:
        value = MISSING
    if cell is not None:
        details += [f'{k} {status}' for status, k in sorted(cell.pending_final.items())]
        note = _weight_note(cell, regularizer)
        if note:
            details.append(note)
    paper = _format_paper(paper_entry, metric, style)
    text = value
    inner = ', '.join(details)
    if paper:
        inner = f'{inner}; paper {paper}' if inner else f'paper {paper}'
    if inner:
        text += f' ({inner})'
    return text


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return lines


# ----------------------------------------------------------------------------------------------------------
# What the runs of a table are: length, seeds, selection protocol, commits.


def family(scenario: str) -> str:
    """``mnist_mlp`` of ``mnist_mlp/size1k`` (and of a layer-dependency run's ``mnist_mlp/default@layer3``)."""
    return scenario.split('@')[0].split('/')[0]


def protocol_of(scenario: str) -> Optional[tuple[str, int, str]]:
    """``(unit, length, whose)`` of the scenario's protocol (`PROTOCOL`); None where none is stated."""
    return PROTOCOL.get(family(scenario))


def _count(value: int, unit: str) -> str:
    return f'{value} {unit[:-1] if value == 1 else unit}'


def _length_phrase(unit: str, values: Sequence[int], proto: Optional[tuple[str, int, str]]) -> str:
    """``10 and 50 epochs``, with ``, shorter than the paper's 50`` (or ``: some runs shorter …``) appended."""
    shown = ', '.join(str(v) for v in values[:-1]) + (' and ' if len(values) > 1 else '')
    shown += _count(values[-1], unit)
    if proto is None or proto[0] != unit:
        return shown
    _, target, whose = proto
    if values[-1] < target:
        return f'{shown}, shorter than {whose} {target}'
    if values[0] < target:
        return f'{shown}: some runs shorter than {whose} {target}'
    return shown


def shortfall_label(scenarios: Sequence[str], items: Sequence[Run | Pending]) -> str:
    """`` — 10 epochs, shorter than the paper's 50`` when runs of ``scenarios`` are shorter than their
    protocol (`PROTOCOL`), so that such a table never reads as a result; '' otherwise."""
    parts: dict[str, None] = {}  # ordered set
    for scenario in scenarios:
        proto = protocol_of(scenario)
        its = [x for x in items if x.scenario == scenario]
        if proto is None or not its:
            continue
        unit, target, _ = proto
        values = sorted({getattr(x, unit) for x in its if getattr(x, unit) is not None})
        if values and values[0] < target:
            parts[_length_phrase(unit, values, proto)] = None
        if any(getattr(x, unit) is None for x in its):
            parts[f'{unit} not recorded for some runs'] = None
    return (' — ' + '; '.join(parts)) if parts else ''


def epochs_phrase(scenario: str, epochs: Iterable[Optional[int]]) -> str:
    """For figure titles: ``50 epochs``, or ``10 epochs, shorter than the paper's 50`` (`PROTOCOL`)."""
    epochs = list(epochs)
    values = sorted({e for e in epochs if e is not None})
    if not values:
        return 'epochs not recorded'
    text = _length_phrase('epochs', values, protocol_of(scenario))
    return text + ('; epochs not recorded for some runs' if None in epochs else '')


def format_seeds(seeds: Iterable[int]) -> str:
    """``0–4, 7, 9–10``: sorted, consecutive seeds as ranges."""
    ordered = sorted(set(seeds))
    spans: list[list[int]] = []
    for seed in ordered:
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ', '.join(f'{a}' if a == b else f'{a}–{b}' for a, b in spans)


def _seeds_word(seeds: set[int]) -> str:
    return 'seed' if len(seeds) == 1 else 'seeds'


def _range(values: Iterable[int]) -> str:
    values = sorted(set(values))
    return f'{values[0]}' if values[0] == values[-1] else f'{values[0]}–{values[-1]}'


def short_commit(commit: str) -> str:
    """The 7-character hash, keeping a ``-dirty`` mark."""
    dirty = commit.endswith('-dirty')
    return commit[:7] + ('-dirty' if dirty else '')


def _selection_text(items: Sequence[Run | Pending], final_seeds: set[int]) -> str:
    seeds_of: dict[tuple[str, str, float], set[int]] = collections.defaultdict(set)
    for x in items:
        if x.phase == 'select':
            seeds_of[(x.scenario, x.regularizer, x.weight)].add(x.seed)
    if not seeds_of:
        return 'no λ selection runs'
    per_weight = [len(v) for v in seeds_of.values()]
    seeds = set().union(*seeds_of.values())
    if max(per_weight) == 1:
        text = (
            f'λ selection: paper protocol: 1 selection run per λ ({_seeds_word(seeds)} {format_seeds(seeds)})'
        )
    else:
        text = (
            f'λ selection: lowest mean validation metric over S={_range(per_weight)} selection seeds per λ '
            f'({_seeds_word(seeds)} {format_seeds(seeds)})'
        )
    if seeds & final_seeds:
        text += ', not disjoint from the final seeds'
    return text


def protocol_line(scenarios: Sequence[str], items: Sequence[Run | Pending]) -> str:
    """One sentence: epochs (steps where the protocol counts steps), final seeds, λ selection, commits."""
    items = [x for x in items if x.scenario in set(scenarios)]
    epochs = sorted({x.epochs for x in items if x.epochs is not None})
    parts = ['epochs ' + (', '.join(map(str, epochs)) if epochs else 'not recorded')]
    if any((protocol_of(s) or ('',))[0] == 'steps' for s in scenarios):
        steps = sorted({x.steps for x in items if x.steps is not None})
        parts.append('steps ' + (', '.join(map(str, steps)) if steps else 'not recorded'))
    finals: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for x in items:
        if x.phase == 'final' and isinstance(x, Run):
            finals[(x.scenario, x.regularizer)].add(x.seed)
    final_seeds = set().union(*finals.values()) if finals else set()
    if finals:
        parts.append(
            f'final runs n={_range(len(v) for v in finals.values())} per cell '
            f'({_seeds_word(final_seeds)} {format_seeds(final_seeds)})'
        )
    else:
        parts.append('no finished final runs')
    parts.append(_selection_text(items, final_seeds))
    commits = sorted({short_commit(x.commit) for x in items if x.commit})
    parts.append(('commits ' if len(commits) > 1 else 'commit ') + (', '.join(commits) or 'not recorded'))
    return 'Runs: ' + '; '.join(parts) + '.'


def _protocol_lines(
    scenarios: Sequence[str], items: Sequence[Run | Pending], cells: Mapping[str, Mapping[str, Cell]]
) -> list[str]:
    """The table's `Runs:` line; one per column (named) when its columns ran different protocols."""
    ran = [s for s in scenarios if _has_data(cells, s)]
    per_column = {s: protocol_line([s], items) for s in ran}
    if len(set(per_column.values())) <= 1:
        return [protocol_line(scenarios, items)]
    return [f'- `{s}`: {line}' for s, line in per_column.items()]


# ----------------------------------------------------------------------------------------------------------
# Paired statistics: gains over the baseline, paired by seed, and their comparison with the paper's.


@dataclasses.dataclass(frozen=True)
class Paired:
    """Mean of the paired differences a − b over the seeds both have, with a Student-t CI and p-value."""

    mean: float
    n: int
    se: Optional[float]  # None for n < 2
    low: Optional[float]
    high: Optional[float]
    p: Optional[float]  # two-sided paired t-test of mean = 0
    seeds: tuple[int, ...]


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> Optional[Paired]:
    """``a − b`` paired by seed (the keys): mean, SE = sd/√n (ddof=1), CI ± t_{(1+level)/2, n−1}·SE, p.

    Returns None without a common seed. With sd = 0 the CI is the point and p is 0 (1 for a zero mean).
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    mean, n = float(np.mean(d)), len(seeds)
    if n < 2:
        return Paired(mean, n, None, None, None, None, seeds)
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
    if se > 0:
        p = float(2.0 * scipy_stats.t.sf(abs(mean) / se, n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    return Paired(mean, n, se, mean - half, mean + half, p, seeds)


@dataclasses.dataclass(frozen=True)
class PaperGain:
    """The paper's mean difference and its SE √(s_a²/n_a + s_b²/n_b) (its runs are not paired)."""

    mean: float
    se: float
    terms: tuple[tuple[float, int], ...]  # (variance s²/n, dof n−1) of each mean, for Welch–Satterthwaite


def paper_gain(a: Optional[Mapping[str, Any]], b: Optional[Mapping[str, Any]]) -> Optional[PaperGain]:
    """``a − b`` of two paper entries (mean ± std over ``n``, default `PAPER_RUNS`); None without both stds."""
    if not a or not b or a.get('std') is None or b.get('std') is None:
        return None
    terms = tuple(
        (float(e['std']) ** 2 / int(e.get('n') or PAPER_RUNS), int(e.get('n') or PAPER_RUNS) - 1)
        for e in (a, b)
    )
    return PaperGain(float(a['mean']) - float(b['mean']), math.sqrt(sum(v for v, _ in terms)), terms)


def relative_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[Paired]:
    """``100 (a − b) / b`` paired by seed: a gain in % of ``b``, for metrics on a scale the paper leaves open."""
    relative = {s: 100.0 * (a[s] - b[s]) / b[s] for s in a if s in b and b[s] != 0}
    return paired_difference(relative, dict.fromkeys(relative, 0.0))


def relative_paper_gain(
    a: Optional[Mapping[str, Any]], b: Optional[Mapping[str, Any]]
) -> Optional[PaperGain]:
    """The paper's ``100 (a − b) / b`` with its delta-method SE: ∂/∂a = 100/b, ∂/∂b = −100 a/b²."""
    gain = paper_gain(a, b)
    if gain is None:
        return None
    mean_a, mean_b = float(a['mean']), float(b['mean'])
    (var_a, dof_a), (var_b, dof_b) = gain.terms
    terms = ((var_a * (100.0 / mean_b) ** 2, dof_a), (var_b * (100.0 * mean_a / mean_b**2) ** 2, dof_b))
    return PaperGain(100.0 * (mean_a - mean_b) / mean_b, math.sqrt(sum(v for v, _ in terms)), terms)


def welch(diff: float, terms: Sequence[tuple[float, int]], level: float = 0.95) -> tuple[float, float]:
    """Half-width of the `level` CI and two-sided p of `diff`, whose variance is the sum of `terms`
    ((variance s²/n, dof n−1) of each mean), against Student t with Welch–Satterthwaite dof."""
    var = sum(v for v, _ in terms)
    dof = var**2 / sum(v**2 / k for v, k in terms if v > 0)
    se = math.sqrt(var)
    return float(scipy_stats.t.ppf(0.5 + level / 2, dof)) * se, float(
        2.0 * scipy_stats.t.sf(abs(diff) / se, dof)
    )


def differs_from_paper(ours: Paired, paper: PaperGain) -> Optional[float]:
    """Two-sided p of (our gain − the paper's) / √(SE_ours² + SE_paper²), Student t with Welch–Satterthwaite
    dof over the three variance terms (ours, n−1; the paper's two means, n−1 each). None if undefined."""
    if ours.se is None:
        return None
    terms = ((ours.se**2, ours.n - 1),) + paper.terms
    if sum(v for v, _ in terms) <= 0:
        return None
    return welch(ours.mean - paper.mean, terms)[1]


def _signed(x: float, metric: str) -> str:
    return f'{x:+.2e}' if metric == 'mse' else f'{x:+.2f}'


def format_p(p: float) -> str:
    return 'p<0.0001' if p < 1e-4 else f'p={p:.2g}'


def format_gain(ours: Optional[Paired], paper: Optional[PaperGain], metric: str) -> str:
    """``-0.43 [-0.50, -0.36] (n=10, p=0.0003; paper -0.43 ± 0.07) †``; † = differs from the paper's gain."""
    details = []
    if ours is None:
        text = MISSING
    elif ours.low is None:
        text, details = _signed(ours.mean, metric), [f'n={ours.n}']
    else:
        text = f'{_signed(ours.mean, metric)} [{_signed(ours.low, metric)}, {_signed(ours.high, metric)}]'
        details = [f'n={ours.n}', format_p(ours.p)]
    inner = ', '.join(details)
    if paper is not None:
        paper_text = f'paper {_signed(paper.mean, metric)} ± {format_number(paper.se, metric)}'
        inner = f'{inner}; {paper_text}' if inner else paper_text
    text += f' ({inner})' if inner else ''
    p = differs_from_paper(ours, paper) if ours is not None and paper is not None else None
    return text + (' †' if p is not None and p < SIGNIFICANCE else '')


# ----------------------------------------------------------------------------------------------------------
# Tables.


def _paper_entry(paper: Mapping[str, Any], scenario: str, regularizer: str) -> Optional[dict[str, Any]]:
    return paper.get('scenarios', {}).get(scenario, {}).get('values', {}).get(regularizer)


def _has_data(cells: Mapping[str, Mapping[str, Cell]], scenario: str) -> bool:
    return any(
        c.final is not None or c.select or c.pending_final or c.pending_select
        for c in cells.get(scenario, {}).values()
    )


def _table_rows(
    spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]], paper: Mapping[str, Any]
) -> list[str]:
    regs: set[str] = set()
    for col in spec.columns:
        regs |= set(paper.get('scenarios', {}).get(col.scenario, {}).get('values', {}))
        regs |= set(cells.get(col.scenario, {}))
    if spec.with_l1r:
        regs.add('l1r')
    return _ordered(regs)


def _bold_sets(
    spec: TableSpec, regs: Sequence[str], cells: Mapping[str, Mapping[str, Cell]]
) -> dict[str, set[str]]:
    bold: dict[str, set[str]] = {}
    for col in spec.columns:
        ranked = {
            r: _rank_value(c.final, spec.metric, col.style)
            for r, c in cells.get(col.scenario, {}).items()
            if r in regs and c.final is not None
        }
        best = min(ranked.values()) if ranked else None
        bold[col.scenario] = {r for r, v in ranked.items() if v == best}
    return bold


def render_error_table(
    spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]], paper: Mapping[str, Any]
) -> list[str]:
    """One of Tables 2, 3, 4, 7, 8, 9, 10: rows = regularizers, columns = scenarios."""
    regs = _table_rows(spec, cells, paper)
    bold = _bold_sets(spec, regs, cells)
    rows = []
    for reg in regs:
        row = [DISPLAY_NAMES.get(reg, reg)]
        for col in spec.columns:
            row.append(
                format_cell(
                    cells.get(col.scenario, {}).get(reg),
                    reg,
                    _paper_entry(paper, col.scenario, reg),
                    spec.metric,
                    col.style,
                    bold=reg in bold[col.scenario],
                )
            )
        rows.append(row)
    he = [paper.get('scenarios', {}).get(c.scenario, {}).get('he_et_al') for c in spec.columns]
    if any(he):
        rows.append(
            ['He et al. 2016 (paper only)']
            + [
                f'{MISSING} (paper {_format_paper(h, spec.metric, c.style)})' if h else MISSING
                for h, c in zip(he, spec.columns)
            ]
        )
    header = ['Regularizer'] + [f'{c.title} (`{c.scenario}`)' for c in spec.columns]
    return _md_table(header, rows)


def render_table5(
    spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]], paper: Mapping[str, Any]
) -> list[str]:
    """Table 5: test error and the six representation statistics (mean ± std over final runs' stats.json)."""
    scenario = spec.columns[0].scenario
    paper5 = paper.get('table5', {}).get('values', {})
    regs = _ordered(set(paper5) | set(cells.get(scenario, {})) | {'l1r'})
    bold = _bold_sets(spec, regs, cells)[scenario]
    rows = []
    for reg in regs:
        cell = cells.get(scenario, {}).get(reg)
        p = paper5.get(reg, {})
        row = [
            DISPLAY_NAMES.get(reg, reg),
            format_cell(cell, reg, p.get('test_error'), 'error', bold=reg in bold),
        ]
        for key in stats_lib.STAT_KEYS:
            s = cell.stats.get(key) if cell is not None else None
            text = (
                MISSING
                if s is None
                else (
                    _format_stat(s.mean)
                    if s.std is None
                    else f'{_format_stat(s.mean)} ± {_format_stat(s.std)}'
                )
            )
            details = [f'n={s.n}'] if s is not None else []
            if key in p:
                details.append(f'paper {p[key]:.2f}')  # as printed in the paper
            row.append(text + (f' ({"; ".join(details)})' if details else ''))
        rows.append(row)
    header = ['Regularizer', 'Test error (%)'] + [stats_lib.STAT_TITLES[k] for k in stats_lib.STAT_KEYS]
    return _md_table(header, rows)


#: Table 5 statistics compared with the baseline's, paired over seeds: does dropout reduce correlation?
TABLE5_PAIRED = ('correlation', 'cw_correlation')


def _table5_differences(cells: Mapping[str, Cell]) -> list[str]:
    """Lines "X − Baseline: CORRELATION d [CI] …" for dropout and batch norm (the paper's Discussion)."""
    base = cells.get('baseline')
    lines = []
    for reg in ('dropout', 'batchnorm'):
        cell = cells.get(reg)
        if base is None or cell is None:
            continue
        parts = []
        for key in TABLE5_PAIRED:
            d = paired_difference(cell.stats_by_seed.get(key, {}), base.stats_by_seed.get(key, {}))
            if d is not None and d.low is not None:
                parts.append(
                    f'{stats_lib.STAT_TITLES[key]} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] '
                    f'(n={d.n}, {format_p(d.p)})'
                )
        if parts:
            lines.append(f'- {DISPLAY_NAMES[reg]} − Baseline, paired over seeds: ' + '; '.join(parts) + '.')
    return lines + ([''] if lines else [])


def _metric_of(scenario: str, runs: Sequence[Run]) -> str:
    scenario_runs = [r for r in runs if r.scenario == scenario]
    if scenario_runs and all(r.error is None for r in scenario_runs):
        return 'mse'
    return 'error'


CONVENTIONS = """\
Conventions: each cell is `mean ± std (n=…)` of the test metric over the finished final runs (std = sample
std, ddof=1; no std when n=1), then the chosen λ and the paper's number. λ is the select-phase λ with the
lowest validation metric (mean over seeds if several); ties go to the smaller λ. Bold = lowest mean in the
column at display precision (every tied cell; partial cells count, check their n). `—` = no finished run.
ResNet-110 cells read `best (mean ± std)` as in the paper and are bolded by the best run. Runs that are
not finished (running, diverged) are treated as missing, never estimated; cells list them by status."""

PROTOCOL_CONVENTIONS = """\
Each table's `Runs:` line gives the epochs its runs trained, the final runs per cell and their seeds, the
λ selection protocol (S selection seeds per λ; S=1 is the paper's protocol) and the code commits of the
runs; a table whose runs are shorter than the protocol (50 epochs for every MNIST scenario) says so in its
title. Dropout's λ is its dropout rate; the baseline and batch norm have no λ (final runs only)."""

GAINS_CONVENTIONS = """\
Gains tables: each cell is our gain over the baseline (or cw-CR − CR, cw-VR − VR), the mean of the paired
differences regularizer − baseline over the final seeds both have (negative = lower error), with its 95 % CI
(Student t, n−1 dof) and the two-sided paired t-test p; pairing needs one final λ per cell (the chosen one).
Then the paper's gain (difference of its means) ± its SE √(s_r²/5 + s_b²/5), its runs being unpaired mean ±
std over 5. MSE gains (Table 10) are relative, 100 (a − b)/b per seed and, for the paper, of its means with
a delta-method SE: the paper's MSE is on a scale it does not define. † marks a gain that differs from the
paper's at the 5 % level (two-sided): t = (ours − paper) / √(SE_ours² + SE_paper²) against Student t with
Welch–Satterthwaite dof over the three variance terms (ours with n−1, the paper's two means with 4 each).
The issue #14 lines ask whether cw-VR or L1R beats both dropout and batch norm: "holds (significant)" if one
of them is lower than both with both paired 95 % CIs below 0, "holds in the means only" if one is lower than
both in the mean, "n/a" when rows are missing."""

COMPARISONS: tuple[tuple[str, str], ...] = (('cw_cr', 'cr'), ('cw_vr', 'vr'))


def _pair(cells: Mapping[str, Cell], a: str, b: str, relative: bool = False) -> Optional[Paired]:
    if a not in cells or b not in cells:
        return None
    return (relative_difference if relative else paired_difference)(
        cells[a].final_by_seed, cells[b].final_by_seed
    )


def render_gains_table(
    spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]], paper: Mapping[str, Any]
) -> list[str]:
    """Gains over the baseline and cw-X − X per column, paired by seed, beside the paper's; [] without data."""
    pairs = [(r, 'baseline') for r in _table_rows(spec, cells, paper) if r != 'baseline'] + list(COMPARISONS)
    # The paper's MSE is on a scale it does not define: only relative gains compare.
    relative = spec.metric == 'mse'
    rows, any_ours = [], False
    for a, b in pairs:
        name = DISPLAY_NAMES.get(a, a) if b == 'baseline' else f'{DISPLAY_NAMES[a]} − {DISPLAY_NAMES[b]}'
        row, keep = [name], False
        for col in spec.columns:
            ours = _pair(cells.get(col.scenario, {}), a, b, relative)
            entries = _paper_entry(paper, col.scenario, a), _paper_entry(paper, col.scenario, b)
            theirs = (relative_paper_gain if relative else paper_gain)(*entries)
            keep |= ours is not None or theirs is not None
            any_ours |= ours is not None
            row.append(format_gain(ours, theirs, 'percent' if relative else spec.metric))
        if keep:
            rows.append(row)
    if not any_ours:
        return []
    first = 'Gain (% of the reference)' if relative else 'Gain'
    return _md_table([first] + [f'{c.title} (`{c.scenario}`)' for c in spec.columns], rows)


def dropout_bn_verdict(by_reg: Mapping[str, Cell]) -> tuple[str, list[str]]:
    """Issue #14 for one column: does cw-VR or L1R beat both dropout and batch norm (paired by seed)?

    Returns:
      The verdict ('holds (significant)', 'holds in the means only', 'does not hold' or 'n/a') and the
      paired differences behind it (formatted, 95 % CI).
    """
    verdict, details, seen = 'n/a', [], False
    significant = means = False
    for reg in ('cw_vr', 'l1r'):
        diffs = [_pair(by_reg, reg, other) for other in ('dropout', 'batchnorm')]
        for other, d in zip(('dropout', 'batchnorm'), diffs):
            if d is not None:
                details.append(
                    f'{DISPLAY_NAMES[reg]} − {DISPLAY_NAMES[other]} {format_gain(d, None, "error")}'
                )
        if any(d is None for d in diffs):
            continue
        seen = True
        means |= all(d.mean < 0 for d in diffs)
        significant |= all(d.high is not None and d.high < 0 for d in diffs)
    if seen:
        verdict = (
            'holds (significant)' if significant else 'holds in the means only' if means else 'does not hold'
        )
    return verdict, details


def _dropout_bn_lines(spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]]) -> list[str]:
    lines = []
    for col in spec.columns:
        if not _has_data(cells, col.scenario):
            continue
        if not {'dropout', 'batchnorm'} & set(cells[col.scenario]):  # e.g. Table 10: nothing to compare
            continue
        verdict, details = dropout_bn_verdict(cells[col.scenario])
        lines.append(
            f'- `{col.scenario}`: at least one of cw-VR and L1R beats both dropout and batch norm: '
            f'**{verdict}**' + (f' ({"; ".join(details)})' if details else '') + '.'
        )
    return lines


def _status_breakdown(loaded: LoadedRuns) -> str:
    counts = collections.Counter(p.status for p in loaded.pending)
    return (': ' + ', '.join(f'{n} {status}' for status, n in sorted(counts.items()))) if counts else ''


def _header(loaded: LoadedRuns) -> list[str]:
    lines = [
        '# cwreg results vs. Choi & Rhee (AAAI 2019)',
        '',
        f'{loaded.num_files} runs recorded: {len(loaded.runs)} finished runs used, '
        f'{loaded.num_unfinished} not finished (treated as missing{_status_breakdown(loaded)}), '
        f'{len(loaded.unreadable)} unreadable, '
        f'{len(loaded.duplicates)} duplicates dropped.',
        '',
        CONVENTIONS,
        '',
        PROTOCOL_CONVENTIONS,
        '',
        GAINS_CONVENTIONS,
        '',
    ]
    lines += [f'- unreadable: `{path}`' for path in loaded.unreadable_shown]
    return lines + ([''] if loaded.unreadable_shown else [])


def _render_spec(
    spec: TableSpec,
    cells: Mapping[str, Mapping[str, Cell]],
    items: Sequence[Run | Pending],
    paper: Mapping[str, Any],
) -> list[str]:
    """A table's section (title labelled when its runs are short, `Runs:` line), then its gains section."""
    scenarios = [c.scenario for c in spec.columns]
    label = shortfall_label(scenarios, items)
    if not any(_has_data(cells, s) for s in scenarios):
        return [
            f'## {spec.title}',
            '',
            f'Not run: no results for {", ".join(f"`{s}`" for s in scenarios)}.',
            '',
        ]
    lines = [f'## {spec.title}{label}', '', *_protocol_lines(scenarios, items, cells), '']
    lines += (render_table5 if spec.key == '5' else render_error_table)(spec, cells, paper) + ['']
    if spec.key == '5':
        lines += _table5_differences(cells.get(scenarios[0], {}))
    gains = render_gains_table(spec, cells, paper) if spec.key not in ('5', 'other') else []
    if gains:
        lines += [f'## Table {spec.key} gains, paired over seeds{label}', '', *gains, '']
        verdicts = _dropout_bn_lines(spec, cells)
        if verdicts:
            lines += verdicts + ['']
    return lines


def _other_specs(cells: Mapping[str, Any], runs: Sequence[Run], tabled: set[str]) -> list[TableSpec]:
    specs = []
    for scenario in sorted(set(cells) - tabled):
        metric = _metric_of(scenario, runs)
        title = 'Test MSE' if metric == 'mse' else 'Test error (%)'
        specs.append(TableSpec('other', scenario, (Column(scenario, title),), metric=metric, with_l1r=False))
    return specs


def render(
    loaded: LoadedRuns, paper: Optional[Mapping[str, Any]] = None, tables: Optional[Sequence[str]] = None
) -> str:
    """The whole markdown report of ``loaded``; derived from the runs' fields only (no paths, no clock).

    Args:
      loaded: runs from `load_runs` or `cwreg.experiments.records.load_records`.
      paper: the paper's numbers (default `load_paper_results`).
      tables: keys of `TABLES` to include ('other': scenarios outside them); None: all.
    """
    paper = load_paper_results() if paper is None else paper
    cells = build_cells(loaded.runs, loaded.pending)
    items: list[Run | Pending] = [*loaded.runs, *loaded.pending]
    lines = _header(loaded)
    specs = [s for s in TABLES if tables is None or s.key in tables]
    tabled = {c.scenario for spec in TABLES for c in spec.columns}
    others = _other_specs(cells, loaded.runs, tabled) if tables is None or 'other' in tables else []
    for spec in specs:
        lines += _render_spec(spec, cells, items, paper)
    if others:
        lines += ["## Other scenarios (not in the paper's tables)", '']
        for spec in others:
            label = shortfall_label([spec.title], items)
            lines += [f'`{spec.title}`{label}. ' + protocol_line([spec.title], items), '']
            lines += render_error_table(spec, cells, paper) + ['']
    lines += ['## λ search (validation metric; bold = chosen λ)', '']
    order = list(dict.fromkeys(c.scenario for spec in specs + others for c in spec.columns))
    for scenario in order:
        if scenario not in cells or not any(c.select or c.pending_select for c in cells[scenario].values()):
            continue
        metric = _metric_of(scenario, loaded.runs)
        unit = 'MSE' if metric == 'mse' else 'error %'
        lines += [f'### `{scenario}` (validation {unit}){shortfall_label([scenario], items)}', '']
        lines += render_lambda_search(cells[scenario], metric) + ['']
    return '\n'.join(lines).rstrip() + '\n'


def render_report(
    sweep_dirs: Sequence[str], loaded: LoadedRuns, paper: Optional[Mapping[str, Any]] = None
) -> str:
    """`render` (kept for callers): ``sweep_dirs`` is no longer shown, so reports from the same runs read the
    same whether they were loaded from sweep directories or from records files."""
    del sweep_dirs
    return render(loaded, paper)


def render_lambda_search(by_reg: Mapping[str, Cell], metric: str) -> list[str]:
    """Validation metric of every regularizer × λ of one scenario; bold = the chosen λ."""
    # The paper's λ grid; other λ found in the results are shown too.
    weights = sorted(set(names.WEIGHT_GRID) | {w for c in by_reg.values() for w in c.select})
    rows = []
    for reg in _ordered(by_reg):
        cell = by_reg[reg]
        row = [DISPLAY_NAMES.get(reg, reg)]
        for w in weights:
            s = cell.select.get(w)
            if s is None:
                row.append(cell.pending_select.get(w, MISSING))
                continue
            text = format_number(s.mean, metric) + (f' (n={s.n})' if s.n > 1 else '')
            row.append(f'**{text}**' if w == cell.chosen_weight else text)
        rows.append(row)
    return _md_table(['Regularizer'] + [f'λ={format_weight(w)}' for w in weights], rows)


def write_text(text: str, out: str) -> None:
    """Writes ``text`` to ``out``, creating its directory."""
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(out, 'w') as f:
        f.write(text)


def write_report(sweep_dirs: Sequence[str], out: str) -> str:
    """Loads every run under ``sweep_dirs``, writes the markdown report to ``out`` and returns it."""
    text = render(load_runs(sweep_dirs))
    write_text(text, out)
    return text
