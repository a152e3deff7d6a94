"""Table 8's data-size columns (CIFAR-10 CNN, 1k and 5k training images) in one command.

Full CIFAR-10 is not available offline, and what travels to a lent accelerator is limited (64 MiB with the
code). The paper's 1k / 5k columns only need the *first* 1k / 5k CIFAR-10 training images, which are in
``data_batch_1`` (the ``cifar10_partial`` dataset of :mod:`cwreg.training.cifar10_partial`). This module

1. :func:`prepare_subset`: prepares that dataset inside the checkout (default ``data/table8``, ignored by git:
   ``/data/``), from the original batches in ``../shared/data/cifar10-partial``, with
   :func:`cwreg.training.prepare.prepare_dataset`; a prepared folder is reused (no source needed then), so the folder
   alone can be carried to the accelerator;
2. :func:`stage`: copies it into the work directory (training writes a decoded-array cache next to the TFDS
   files, 61 MB, which must not grow the carried folder);
3. :func:`run_columns`: runs :func:`cwreg.experiments.sweep.run_sweep` (λ search on a validation hold-out, then the final
   seeds with the chosen λ; runs differing in λ or seed trained as one vmapped group; resumable) for
   ``configs/cifar10_cnn.py`` scenarios ``size1k`` and ``size5k``;
4. :func:`write_tables`: writes the two Table 8 columns (``cwreg.experiments.report``'s renderer, paper numbers beside
   ours), the λ searches and one JSON line per run into an output folder (never ``docs/results`` by default).

**Validation hold-out (the one departure from the paper's protocol).** The paper picks λ on the last 10,000
of CIFAR-10's 50,000 training images (40,000-49,999), which are not in the subset. Here λ is picked on
training images 5,000-9,999 of ``data_batch_1``: 5,000 images, disjoint from both columns' training images
and from the test set. The training images (the first 1k / 5k) and the test set (all 10,000) are the
paper's. That is why the whole ``data_batch_1`` is prepared (10k training images + 10k test images,
46.6 MB as TFDS files), not only its first 5k. :mod:`cwreg.training.data` holds out the paper's 10,000 by
default; this module's configs set ``config.dataset.validation_size`` to 5,000, and :func:`check_holdout`
verifies the split before any training.

``TOY`` is the same pipeline at a scale that runs on a CPU in a few minutes (300 training and 100 test
images, 1 epoch, 2 λ, 2 seeds): its tables say so in their title and are no result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
from typing import Any, Optional, Sequence

import ml_collections

from cwreg import names
from cwreg.experiments import report, sweep
from cwreg.training import config as config_lib
from cwreg.training import data as data_lib

DATASET = 'cifar10_partial'
SCENARIOS: tuple[str, ...] = ('size1k', 'size5k')
REGULARIZERS: tuple[str, ...] = names.SWEEP_REGULARIZERS
MARKER = 'table8_subset.json'  # in a prepared data dir: which subset it holds
SCALE_FILE = 'table8_scale.json'  # in a work dir: the scale its runs are of
TABLES_FILE = 'table8.md'
RUNS_FILE = 'runs.jsonl'
REPORT_FILE = 'report.md'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE_DIR = os.path.join(REPO_ROOT, os.pardir, 'shared', 'data', 'cifar10-partial')
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, 'data', 'table8')
DEFAULT_WORK_DIR = os.path.join(REPO_ROOT, 'workdirs', 'table8')


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much of everything: the data subset, the sweeps' grid and seeds, and the training overrides."""

    name: str
    num_train: int  # first training images prepared (the holdout is their last `holdout`)
    num_test: int  # first test images prepared
    holdout: int  # validation hold-out: the last `holdout` of the prepared training images
    train_sizes: tuple[tuple[str, int], ...]  # scenario -> dataset.train_size
    weights: tuple[float, ...]
    protocol: sweep.Protocol  # selection and final seeds
    overrides: tuple[tuple[str, Any], ...] = ()  # config field -> value (over configs/cifar10_cnn.py)
    statistics: bool = True  # Table 5 statistics (stats.json) of the final runs, as run_sweep writes them

    def train_size(self, scenario: str) -> int:
        return dict(self.train_sizes)[scenario]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# statistics=False: Table 8 needs none, and run_sweep recomputes them on every call (a compiled forward per
