"""Raw per-run records: one small JSONL file per sweep, from which every report table can be rebuilt.

A records file has one JSON object per line, one line per finished or diverged run (runs still in progress
are left out), sorted by (scenario, regularizer, phase, λ, seed). Each line has the fields of
`cwreg.experiments.report.RECORD_FIELDS`::

  {"scenario": "mnist_mlp/default", "regularizer": "cw_vr", "weight": 0.01, "seed": 3, "phase": "final",
   "eval_split": "test", "epochs": 50, "steps": 25000, "error": 2.42, "loss": 0.08, "penalty_value": 0.01,
   "status": "finished", "wall_time_s": 61.2, "commit": "cb7e55e…", "stats": {"activation_amplitude": …}}

``commit`` is the run's ``provenance.git_commit``; ``stats`` holds a final run's Table 5 statistics
(``stats.json``), null otherwise. Numbers are written by Python's ``json``, whose float round trip is exact,
so a report from records equals the one from the sweep directories (`load_records` and
`cwreg.experiments.report.load_runs` share `cwreg.experiments.report.run_of_record`).

A manifest (``docs/results/reports.json``) lists the committed reports and the records each is built from::

  [{"out": "docs/results/tables.md",
    "records": ["docs/results/records/mnist_mlp_default.jsonl", "docs/results/records/mnist_ae.jsonl"],
    "tables": ["5", "7", "10", "other"]}]

Paths are relative to the repository root (``root``); ``tables`` (optional) restricts the report to those
keys of `cwreg.experiments.report.TABLES` ('other': scenarios outside them); without it the report has every table.
An entry with ``"variants": [name, ...]`` and one records file per variant is a comparison of variants of
the same runs instead (`cwreg.experiments.faithfulness`), under an optional ``"title"``. An entry with
``"layers": [layer, ...]`` and ``"default_layer"`` is Figure 3's numbers (`cwreg.experiments.layers`) from a
sweep's records and its layer runs' records.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

from cwreg.experiments import report

# Runs a records file keeps: results. Runs in progress are not results yet.
KEPT_STATUSES: tuple[str, ...] = ('finished', 'diverged')
_REQUIRED = ('scenario', 'regularizer', 'weight', 'seed', 'phase', 'status')
MANIFEST_KEYS = frozenset({'out', 'records', 'tables', 'variants', 'title', 'layers', 'default_layer'})

_log = logging.getLogger(__name__)


def _sort_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        record['scenario'],
        record['regularizer'],
        record['phase'],
        record['weight'],
        record['seed'],
        record['status'],
    )


def sweep_records(sweep_dirs: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """The records of every finished or diverged run below ``sweep_dirs``, sorted, and how many files were
    left out (in progress, unreadable, or too incomplete to place)."""
    seen = report.LoadedRuns(runs=[])
    items = report.read_results(sweep_dirs, seen)
    # sorted() is stable: runs with one key stay in path order, the order load_runs resolves duplicates in.
    records = sorted((r for _, _, r in items if r['status'] in KEPT_STATUSES), key=_sort_key)
    left_out = seen.num_files + len(items) - len(records)
    return [{k: r[k] for k in report.RECORD_FIELDS} for r in records], left_out


def export_records(sweep_dirs: Sequence[str], path: str) -> int:
    """Writes the records file of ``sweep_dirs`` to ``path`` (one JSON line per run); returns the line count."""
    records, left_out = sweep_records(sweep_dirs)
    if left_out:
        _log.warning(
            '%d results.json files below %s are not finished/diverged or unreadable: not exported.',
            left_out,
            ', '.join(sweep_dirs),
        )
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')
    return len(records)


def _read_lines(path: str, out: report.LoadedRuns) -> list[tuple[str, str, dict[str, Any]]]:
    items = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f'{os.path.basename(path)}:{number}'
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or any(k not in record for k in _REQUIRED):
                    raise ValueError(f'not a run record (needs {", ".join(_REQUIRED)})')
            except ValueError as e:
                _log.warning('Skipping unreadable record %s:%d: %s', path, number, e)
                out.num_files += 1
                out.unreadable.append(f'{path}:{number}')
                out.unreadable_shown.append(where)
                continue
            items.append((f'{path}:{number}', where, {k: record.get(k) for k in report.RECORD_FIELDS}))
    return items


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of one records file (`report.RECORD_FIELDS` each), in file order.

    Raises:
      ValueError: naming the line, for a line that is not JSON or lacks a required field.
    """
    out = report.LoadedRuns(runs=[])
    items = _read_lines(path, out)
    if out.unreadable:
        raise ValueError(f'{path}: unreadable records at {", ".join(out.unreadable_shown)} (see the log).')
    return [record for _, _, record in items]


def load_records(paths: Sequence[str]) -> report.LoadedRuns:
    """The runs of records files, as `cwreg.experiments.report.load_runs` gives them for the sweep directories.

    A run repeated (within or across files) keeps its last line, as `load_runs` keeps its last path.
    """
    out = report.LoadedRuns(runs=[])
    items = []
    for path in paths:
        items += _read_lines(path, out)
    return report.collect(items, out)


def read_manifest(path: str) -> list[dict[str, Any]]:
    """The entries of a manifest (see the module docstring), checked.

    Raises:
      ValueError: the manifest is not a list of entries with a string ``out`` and a list ``records``, or an
        entry has a key other than out, records and tables.
    """
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f'{path}: a manifest is a JSON list of reports.')
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get('out'), str)
            or not isinstance(entry.get('records'), list)
        ):
            raise ValueError(
                f'{path}: each entry needs "out" (a path) and "records" (a list of paths): {entry!r}'
            )
        unknown = set(entry) - MANIFEST_KEYS
        if unknown:
            raise ValueError(
                f'{path}: unknown keys {sorted(unknown)} in {entry["out"]}; known: {sorted(MANIFEST_KEYS)}'
            )
        if 'layers' in entry and not isinstance(entry.get('default_layer'), str):
            raise ValueError(f'{path}: {entry["out"]} has "layers" but no "default_layer" (a layer name).')
    return entries


def render_entry(entry: Mapping[str, Any], root: str = '.') -> str:
    """The markdown of one manifest entry, from its records alone (paths relative to ``root``)."""
    paths = [os.path.join(root, p) for p in entry['records']]
    if 'variants' in entry:  # one records file per variant of the same runs (e.g. the TF 1.x check)
        from cwreg.experiments import faithfulness  # pylint: disable=g-import-not-at-top  (it imports this module)

        return faithfulness.document(entry['variants'], paths, title=entry.get('title'))
    if 'layers' in entry:
        from cwreg.experiments import layers  # pylint: disable=g-import-not-at-top  (the training stack)

        return layers.document(load_records(paths).runs, entry['layers'], entry['default_layer'])
    return report.render(load_records(paths), tables=entry.get('tables'))


def write_manifest(path: str, root: str = '.') -> list[str]:
    """Regenerates every report of the manifest at ``path``; returns their ``out`` paths (relative to root)."""
    written = []
    for entry in read_manifest(path):
        report.write_text(render_entry(entry, root), os.path.join(root, entry['out']))
        written.append(entry['out'])
    return written
