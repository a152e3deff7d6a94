"""The λ-search protocol end to end on a tiny real-MNIST scenario: choice, resume, statistics, figures."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import mnist_mlp
from cwreg.experiments import figures, layers, report, sweep
from cwreg.training import loop

# Two selection seeds, so that the choice is by a mean; two final seeds, disjoint from them.
PROTOCOL = sweep.Protocol(selection_seeds=(0, 1), final_seeds=(2, 3))
SELECT, FINAL = PROTOCOL.selection_seeds, PROTOCOL.final_seeds


@pytest.fixture(scope='module')
def tiny_sweep(real_data_dir, tmp_path_factory):
    base = mnist_mlp.get_config('size1k')
    base.dataset.data_dir = real_data_dir
    base.dataset.train_size = 300
    base.num_epochs = 2
    base.model.width = 16
    base.eval_batch_size = 2000
    sweep_dir = str(tmp_path_factory.mktemp('sweep'))
    chosen = sweep.run_sweep(
        base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0), protocol=PROTOCOL, max_group=6
    )
    return base, sweep_dir, chosen


def _results(path):
    with open(os.path.join(path, 'results.json')) as f:
        return json.load(f)


def test_layout_and_phases(tiny_sweep):
    _, sweep_dir, _ = tiny_sweep
    for weight in (0.01, 1.0):
        for seed in SELECT:
            result = _results(sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=weight, seed=seed))
            assert result['phase'] == 'select' and result['eval_split'] == 'validation'
            assert result['weight'] == weight and result['status'] == 'finished' and result['seed'] == seed
            assert result['config']['dataset']['validation'] is True
    for name in ('baseline', 'cw_vr'):
        for seed in FINAL:
            result = _results(sweep.run_dir(sweep_dir, name, 'final', seed=seed))
            assert result['phase'] == 'final' and result['eval_split'] == 'test' and result['seed'] == seed
    # The baseline has no λ to choose: final runs only.
    assert not [d for d in os.listdir(os.path.join(sweep_dir, 'baseline')) if d.startswith('select')]


def test_protocols_keep_selection_and_final_seeds_apart():
    assert sweep.PAPER == sweep.Protocol((0,), (1, 2, 3, 4, 5))
    assert sweep.POWERED.selection_seeds == (0, 1, 2) and len(sweep.POWERED.final_seeds) == 10
    with pytest.raises(ValueError, match='disjoint'):
        sweep.Protocol((0, 1), (1, 2))
    with pytest.raises(ValueError, match='at least one'):
        sweep.Protocol((), (1,))


def test_the_choice_is_by_the_mean_over_selection_seeds(tiny_sweep, tmp_path):
    """λ=0.01 has the single best validation run, λ=1 the better mean: λ=1 is chosen."""
    _, sweep_dir, _ = tiny_sweep
    sweep_dir = str(shutil.copytree(sweep_dir, tmp_path / 'sweep'))
    for (weight, seed), error in {(0.01, 0): 1.0, (0.01, 1): 5.0, (1.0, 0): 2.0, (1.0, 1): 2.0}.items():
        workdir = sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=weight, seed=seed)
        result = _results(workdir)
        result['error'] = error
        with open(os.path.join(workdir, 'results.json'), 'w') as f:
            json.dump(result, f)
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', seeds=SELECT) == 1.0
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', seeds=(0,)) == 0.01  # the paper's one run per λ


def test_chosen_weight_is_the_best_validation_error(tiny_sweep):
    _, sweep_dir, chosen = tiny_sweep
    errors = {
        w: np.mean(
            [_results(sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=w, seed=s))['error'] for s in SELECT]
        )
        for w in (0.01, 1.0)
    }
    assert chosen['cw_vr'] == min(errors, key=lambda w: (errors[w], w))
    for seed in FINAL:
        assert _results(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=seed))['weight'] == chosen['cw_vr']
    assert chosen['baseline'] == 0.0


def test_rerun_skips_finished_runs(tiny_sweep, monkeypatch):
    base, sweep_dir, chosen = tiny_sweep

    def fail(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(loop, 'train_group', fail)
    assert (
        sweep.run_sweep(
            base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0), protocol=PROTOCOL
        )
        == chosen
    )


def test_rerun_trains_only_missing_runs(tiny_sweep, monkeypatch):
    base, sweep_dir, _ = tiny_sweep
    missing = sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=FINAL[1])
    before = _results(missing)
    os.remove(os.path.join(missing, 'results.json'))
    trained = []
    original = loop.train_group

    def record(configs, workdirs, *args, **kwargs):
        trained.extend(workdirs)
        return original(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(loop, 'train_group', record)
    sweep.run_sweep(base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0), protocol=PROTOCOL)
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
    for seed in SELECT:
        path = os.path.join(
            sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=other, seed=seed), 'results.json'
        )
        result = _results(os.path.dirname(path))
        result['error'] = -1.0
        with open(path, 'w') as f:
            json.dump(result, f)
    trained = []
    original = loop.train_group

    def record(configs, workdirs, *args, **kwargs):
        trained.extend(workdirs)
        assert all(
            not os.path.exists(os.path.join(w, 'results.json')) for w in workdirs
        )  # stale ones removed
        return original(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(loop, 'train_group', record)
    assert (
        sweep.run_sweep(base, sweep_dir, regularizers=('cw_vr',), grid=(0.01, 1.0), protocol=PROTOCOL)[
            'cw_vr'
        ]
        == other
    )
    finals = [sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=s) for s in FINAL]
    assert trained == finals
    assert [_results(w)['weight'] for w in finals] == [other, other]


def test_final_runs_have_table5_statistics(tiny_sweep):
    _, sweep_dir, _ = tiny_sweep
    with open(os.path.join(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=FINAL[0]), 'stats.json')) as f:
        values = json.load(f)
    for key in (
        'activation_amplitude',
        'covariance',
        'correlation',
        'cw_correlation',
        'variance',
        'n_cw_variance',
    ):
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
    paths = figures.representation_figures(sweep_dir, str(tmp_path), regularizers=('cw_vr',), seed=FINAL[0])
    for path in paths:
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_unknown_regularizer_fails_before_training(tiny_sweep, tmp_path):
    base, _, _ = tiny_sweep
    with pytest.raises(ValueError, match='cw_vr'):
        sweep.run_sweep(base, str(tmp_path), regularizers=('cw_xx',))


def _record_trained(monkeypatch) -> list:
    trained = []
    original = loop.train_group

    def record(configs, workdirs, *args, **kwargs):
        trained.extend(workdirs)
        return original(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(loop, 'train_group', record)
    return trained


@pytest.mark.parametrize(
    'field,value',
    [
        ('optimizer.learning_rate', 1e-3),
        ('penalty.layer', 'layer3'),
        ('model.width', 8),
        ('dataset.train_size', 200),
        ('batch_size', 50),
        ('num_epochs', 3),
        ('optimizer.name', 'sgd'),
        ('weight_decay', 1e-4),
    ],
)
def test_a_finished_run_is_reused_only_for_its_whole_config(tiny_sweep, field, value):
    """Mutation caught: the done-check comparing only (regularizer, λ, seed, phase, epochs), as before."""
    base, sweep_dir, chosen = tiny_sweep
    workdir = sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=FINAL[0])
    config = sweep.run_config(base, 'cw_vr', chosen['cw_vr'], FINAL[0], validation=False)
    assert sweep.status(workdir, config) == 'finished'
    other = ml_collections.ConfigDict(config.to_dict())
    section, _, name = field.rpartition('.')
    (other[section] if section else other)[name] = value
    assert sweep.status(workdir, other) is None


def test_where_the_data_is_and_how_often_to_evaluate_do_not_make_another_run(tiny_sweep):
    base, sweep_dir, chosen = tiny_sweep
    config = ml_collections.ConfigDict(
        sweep.run_config(base, 'cw_vr', chosen['cw_vr'], FINAL[0], False).to_dict()
    )
    config.dataset.data_dir, config.eval_every_epochs, config.steps_per_dispatch = '/elsewhere', 7, 3
    config.eval_batch_size, config.checkpoint = 500, False
    assert sweep.status(sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=FINAL[0]), config) == 'finished'


def test_a_changed_base_config_retrains_and_chosen_weight_reads_only_its_runs(
    tiny_sweep, tmp_path, monkeypatch
):
    base, sweep_dir, chosen = tiny_sweep
    sweep_dir = str(shutil.copytree(sweep_dir, tmp_path / 'sweep'))
    other = ml_collections.ConfigDict(base.to_dict())
    other.optimizer.learning_rate = 1e-3
    # Runs of the old config are not runs of the new one: chosen_weight(…, base) sees none of them.
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', base) == chosen['cw_vr']
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', other) is None
    assert sweep.chosen_weight(sweep_dir, 'cw_vr') == chosen['cw_vr']  # without a config: every run counts
    trained = _record_trained(monkeypatch)
    sweep.run_sweep(
        other,
        sweep_dir,
        regularizers=('baseline',),
        grid=(0.01, 1.0),
        protocol=sweep.Protocol((0,), (FINAL[0],)),
        statistics=False,
    )
    assert trained == [sweep.run_dir(sweep_dir, 'baseline', 'final', seed=FINAL[0])]
    for workdir in trained:
        assert _results(workdir)['config']['optimizer']['learning_rate'] == 1e-3


def test_chosen_weight_ignores_a_select_run_of_another_config(tiny_sweep, tmp_path):
    base, sweep_dir, chosen = tiny_sweep
    sweep_dir = str(shutil.copytree(sweep_dir, tmp_path / 'sweep'))
    other = 1.0 if chosen['cw_vr'] == 0.01 else 0.01
    workdir = sweep.run_dir(sweep_dir, 'cw_vr', 'select', weight=other, seed=SELECT[0])
    result = _results(workdir)
    result['error'] = -100.0  # the best mean, were it of this config
    result['config']['model']['width'] = 32
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(result, f)
    # Of this config, `other` has one selection seed of two: it does not compete on that one.
    assert sweep.chosen_weight(sweep_dir, 'cw_vr', base, seeds=SELECT) == chosen['cw_vr']
    assert sweep.chosen_weight(sweep_dir, 'cw_vr') == other


def test_a_truncated_results_json_is_named_and_its_run_retrained(tiny_sweep, tmp_path, monkeypatch, caplog):
    base, sweep_dir, chosen = tiny_sweep
    sweep_dir = str(shutil.copytree(sweep_dir, tmp_path / 'sweep'))
    workdir = sweep.run_dir(sweep_dir, 'cw_vr', 'final', seed=FINAL[1])
    path = os.path.join(workdir, 'results.json')
    with open(path, 'r+') as f:
        f.truncate(os.path.getsize(path) // 2)
    trained = _record_trained(monkeypatch)
    with caplog.at_level('WARNING'):
        assert (
            sweep.run_sweep(
                base, sweep_dir, regularizers=('baseline', 'cw_vr'), grid=(0.01, 1.0), protocol=PROTOCOL
            )
            == chosen
        )
    assert trained == [workdir]
    assert any(path in r.getMessage() and 'unreadable' in r.getMessage() for r in caplog.records), caplog.text
    assert _results(workdir)['status'] == 'finished'


def test_layer_dependency_trains_the_other_layers_on_the_final_seeds_with_the_chosen_lambda(
    monkeypatch, tmp_path
):
    """Figure 3 trains each layer but the default one (the sweep's finals) with the λ chosen by the sweep of
    the same config over the protocol's selection seeds, on the protocol's final seeds."""
    base = mnist_mlp.get_config('cw_vr')
    asked, trained = [], []
    monkeypatch.setattr(
        sweep, 'chosen_weight', lambda d, name, b=None, seeds=None: asked.append((b, seeds)) or 0.1
    )
    monkeypatch.setattr(sweep, '_train', lambda configs, *args: trained.extend(configs))
    protocol = sweep.Protocol((0, 1), (5, 6, 7))
    weights = layers.run_layer_dependency(
        base, str(tmp_path / 'layers'), str(tmp_path / 'sweep'), ['cw_vr'], ['layer3', 'layer5'], protocol
    )
    assert weights == {'cw_vr': 0.1} and asked == [(base, (0, 1))]
    assert [(c.penalty.layer, c.seed, c.penalty.weight) for c in trained] == [
        ('layer3', s, 0.1) for s in (5, 6, 7)
    ]
    assert {c.scenario for c in trained} == {'mnist_mlp/default@layer3'}
    assert all(not c.dataset.validation for c in trained)
    monkeypatch.setattr(sweep, 'chosen_weight', lambda d, name, b=None, seeds=None: None)
    with pytest.raises(ValueError, match='no finished λ search for cw_vr with this config'):
        layers.run_layer_dependency(
            base, str(tmp_path / 'l2'), str(tmp_path / 'sweep'), ['cw_vr'], ['layer3'], protocol
        )
