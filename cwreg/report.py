"""Markdown results tables in the layout of Choi & Rhee (AAAI 2019), next to the paper's numbers.

Input: sweep directories holding one ``results.json`` per training run (any depth; found with
``**/results.json``; directory names are never parsed, only the fields)::

  {"scenario": "mnist_mlp/default", "regularizer": "cw_vr", "weight": 0.1, "seed": 0,
   "phase": "select" | "final", "eval_split": "validation" | "test", "error": 2.42, "loss": 0.08,
   "status": "finished", ...}

plus optionally a ``stats.json`` (`cwreg.stats.representation_statistics`) next to a final run's
``results.json`` for Table 5. Runs whose ``status`` is not ``"finished"`` (in progress, ``"diverged"``, …)
are treated as missing: they never enter a mean, but their status is shown (``n=3, 2 diverged`` in a cell,
``diverged`` in the λ-search table). Unreadable files are skipped and listed.

Conventions (also printed in the report):

* Metric: ``error`` (test/validation error in %); where ``error`` is null (the autoencoder) ``loss`` (MSE).
* λ selection: per (scenario, regularizer), the select-phase λ with the lowest mean validation metric (mean
  over seeds if several); ties (equal within 1e-9 relative) go to the smaller λ, the weaker regularization.
* Cells: ``mean ± std (n=…)`` over the finished final runs, std is the sample std (ddof=1, the unbiased
  variance; the paper does not say which it used); with n=1 no std is shown. The chosen λ and the paper's
  number follow. Bold marks the lowest mean of each column at display precision (all cells of a tie);
  partially finished cells count. Missing cells are ``—``.
* ResNet-110 (Table 4) follows the paper's ``best (mean ± std)`` and is bolded by the best run.
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

from cwreg import stats as stats_lib

# Paper order (Tables 2-10), then L1R, which the paper discusses but never tabulates.
REGULARIZER_ORDER: tuple[str, ...] = ('baseline', 'l1w', 'l2w', 'cr', 'cw_cr', 'vr', 'cw_vr', 'l1r')

DISPLAY_NAMES: dict[str, str] = {
    'baseline': 'Baseline',
    'l1w': 'L1W',
    'l2w': 'L2W',
    'cr': 'CR (DeCov)',
    'cw_cr': 'cw-CR',
    'vr': 'VR',
    'cw_vr': 'cw-VR',
    'l1r': 'L1R',
}

# The paper's λ grid (Section A.1); other λ found in the results are shown too.
LAMBDA_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)

PAPER_RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results.json')

MISSING = '—'
_TIE_RTOL = 1e-9

_log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished training run (one ``results.json``)."""
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


@dataclasses.dataclass
class LoadedRuns:
  runs: list[Run]
  num_files: int = 0
  num_unfinished: int = 0
  pending: list[Pending] = dataclasses.field(default_factory=list)
  unreadable: list[str] = dataclasses.field(default_factory=list)
  duplicates: list[str] = dataclasses.field(default_factory=list)


def _optional_float(value: Any) -> Optional[float]:
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _read_stats(results_path: str) -> Optional[dict[str, float]]:
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


def load_runs(sweep_dirs: Sequence[str]) -> LoadedRuns:
  """Reads every finished ``results.json`` below ``sweep_dirs``.

  A run identified by (scenario, regularizer, phase, λ, seed) that appears more than once (e.g. the same
  sweep passed twice) is counted once: the file with the lexicographically last path wins.

  Args:
    sweep_dirs: directories to search recursively.

  Returns:
    The finished runs and bookkeeping (files seen, unfinished, unreadable, duplicates).
  """
  out = LoadedRuns(runs=[])
  paths: list[str] = []
  for d in sweep_dirs:
    if not os.path.isdir(d):
      _log.warning('Sweep directory %s does not exist.', d)
      continue
    paths.extend(glob.glob(os.path.join(d, '**', 'results.json'), recursive=True))
  by_key: dict[tuple[Any, ...], Run] = {}
  for path in sorted(set(os.path.abspath(p) for p in paths)):
    out.num_files += 1
    try:
      with open(path) as f:
        raw = json.load(f)
      if raw.get('status') != 'finished':
        out.num_unfinished += 1
        try:
          out.pending.append(Pending(str(raw['scenario']), str(raw['regularizer']),
                                     float(raw.get('weight') or 0.0), int(raw.get('seed', 0)),
                                     str(raw['phase']), str(raw.get('status'))))
        except (KeyError, ValueError, TypeError):
          pass  # counted as unfinished; too incomplete to place in a table
        continue
      run = Run(
          scenario=str(raw['scenario']),
          regularizer=str(raw['regularizer']),
          weight=float(raw.get('weight') or 0.0),
          seed=int(raw.get('seed', 0)),
          phase=str(raw['phase']),
          eval_split=str(raw.get('eval_split', '')),
          error=_optional_float(raw.get('error')),
          loss=_optional_float(raw.get('loss')),
          path=path,
      )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
      _log.warning('Skipping unreadable %s: %r', path, e)
      out.unreadable.append(path)
      continue
    if run.metric is None:
      _log.warning('Skipping %s: finished but has neither error nor loss.', path)
      out.unreadable.append(path)
      continue
    if run.phase == 'final':
      run = dataclasses.replace(run, stats=_read_stats(path))
    key = (run.scenario, run.regularizer, run.phase, run.weight, run.seed)
    if key in by_key:
      out.duplicates.append(by_key[key].path)
    by_key[key] = run
  out.runs = list(by_key.values())
  return out


