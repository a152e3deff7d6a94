"""Tests for cwreg.experiments.records: per-run JSONL records, reports from records alone, the reports manifest."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from cwreg.experiments import records, report
from cwreg.experiments import stats as stats_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MANIFEST = os.path.join(_REPO, 'docs', 'results', 'reports.json')
_COMMIT = 'cb7e55ec8943d295badf14a6e23d85cc31c9468c'
_EXACT = 2.5 + 1e-15  # 2.500000000000001: a float that a rounding writer would change


def _result(scenario, reg, weight, seed, phase, error, status='finished', loss=0.1, epochs=50):
    return {
        'scenario': scenario,
        'regularizer': reg,
        'weight': weight,
        'seed': seed,
        'phase': phase,
        'eval_split': 'validation' if phase == 'select' else 'test',
        'error': error,
        'loss': loss,
        'penalty_value': 0.5,
        'epochs': epochs,
        'steps': epochs * 500,
        'wall_time_s': 12.25,
        'status': status,
        'config': {'num_epochs': epochs},
        'provenance': {'git_commit': _COMMIT, 'jax': '0.10.1'},
    }


def _write(root, name, payload, stats=None):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'results.json'), 'w') as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload))
    if stats is not None:
        with open(os.path.join(d, 'stats.json'), 'w') as f:
            json.dump({**stats, 'layer': 'layer5', 'split': 'test'}, f)


def _stats(seed):
    return dict(zip(stats_lib.STAT_KEYS, [5.0 + seed / 3, 2.0, 0.3, 0.2, 9.0, 1.3]))


def _new_protocol_sweep(root):
    """S=3 selection seeds (0-2), F=10 final seeds (10-19), baseline and batch norm with final runs only.

    Directory names are deliberately unsorted relative to the record order (records never parse them).
    """
    s = 'mnist_mlp/default'
    for seed in range(10, 20):
        _write(
            root,
            f'z_base/final_s{seed}',
            _result(s, 'baseline', 0.0, seed, 'final', 2.8 + seed / 100),
            stats=_stats(seed),
        )
        _write(root, f'a_bn/final_s{seed}', _result(s, 'batchnorm', None, seed, 'final', 2.7 + seed / 200))
        _write(
            root,
            f'm_cwvr/final_s{seed}',
            _result(s, 'cw_vr', 0.1, seed, 'final', 2.45 + seed / 150),
            stats=_stats(seed + 1),
        )
        _write(root, f'do/final_s{seed}', _result(s, 'dropout', 0.3, seed, 'final', 2.6 + seed / 90))
    for seed in range(3):
        for w in (0.01, 0.1, 1.0):
            _write(
                root,
                f'm_cwvr/select_w{w:g}_s{seed}',
                _result(s, 'cw_vr', w, seed, 'select', 2.6 + abs(w - 0.1)),
            )
        for w in (0.1, 0.3, 0.5):
            _write(
                root,
                f'do/select_w{w:g}_s{seed}',
                _result(s, 'dropout', w, seed, 'select', 2.7 + abs(w - 0.3)),
            )
    _write(root, 'm_cwvr/select_w100_s0', _result(s, 'cw_vr', 100.0, 0, 'select', None, 'diverged', None))
    _write(root, 'm_cwvr/select_w10_s0', _result(s, 'cw_vr', 10.0, 0, 'select', _EXACT))
    _write(root, 'vr/final_s10', _result(s, 'vr', 1.0, 10, 'final', None, 'diverged', None))
    # A short autoencoder run (Table 10 must say so).
    _write(
        root,
        'ae/final_s10',
        _result('mnist_autoencoder/default', 'cw_vr', 0.1, 10, 'final', None, loss=0.0119, epochs=10),
    )
    return root


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    return _new_protocol_sweep(str(tmp_path_factory.mktemp('sweep')))


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_export_records_fields_order_and_exact_floats(sweep, tmp_path):
    _write(
        sweep_copy := str(tmp_path / 'with_running'),
        'x',
        _result('mnist_mlp/default', 'vr', 1.0, 11, 'final', None, 'running', None),
    )
    _write(sweep_copy, 'broken', '{not json')
    path = str(tmp_path / 'records' / 'sweep.jsonl')
    count = records.export_records([sweep, sweep_copy], path)
    rows = _lines(path)
    assert count == len(rows) == 40 + 18 + 2 + 1 + 1  # finals, selects, 2 diverged, 1 more select, the AE
    assert all(list(r) == list(report.RECORD_FIELDS) for r in rows)
    keys = [(r['scenario'], r['regularizer'], r['phase'], r['weight'], r['seed']) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert not any(r['status'] == 'running' for r in rows)  # in progress: not a result
    assert sum(r['status'] == 'diverged' for r in rows) == 2
    by_key = dict(zip(keys, rows))
    assert by_key[('mnist_mlp/default', 'cw_vr', 'select', 10.0, 0)]['error'] == _EXACT  # bit for bit
    base = by_key[('mnist_mlp/default', 'baseline', 'final', 0.0, 13)]
    assert base['stats'] == _stats(13) and base['commit'] == _COMMIT and base['epochs'] == 50
    assert base['steps'] == 25000 and base['wall_time_s'] == 12.25 and base['penalty_value'] == 0.5
    assert by_key[('mnist_mlp/default', 'cw_vr', 'select', 0.1, 2)]['stats'] is None
    assert by_key[('mnist_mlp/default', 'dropout', 'final', 0.3, 19)]['stats'] is None  # no stats.json
    assert by_key[('mnist_mlp/default', 'batchnorm', 'final', 0.0, 10)]['weight'] == 0.0  # null λ: none
    # The report lists the unreadable file relative to its sweep directory, never by an absolute path.
    text = report.render(report.load_runs([sweep, sweep_copy]))
    assert '- unreadable: `broken/results.json`' in text and str(tmp_path) not in text


def test_records_do_not_depend_on_where_the_sweep_lies(sweep, tmp_path):
    moved = str(tmp_path / 'elsewhere' / 'deeper')
    shutil.copytree(sweep, moved)
    a, b = str(tmp_path / 'a.jsonl'), str(tmp_path / 'b.jsonl')
    records.export_records([sweep], a)
    records.export_records([moved], b)
    assert open(a, 'rb').read() == open(b, 'rb').read()
    assert sweep not in open(a).read()


def test_report_from_records_equals_report_from_sweep(sweep, tmp_path):
    path = str(tmp_path / 'r.jsonl')
    records.export_records([sweep], path)
    from_sweep = report.render(report.load_runs([sweep]))
    from_records = report.render(records.load_records([path]))
    assert from_records == from_sweep
    assert sweep not in from_records and str(tmp_path) not in from_records  # no absolute paths
    # What the new protocol shows: paired gains, S=3 selection, F=10 disjoint final seeds, short AE runs.
    assert '## Table 7 gains, paired over seeds' in from_records
    assert (
        'Runs: epochs 50; final runs n=10 per cell (seeds 10–19); λ selection: lowest mean validation '
        'metric over S=1–3 selection seeds per λ (seeds 0–2); commit cb7e55e.'
    ) in from_records
    assert (
        '## Table 10: Mean squared error of deep autoencoder (MNIST) — 10 epochs, shorter than the '
        "paper's 50" in from_records
    )


def test_load_records_keeps_runs_and_statuses(sweep, tmp_path):
    path = str(tmp_path / 'r.jsonl')
    records.export_records([sweep], path)
    loaded = records.load_records([path])
    direct = report.load_runs([sweep])
    strip = lambda runs: sorted(
        (
            r.scenario,
            r.regularizer,
            r.phase,
            r.weight,
            r.seed,
            r.error,
            r.loss,
            r.epochs,
            r.steps,
            r.commit,
            json.dumps(r.stats),
        )
        for r in runs
    )
    assert strip(loaded.runs) == strip(direct.runs)
    assert sorted(map(repr, loaded.pending)) == sorted(map(repr, direct.pending))
    # A broken line is listed (by file name and line), never fatal; a repeated file counts runs once.
    with open(path, 'a') as f:
        f.write('{"scenario": "x"}\n')
    again = records.load_records([path, path])
    assert again.unreadable_shown == ['r.jsonl:63', 'r.jsonl:63'] and len(again.runs) == len(direct.runs)


def test_launch_export_then_report_from_records(sweep, tmp_path):
    script = os.path.join(_REPO, 'launch', 'report.py')
    exported, out1, out2 = (str(tmp_path / n) for n in ('r.jsonl', 'a.md', 'b.md'))
    for args in (
        [f'--sweep_dirs={sweep}', f'--export_records={exported}', f'--out={out1}'],
        [f'--records={exported}', f'--out={out2}'],
    ):
        proc = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, cwd=_REPO, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
    assert open(out1).read() == open(out2).read() == report.render(report.load_runs([sweep]))
    bad = subprocess.run(
        [sys.executable, script, f'--records={exported}', f'--sweep_dirs={sweep}'],
        capture_output=True,
        text=True,
        cwd=_REPO,
        timeout=120,
    )
    assert bad.returncode != 0 and 'exactly one' in bad.stderr


def test_manifest_regenerates_reports(sweep, tmp_path):
    root = tmp_path / 'repo'
    (root / 'docs' / 'results' / 'records').mkdir(parents=True)
    records.export_records([sweep], str(root / 'docs' / 'results' / 'records' / 'mlp.jsonl'))
    manifest = [
        {'out': 'docs/results/all.md', 'records': ['docs/results/records/mlp.jsonl']},
        {'out': 'docs/results/t10.md', 'records': ['docs/results/records/mlp.jsonl'], 'tables': ['10']},
    ]
    (root / 'docs' / 'results' / 'reports.json').write_text(json.dumps(manifest))
    proc = subprocess.run(
        [sys.executable, os.path.join(_REPO, 'launch', 'report.py'), '--manifest=docs/results/reports.json'],
        capture_output=True,
        text=True,
        cwd=str(root),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    full = (root / 'docs' / 'results' / 'all.md').read_text()
    assert full == report.render(report.load_runs([sweep]))
    t10 = (root / 'docs' / 'results' / 't10.md').read_text()
    assert t10 == records.render_entry(manifest[1], str(root))
    assert '## Table 10' in t10 and '## Table 7' not in t10 and '`mnist_mlp/default`' not in t10
    (root / 'bad.json').write_text(json.dumps([{**manifest[0], 'colour': 'x'}]))
    with pytest.raises(ValueError, match='unknown keys'):
        records.read_manifest(str(root / 'bad.json'))


def test_committed_reports_match_their_records():
    # Every markdown file the manifest lists must be exactly what its committed records render to.
    if not os.path.exists(_MANIFEST):
        pytest.skip(f'no manifest yet at {os.path.relpath(_MANIFEST, _REPO)}')
    for entry in records.read_manifest(_MANIFEST):
        with open(os.path.join(_REPO, entry['out'])) as f:
            committed = f.read()
        assert records.render_entry(entry, _REPO) == committed, (
            f'{entry["out"]} is stale: python launch/report.py --manifest=docs/results/reports.json'
        )


def _default_out(script):
    """The value of the launch script's module-level ``DEFAULT_OUT = os.path.join(...)``."""
    tree = ast.parse(open(os.path.join(_REPO, 'launch', script)).read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 'DEFAULT_OUT')
    return eval(compile(ast.Expression(node.value), script, 'eval'), {'os': os})  # pylint: disable=eval-used


