"""launch/cifar10_table8.py: Table 8's 1k/5k CIFAR-10 columns in one command, run here at toy scale."""

import json
import os
import subprocess
import sys

from conftest import CIFAR10_PARTIAL_SOURCE_DIR as CIFAR_DIR  # pylint: disable=g-bad-import-order
import pytest

from cwreg import names
from cwreg.experiments import report, sweep, table8
from cwreg.training import data as data_lib
from cwreg.training import loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'launch', 'cifar10_table8.py')
CARRY_LIMIT = 64 * 2**20  # what travels to a lent accelerator, code included


def _need_data():
    if not os.path.isdir(CIFAR_DIR):
        if os.environ.get('CI'):
            pytest.fail(f'real data not found: {CIFAR_DIR}')
        pytest.skip(f'real data not available: {CIFAR_DIR}')


def _launch(*args: str) -> str:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _code_size() -> int:
    files = (
        subprocess.run(['git', '-C', REPO_ROOT, 'ls-files', '-z'], capture_output=True, check=True)
        .stdout.decode()
        .split('\0')
    )
    return sum(
        os.path.getsize(os.path.join(REPO_ROOT, f))
        for f in files
        if f and os.path.isfile(os.path.join(REPO_ROOT, f))
    )


def test_holdout_is_the_last_training_images_and_is_restored(tmp_path):
    _need_data()
    data_dir = str(tmp_path / 'data')
    prepared = table8.prepare_subset(data_dir, CIFAR_DIR, table8.TOY)
    assert prepared['prepared_now']
    again = table8.prepare_subset(data_dir, str(tmp_path / 'absent'), table8.TOY)  # no source needed now
    assert not again['prepared_now'] and again['size_bytes'] == prepared['size_bytes']
    full = data_lib.load_dataset(table8.DATASET, data_dir=data_dir)
    assert (full.train.num_examples, full.eval.num_examples) == (table8.TOY.num_train, table8.TOY.num_test)
    table8.check_holdout(data_dir, table8.TOY)
    config = table8.base_config('size1k', data_dir, table8.TOY)
    assert config.dataset.validation_size == table8.TOY.holdout
    ds = loop.load_data(sweep.run_config(config, 'baseline', 0.0, 0, validation=True))
    cut = table8.TOY.num_train - table8.TOY.holdout
    assert (ds.train.images == full.train.images[: config.dataset.train_size]).all()
    assert (ds.eval.images == full.train.images[cut:]).all()
    assert (ds.eval.labels == full.train.labels[cut:]).all()
    with pytest.raises(
        ValueError, match='holds the subset'
    ):  # a toy data dir is never taken for the full one
        table8.prepare_subset(data_dir, CIFAR_DIR, table8.FULL)


def test_base_configs_are_the_table8_columns():
    for scenario, size in table8.FULL.train_sizes:
        config = table8.base_config(scenario, '/tmp/x', table8.FULL)
        assert config.scenario == f'cifar10_cnn/{scenario}' and config.dataset.train_size == size
        assert (config.num_epochs, config.batch_size, config.penalty.layer) == (50, 100, 'fc')
    toy = table8.base_config('size5k', '/tmp/x', table8.TOY)
    assert (toy.num_epochs, toy.batch_size, toy.dataset.train_size) == (1, 50, 200)


@pytest.mark.slow
def test_full_subset_is_small_enough_to_carry(tmp_path):
    _need_data()
    data_dir = str(tmp_path / 'data')
    out = _launch('--prepare_only', f'--data_dir={data_dir}', f'--source_dir={CIFAR_DIR}')
    assert 'prepared now' in out
    size = table8.prepared_size(data_dir)
    assert size + _code_size() < CARRY_LIMIT, (size, _code_size())
    # Prepared: the accelerator machine needs no source.
    assert 'already prepared' in _launch(
        '--prepare_only', f'--data_dir={data_dir}', f'--source_dir={tmp_path / "absent"}'
    )
    ds = data_lib.load_dataset(table8.DATASET, data_dir=data_dir)
    assert (ds.train.num_examples, ds.eval.num_examples) == (10_000, 10_000)


@pytest.mark.slow
def test_toy_pipeline_writes_both_columns_and_resumes(tmp_path):
    _need_data()
    data_dir, work_dir, out_dir = (str(tmp_path / n) for n in ('data', 'work', 'out'))
    # Two regularizers keep the test to 8 compiled groups (all eight take 32, ≈ 6 min here); the table
    # still has a row for every regularizer.
    ran = ('baseline', 'cw_vr')
    args = [
        '--toy',
        f'--data_dir={data_dir}',
        f'--work_dir={work_dir}',
        f'--out_dir={out_dir}',
        f'--source_dir={CIFAR_DIR}',
        f'--regularizers={",".join(ran)}',
    ]
    _launch(*args)
    size = table8.prepared_size(data_dir)
    assert sorted(os.listdir(data_dir)) == [table8.DATASET, table8.MARKER]  # no cache grew the carried dir

    text = open(os.path.join(out_dir, table8.TABLES_FILE)).read()
    assert 'TOY SCALE, NOT A RESULT' in text.splitlines()[0]
    header = next(line for line in text.splitlines() if line.startswith('| Regularizer | Data size 1k'))
    assert '`cifar10_cnn/size1k`' in header and '`cifar10_cnn/size5k`' in header
    table = text.splitlines()[text.splitlines().index(header) + 2 :]
    table = table[: next(i for i, line in enumerate(table + ['']) if not line.startswith('|'))]
    rows = {line.split('|')[1].strip(): line.split('|')[2:4] for line in table}
    for reg in ran:
        cells = rows[names.DISPLAY_NAMES[reg]]
        assert all('(n=2' in cell and not cell.strip().startswith(report.MISSING) for cell in cells), (
            reg,
            cells,
        )
    assert {names.DISPLAY_NAMES[reg] for reg in table8.REGULARIZERS} <= set(rows)
    records = [json.loads(line) for line in open(os.path.join(out_dir, table8.RUNS_FILE))]
    per_column = 2 + 2 + 2  # baseline: 2 final seeds; cw_vr: 2 λ × 1 selection seed, 2 final seeds
    assert len(records) == 2 * per_column and all(r['status'] == 'finished' for r in records)
    assert {r['train_size'] for r in records} == {100, 200}
    assert os.path.exists(os.path.join(out_dir, table8.REPORT_FILE))

    again = _launch(*args)  # resumable: a finished sweep trains nothing and writes the same table
    assert 'epoch 1/1' not in again and f'{per_column}/{per_column} runs done' in again

    def numbers(markdown):  # all but the protocol line, which names the (moving) commit
        return [line for line in markdown.splitlines() if not line.startswith('Protocol:')]

    assert numbers(open(os.path.join(out_dir, table8.TABLES_FILE)).read()) == numbers(text)
    assert table8.prepared_size(data_dir) == size