def load_paper_results(path: str = PAPER_RESULTS_PATH) -> dict[str, Any]:
  """The paper's transcribed numbers (`cwreg/paper_results.json`)."""
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
      )
  return cells


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
    TableSpec('2', 'Table 2: Error (%) for CIFAR-10 CNN model (optimizers)', (
        _C('cifar10_cnn/default', 'Adam'), _C('cifar10_cnn/momentum', 'Momentum'))),
    TableSpec('3', 'Table 3: Error (%) for CIFAR-100 CNN model (number of classes)', (
        _C('cifar100_cnn/classes16', '16 classes'), _C('cifar100_cnn/classes64', '64 classes'),
        _C('cifar100_cnn/default', '100 classes'))),
    TableSpec('4', 'Table 4: Error (%) for ResNet-32/110 (CIFAR-10)', (
        _C('resnet32/default', 'ResNet-32'), _C('resnet110/default', 'ResNet-110', 'best_mean_std')),
              with_l1r=False),
    TableSpec('5', 'Table 5: Quantitative evaluations of representation characteristics (MNIST MLP)', (
        _C('mnist_mlp/default', 'Test error (%)'),)),
    TableSpec('7', 'Table 7: Error (%) for MNIST MLP model', (
        _C('mnist_mlp/default', 'Default'), _C('mnist_mlp/size1k', 'Data size 1k'),
        _C('mnist_mlp/size5k', 'Data size 5k'), _C('mnist_mlp/width2', 'Layer width 2'),
        _C('mnist_mlp/width8', 'Layer width 8'))),
    TableSpec('8', 'Table 8: Error (%) for CIFAR-10 CNN model', (
        _C('cifar10_cnn/default', 'Default'), _C('cifar10_cnn/size1k', 'Data size 1k'),
        _C('cifar10_cnn/size5k', 'Data size 5k'), _C('cifar10_cnn/width32', 'Layer width 32'),
        _C('cifar10_cnn/width512', 'Layer width 512'), _C('cifar10_cnn/momentum', 'Momentum'),
        _C('cifar10_cnn/rmsprop', 'RMSProp'))),
    TableSpec('9', 'Table 9: Error (%) for CIFAR-100 CNN model', (
        _C('cifar100_cnn/default', 'Default'), _C('cifar100_cnn/size1k', 'Data size 1k'),
        _C('cifar100_cnn/size5k', 'Data size 5k'), _C('cifar100_cnn/width32', 'Layer width 32'),
        _C('cifar100_cnn/width512', 'Layer width 512'), _C('cifar100_cnn/classes4', '4 classes'),
        _C('cifar100_cnn/classes16', '16 classes'), _C('cifar100_cnn/classes64', '64 classes'))),
    TableSpec('10', 'Table 10: Mean squared error of deep autoencoder (MNIST)', (
        _C('mnist_autoencoder/default', 'Mean Squared Error'),), metric='mse', with_l1r=False),
)


def _ordered(regs: Iterable[str]) -> list[str]:
  regs = set(regs)
  known = [r for r in REGULARIZER_ORDER if r in regs]
  return known + sorted(regs - set(REGULARIZER_ORDER))


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
    return f"{format_number(entry['best'], metric)} ({format_mean_std(entry['mean'], entry.get('std'), metric)})"
  text = format_mean_std(entry['mean'], entry.get('std'), metric)
  if entry.get('std') is None and entry.get('n'):
    text += f" (mean of {entry['n']})"
  return text


