"""The benchmark's train-step table runs and reports what the README's table shows."""

import json
import math
import subprocess

import jax

from cwreg.experiments import bench


def test_train_step_rows_report_overheads_and_the_product_floor():
    rows = bench.train_step_rows(['mnist_mlp'], ['cr'], steps=3, repeats=2)
    by_penalty = {row['penalty']: row for row in rows}
    assert set(by_penalty) == {'none', 'cr', bench.FLOOR}
    assert by_penalty['none']['overhead_%'] == 0.0 and by_penalty['none']['added_us'] == 0.0
    for row in rows:
        assert row['model'] == 'mnist_mlp'
        assert row['ms_per_step'] > 0 and math.isfinite(row['overhead_%'])
    # The floor row is a share of the baseline step, not a difference from it.
    floor = by_penalty[bench.FLOOR]
    assert floor['layer'] == 'layer5' and floor['added_us'] > 0 and floor['overhead_%'] > 0


def test_representation_width_is_the_number_of_units_of_the_layer():
    import configs.cifar10_cnn
    import configs.mnist_mlp

    assert bench._representation_width(configs.mnist_mlp.get_config(''), (28, 28, 1), 'layer5') == 100
    cnn = configs.cifar10_cnn.get_config('')
    assert bench._representation_width(cnn, (32, 32, 3), 'fc') == 128
    assert bench._representation_width(cnn, (32, 32, 3), 'conv1') == 32 * 32 * 32


def test_representation_width_and_chunk_runner_take_dropout_and_batchnorm_configs():
    import configs.cifar10_cnn
    import configs.mnist_mlp

    for regularizer in ('dropout', 'batchnorm'):
        mlp = configs.mnist_mlp.get_config(regularizer)
        assert bench._representation_width(mlp, (28, 28, 1), 'layer5') == 100
        cnn = configs.cifar10_cnn.get_config(regularizer)
        assert bench._representation_width(cnn, (32, 32, 3), 'fc') == 128
        mlp.batch_size = 10
        loss = bench._chunk_runner(mlp, (28, 28, 1), steps=2, num_examples=40)()
        assert loss.shape == (1, 2) and bool(jax.numpy.all(jax.numpy.isfinite(loss)))


def test_penalty_rows_time_both_label_forms_against_a_baseline(tmp_path):
    import pathlib

    source = pathlib.Path(bench.__file__).parent.parent / 'penalties.py'
    baseline = bench.load_baseline(str(source))
    rows = bench.penalty_rows(shapes=((8, 5, 3),), names=('cw_vr', 'vr'), repeats=2, baseline=baseline)
    assert [(r['penalty'], r['labels']) for r in rows] == [
        ('cw_vr', 'ids'),
        ('cw_vr', 'one-hot'),
        ('vr', 'ids'),
    ]
    for row in rows:
        assert row['ours_ms'] > 0 and row['baseline_ms'] > 0 and math.isfinite(row['vs_baseline'])
        assert row['rel_diff'] < 1e-5


def test_penalty_rows_time_calls_synchronously_and_restore_the_dispatch_flag(monkeypatch):
    """Calls of 10-50 µs are timed on the calling thread (no hand-off to a worker), and the caller's
    setting of jax_cpu_enable_async_dispatch survives the call, whichever it was."""
    seen = []
    real = bench._interleaved_medians

    def spy(fns, repeats, **kwargs):
        seen.append(jax.config.read('jax_cpu_enable_async_dispatch'))
        return real(fns, repeats, **kwargs)

    monkeypatch.setattr(bench, '_interleaved_medians', spy)
    for before in (True, False):
        jax.config.update('jax_cpu_enable_async_dispatch', before)
        try:
            bench.penalty_rows(shapes=((8, 5, 3),), names=('vr',), repeats=1)
            assert jax.config.read('jax_cpu_enable_async_dispatch') is before
        finally:
            jax.config.update('jax_cpu_enable_async_dispatch', True)
    assert seen == [False, False]
    bench.penalty_rows(shapes=((8, 5, 3),), names=('vr',), repeats=1, synchronous=False)
    assert seen[-1] is True


def test_interleaved_medians_alternate_which_function_goes_first():
    """A round's first call is slower (cache, dispatch state): the first place must not always fall to one."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ('ours', 'baseline', 'other')}
    bench._interleaved_medians(fns, repeats=4, min_time=0.0)
    rounds = [tuple(calls[i : i + 3]) for i in range(3, len(calls), 3)]  # after the warm-up calls
    assert rounds[:4] == [('ours', 'baseline', 'other'), ('other', 'baseline', 'ours')] * 2


def test_penalty_rows_in_processes_report_medians_and_ranges_over_processes():
    import pathlib

    source = str(pathlib.Path(bench.__file__).parent.parent / 'penalties.py')
    rows = bench.penalty_rows_in_processes(2, ('vr',), repeats=2, baseline_path=source, shapes=((8, 5, 3),))
    assert [(r['penalty'], r['labels'], r['N'], r['I'], r['K']) for r in rows] == [('vr', 'ids', 8, 5, 3)]
    low, high = map(float, rows[0]['vs_baseline_range'].split('–'))
    assert low <= round(rows[0]['vs_baseline'], 2) <= high and rows[0]['ours_ms'] > 0


def test_penalty_rows_in_processes_take_each_rows_median_over_processes(monkeypatch):
    # Canned outputs of five processes: the row is their median, the range their min and max.
    outputs = iter([(1.3, 0.5), (1.0, 0.1), (1.2, 0.4), (1.1, 0.2), (1.4, 0.3)])

    def fake_run(args, **kwargs):
        ratio, ours = next(outputs)
        row = {
            'penalty': 'vr',
            'labels': 'ids',
            'N': 8,
            'I': 5,
            'K': 3,
            'ours_ms': ours,
            'vs_baseline': ratio,
        }
        return subprocess.CompletedProcess(args, 0, stdout='noise\nROWS ' + json.dumps([row]) + '\n')

    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    (row,) = bench.penalty_rows_in_processes(5, ('vr',), repeats=1, baseline_path='b.py', shapes=((8, 5, 3),))
    assert row['vs_baseline'] == 1.2 and row['ours_ms'] == 0.3
    assert row['vs_baseline_range'] == '1.00–1.40'
