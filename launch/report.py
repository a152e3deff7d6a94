r"""Writes the markdown results tables (paper layout, paper numbers beside ours) for finished sweeps.

Usage:
  python launch/report.py --sweep_dirs=/path/sweep1,/path/sweep2 --out=docs/results/tables.md

All logic lives in `cwreg.report`; see its docstring for the λ tie rule and the std convention.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from cwreg import report

_SWEEP_DIRS = flags.DEFINE_list('sweep_dirs', None, 'Comma-separated sweep directories (searched for '
                                '**/results.json).')
_OUT = flags.DEFINE_string('out', 'docs/results/tables.md', 'Markdown file to write.')
flags.mark_flag_as_required('sweep_dirs')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  text = report.write_report(_SWEEP_DIRS.value, _OUT.value)
  logging.info('Wrote %s (%d lines).', _OUT.value, text.count('\n'))
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
