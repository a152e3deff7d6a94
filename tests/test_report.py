"""Tests for cwreg.experiments.report, launch/report.py and cwreg/experiments/paper_results.json."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from conftest import SHARED_DATA
import numpy as np
import pytest

from cwreg.experiments import report
from cwreg.experiments import stats as stats_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------
# Fake sweep.

_BASELINE_FINAL = [2.80, 2.90, 2.85, 2.95, 2.75]  # mean 2.85, std ddof=1 0.079 (ddof=0 would be 0.071)
_CW_VR_FINAL = [2.40, 2.42, 2.44, 2.41, 2.43]  # mean 2.42, std ddof=1 0.016
_VR_FINAL = [2.60, 2.70, 2.65]  # only 3 of 5 finished
_CW_VR_SELECT = {0.001: 2.9, 0.01: 2.5, 0.1: 2.5, 1.0: 2.7, 10.0: 3.5}  # tie 0.01 / 0.1 -> 0.01
_AE_FINAL = [0.0120, 0.0118, 0.0119, 0.0121, 0.0117]
_BASELINE_STATS = [dict(zip(stats_lib.STAT_KEYS, [5.0 + s, 2.0, 0.3, 0.2, 9.0, 1.3])) for s in range(5)]


def _write(root, name, payload):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, 'results.json')
    with open(path, 'w') as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload))
    return d


def _run(scenario, reg, weight, seed, phase, error, status='finished', loss=0.1):
    return {
        'scenario': scenario,
        'regularizer': reg,
        'weight': weight,
        'seed': seed,
        'phase': phase,
        'eval_split': 'validation' if phase == 'select' else 'test',
        'error': error,
        'loss': loss,
        'penalty_value': 0.0,
        'epochs': 1,
        'wall_time_s': 1.0,
        'status': status,
        'config': {},
    }


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('sweep'))
    mlp = os.path.join(root, 'mnist_mlp')  # directory names deliberately differ from the lead's layout
    s = 'mnist_mlp/default'
    _write(mlp, 'baseline/select_w0', _run(s, 'baseline', 0.0, 0, 'select', 3.0))
    for seed, err in enumerate(_BASELINE_FINAL):
        d = _write(mlp, f'baseline/final_s{seed}', _run(s, 'baseline', 0.0, seed, 'final', err))
        with open(os.path.join(d, 'stats.json'), 'w') as f:
            json.dump(_BASELINE_STATS[seed], f)
    for w, err in _CW_VR_SELECT.items():
        _write(mlp, f'cwvr/sel_{w}', _run(s, 'cw_vr', w, 0, 'select', err))
    _write(mlp, 'cwvr/sel_100', _run(s, 'cw_vr', 100.0, 0, 'select', 1.0, status='running'))
    for seed, err in enumerate(_CW_VR_FINAL):
        _write(mlp, f'cwvr/fin_{seed}', _run(s, 'cw_vr', 0.01, seed, 'final', err))
    _write(mlp, 'vr/sel_1', _run(s, 'vr', 1.0, 0, 'select', 2.8))
    for seed, err in enumerate(_VR_FINAL):
        _write(mlp, f'vr/fin_{seed}', _run(s, 'vr', 1.0, seed, 'final', err))
    for seed in (3, 4):
        _write(mlp, f'vr/fin_{seed}', _run(s, 'vr', 1.0, seed, 'final', None, status='running'))
    _write(mlp, 'cr/sel_10', _run(s, 'cr', 10.0, 0, 'select', 2.6))  # selected, finals never ran
    _write(mlp, 'l1r/sel_0.1', _run(s, 'l1r', 0.1, 0, 'select', 2.55))
    _write(mlp, 'l1r/fin_0', _run(s, 'l1r', 0.1, 0, 'final', 2.50))
    _write(mlp, 'broken', '{not json')
    # Another scenario of Table 7: cw-CR best there.
    s5 = 'mnist_mlp/size5k'
    for reg, errs in {'baseline': [6.1, 6.3], 'cw_cr': [5.7, 5.9]}.items():
        for seed, err in enumerate(errs):
            _write(
                mlp,
                f'{reg}5k/fin_{seed}',
                _run(s5, reg, 0.0 if reg == 'baseline' else 1.0, seed, 'final', err),
            )
    # Autoencoder (Table 10): error is null, loss is the MSE.
    ae = os.path.join(root, 'ae')
    for seed, mse in enumerate(_AE_FINAL):
        _write(
            ae,
            f'cwvr/f{seed}',
            _run('mnist_autoencoder/default', 'cw_vr', 0.1, seed, 'final', None, loss=mse),
        )
    _write(ae, 'cwvr/s', _run('mnist_autoencoder/default', 'cw_vr', 0.1, 0, 'select', None, loss=0.013))
    # A scenario the paper does not have.
    _write(root, 'toy/x', _run('toy/default', 'baseline', 0.0, 0, 'final', 50.0))
    return root


def _section(text, heading_prefix):
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(heading_prefix))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('#')), len(lines))
    return lines[start + 1 : end]


def _table(section_lines):
    rows = [l for l in section_lines if l.startswith('|')]
    header = [c.strip() for c in rows[0].strip('|').split('|')]
    body = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        body[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header, body


@pytest.fixture(scope='module')
def text(sweep):
    loaded = report.load_runs([sweep])
    return report.render_report([sweep], loaded)


# ----------------------------------------------------------------------------------------------------------
# Unit behaviour.


def test_load_runs_skips_unfinished_and_broken(sweep):
    loaded = report.load_runs([sweep])
    assert loaded.num_unfinished == 3
    assert len(loaded.unreadable) == 1 and loaded.unreadable[0].endswith(
        os.path.join('broken', 'results.json')
    )
    assert all(r.phase in ('select', 'final') for r in loaded.runs)
    finals = [
        r
        for r in loaded.runs
        if r.scenario == 'mnist_mlp/default' and r.regularizer == 'vr' and r.phase == 'final'
    ]
    assert sorted(r.metric for r in finals) == sorted(_VR_FINAL)


def test_duplicate_sweep_dirs_are_counted_once(sweep):
    once = report.load_runs([sweep])
    twice = report.load_runs([sweep, sweep])
    assert len(twice.runs) == len(once.runs)


def test_summarize_uses_sample_std():
    s = report.summarize(_BASELINE_FINAL)
    assert s.mean == pytest.approx(2.85)
    assert s.std == pytest.approx(np.std(_BASELINE_FINAL, ddof=1))
    assert s.n == 5 and s.best == 2.75
    assert report.summarize([1.0]).std is None
    assert report.summarize([]) is None


def _select_runs(values):
    return [report.Run('s', 'vr', w, 0, 'select', 'validation', e, None, 'p') for w, e in values.items()]


def test_select_weight_lowest_validation_and_tie_rule():
    assert report.select_weight(_select_runs(_CW_VR_SELECT))[0] == 0.01
    assert report.select_weight(_select_runs({100.0: 1.0, 0.1: 1.0, 1.0: 1.0}))[0] == 0.1
    assert report.select_weight(_select_runs({100.0: 0.9, 0.1: 1.0}))[0] == 100.0
    finals_only = [report.Run('s', 'vr', 1.0, 0, 'final', 'test', 1.0, None, 'p')]
    assert report.select_weight(finals_only) == (None, {})


def test_select_weight_averages_seeds():
    runs = [
        report.Run('s', 'vr', 1.0, k, 'select', 'validation', e, None, 'p') for k, e in enumerate([1.0, 3.0])
    ]
    runs.append(report.Run('s', 'vr', 10.0, 0, 'select', 'validation', 1.5, None, 'p'))
    chosen, summaries = report.select_weight(runs)
    assert chosen == 10.0 and summaries[1.0].mean == 2.0 and summaries[1.0].n == 2


# ----------------------------------------------------------------------------------------------------------
# The markdown.


def test_table7_cells(text):
    header, body = _table(_section(text, '## Table 7'))
    default = 'Default (`mnist_mlp/default`)'
    assert list(body) == ['Baseline', 'L1W', 'L2W', 'CR (DeCov)', 'cw-CR', 'VR', 'cw-VR', 'L1R']
    std = np.std(_CW_VR_FINAL, ddof=1)
    assert body['cw-VR'][default] == f'**2.42 ± {std:.2f}** (n=5, λ=0.01; paper 2.42 ± 0.06)'
    assert body['Baseline'][default] == '2.85 ± 0.08 (n=5; paper 2.85 ± 0.11)'  # ddof=1: 0.079 -> 0.08
    assert body['VR'][default].startswith('2.65 ± 0.05 (n=3, 2 running, λ=1;')
    assert body['CR (DeCov)'][default] == '— (λ=10; paper 2.50 ± 0.05)'  # selected but never run
    assert body['L1W'][default] == '— (paper 2.85 ± 0.06)'
    assert body['L1R'][default] == '2.50 (n=1, λ=0.1)'  # no paper number, no std for n=1
    # Other column: cw-CR is best, with one seed fewer than five.
    k5 = 'Data size 5k (`mnist_mlp/size5k`)'
    assert body['cw-CR'][k5].startswith('**5.80 ± 0.14** (n=2')
    assert body['Baseline'][k5].startswith('6.20 ± 0.14 (n=2')
    assert '**' not in body['cw-VR'][k5] and body['cw-VR'][k5].startswith('—')
    # Unrun columns show the paper only.
    assert body['VR']['Layer width 8 (`mnist_mlp/width8`)'] == '— (paper 9.22 ± 0.28)'


def test_exactly_one_bold_per_column_with_data(text):
    _, body = _table(_section(text, '## Table 7'))
    for column in ('Default (`mnist_mlp/default`)', 'Data size 5k (`mnist_mlp/size5k`)'):
        assert sum(cell.startswith('**') for row in body.values() for cell in [row[column]]) == 1
    assert not any(row['Layer width 2 (`mnist_mlp/width2`)'].startswith('**') for row in body.values())


def test_bold_marks_ties_at_display_precision(tmp_path):
    for reg, errs in {'vr': [2.001, 2.002], 'cw_vr': [2.0, 2.001], 'cr': [2.5, 2.5]}.items():
        for seed, err in enumerate(errs):
            _write(str(tmp_path), f'{reg}{seed}', _run('mnist_mlp/width2', reg, 1.0, seed, 'final', err))
    out = report.render_report([str(tmp_path)], report.load_runs([str(tmp_path)]))
    _, body = _table(_section(out, '## Table 7'))
    col = 'Layer width 2 (`mnist_mlp/width2`)'
    assert body['VR'][col].startswith('**2.00') and body['cw-VR'][col].startswith('**2.00')
    assert not body['CR (DeCov)'][col].startswith('**')


def test_tables_without_data_say_not_run(text):
    for heading in ('## Table 2', '## Table 3', '## Table 4', '## Table 8', '## Table 9'):
        section = '\n'.join(_section(text, heading))
        assert 'Not run' in section and '|' not in section, heading


def test_table5(text):
    header, body = _table(_section(text, '## Table 5'))
    assert header[2:] == [stats_lib.STAT_TITLES[k] for k in stats_lib.STAT_KEYS]
    amp = np.mean([s['activation_amplitude'] for s in _BASELINE_STATS])
    amp_std = np.std([s['activation_amplitude'] for s in _BASELINE_STATS], ddof=1)
    assert body['Baseline']['ACTIVATION AMPLITUDE'] == f'{amp:.2f} ± {amp_std:.2f} (n=5; paper 4.93)'
    assert body['Baseline']['COVARIANCE (CR)'] == '2.00 ± 0.00 (n=5; paper 2.08)'
    assert body['cw-VR']['N CW VARIANCE (cw-VR)'] == '— (paper 0.74)'  # no stats.json
    assert body['cw-VR']['Test error (%)'].startswith('**2.42')


def test_table10_autoencoder_mse(text):
    _, body = _table(_section(text, '## Table 10'))
    col = 'Mean Squared Error (`mnist_autoencoder/default`)'
    mean, std = np.mean(_AE_FINAL), np.std(_AE_FINAL, ddof=1)
    assert body['cw-VR'][col] == f'**{mean:.2e} ± {std:.2e}** (n=5, λ=0.1; paper 1.19e-02 ± 2.48e-04)'
    assert body['Baseline'][col] == '— (paper 1.44e-02 ± 3.36e-04)'
    assert 'L1W' not in body  # the paper has no L1W/L2W row here and we have no data


def test_other_scenarios_are_not_dropped(text):
    section = '\n'.join(_section(text, '## Other scenarios'))
    assert 'Test error (%) (`toy/default`)' in section and '| **50.00** (n=1) |' in section


def test_lambda_search_table(text):
    header, body = _table(_section(text, '### `mnist_mlp/default`'))
    assert header[1:] == ['λ=0', 'λ=0.001', 'λ=0.01', 'λ=0.1', 'λ=1', 'λ=10', 'λ=100']
    row = body['cw-VR']
    assert row['λ=0.01'] == '**2.50**' and row['λ=0.1'] == '2.50'
    assert row['λ=100'] == 'running'  # unfinished: shown, never used
    assert row['λ=0.001'] == '2.90' and body['VR']['λ=0.1'] == '—'
    assert body['Baseline']['λ=0'] == '**3.00**'
    assert '### `mnist_autoencoder/default` (validation MSE)' in text


def test_header_counts(text):
    assert 'unreadable' in text and '3 not finished (treated as missing: 3 running)' in text


def test_launch_script_writes_file(sweep, tmp_path):
    out = tmp_path / 'results' / 'tables.md'
    proc = subprocess.run(
        [sys.executable, os.path.join(_REPO, 'launch', 'report.py'), f'--sweep_dirs={sweep}', f'--out={out}'],
        capture_output=True,
        text=True,
        cwd=_REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == report.render_report([sweep], report.load_runs([sweep]))


# ----------------------------------------------------------------------------------------------------------
# The paper's numbers.


@pytest.fixture(scope='module')
def paper():
    return report.load_paper_results()


def _classification_columns(paper):
    return {k: v for k, v in paper['scenarios'].items() if v['tables'][0] in ('7', '8', '9')}


def test_paper_has_20_classification_scenarios_with_7_rows(paper):
    cols = _classification_columns(paper)
    assert len(cols) == 20  # "We have tested a total of 20 scenarios"
    for name, col in cols.items():
        assert list(col['values']) == paper['regularizers'], name
        for v in col['values'].values():
            assert isinstance(v['mean'], float) and isinstance(v['std'], float) and 0 < v['std'] < v['mean']


def test_paper_bold_is_the_minimum_and_tally_matches_text(paper):
    tally = collections.Counter()
    for name, col in _classification_columns(paper).items():
        means = {r: v['mean'] for r, v in col['values'].items()}
        best = min(means.values())
        assert [r for r, m in means.items() if m == best] == col['best'], name
        tally[col['best'][0]] += 1
    # "the best performing one was cw-VR for 11 cases, VR for 5 cases, cw-CR for 2 cases, and CR for 1 case
    # ... the baseline performed the best for only one case".
    assert tally == {'cw_vr': 11, 'vr': 5, 'cw_cr': 2, 'cr': 1, 'baseline': 1}


def test_paper_cross_table_consistency(paper):
    sc = paper['scenarios']
    assert '2' in sc['cifar10_cnn/default']['tables'] and '2' in sc['cifar10_cnn/momentum']['tables']
    assert {'3'} <= set(sc['cifar100_cnn/classes16']['tables'])
    t5 = paper['table5']['values']
    for reg, row in t5.items():
        assert row['test_error'] == sc['mnist_mlp/default']['values'][reg]
        assert set(row) == {'test_error', *stats_lib.STAT_KEYS}
    assert t5['cw_vr']['n_cw_variance'] == 0.74 and t5['baseline']['variance'] == 9.05
    # Tables 2/3: "cw-VR achieves the best performance in 4 out of 5 cases".
    t23 = [
        'cifar10_cnn/default',
        'cifar10_cnn/momentum',
        'cifar100_cnn/classes16',
        'cifar100_cnn/classes64',
        'cifar100_cnn/default',
    ]
    assert sum(sc[s]['best'] == ['cw_vr'] for s in t23) == 4


def test_paper_table4_and_table10(paper):
    r110 = paper['scenarios']['resnet110/default']['values']
    assert r110['cw_vr'] == {'best': 6.00, 'mean': 6.18, 'std': 0.15, 'n': 5}
    assert paper['scenarios']['resnet32/default']['values']['cw_vr']['mean'] == 7.17
    ae = paper['scenarios']['mnist_autoencoder/default']['values']
    assert ae['baseline']['mean'] == pytest.approx(1.44e-2) and ae['cw_vr']['mean'] == pytest.approx(1.19e-2)
    assert min(ae, key=lambda r: ae[r]['mean']) == 'cw_vr'
    assert any('L1R' in n for n in paper['notes'])


def test_paper_values_match_extracted_text(paper):
    # Where the paper's text extraction is available, every column must be found verbatim in it, with the
    # bold value repeated three times as the extraction does.
    path = os.path.join(SHARED_DATA, os.pardir, 'paper', 'choi-rhee-2019-class-wise-regularizers.txt')
    if not os.path.exists(path):
        pytest.skip('paper text not available')
    lines = [l.strip() for l in open(path, encoding='utf-8').read().splitlines()]
    for name, col in _classification_columns(paper).items():
        seq = []
        for reg in paper['regularizers']:
            v = col['values'][reg]
            s = (
                '82.3 ± 0.6'
                if (name, reg) == ('cifar100_cnn/size5k', 'l1w')
                else f'{v["mean"]:.2f} ± {v["std"]:.2f}'
            )
            seq += [s] * (3 if reg in col['best'] else 1)
        assert any(lines[i : i + 9] == seq for i in range(len(lines))), name


def test_table4_resnet110_best_mean_std(tmp_path):
    errs = {
        'baseline': [6.3, 6.2, 6.4, 6.35, 6.25],
        'cw_vr': [6.25, 6.05, 6.3, 6.2, 6.15],
        'vr': [6.1, 6.2, 6.1],
    }
    for reg, values in errs.items():
        for seed, err in enumerate(values):
            _write(
                str(tmp_path),
                f'{reg}{seed}',
                _run('resnet110/default', reg, 0.0 if reg == 'baseline' else 1.0, seed, 'final', err),
            )
    out = report.render_report([str(tmp_path)], report.load_runs([str(tmp_path)]))
    _, body = _table(_section(out, '## Table 4'))
    col = 'ResNet-110 (`resnet110/default`)'
    b = errs['baseline']
    assert body['Baseline'][col] == (
        f'6.20 ({np.mean(b):.2f} ± {np.std(b, ddof=1):.2f}) (n=5; paper 6.12 (6.31 ± 0.14))'
    )
    # Bolded by the best run (6.05), not by the mean (VR's 6.13 < cw-VR's 6.19).
    assert body['cw-VR'][col].startswith('**6.05 (') and not body['VR'][col].startswith('**')
    assert body['He et al. 2016 (paper only)'][col] == '— (paper 6.43 (6.61 ± 0.16))'
    assert body['Baseline']['ResNet-32 (`resnet32/default`)'] == '— (paper 7.39 (mean of 2))'
    assert 'L1W' not in body and 'L1R' not in body


def test_diverged_runs_are_reported_not_averaged(tmp_path):
    s = 'mnist_mlp/width8'
    _write(str(tmp_path), 'a', _run(s, 'vr', 100.0, 0, 'select', None, status='diverged', loss=None))
    _write(str(tmp_path), 'b', _run(s, 'vr', 1.0, 0, 'select', 9.5))
    _write(str(tmp_path), 'c', _run(s, 'vr', 1.0, 0, 'final', 9.0))
    _write(str(tmp_path), 'd', _run(s, 'vr', 1.0, 1, 'final', None, status='diverged', loss=None))
    _write(str(tmp_path), 'e', _run('mnist_mlp/width2', 'cr', 1.0, 0, 'final', None, status='running'))
    out = report.render_report([str(tmp_path)], report.load_runs([str(tmp_path)]))
    _, body = _table(_section(out, '## Table 7'))
    assert (
        body['VR']['Layer width 8 (`mnist_mlp/width8`)']
        == '**9.00** (n=1, 1 diverged, λ=1; paper 9.22 ± 0.28)'
    )
    assert body['CR (DeCov)']['Layer width 2 (`mnist_mlp/width2`)'] == '— (1 running; paper 34.80 ± 0.25)'
    _, lam = _table(_section(out, '### `mnist_mlp/width8`'))
    assert lam['VR']['λ=100'] == 'diverged' and lam['VR']['λ=1'] == '**9.50**'


# ----------------------------------------------------------------------------------------------------------
# Paired statistics (gains over the baseline), the paper comparison, short runs, dropout / batch norm.

_T975 = {9: 2.2621571627982, 4: 2.7764451051977987}  # Student t quantiles t_{0.975, dof}


def _hand_paired(a, b):
    """Mean, SE, 95 % CI of a − b over common seeds, by hand in float64 (no numpy statistics)."""
    seeds = sorted(set(a) & set(b))
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    se = sd / n**0.5
    return mean, se, mean - _T975[n - 1] * se, mean + _T975[n - 1] * se


def _t_two_sided_p(t, dof, steps=20000):
    """2·P(T > |t|) by Simpson's rule on Student's density, independent of scipy."""
    import math

    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    pdf = lambda x: c * (1 + x * x / dof) ** (-(dof + 1) / 2)
    h = abs(t) / steps
    area = pdf(0) + pdf(abs(t)) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, steps))
    return 1.0 - 2.0 * area * h / 3


def test_paired_difference_matches_hand_computation():
    rng = np.random.default_rng(0)
    for n in (10, 5):
        base = {s: 3.0 + 0.1 * rng.standard_normal() for s in range(n)}
        reg = {s: base[s] - 0.2 + 0.15 * rng.standard_normal() for s in range(n)}
        got = report.paired_difference(reg, base)
        mean, se, low, high = _hand_paired(reg, base)
        assert got.n == n and got.seeds == tuple(range(n))
        assert got.mean == pytest.approx(mean, abs=1e-12) and got.se == pytest.approx(se, rel=1e-10)
        assert got.low == pytest.approx(low, rel=1e-9) and got.high == pytest.approx(high, rel=1e-9)
        assert got.p == pytest.approx(_t_two_sided_p(mean / se, n - 1), abs=1e-8)


def test_paired_p_is_005_at_the_t_quantile():
    # Shift differences so that mean / SE is exactly t_{0.975, n-1}: the two-sided p must be 0.05 and the
    # CI's upper (or lower) end must touch 0.
    for dof, t in _T975.items():
        n = dof + 1
        e = np.linspace(-1.0, 1.0, n + 1)[1:] ** 3
        se = np.std(e, ddof=1) / np.sqrt(n)
        d = e - e.mean() + t * se
        got = report.paired_difference({s: float(x) for s, x in enumerate(d)}, {s: 0.0 for s in range(n)})
        assert got.p == pytest.approx(0.05, abs=1e-10)
        assert got.low == pytest.approx(0.0, abs=1e-10)


def test_paired_difference_pairs_by_seed():
    # Seed 1 has no baseline, seed 20 no regularized run; values are given in shuffled key order, and the
    # paired mean (-0.1 on every seed) differs from the unpaired difference of means.
    base = {s: float(s) for s in [3, 0, 2, 5, 4, 6, 7, 8, 9, 20]}
    reg = {s: float(s) - 0.1 for s in [8, 7, 9, 6, 5, 4, 3, 2, 1, 0]}
    got = report.paired_difference(reg, base)
    assert got.seeds == (0, 2, 3, 4, 5, 6, 7, 8, 9) and got.n == 9
    assert got.mean == pytest.approx(-0.1) and got.se == pytest.approx(0.0, abs=1e-12)
    assert report.paired_difference({0: 1.0}, {1: 1.0}) is None
    one = report.paired_difference({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.mean == 0.5 and one.low is None and one.p is None


def test_paper_gain_and_welch_comparison():
    paper = report.paper_gain({'mean': 2.42, 'std': 0.06}, {'mean': 2.85, 'std': 0.11})
    assert paper.mean == pytest.approx(-0.43) and paper.se == pytest.approx(
        np.sqrt(0.06**2 / 5 + 0.11**2 / 5)
    )
    ours = report.Paired(mean=-0.30, n=10, se=0.02, low=None, high=None, p=None, seeds=tuple(range(10)))
    v = [0.02**2, 0.06**2 / 5, 0.11**2 / 5]
    dof = sum(v) ** 2 / (v[0] ** 2 / 9 + v[1] ** 2 / 4 + v[2] ** 2 / 4)
    t = (-0.30 + 0.43) / np.sqrt(sum(v))
    assert report.differs_from_paper(ours, paper) == pytest.approx(_t_two_sided_p(t, dof), abs=1e-8)
    assert report.paper_gain({'mean': 7.39, 'n': 2}, {'mean': 7.0, 'std': 0.1}) is None  # no std: no SE


def _gains_sweep(
    root, reg_errors, base_errors, scenario='mnist_mlp/default', reg='cw_vr', epochs=50, extra=()
):
    for seed, err in enumerate(base_errors):
        _write(root, f'b{seed}', {**_run(scenario, 'baseline', 0.0, seed, 'final', err), 'epochs': epochs})
    for seed, err in enumerate(reg_errors):
        _write(root, f'r{seed}', {**_run(scenario, reg, 0.01, seed, 'final', err), 'epochs': epochs})
    for name, payload in extra:
        _write(root, name, payload)
    return report.render(report.load_runs([root]))


def test_gains_table_cell_and_significance_marker(tmp_path):
    base = [2.85 + x for x in (0.0, 0.1, -0.1, 0.05, -0.05, 0.02, -0.02, 0.08, -0.08, 0.0)]
    noise = [0.01, -0.01, 0.02, -0.02, 0.0, 0.015, -0.015, 0.005, -0.005, 0.0]
    # The paper's cw-VR gain on the default column is 2.42 - 2.85 = -0.43 (SE 0.056).
    same = _gains_sweep(str(tmp_path / 'same'), [b - 0.43 + e for b, e in zip(base, noise)], base)
    _, body = _table(_section(same, '## Table 7 gains'))
    cell = body['cw-VR']['Default (`mnist_mlp/default`)']
    mean, se, low, high = _hand_paired(
        dict(enumerate([b - 0.43 + e for b, e in zip(base, noise)])), dict(enumerate(base))
    )
    assert cell.startswith(f'{mean:+.2f} [{low:+.2f}, {high:+.2f}] (n=10, p<0.0001; paper -0.43 ± 0.06)')
    assert not cell.endswith('†')
    far = _gains_sweep(str(tmp_path / 'far'), [b - 0.10 + e for b, e in zip(base, noise)], base)
    _, body = _table(_section(far, '## Table 7 gains'))
    assert body['cw-VR']['Default (`mnist_mlp/default`)'].endswith(' †')
    # Rows with paper gains only stay; columns without our runs show the paper alone.
    assert body['L1W']['Default (`mnist_mlp/default`)'] == '— (paper +0.00 ± 0.06)'
    assert body['cw-VR − VR']['Default (`mnist_mlp/default`)'] == '— (paper -0.23 ± 0.06)'


def test_no_gains_section_without_pairs(text):
    # The fixture's autoencoder has no baseline: no Table 10 gains.
    assert '## Table 10 gains' not in text and '## Table 7 gains' in text


def test_short_runs_are_labelled_in_titles(tmp_path):
    ae = 'mnist_autoencoder/default'
    short = _gains_sweep(str(tmp_path / 'short'), [0.012] * 2, [0.014] * 2, scenario=ae, epochs=10)
    assert (
        "## Table 10: Mean squared error of deep autoencoder (MNIST) — 10 epochs, shorter than the paper's 50"
        in short.splitlines()
    )
    assert "## Table 10 gains, paired over seeds — 10 epochs, shorter than the paper's 50" in short
    full = _gains_sweep(str(tmp_path / 'full'), [0.012] * 2, [0.014] * 2, scenario=ae, epochs=50)
    assert '## Table 10: Mean squared error of deep autoencoder (MNIST)' in full.splitlines()
    assert not any('shorter' in l for l in full.splitlines() if l.startswith('#'))
    assert 'Runs: epochs 50;' in full
    mixed = _gains_sweep(
        str(tmp_path / 'mixed'),
        [0.012] * 2,
        [0.014] * 2,
        scenario=ae,
        epochs=50,
        extra=[('x', {**_run(ae, 'vr', 1.0, 0, 'final', None, loss=0.013), 'epochs': 49})],
    )
    assert "— 49 and 50 epochs: some runs shorter than the paper's 50" in mixed
    # Without an `epochs` field, config.num_epochs says how long the run was.
    d = str(tmp_path / 'config')
    payload = {**_run(ae, 'vr', 1.0, 0, 'final', None, loss=0.013), 'config': {'num_epochs': 5}}
    del payload['epochs']
    _write(d, 'x', payload)
    assert "— 5 epochs, shorter than the paper's 50" in report.render(report.load_runs([d]))
    assert report.epochs_phrase('mnist_mlp/default', [50, 50]) == '50 epochs'
    assert report.epochs_phrase('mnist_mlp/default', [1]) == "1 epoch, shorter than the paper's 50"


def test_runs_line_states_protocol(tmp_path):
    s = 'mnist_mlp/width8'
    d = str(tmp_path)
    commit = {'provenance': {'git_commit': 'abcdef0123456789'}, 'epochs': 50}
    for seed in range(10, 20):
        _write(d, f'b{seed}', {**_run(s, 'baseline', 0.0, seed, 'final', 10.0), **commit})
        _write(d, f'r{seed}', {**_run(s, 'vr', 1.0, seed, 'final', 9.0), **commit})
    for seed in range(3):
        for w in (0.1, 1.0):
            _write(
                d,
                f's{seed}_{w}',
                {
                    **_run(s, 'vr', w, seed, 'select', 9.5 - w),
                    **commit,
                    'provenance': {'git_commit': '1234567890abc-dirty'},
                },
            )
    lines = report.render(report.load_runs([d])).splitlines()
    i = lines.index('## Table 7: Error (%) for MNIST MLP model')
    assert lines[i + 2] == (
        'Runs: epochs 50; final runs n=10 per cell (seeds 10–19); λ selection: lowest mean '
        'validation metric over S=3 selection seeds per λ (seeds 0–2); commits 1234567-dirty, '
        'abcdef0.'
    )
    assert report.format_seeds([0, 1, 2, 5, 7, 8]) == '0–2, 5, 7–8'


def test_dropout_and_batchnorm_rows(tmp_path):
    d = str(tmp_path)
    s = 'mnist_mlp/default'
    for seed in range(3):
        _write(d, f'do{seed}', _run(s, 'dropout', 0.3, seed, 'final', 2.6))
        _write(d, f'bn{seed}', _run(s, 'batchnorm', 0.0, seed, 'final', 2.7))
    _write(d, 'ae', _run('mnist_autoencoder/default', 'cw_vr', 0.1, 0, 'final', None, loss=0.012))
    out = report.render(report.load_runs([d]))
    _, body = _table(_section(out, '## Table 7'))
    assert list(body) == [
        'Baseline',
        'L1W',
        'L2W',
        'Dropout',
        'Batch norm',
        'CR (DeCov)',
        'cw-CR',
        'VR',
        'cw-VR',
        'L1R',
    ]
    assert body['Dropout']['Default (`mnist_mlp/default`)'] == '**2.60 ± 0.00** (n=3, λ=0.3 (no select runs))'
    assert body['Batch norm']['Default (`mnist_mlp/default`)'] == '2.70 ± 0.00 (n=3)'  # no λ
    _, ae = _table(_section(out, '## Table 10'))
    assert 'Dropout' not in ae and 'Batch norm' not in ae


def test_dropout_bn_verdict_only_where_dropout_or_batchnorm_ran(tmp_path):
    d = str(tmp_path)
    for seed in range(3):
        for reg, value in (('baseline', 2.8), ('cw_vr', 2.5), ('dropout', 2.6), ('batchnorm', 2.7)):
            _write(
                d, f'mlp/{reg}{seed}', _run('mnist_mlp/default', reg, 0.1, seed, 'final', value + 0.01 * seed)
            )
        for reg, mse in (('baseline', 0.014), ('cw_vr', 0.012)):
            _write(
                d,
                f'ae/{reg}{seed}',
                _run('mnist_autoencoder/default', reg, 0.1, seed, 'final', None, loss=mse),
            )
    out = report.render(report.load_runs([d]))
    assert '## Table 10 gains, paired over seeds' in out
    # Table 10 has neither dropout nor batch norm: no verdict line (it read 'n/a').
    assert 'mnist_autoencoder/default`: at least one of' not in out
    assert '- `mnist_mlp/default`: at least one of cw-VR and L1R beats both dropout and batch norm: **' in out


def _verdict(values):
    cells = report.build_cells(
        [
            report.Run('s', reg, 0.1, seed, 'final', 'test', err, None, 'p')
            for reg, errs in values.items()
            for seed, err in enumerate(errs)
        ]
    )
    return report.dropout_bn_verdict(cells['s'])[0]


def test_dropout_bn_verdict():
    do = [2.6, 2.7, 2.5, 2.65, 2.55]
    bn = [2.7, 2.6, 2.65, 2.75, 2.6]
    better = [x - 0.3 + e for x, e in zip(do, (0.01, -0.01, 0.02, 0.0, -0.02))]
    assert _verdict({'dropout': do, 'batchnorm': bn, 'cw_vr': better}) == 'holds (significant)'
    # L1R alone suffices; cw-VR worse than dropout.
    assert (
        _verdict({'dropout': do, 'batchnorm': bn, 'cw_vr': [x + 0.1 for x in do], 'l1r': better})
        == 'holds (significant)'
    )
    noisy = [x - 0.05 + e for x, e in zip(do, (0.3, -0.3, 0.2, -0.2, 0.0))]
    assert min(np.mean(noisy) - np.mean(do), np.mean(noisy) - np.mean(bn)) < 0
    assert _verdict({'dropout': do, 'batchnorm': bn, 'cw_vr': noisy}) == 'holds in the means only'
    assert _verdict({'dropout': do, 'batchnorm': bn, 'cw_vr': [x + 0.2 for x in bn]}) == 'does not hold'
    # Beating dropout (significantly) but not batch norm is not enough.
    low_bn = [x - 0.5 for x in do]
    assert _verdict({'dropout': do, 'batchnorm': low_bn, 'cw_vr': better}) == 'does not hold'
    assert _verdict({'dropout': do, 'cw_vr': better}) == 'n/a'  # no batch norm row
    assert _verdict({'dropout': do, 'batchnorm': bn}) == 'n/a'  # neither cw-VR nor L1R


def test_table5_paired_correlation_differences_of_dropout(tmp_path):
    """Issue #14: 'dropout does not reduce correlation' needs dropout − baseline paired over seeds."""
    s = 'mnist_mlp/default'
    base_corr, drop_corr = [0.30, 0.32, 0.28, 0.31, 0.29], [0.27, 0.30, 0.27, 0.28, 0.28]
    for reg, weight, corr in (('baseline', 0.0, base_corr), ('dropout', 0.1, drop_corr)):
        for seed, c in enumerate(corr, start=1):
            d = _write(str(tmp_path), f'{reg}/final_s{seed}', _run(s, reg, weight, seed, 'final', 2.5))
            with open(os.path.join(d, 'stats.json'), 'w') as f:
                json.dump({**_BASELINE_STATS[0], 'correlation': c, 'cw_correlation': 2 * c}, f)
    text = report.render(report.load_runs([str(tmp_path)]))
    (line,) = [l for l in text.splitlines() if l.startswith('- Dropout − Baseline, paired over seeds:')]
    mean, _, low, high = _hand_paired(dict(enumerate(drop_corr)), dict(enumerate(base_corr)))
    assert f'CORRELATION (CR) {mean:+.3f} [{low:+.3f}, {high:+.3f}] (n=5' in line, line
    mean2, _, low2, high2 = _hand_paired(
        {i: 2 * c for i, c in enumerate(drop_corr)}, {i: 2 * c for i, c in enumerate(base_corr)}
    )
    assert f'CW CORRELATION (cw-CR) {mean2:+.3f} [{low2:+.3f}, {high2:+.3f}]' in line, line


