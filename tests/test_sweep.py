"""The λ-search protocol end to end on a tiny real-MNIST scenario: choice, resume, statistics, figures."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import mnist_mlp
from cwreg import figures
from cwreg import report
from cwreg import sweep
from cwreg import train


@pytest.fixture(scope='module')
def tiny_sweep(real_data_dir, tmp_path_factory):
    base = mnist_mlp.get_config('size1k')
    base.dataset.data_dir = real_data_dir
    base.dataset.train_size = 300
    base.num_epochs = 2
    base.model.width = 16
    base.eval_batch_size = 2000
    sweep_dir = str(tmp_path_factory.mktemp('sweep'))
    chosen = sweep.run_sweep(base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0),
                             seeds=(0, 1), max_group=6)
    return base, sweep_dir, chosen


def _results(path):
    with open(os.path.join(path, 'results.json')) as f:
        return json.load(f)


def test_layout_and_phases(tiny_sweep):
    _, sweep_dir, _ = tiny_sweep
    for weight in (0.01, 1.0):
        result = _results(sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=weight))
        assert result['phase'] == 'select' and result['eval_split'] == 'validation'
        assert result['weight'] == weight and result['status'] == 'finished'
        assert result['config']['dataset']['validation'] is True
    for seed in (0, 1):
        result = _results(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=seed))
        assert result['phase'] == 'final' and result['eval_split'] == 'test' and result['seed'] == seed
    assert _results(sweep.run_dir(sweep_dir, 'baseline', 'select'))['regularizer'] == 'baseline'


def test_chosen_weight_is_the_best_validation_error(tiny_sweep):
    _, sweep_dir, chosen = tiny_sweep
    errors = {w: _results(sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=w))['error'] for w in (0.01, 1.0)}
    assert chosen['cw_vr'] == min(errors, key=lambda w: (errors[w], w))
    for seed in (0, 1):
        assert _results(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=seed))['weight'] == chosen['cw_vr']
    assert chosen['baseline'] == 0.0


def test_rerun_skips_finished_runs(tiny_sweep, monkeypatch):
    base, sweep_dir, chosen = tiny_sweep

    def fail(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(train, 'train_group', fail)
    assert sweep.run_sweep(base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0),
                           seeds=(0, 1)) == chosen


def test_rerun_trains_only_missing_runs(tiny_sweep, monkeypatch):
    base, sweep_dir, _ = tiny_sweep
    missing = sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=1)
    before = _results(missing)
    os.remove(os.path.join(missing, 'results.json'))
    trained = []
    original = train.train_group

    def record(configs, workdirs, *args, **kwargs):
        trained.extend(workdirs)
        return original(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(train, 'train_group', record)
    sweep.run_sweep(base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0), seeds=(0, 1))
    assert trained == [missing]
    after = _results(missing)
    # Same seed, same λ, same data: the retrained run reproduces the first one.
    np.testing.assert_allclose(after['loss'], before['loss'], rtol=1e-5)
    assert after['error'] == pytest.approx(before['error'])


def test_final_runs_follow_a_changed_choice_of_lambda(tiny_sweep, tmp_path, monkeypatch):
    base, sweep_dir, chosen = tiny_sweep
    sweep_dir = str(shutil.copytree(sweep_dir, tmp_path / 'sweep'))
    # Make the other λ the better one on validation, as a longer or wider search might.
    other = 1.0 if chosen['cw_vr'] == 0.01 else 0.01
    path = os.path.join(sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=other), 'results.json')
    result = _results(os.path.dirname(path))
    result['error'] = -1.0
    with open(path, 'w') as f:
        json.dump(result, f)
    trained = []
    original = train.train_group

    def record(configs, workdirs, *args, **kwargs):
        trained.extend(workdirs)
        assert all(not os.path.exists(os.path.join(w, 'results.json')) for w in workdirs)  # stale ones removed
        return original(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(train, 'train_group', record)
    assert sweep.run_sweep(base, sweep_dir, regularizers=('cw_vr',), grid=(0.01, 1.0),
                                                  seeds=(0, 1))['cw_vr'] == other
    finals = [sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=s) for s in (0, 1)]
    assert trained == finals
    assert [_results(w)['weight'] for w in finals] == [other, other]


def test_final_runs_have_table5_statistics(tiny_sweep):
    _, sweep_dir, _ = tiny_sweep
    with open(os.path.join(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=0), 'stats.json')) as f:
        values = json.load(f)
    for key in ('activation_amplitude', 'covariance', 'correlation', 'cw_correlation', 'variance',
                'n_cw_variance'):
        assert np.isfinite(values[key])
    assert values['layer'] == 'layer5' and values['split'] == 'test'


def test_report_reads_the_sweep(tiny_sweep):
    _, sweep_dir, chosen = tiny_sweep
    runs = report.load_runs([sweep_dir]).runs
    assert {r.regularizer for r in runs} == {'baseline', 'cw_vr'}
    assert len([r for r in runs if r.phase == 'final']) == 4
    weight, _ = report.select_weight([r for r in runs if r.regularizer == 'cw_vr'])
    assert weight == chosen['cw_vr']


def test_representation_figures(tiny_sweep, tmp_path):
    _, sweep_dir, _ = tiny_sweep
    paths = figures.representation_figures(sweep_dir, str(tmp_path), regularizers=('cw_vr',))
    for path in paths:
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_unknown_regularizer_fails_before_training(tiny_sweep, tmp_path):
    base, _, _ = tiny_sweep
    with pytest.raises(ValueError, match='cw_vr'):
        sweep.run_sweep(base, str(tmp_path), regularizers=('cw_xx',))