# final run: minutes of accelerator time for 80 runs).
FULL = Scale(
    'full',
    num_train=10_000,
    num_test=10_000,
    holdout=5_000,
    train_sizes=(('size1k', 1_000), ('size5k', 5_000)),
    weights=names.WEIGHT_GRID,
    protocol=sweep.PAPER,
    statistics=False,
)
# 2 λ, 1 selection and 2 final seeds: select and final groups have the same shapes, so one compiled program
# serves both (with the persistent compilation cache the launch script turns on); compiling dominates a toy run.
TOY = Scale(
    'toy',
    num_train=300,
    num_test=100,
    holdout=100,
    train_sizes=(('size1k', 100), ('size5k', 200)),
    weights=(0.01, 1.0),
    protocol=sweep.Protocol((0,), (1, 2)),
    overrides=(('num_epochs', 1), ('batch_size', 50), ('eval_batch_size', 100), ('checkpoint', False)),
    statistics=False,
)
SCALES = {s.name: s for s in (FULL, TOY)}


# ------------------------------------------------------------------------------------------------------------
# Data.


def _tfds_files(data_dir: str) -> list[str]:
    """The prepared dataset's own files (relative to data_dir), without cwreg's decoded-array cache."""
    root = os.path.join(data_dir, DATASET)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != data_lib._ARRAY_CACHE)  # pylint: disable=protected-access
        files += [os.path.relpath(os.path.join(dirpath, f), data_dir) for f in sorted(filenames)]
    return files


def prepared_size(data_dir: str) -> int:
    """Bytes of the prepared subset as it would travel: the TFDS files plus the marker."""
    paths = _tfds_files(data_dir) + ([MARKER] if os.path.exists(os.path.join(data_dir, MARKER)) else [])
    return sum(os.path.getsize(os.path.join(data_dir, p)) for p in paths)


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _subset(scale: Scale) -> dict[str, Any]:
    return {'dataset': DATASET, 'num_train': scale.num_train, 'num_test': scale.num_test}


def _is_prepared(data_dir: str) -> bool:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.builder(DATASET, data_dir=data_dir).is_prepared()


def _prepare_first_examples(source_dir: str, data_dir: str, num_train: int, num_test: int) -> None:
    """A `cifar10_partial` holding only the first examples of each split (the toy scale)."""
    import itertools  # pylint: disable=g-import-not-at-top

    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from cwreg.training import (
        cifar10_partial,  # pylint: disable=g-import-not-at-top
        prepare,  # pylint: disable=g-import-not-at-top
    )

    limits = {'train': num_train, 'test': num_test}

    class FirstExamples(cifar10_partial.Cifar10Partial, skip_registration=True):
        name = DATASET

        def _split_generators(self, dl_manager):
            splits = super()._split_generators(dl_manager)
            self.info.metadata['num_train_examples'] = num_train
            return splits

        def _generate_examples(self, batch_dir, batch_names, split):
            return itertools.islice(super()._generate_examples(batch_dir, batch_names, split), limits[split])

    tfds.disable_progress_bar()
    FirstExamples(data_dir=data_dir).download_and_prepare(
        download_config=prepare._download_config(source_dir)
    )  # pylint: disable=protected-access