def test_columns_of_different_protocols_get_a_runs_line_each(text):
    """The default and 5k columns of the fake sweep ran other final seeds: one merged line would mislead."""
    section = _section(text, '## Table 7:')
    runs = [l for l in section if 'Runs:' in l]
    assert [l.split(':')[0] for l in runs] == ['- `mnist_mlp/default`', '- `mnist_mlp/size5k`'], runs
    assert 'seeds 0–4' in runs[0] and 'seeds 0–1' in runs[1] or 'seeds 0, 1' in runs[1], runs


def test_table10_gains_are_relative_to_the_reference_and_compared_with_the_papers_relative_gain(tmp_path):
    # The paper's MSE scale is undefined: its gains compare only as % of the reference's MSE.
    d = str(tmp_path)
    base = [0.0140, 0.0150, 0.0162]
    cw_vr = [0.0120, 0.0131, 0.0139]
    for seed, (b, c) in enumerate(zip(base, cw_vr)):
        for reg, mse in (('baseline', b), ('cw_vr', c)):
            _write(
                d,
                f'ae/{reg}{seed}',
                _run('mnist_autoencoder/default', reg, 0.1, seed, 'final', None, loss=mse),
            )
    _, body = _table(_section(report.render(report.load_runs([d])), '## Table 10 gains'))
    cell = body['cw-VR']['Mean Squared Error (`mnist_autoencoder/default`)']
    rel = 100.0 * (np.array(cw_vr) - np.array(base)) / np.array(base)
    half = 4.302652729911275 * np.std(rel, ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    # Paper: cw-VR 1.19e-2 ± 2.48e-4, baseline 1.44e-2 ± 3.36e-4 over 5 runs; delta-method SE.
    paper = 100.0 * (0.0119 - 0.0144) / 0.0144
    paper_se = 100.0 * np.sqrt((2.48e-4 / 0.0144) ** 2 / 5 + (0.0119 * 3.36e-4 / 0.0144**2) ** 2 / 5)
    assert cell.startswith(f'{rel.mean():+.2f} [{rel.mean() - half:+.2f}, {rel.mean() + half:+.2f}] (n=3, ')
    assert f'paper {paper:+.2f} ± {paper_se:.2f})' in cell
