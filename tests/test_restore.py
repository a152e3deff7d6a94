"""Tests for sweep.restore_from_records, records.read_records and launch/sweep.py --restore_from (no training)."""

import json
import os
import subprocess
import sys

import pytest

from configs import mnist_mlp
from cwreg.experiments import records, sweep

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT = os.path.join(_REPO, 'docs', 'results', 'records', 'mnist_mlp_default.jsonl')
_TRAINED_BY = sweep.POWERED  # the protocol of the committed default column
_COMMIT = 'fdf05666900841d03db75f8f34fc99a684632eed'


def _base():
    return mnist_mlp.get_config('default')


def _lines(path=_DEFAULT):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _record(**overrides):
    record = {
        'scenario': 'mnist_mlp/default',
        'regularizer': 'baseline',
        'weight': 0.0,
        'seed': 3,
        'phase': 'final',
        'eval_split': 'test',
        'epochs': 50,
        'steps': 25000,
        'error': 2.75,
        'loss': 0.125,
        'penalty_value': 0.0,
        'status': 'finished',
        'wall_time_s': 12.5,
        'commit': _COMMIT,
        'stats': None,
    }
    return {**record, **overrides}


def _write(tmp_path, *lines, name='x.jsonl'):
    path = tmp_path / name
    path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n' for line in lines))
    return str(path)


@pytest.fixture(scope='module')
def restored(tmp_path_factory):
    sweep_dir = str(tmp_path_factory.mktemp('restored'))
    count = sweep.restore_from_records(_base(), sweep_dir, _DEFAULT, _TRAINED_BY)
    return sweep_dir, count


def test_round_trip_gives_the_committed_records_byte_for_byte(restored, tmp_path):
    sweep_dir, count = restored
    assert count == len(_lines()) == 241
    out = str(tmp_path / 'out.jsonl')
    records.export_records([sweep_dir], out)
    with open(out, 'rb') as a, open(_DEFAULT, 'rb') as b:
        assert a.read() == b.read()
    with open(os.path.join(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=4), 'results.json')) as f:
        commit = json.load(f)['provenance']['git_commit']
    assert commit == next(
        r['commit'] for r in _lines() if (r['regularizer'], r['phase'], r['seed']) == ('cw_vr', 'final', 4)
    )


def test_a_restored_run_is_done_only_for_the_config_it_was_trained_with(restored):
    sweep_dir, _ = restored
    base = _base()
    lines = _lines()
    final_weight = next(r['weight'] for r in lines if r['regularizer'] == 'cw_vr' and r['phase'] == 'final')
    workdir = sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=4)
    assert sweep.status(workdir, sweep.run_config(base, 'cw_vr', final_weight, 4, False)) == 'finished'
    assert sweep.status(workdir, sweep.run_config(base, 'cw_vr', final_weight * 10, 4, False)) is None
    longer = _base()
    longer.num_epochs = 60
    assert sweep.status(workdir, sweep.run_config(longer, 'cw_vr', final_weight, 4, False)) is None
    by_weight = {}
    for r in lines:
        if r['regularizer'] == 'cw_vr' and r['phase'] == 'select':
            by_weight.setdefault(r['weight'], []).append(r['error'])
    best = min(by_weight, key=lambda w: sum(by_weight[w]) / len(by_weight[w]))
    assert all(len(v) == 3 for v in by_weight.values())
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', base, seeds=(0, 1, 2)) == best == final_weight


def test_only_the_runs_of_the_protocol_are_restored(tmp_path):
    protocol = sweep.Protocol((0, 1), (5, 6))
    count = sweep.restore_from_records(_base(), str(tmp_path), _DEFAULT, protocol)
    lines = _lines()
    kept = [r for r in lines if r['seed'] in (protocol.selection_seeds if r['phase'] == 'select' else (5, 6))]
    assert 0 < count == len(kept) < len(lines)
    for r in lines:
        workdir = sweep.run_dir(str(tmp_path), r['regularizer'], r['phase'], r['weight'], r['seed'])
        assert os.path.exists(os.path.join(workdir, 'results.json')) == (r in kept), workdir