def prepare_subset(
    data_dir: str = DEFAULT_DATA_DIR, source_dir: str = DEFAULT_SOURCE_DIR, scale: Scale = FULL
) -> dict[str, Any]:
    """Prepares (or finds prepared) the scale's subset in `data_dir`; returns where, its size and whether new.

    The full scale is :func:`cwreg.training.prepare.prepare_dataset`'s `cifar10_partial` of `data_batch_1` + the test
    batch. A data dir already holding the subset is reused without reading `source_dir` (which may then be
    absent, as on an accelerator machine); one holding another subset raises.
    """
    data_dir = os.path.abspath(data_dir)
    marker_path = os.path.join(data_dir, MARKER)
    want = _subset(scale)
    marker = _read_json(marker_path)
    if marker is not None and marker != want:
        raise ValueError(
            f'{data_dir} holds the subset {marker}, not {want}; use another data dir for this '
            'scale, or delete it to prepare again.'
        )
    t0 = time.time()
    newly = not (marker == want and _is_prepared(data_dir))
    if newly:
        if not os.path.isdir(source_dir):
            raise data_lib.DatasetNotPreparedError(
                f'{data_dir} holds no prepared CIFAR-10 subset and the source {source_dir} is absent: prepare '
                'it where ../shared/data/cifar10-partial exists (the same command, or --prepare_only) and '
                'carry the folder.'
            )
        if os.path.exists(os.path.join(data_dir, DATASET)):
            raise ValueError(
                f'{data_dir} holds a {DATASET} dataset without {MARKER} (not prepared by '
                'cwreg.experiments.table8): use another data dir, or delete it.'
            )
        if scale.num_train == FULL.num_train and scale.num_test == FULL.num_test:
            from cwreg.training import prepare  # pylint: disable=g-import-not-at-top

            prepare.prepare_dataset(DATASET, source_dir=source_dir, data_dir=data_dir)
        else:
            _prepare_first_examples(source_dir, data_dir, scale.num_train, scale.num_test)
        with open(marker_path, 'w') as f:
            json.dump(want, f, indent=2, sort_keys=True)
        # TFDS leaves an empty downloads/extracted/ tree: nothing to carry.
        for dirpath, _, _ in sorted(os.walk(os.path.join(data_dir, 'downloads')), reverse=True):
            with contextlib.suppress(OSError):  # only empty folders go
                os.rmdir(dirpath)
    return {
        'data_dir': data_dir,
        'size_bytes': prepared_size(data_dir),
        'prepared_now': newly,
        'seconds': time.time() - t0,
    }


def stage(data_dir: str, work_dir: str) -> str:
    """Copies the prepared subset (TFDS files only) to `<work_dir>/tfds` unless there already; returns it.

    Training writes its decoded-array cache next to the TFDS files it reads: reading the copy keeps the carried
    `data_dir` at its prepared size.
    """
    target = os.path.join(os.path.abspath(work_dir), 'tfds')
    files = _tfds_files(data_dir) + [MARKER]
    same = all(
        os.path.exists(os.path.join(target, p))
        and os.path.getsize(os.path.join(target, p)) == os.path.getsize(os.path.join(data_dir, p))
        for p in files
    )
    if not same:
        shutil.rmtree(target, ignore_errors=True)
        for p in files:
            os.makedirs(os.path.dirname(os.path.join(target, p)), exist_ok=True)
            shutil.copy2(os.path.join(data_dir, p), os.path.join(target, p))
    return target


def check_holdout(data_dir: str, scale: Scale) -> None:
    """Raises unless the select runs (``config.dataset.validation_size = scale.holdout``) see the intended
    split: the first images train, the last `scale.holdout` of the prepared training images validate."""
    ds = data_lib.load_dataset(DATASET, data_dir=data_dir, validation=True, validation_size=scale.holdout)
    want = (scale.num_train - scale.holdout, scale.holdout)
    got = (ds.train.num_examples, ds.eval.num_examples)
    if got != want:
        raise RuntimeError(
            f'Validation split of {data_dir}: {got[0]} train / {got[1]} validation examples, expected {want}.'
        )


# ------------------------------------------------------------------------------------------------------------
# Sweeps.


def base_config(scenario: str, data_dir: str, scale: Scale = FULL) -> ml_collections.ConfigDict:
    """`configs/cifar10_cnn.py:<scenario>` on the prepared subset, with the scale's overrides."""
    from configs import cifar10_cnn  # pylint: disable=g-import-not-at-top  (needs the checkout on sys.path)

    config = cifar10_cnn.get_config(f'baseline,{scenario}')
    config.dataset.name = DATASET
    config.dataset.data_dir = os.path.abspath(data_dir)
    config.dataset.download = False
    config.dataset.train_size = scale.train_size(scenario)
    config.dataset.validation_size = scale.holdout
    for field, value in scale.overrides:
        *parents, leaf = field.split('.')
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    config_lib.validate_config(config)
    return config