def _format_ours(summary: Summary, metric: str, style: str) -> str:
  if style == 'best_mean_std':
    return f'{format_number(summary.best, metric)} ({format_mean_std(summary.mean, summary.std, metric)})'
  return format_mean_std(summary.mean, summary.std, metric)


def _rank_value(summary: Summary, metric: str, style: str) -> float:
  # Compare at display precision so that cells that read the same are bolded together.
  return float(format_number(summary.best if style == 'best_mean_std' else summary.mean, metric))


def _weight_note(cell: Cell, regularizer: str) -> Optional[str]:
  if regularizer == 'baseline':
    return None
  if cell.chosen_weight is None:
    if cell.final_weights:
      return 'λ=' + ','.join(format_weight(w) for w in cell.final_weights) + ' (no select runs)'
    return None
  note = f'λ={format_weight(cell.chosen_weight)}'
  if cell.final_weights and cell.final_weights != (cell.chosen_weight,):
    note += ' (final runs used λ=' + ','.join(format_weight(w) for w in cell.final_weights) + ')'
  return note


def format_cell(cell: Optional[Cell], regularizer: str, paper_entry: Optional[Mapping[str, Any]],
                metric: str, style: str = 'mean_std', bold: bool = False) -> str:
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
# Tables.


def _paper_entry(paper: Mapping[str, Any], scenario: str, regularizer: str) -> Optional[dict[str, Any]]:
  return paper.get('scenarios', {}).get(scenario, {}).get('values', {}).get(regularizer)


def _has_data(cells: Mapping[str, Mapping[str, Cell]], scenario: str) -> bool:
  return any(c.final is not None or c.select or c.pending_final or c.pending_select
             for c in cells.get(scenario, {}).values())


def _table_rows(spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]],
                paper: Mapping[str, Any]) -> list[str]:
  regs: set[str] = set()
  for col in spec.columns:
    regs |= set(paper.get('scenarios', {}).get(col.scenario, {}).get('values', {}))
    regs |= set(cells.get(col.scenario, {}))
  if spec.with_l1r:
    regs.add('l1r')
  return _ordered(regs)


def _bold_sets(spec: TableSpec, regs: Sequence[str],
               cells: Mapping[str, Mapping[str, Cell]]) -> dict[str, set[str]]:
  bold: dict[str, set[str]] = {}
  for col in spec.columns:
    ranked = {r: _rank_value(c.final, spec.metric, col.style)
              for r, c in cells.get(col.scenario, {}).items() if r in regs and c.final is not None}
    best = min(ranked.values()) if ranked else None
    bold[col.scenario] = {r for r, v in ranked.items() if v == best}
  return bold


def render_error_table(spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]],
                       paper: Mapping[str, Any]) -> list[str]:
  """One of Tables 2, 3, 4, 7, 8, 9, 10: rows = regularizers, columns = scenarios."""
  regs = _table_rows(spec, cells, paper)
  bold = _bold_sets(spec, regs, cells)
  rows = []
  for reg in regs:
    row = [DISPLAY_NAMES.get(reg, reg)]
    for col in spec.columns:
      row.append(format_cell(cells.get(col.scenario, {}).get(reg), reg,
                             _paper_entry(paper, col.scenario, reg), spec.metric, col.style,
                             bold=reg in bold[col.scenario]))
    rows.append(row)
  he = [paper.get('scenarios', {}).get(c.scenario, {}).get('he_et_al') for c in spec.columns]
  if any(he):
    rows.append(['He et al. 2016 (paper only)'] + [
        f'{MISSING} (paper {_format_paper(h, spec.metric, c.style)})' if h else MISSING
        for h, c in zip(he, spec.columns)])
  header = ['Regularizer'] + [f'{c.title} (`{c.scenario}`)' for c in spec.columns]
  return _md_table(header, rows)