def test_a_final_run_gets_its_stats_and_an_existing_result_is_never_overwritten(tmp_path):
    stats = {'activation_amplitude': 5.0, 'covariance': 2.0}
    path = _write(tmp_path, _record(seed=3, stats=stats), _record(seed=4, stats=stats))
    sweep_dir = str(tmp_path / 'sweep')
    kept = os.path.join(sweep.run_dir(sweep_dir, 'baseline', 'final', seed=4), 'results.json')
    os.makedirs(os.path.dirname(kept))
    with open(kept, 'w') as f:
        f.write('{"status": "running", "note": "mine"}')
    assert sweep.restore_from_records(_base(), sweep_dir, path) == 1
    with open(kept) as f:
        assert f.read() == '{"status": "running", "note": "mine"}'
    assert not os.path.exists(os.path.join(os.path.dirname(kept), 'stats.json'))
    with open(os.path.join(sweep.run_dir(sweep_dir, 'baseline', 'final', seed=3), 'stats.json')) as f:
        assert json.load(f) == {**stats, 'layer': 'layer5', 'split': 'test'}


@pytest.mark.parametrize(
    'overrides, named',
    [
        ({'scenario': 'mnist_mlp/size1k'}, "'scenario'"),
        ({'epochs': 30}, "'epochs'"),
        ({'weight': 0.5}, "'weight'"),  # the baseline has no λ
    ],
)
def test_a_record_of_another_run_is_refused(tmp_path, overrides, named):
    path = _write(tmp_path, _record(), _record(**overrides))
    with pytest.raises(ValueError, match=named):
        sweep.restore_from_records(_base(), str(tmp_path / 'sweep'), path)


@pytest.mark.parametrize(
    'bad', ['not json', json.dumps({k: v for k, v in _record().items() if k != 'phase'})]
)
def test_a_malformed_line_is_named(tmp_path, bad):
    path = _write(tmp_path, _record(), bad)
    with pytest.raises(ValueError, match='x.jsonl:2'):
        records.read_records(path)
    with pytest.raises(ValueError, match='x.jsonl:2'):
        sweep.restore_from_records(_base(), str(tmp_path / 'sweep'), path)


def test_read_records_keeps_file_order_and_fields(tmp_path):
    path = _write(tmp_path, _record(seed=5), '', _record(seed=4, extra=1))
    assert records.read_records(path) == [_record(seed=5), _record(seed=4)]


_DRIVER = """
import os, runpy, sys
from cwreg.experiments import sweep
def run_sweep(base, sweep_dir, protocol, **kwargs):  # stands in for training: what was restored before it
    done = os.path.exists(os.path.join(sweep.run_dir(sweep_dir, 'baseline', 'final', seed=3), 'results.json'))
    print('run_sweep', protocol.selection_seeds, protocol.final_seeds, done)
    return {}
sweep.run_sweep = run_sweep
sys.argv = ['launch/sweep.py'] + sys.argv[1:]
runpy.run_path('launch/sweep.py', run_name='__main__')
"""


def test_launch_sweep_restores_before_it_sweeps(tmp_path):
    path = _write(tmp_path, _record(seed=3), _record(seed=1))
    args = [
        '--config=configs/mnist_mlp.py:default',
        f'--sweep_dir={tmp_path / "sweep"}',
        f'--restore_from={path}',
    ]
    args += ['--selection_seeds=2', '--final_seeds=4', '--regularizers=baseline']
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.run(
        [sys.executable, '-c', _DRIVER, *args],
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'Restored 1 runs from {path}' in proc.stdout  # seed 1 is a selection seed of S=2
    assert 'run_sweep (0, 1) (2, 3, 4, 5) True' in proc.stdout
