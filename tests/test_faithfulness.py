"""The two-variant comparison (TF 1.x check) against scipy's Welch test and a hand computation."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cwreg.experiments import faithfulness, records

SEEDS = (1, 2, 3, 4, 5)


def _write(path, errors_by_reg, weight=1.0):
    lines = []
    for reg, errors in errors_by_reg.items():
        for seed, error in zip(SEEDS, errors):
            lines.append(
                {
                    'scenario': 'mnist_mlp/default',
                    'regularizer': reg,
                    'weight': 0.0 if reg == 'baseline' else weight,
                    'seed': seed,
                    'phase': 'final',
                    'eval_split': 'test',
                    'epochs': 50,
                    'steps': 25000,
                    'error': error,
                    'loss': 0.1,
                    'penalty_value': 0.0,
                    'status': 'finished',
                    'wall_time_s': 1.0,
                    'commit': 'abc1234',
                    'stats': None,
                }
            )
    path.write_text(''.join(json.dumps(l) + '\n' for l in lines))
    return str(path)


A = {'baseline': [2.7, 2.6, 2.9, 2.8, 2.75], 'cw_vr': [2.4, 2.5, 2.45, 2.3, 2.6]}
B = {'baseline': [2.65, 2.8, 2.7, 2.9, 2.6], 'cw_vr': [2.6, 2.5, 2.7, 2.55, 2.65]}


def _cells(text, name):
    row = next(l for l in text.splitlines() if l.startswith(f'| {name} |'))
    return [c.strip() for c in row.strip('|').split('|')]


def test_variant_difference_is_welchs_test(tmp_path):
    a, b = _write(tmp_path / 'a.jsonl', A), _write(tmp_path / 'b.jsonl', B)
    text = faithfulness.render(['A', 'B'], [a, b])
    cells = _cells(text, 'Baseline')
    welch = scipy_stats.ttest_ind(B['baseline'], A['baseline'], equal_var=False)
    diff = np.mean(B['baseline']) - np.mean(A['baseline'])
    low, high = welch.confidence_interval(0.95)
    assert cells[4] == f'{diff:+.2f} [{low:+.2f}, {high:+.2f}] (p={welch.pvalue:.2g})'


def test_difference_of_paired_gains(tmp_path):
    a, b = _write(tmp_path / 'a.jsonl', A), _write(tmp_path / 'b.jsonl', B)
    cells = _cells(faithfulness.render(['A', 'B'], [a, b]), 'cw-VR')
    da = np.subtract(A['cw_vr'], A['baseline'])
    db = np.subtract(B['cw_vr'], B['baseline'])
    sa, sb = np.std(da, ddof=1) ** 2 / 5, np.std(db, ddof=1) ** 2 / 5
    dof = (sa + sb) ** 2 / (sa**2 / 4 + sb**2 / 4)
    diff, half = db.mean() - da.mean(), scipy_stats.t.ppf(0.975, dof) * np.sqrt(sa + sb)
    assert cells[7].startswith(f'{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}]')
    paired_a = scipy_stats.ttest_rel(A['cw_vr'], A['baseline'])
    assert cells[5].endswith(f'(p={paired_a.pvalue:.2g})') and cells[5].startswith(f'{da.mean():+.2f}')


def test_variants_of_other_lambda_are_refused(tmp_path):
    a, b = _write(tmp_path / 'a.jsonl', A), _write(tmp_path / 'b.jsonl', B, weight=0.1)
    with pytest.raises(ValueError, match='other λ'):
        faithfulness.render(['A', 'B'], [a, b])


def test_manifest_entry_with_variants(tmp_path):
    _write(tmp_path / 'a.jsonl', A), _write(tmp_path / 'b.jsonl', B)
    text = records.render_entry(
        {'out': 'x.md', 'records': ['a.jsonl', 'b.jsonl'], 'variants': ['A', 'B']}, root=str(tmp_path)
    )
    assert text.startswith('# B vs A') and '| cw-VR | 1 |' in text and 'commit abc1234' in text


def test_baseline_variants_table_counts_the_networks_that_trained(tmp_path):
    dead, alive = [88.65, 60.0, 88.65, 62.0, 64.0], [50.0, 40.0, 30.0, 35.0, 45.0]
    a = _write(tmp_path / 'a.jsonl', {'baseline': dead})
    b = _write(tmp_path / 'b.jsonl', {'baseline': alive})
    text = faithfulness.document(['as is', 'bias'], [a, b], title='Width 2')
    assert text.startswith('# Width 2\n')
    assert _cells(text, 'as is')[3:] == ['3/5', f'{np.mean([60.0, 62.0, 64.0]):.2f}']
    assert _cells(text, 'bias')[2].startswith(f'{np.mean(alive):.2f} ± {np.std(alive, ddof=1):.2f}')