def test_default_outputs_are_not_committed_results(sweep, tmp_path):
    for script in ('report.py', 'figures.py'):
        out = os.path.normpath(_default_out(script))
        assert not out.startswith(os.path.join('docs', 'results')) and out.split(os.sep)[0] == 'reports', (
            script
        )
    proc = subprocess.run(
        [sys.executable, os.path.join(_REPO, 'launch', 'report.py'), f'--sweep_dirs={sweep}'],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'reports' / 'tables.md').exists() and not (tmp_path / 'docs').exists()


def test_figure_titles_state_the_epochs_run(tmp_path):
    from cwreg.experiments import figures, layers  # pylint: disable=g-import-not-at-top  (the training stack)

    layer_dir = str(tmp_path / 'layers')
    for seed, epochs in enumerate((10, 10)):
        _write(
            layer_dir,
            f'cw_vr/layer3/final_s{seed}',
            _result('mnist_mlp/default@layer3', 'cw_vr', 0.1, seed, 'final', 2.5, epochs=epochs),
        )
    runs = report.load_runs([layer_dir]).runs
    heading = layers.document(runs, ['layer3', 'layer5'], 'layer5').splitlines()[0]
    assert heading == "# Figure 3: mnist_mlp/default, 10 epochs, shorter than the paper's 50"
    png = layers.figure(runs, ['layer3', 'layer5'], 'layer5', str(tmp_path / 'f3.png'))
    assert set(png) == {'cw_vr'}
    full = str(tmp_path / 'full')
    _write(full, 'a', _result('mnist_mlp/default', 'baseline', 0.0, 0, 'final', 2.8))
    payload = _result('mnist_mlp/default', 'cw_cr', 1.0, 0, 'final', 2.5)
    del payload['epochs']  # older results: config.num_epochs says it
    _write(full, 'b', payload)
    dirs = [os.path.join(full, 'a'), os.path.join(full, 'b')]
    assert figures._length('mnist_mlp/default', dirs) == '50 epochs'  # pylint: disable=protected-access