def render_table5(spec: TableSpec, cells: Mapping[str, Mapping[str, Cell]],
                  paper: Mapping[str, Any]) -> list[str]:
  """Table 5: test error and the six representation statistics (mean ± std over final runs' stats.json)."""
  scenario = spec.columns[0].scenario
  paper5 = paper.get('table5', {}).get('values', {})
  regs = _ordered(set(paper5) | set(cells.get(scenario, {})) | {'l1r'})
  bold = _bold_sets(spec, regs, cells)[scenario]
  rows = []
  for reg in regs:
    cell = cells.get(scenario, {}).get(reg)
    p = paper5.get(reg, {})
    row = [DISPLAY_NAMES.get(reg, reg),
           format_cell(cell, reg, p.get('test_error'), 'error', bold=reg in bold)]
    for key in stats_lib.STAT_KEYS:
      s = cell.stats.get(key) if cell is not None else None
      text = MISSING if s is None else (_format_stat(s.mean) if s.std is None
                                        else f'{_format_stat(s.mean)} ± {_format_stat(s.std)}')
      details = [f'n={s.n}'] if s is not None else []
      if key in p:
        details.append(f'paper {p[key]:.2f}')  # as printed in the paper
      row.append(text + (f" ({'; '.join(details)})" if details else ''))
    rows.append(row)
  header = ['Regularizer', 'Test error (%)'] + [stats_lib.STAT_TITLES[k] for k in stats_lib.STAT_KEYS]
  return _md_table(header, rows)


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


def _status_breakdown(loaded: LoadedRuns) -> str:
  counts = collections.Counter(p.status for p in loaded.pending)
  return (': ' + ', '.join(f'{n} {status}' for status, n in sorted(counts.items()))) if counts else ''


def render_report(sweep_dirs: Sequence[str], loaded: LoadedRuns,
                  paper: Optional[Mapping[str, Any]] = None) -> str:
  """The whole markdown report for already loaded runs."""
  paper = load_paper_results() if paper is None else paper
  cells = build_cells(loaded.runs, loaded.pending)
  lines = ['# cwreg results vs. Choi & Rhee (AAAI 2019)', '',
           'Sweep directories: ' + ', '.join(f'`{d}`' for d in sweep_dirs) + '.',
           f'{loaded.num_files} results.json files: {len(loaded.runs)} finished runs used, '
           f'{loaded.num_unfinished} not finished (treated as missing{_status_breakdown(loaded)}), '
           f'{len(loaded.unreadable)} unreadable, '
           f'{len(loaded.duplicates)} duplicates dropped.', '', CONVENTIONS, '']
  for path in loaded.unreadable:
    lines.append(f'- unreadable: `{path}`')
  if loaded.unreadable:
    lines.append('')
  tabled = set()
  for spec in TABLES:
    lines += [f'## {spec.title}', '']
    scenarios = [c.scenario for c in spec.columns]
    tabled |= set(scenarios)
    if not any(_has_data(cells, s) for s in scenarios):
      lines += [f'Not run: no results for {", ".join(f"`{s}`" for s in scenarios)}.', '']
      continue
    if spec.key == '5':
      lines += render_table5(spec, cells, paper)
    else:
      lines += render_error_table(spec, cells, paper)
    lines.append('')
  others = sorted(set(cells) - tabled)
  if others:
    lines += ['## Other scenarios (not in the paper\'s tables)', '']
    for scenario in others:
      metric = _metric_of(scenario, loaded.runs)
      title = 'Test MSE' if metric == 'mse' else 'Test error (%)'
      spec = TableSpec('other', scenario, (Column(scenario, title),), metric=metric, with_l1r=False)
      lines += render_error_table(spec, cells, paper) + ['']
  lines += ['## λ search (validation metric; bold = chosen λ)', '']
  order = [c.scenario for spec in TABLES for c in spec.columns] + others
  seen = set()
  for scenario in order:
    if scenario in seen or scenario not in cells:
      continue
    seen.add(scenario)
    if not any(c.select or c.pending_select for c in cells[scenario].values()):
      continue
    metric = _metric_of(scenario, loaded.runs)
    unit = 'MSE' if metric == 'mse' else 'error %'
    lines += [f'### `{scenario}` (validation {unit})', '']
    lines += render_lambda_search(cells[scenario], metric) + ['']
  return '\n'.join(lines).rstrip() + '\n'


def render_lambda_search(by_reg: Mapping[str, Cell], metric: str) -> list[str]:
  """Validation metric of every regularizer × λ of one scenario; bold = the chosen λ."""
  weights = sorted(set(LAMBDA_GRID) | {w for c in by_reg.values() for w in c.select})
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


def write_report(sweep_dirs: Sequence[str], out: str) -> str:
  """Loads every run under ``sweep_dirs``, writes the markdown report to ``out`` and returns it."""
  loaded = load_runs(sweep_dirs)
  text = render_report(sweep_dirs, loaded)
  directory = os.path.dirname(out)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(out, 'w') as f:
    f.write(text)
  return text