def _check_work_dir(work_dir: str, scale: Scale) -> None:
    path = os.path.join(work_dir, SCALE_FILE)
    recorded = _read_json(path)
    if recorded is not None and recorded != scale.to_dict():
        raise ValueError(
            f'{work_dir} holds runs of the {recorded.get("name")!r} scale ({path}); use another '
            f'work dir for the {scale.name!r} scale.'
        )
    os.makedirs(work_dir, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(scale.to_dict(), f, indent=2, sort_keys=True)


def sweep_dir(work_dir: str, scenario: str) -> str:
    return os.path.join(os.path.abspath(work_dir), scenario)


def run_columns(
    data_dir: str,
    work_dir: str,
    scale: Scale = FULL,
    scenarios: Sequence[str] = SCENARIOS,
    regularizers: Sequence[str] = REGULARIZERS,
    max_group: int = 6,
) -> dict[str, dict]:
    """Both columns' sweeps (resumable); returns the chosen λ per scenario and regularizer."""
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            raise ValueError(f'Unknown column {scenario!r}; Table 8 data-size columns: {list(SCENARIOS)}.')
    work_dir = os.path.abspath(work_dir)
    _check_work_dir(work_dir, scale)
    staged = stage(data_dir, work_dir)
    chosen = {}
    check_holdout(staged, scale)
    for scenario in scenarios:
        print(f'[table8] column {scenario}: {scale.name} scale', flush=True)
        chosen[scenario] = sweep.run_sweep(
            base_config(scenario, staged, scale),
            sweep_dir(work_dir, scenario),
            regularizers=regularizers,
            grid=scale.weights,
            protocol=scale.protocol,
            max_group=max_group,
            statistics=scale.statistics,
        )
    return chosen


# ------------------------------------------------------------------------------------------------------------
# Tables.


def _commit() -> Optional[str]:
    try:
        return (
            subprocess.run(
                ['git', '-C', REPO_ROOT, 'rev-parse', '--short', 'HEAD'],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def run_records(sweep_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """One flat record per results.json below `sweep_dirs` (the raw numbers behind the tables)."""
    records = []
    for directory in sweep_dirs:
        for root, _, files in sorted(os.walk(directory)):
            if 'results.json' not in files:
                continue
            result = _read_json(os.path.join(root, 'results.json'))
            if not isinstance(result, dict):
                continue
            config = result.get('config') or {}
            records.append(
                {
                    'scenario': result.get('scenario'),
                    'regularizer': result.get('regularizer'),
                    'weight': result.get('weight'),
                    'seed': result.get('seed'),
                    'phase': result.get('phase'),
                    'eval_split': result.get('eval_split'),
                    'status': result.get('status'),
                    'train_size': (config.get('dataset') or {}).get('train_size'),
                    'epochs': result.get('epochs'),
                    'steps': result.get('steps'),
                    'error': result.get('error'),
                    'loss': result.get('loss'),
                    'penalty_value': result.get('penalty_value'),
                    'wall_time_s': result.get('wall_time_s'),
                    'runs_in_group': result.get('runs_in_group'),
                    'git_commit': (result.get('provenance') or {}).get('git_commit'),
                    'device_kind': (result.get('provenance') or {}).get('device_kind'),
                    'path': os.path.relpath(root, directory),
                }
            )
    return records


def _protocol_lines(scale: Scale, scenarios: Sequence[str]) -> list[str]:
    sizes = ', '.join(f'{s} = first {scale.train_size(s):,} training images' for s in scenarios)
    overrides = (
        ', '.join(f'{k}={v}' for k, v in scale.overrides)
        or 'none (configs/cifar10_cnn.py as is: 50 epochs, batch 100, Adam 1e-4, penalties on `fc`)'
    )
    return [
        f'Data: `{DATASET}` (CIFAR-10 `data_batch_1` + test batch, prepared {scale.num_train:,} training / '
        f'{scale.num_test:,} test images). Columns: {sizes}.',
        f"Protocol: λ ∈ {{{', '.join(report.format_weight(w) for w in scale.weights)}}} trained on the column's "
        f'training images and evaluated on a validation hold-out of training images '
        f'{scale.num_train - scale.holdout:,}–{scale.num_train - 1:,} ({scale.holdout:,} images; the paper '
        f"holds out CIFAR-10's last 10,000, which this subset lacks); the λ with the lowest validation error, "
        f'chosen by the mean over selection seed(s) {list(scale.protocol.selection_seeds)}, then final seeds '
        f'{list(scale.protocol.final_seeds)} evaluated on the {scale.num_test:,} test images. Config overrides: '
        f'{overrides}. Code commit: {_commit() or "unknown"}.',
    ]


def write_tables(
    work_dir: str, out_dir: str, scale: Scale = FULL, scenarios: Sequence[str] = SCENARIOS
) -> dict[str, str]:
    """Writes `table8.md` (the columns, λ searches), `runs.jsonl` and the full `report.md` into `out_dir`."""
    dirs = [sweep_dir(work_dir, s) for s in scenarios if os.path.isdir(sweep_dir(work_dir, s))]
    loaded = report.load_runs(dirs)
    cells = report.build_cells(loaded.runs, loaded.pending)
    paper = report.load_paper_results()
    full_spec = next(spec for spec in report.TABLES if spec.key == '8')
    columns = tuple(c for c in full_spec.columns if c.scenario in {f'cifar10_cnn/{s}' for s in scenarios})
    title = f'{full_spec.title}: data-size columns'
    if scale is not FULL:
        title += f' — {scale.name.upper()} SCALE, NOT A RESULT'
    spec = dataclasses.replace(full_spec, title=title, columns=columns)
    lines = [
        f'# {spec.title}',
        '',
        *_protocol_lines(scale, scenarios),
        '',
        f'{len(loaded.runs)} finished runs, {loaded.num_unfinished} not finished (missing: `—`).',
        '',
        report.CONVENTIONS,
        '',
    ]
    lines += report.render_error_table(spec, cells, paper) + ['']
    for column in columns:
        if column.scenario in cells:
            lines += [f'## λ search, `{column.scenario}` (validation error %; bold = chosen λ)', '']
            lines += report.render_lambda_search(cells[column.scenario], 'error') + ['']
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        'tables': os.path.join(out_dir, TABLES_FILE),
        'runs': os.path.join(out_dir, RUNS_FILE),
        'report': os.path.join(out_dir, REPORT_FILE),
    }
    with open(paths['tables'], 'w') as f:
        f.write('\n'.join(lines).rstrip() + '\n')
    with open(paths['runs'], 'w') as f:
        for record in run_records(dirs):
            f.write(json.dumps(record, sort_keys=True) + '\n')
    report.write_report(dirs, paths['report'])
    return paths


def main(
    *,
    toy: bool = False,
    source_dir: str = DEFAULT_SOURCE_DIR,
    data_dir: Optional[str] = None,
    work_dir: Optional[str] = None,
    out_dir: Optional[str] = None,
    scenarios: Sequence[str] = SCENARIOS,
    regularizers: Sequence[str] = REGULARIZERS,
    max_group: int = 6,
    prepare_only: bool = False,
) -> dict[str, Any]:
    """Prepare (or reuse) the subset, run both columns, write the tables. The launch script's whole work."""
    scale = TOY if toy else FULL
    data_dir = data_dir or (DEFAULT_DATA_DIR + ('_toy' if toy else ''))
    work_dir = work_dir or (DEFAULT_WORK_DIR + ('_toy' if toy else ''))
    out_dir = out_dir or os.path.join(work_dir, 'tables')
    t0 = time.time()
    prepared = prepare_subset(data_dir, source_dir, scale)
    print(
        f'[table8] subset in {prepared["data_dir"]}: {prepared["size_bytes"] / 1e6:.1f} MB '
        f'({"prepared now" if prepared["prepared_now"] else "already prepared"})',
        flush=True,
    )
    if prepare_only:
        return {'prepared': prepared}
    chosen = run_columns(data_dir, work_dir, scale, scenarios, regularizers, max_group)
    paths = write_tables(work_dir, out_dir, scale, scenarios)
    print(f'[table8] wrote {paths["tables"]} ({time.time() - t0:.0f} s)', flush=True)
    return {'prepared': prepared, 'chosen': chosen, 'paths': paths, 'seconds': time.time() - t0}
