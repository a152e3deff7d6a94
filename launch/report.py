r"""Writes the markdown results tables (paper layout, paper numbers beside ours) from sweeps or records.

Usage:
  # From sweep directories (the default --out is under reports/, which git ignores):
  python launch/report.py --sweep_dirs=/path/sweep1,/path/sweep2
  # Also write the sweeps' raw per-run records (one JSONL line per finished or diverged run):
  python launch/report.py --sweep_dirs=/path/sweep1 --export_records=docs/results/records/sweep1.jsonl
  # From committed records alone:
  python launch/report.py --records=docs/results/records/a.jsonl,docs/results/records/b.jsonl
  # Regenerate every committed report listed in the manifest (writing into docs/results is explicit):
  python launch/report.py --manifest=docs/results/reports.json

All logic lives in `cwreg.experiments.report` and `cwreg.experiments.records`; see their docstrings for the λ tie rule, the std
convention, the paired statistics and the records and manifest formats.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import (
    app,  # pylint: disable=g-import-not-at-top
    flags,
    logging,
)

from cwreg.experiments import records, report

# Never docs/results: a default run must not overwrite committed results.
DEFAULT_OUT = os.path.join('reports', 'tables.md')

_SWEEP_DIRS = flags.DEFINE_list(
    'sweep_dirs', None, 'Comma-separated sweep directories (searched for **/results.json).'
)
_RECORDS = flags.DEFINE_list(
    'records',
    None,
    'Comma-separated records files (JSONL, `cwreg.experiments.records`): '
    'the report is built from them alone (instead of --sweep_dirs).',
)
_EXPORT_RECORDS = flags.DEFINE_string(
    'export_records', None, 'With --sweep_dirs: also write their records (JSONL) to this path.'
)
_MANIFEST = flags.DEFINE_string(
    'manifest',
    None,
    'A reports manifest (JSON list of {"out", "records", '
    '"tables"}): regenerates every report it lists, relative to --root.',
)
_ROOT = flags.DEFINE_string('root', '.', 'With --manifest: the directory its paths are relative to.')
_OUT = flags.DEFINE_string('out', DEFAULT_OUT, 'Markdown file to write.')


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    sources = [bool(_SWEEP_DIRS.value), bool(_RECORDS.value), bool(_MANIFEST.value)]
    if sum(sources) != 1:
        raise app.UsageError('Give exactly one of --sweep_dirs, --records and --manifest.')
    if _EXPORT_RECORDS.value and not _SWEEP_DIRS.value:
        raise app.UsageError('--export_records needs --sweep_dirs.')
    if _MANIFEST.value:
        for out in records.write_manifest(_MANIFEST.value, _ROOT.value):
            print(f'Wrote {out}')
        return
    if _SWEEP_DIRS.value:
        loaded = report.load_runs(_SWEEP_DIRS.value)
        if _EXPORT_RECORDS.value:
            count = records.export_records(_SWEEP_DIRS.value, _EXPORT_RECORDS.value)
            print(f'Wrote {_EXPORT_RECORDS.value} ({count} runs)')
    else:
        loaded = records.load_records(_RECORDS.value)
    text = report.render(loaded)
    report.write_text(text, _OUT.value)
    logging.info('Wrote %s (%d lines).', _OUT.value, text.count('\n'))
    print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
    app.run(main)
