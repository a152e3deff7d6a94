"""Tests for cwreg.experiments.layers (Figure 3, layer dependency) on synthetic runs: no training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cwreg.experiments import layers, records, report

S = 'mnist_mlp/default'
LAYERS = ['layer1', 'layer3', 'layer5']
# Final errors by seed. Baseline has seed 14 that cw-VR on layer5 lacks; cw-VR on layer3 lacks seed 10.
BASE = {10: 2.91, 11: 3.07, 12: 2.84, 13: 3.22, 14: 2.98}
CWVR5 = {10: 2.61, 11: 2.43, 12: 2.70, 13: 2.52}
CWVR3 = {11: 2.87, 12: 2.62, 13: 3.01, 14: 2.74}
DROPOUT = {10: 2.55, 11: 2.66, 12: 2.58, 13: 2.71}


def _run(scenario, reg, seed, error, phase='final', epochs=50, weight=0.1):
    split = 'validation' if phase == 'select' else 'test'
    return report.Run(
        scenario, reg, weight, seed, phase, split, error, 0.1, f'{scenario}/{reg}/{seed}', None, epochs
    )


def _runs(layer3_epochs=50):
    runs = [_run(S, 'baseline', s, e, weight=0.0) for s, e in BASE.items()]
    runs += [_run(S, 'cw_vr', s, e) for s, e in CWVR5.items()]
    runs += [_run(f'{S}@layer3', 'cw_vr', s, e, epochs=layer3_epochs) for s, e in CWVR3.items()]
    # Dropout: the sweep's finals on the default layer only (and shorter, which must not reach the heading).
    runs += [_run(S, 'dropout', s, e, epochs=10, weight=0.3) for s, e in DROPOUT.items()]
    runs += [_run(S, 'cw_vr', s, 50.0 + s, 'select', weight=w) for s in range(3) for w in (0.01, 0.1)]
    runs += [_run('mnist_mlp/size1k', 'cw_vr', s, 9.0) for s in CWVR5]
    return runs[::-1]  # record order must not matter (pairing is by seed, not position)


def _cell(doc, heading, row, column):
    """The cell of table `heading`'s `row` (display name) under `column` (a header prefix)."""
    lines = doc.split(f'## {heading}\n\n', 1)[1].split('\n\n', 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    cells = {
        c.strip('|').split('|')[0].strip(): [x.strip() for x in c.strip('|').split('|')] for c in lines[2:]
    }
    return cells[row][next(i for i, h in enumerate(header) if h.startswith(column))]


def _expected_gain(a, b):
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    n, mean = len(seeds), float(np.mean(d))
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * se
    p = float(2 * scipy_stats.t.sf(abs(mean) / se, n - 1))
    return f'{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] (n={n}, {report.format_p(p)})'


def test_layer_errors_maps_scenario_runs_to_layers():
    runs = _runs() + [_run('mnist_mlp/size1k@layer3', 'cw_vr', s, 7.0) for s in CWVR3]
    errors = layers.layer_errors(runs, S, 'layer5')
    assert errors == {
        'baseline': {'layer5': BASE},
        'cw_vr': {'layer5': CWVR5, 'layer3': CWVR3},
        'dropout': {'layer5': DROPOUT},
    }


def test_document_cells_are_paired_by_seed():
    doc = layers.document(_runs(), LAYERS, 'layer5')
    lines = doc.splitlines()
    assert lines[0] == f'# Figure 3: {S}, 50 epochs'
    assert lines[2].startswith('Runs: ') and lines[2] == report.protocol_line(
        [S] + [f'{S}@{layer}' for layer in LAYERS], [r for r in _runs() if r.regularizer != 'dropout']
    )
    means = 'Test error (%), mean ± std over the final seeds'
    for column, errors in (('layer3', CWVR3), ('layer5 (default)', CWVR5)):
        v = list(errors.values())
        assert _cell(doc, means, 'cw-VR', column) == f'{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f} (n=4)'
    assert _cell(doc, means, 'cw-VR', 'layer1') == report.MISSING
    b = np.array(list(BASE.values()))
    assert f'Baseline (no regularizer): {b.mean():.2f} ± {b.std(ddof=1):.2f} (n=5).' in lines
    minus_base = 'Minus the baseline, paired by seed'
    minus_default = 'Minus the same regularizer on layer5, paired by seed'
    assert _cell(doc, minus_base, 'cw-VR', 'layer3') == _expected_gain(CWVR3, BASE)
    assert _cell(doc, minus_base, 'cw-VR', 'layer5 (default)') == _expected_gain(CWVR5, BASE)
    assert _cell(doc, minus_default, 'cw-VR', 'layer3') == _expected_gain(CWVR3, CWVR5)
    assert '(n=3, ' in _cell(doc, minus_default, 'cw-VR', 'layer3')  # seeds 11-13 only
    assert _cell(doc, minus_default, 'cw-VR', 'layer1') == report.MISSING
    assert _cell(doc, minus_default, 'cw-VR', 'layer5 (default)') == '(reference)'
    assert "λ on every layer: the sweep's choice on layer5 (cw-VR 0.1)" in doc
    assert _cell(doc, minus_base, 'cw-VR', 'layer3').startswith('-')  # cw-VR has the lower error
    # Dropout has no layer runs: not a row of any table.
    assert not any(line.startswith('| Dropout') for line in lines)
    assert doc.count('\n| cw-VR |') == 3


def test_document_heading_states_a_short_run():
    doc = layers.document(_runs(layer3_epochs=10), LAYERS, 'layer5')
    assert doc.splitlines()[0].startswith(f'# Figure 3: {S}, 10 and 50 epochs')
    # The figure's title is the heading's: dropout's 10-epoch runs (not a row) reach neither.
    data = layers._figure_data(_runs(), LAYERS, 'layer5')  # pylint: disable=protected-access
    assert data.length == '50 epochs' and data.regularizers == ['cw_vr']
    assert "shorter than the paper's 50" in doc.splitlines()[0]


def test_layer_scenario():
    assert layers.layer_scenario(_runs()) == S
    with pytest.raises(ValueError, match='none'):
        layers.layer_scenario([r for r in _runs() if '@' not in r.scenario])
    with pytest.raises(ValueError, match='size1k'):
        layers.layer_scenario(_runs() + [_run('mnist_mlp/size1k@layer3', 'cw_vr', 11, 7.0)])


def _record(run):
    raw = {**vars(run), 'status': 'finished', 'penalty_value': None, 'wall_time_s': 1.0, 'steps': None}
    return {k: raw.get(k) for k in report.RECORD_FIELDS}


def test_manifest_renders_the_layer_document(tmp_path):
    runs, paths = _runs(), []
    for name, part in (
        ('sweep', [r for r in runs if '@' not in r.scenario]),
        ('layers', [r for r in runs if '@' in r.scenario]),
    ):
        paths.append(str(tmp_path / f'{name}.jsonl'))
        with open(paths[-1], 'w') as f:
            f.writelines(json.dumps(_record(r)) + '\n' for r in part)
    entry = {'out': 'out/fig3.md', 'records': ['sweep.jsonl', 'layers.jsonl'], 'layers': LAYERS}
    (tmp_path / 'm.json').write_text(json.dumps([{**entry, 'default_layer': 'layer5'}]))
    assert records.write_manifest(str(tmp_path / 'm.json'), root=str(tmp_path)) == ['out/fig3.md']
    written = (tmp_path / 'out' / 'fig3.md').read_text()
    assert written == layers.document(records.load_records(paths).runs, LAYERS, 'layer5')
    assert '# Figure 3: mnist_mlp/default, 50 epochs' in written
    (tmp_path / 'bad.json').write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match='default_layer'):
        records.read_manifest(str(tmp_path / 'bad.json'))


def test_figure_returns_mean_and_std(tmp_path):
    path = tmp_path / 'fig3.png'
    results = layers.figure(_runs(), LAYERS, 'layer5', str(path))
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert set(results) == {'cw_vr', 'baseline'}
    assert set(results['cw_vr']) == {'layer3', 'layer5'}
    for got, errors in ((results['cw_vr']['layer3'], CWVR3), (results['cw_vr']['layer5'], CWVR5)):
        v = list(errors.values())
        assert got == pytest.approx((np.mean(v), np.std(v, ddof=1)), rel=1e-12)
    assert results['baseline'] == pytest.approx(
        (np.mean(list(BASE.values())), np.std(list(BASE.values()), ddof=1))
    )


def test_launch_figures_draws_the_committed_figure3_from_records(tmp_path):
    """The README's command rebuilds figure3.md from the committed records alone, byte for byte."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(repo, 'docs', 'results')
    paths = [os.path.join(results, 'records', f'mnist_mlp_{n}.jsonl') for n in ('default', 'layers')]
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, 'launch', 'figures.py'),
            '--layers=layer1,layer2,layer3,layer4,layer5,layer6',
            f'--records={",".join(paths)}',
            f'--out={tmp_path}',
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / 'figure3.md') as a, open(os.path.join(results, 'figure3.md')) as b:
        assert a.read() == b.read()
    assert (tmp_path / 'figure3.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
