"""Tests for cwreg.experiments.plots (Figures 1-3)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cwreg.experiments import plots

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == _PNG_MAGIC, 'not a PNG'
    assert data[12:16] == b'IHDR'
    width, height = struct.unpack('>II', data[16:24])
    return width, height, len(data)


def _representation(seed=0, n=400, units=6, classes=10):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, units)) * 2.0
    pre = centres[y] + rng.normal(size=(n, units))
    return pre, np.maximum(pre, 0.0), y


def test_principal_components_recovers_directions():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    sd = np.array([10.0, 4.0, 2.0, 0.5, 0.1, 0.1, 0.1, 0.1])
    x = (rng.normal(size=(3000, 8)) * sd) @ basis.T + 5.0
    pca = plots.principal_components(x, 3)
    assert pca.scores.shape == (3000, 3) and pca.components.shape == (3, 8)
    for k in range(3):
        assert abs(pca.components[k] @ basis[:, k]) > 0.99
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(pca.explained_variance, sd[:3] ** 2, rtol=0.1)
    np.testing.assert_allclose(pca.scores, (x - x.mean(axis=0)) @ pca.components.T, atol=1e-8)
    assert np.all(np.diff(pca.explained_variance) <= 0)
    # Deterministic sign: the largest-magnitude loading is positive.
    for comp in pca.components:
        assert comp[np.argmax(np.abs(comp))] > 0


def test_principal_components_pads_narrow_layers():
    x = np.random.default_rng(1).normal(size=(50, 2))
    pca = plots.principal_components(x, 3)
    assert pca.scores.shape == (50, 3)
    assert np.all(pca.scores[:, 2] == 0.0) and np.all(pca.components[2] == 0.0)


def test_most_active_units():
    z = np.zeros((10, 5))
    z[:, 3] = 2.0
    z[:, 1] = 1.0
    z[:, 4] = 1.0  # ties with unit 1: the lower index wins
    assert plots.most_active_units(z, 2) == (3, 1)


def test_plot_representation_writes_png(tmp_path, capsys):
    pre, post, y = _representation()
    path = tmp_path / 'sub' / 'rep.png'
    units = plots.plot_representation(pre, post, y, path, 'cw-VR (epoch 50)')
    assert units == plots.most_active_units(post, 2)
    assert f'units {units}' in capsys.readouterr().out
    width, height, size = _png_size(path)
    assert width >= 1000 and height >= 300 and size > 20_000


def test_plot_representation_explicit_units_and_degenerate_input(tmp_path):
    pre, post, y = _representation(units=4, classes=3)
    post[:, 2] = 0.0  # a dead unit: its histogram is empty, nothing may crash
    assert plots.plot_representation(pre, post, y, tmp_path / 'a.png', 'x', units=(2, 0)) == (2, 0)
    _png_size(tmp_path / 'a.png')
    with pytest.raises(ValueError):
        plots.plot_representation(pre, post, y, tmp_path / 'b.png', 'x', units=(0, 9))
    with pytest.raises(ValueError):
        plots.plot_representation(pre, post, y[:-1], tmp_path / 'c.png', 'x')


def test_plot_representation_grid(tmp_path):
    names = ['Baseline (init)', 'Baseline', 'CR', 'cw-CR', 'VR', 'cw-VR']
    _, _, y = _representation(seed=0)
    models = {}
    for k, name in enumerate(names):
        pre, post, _ = _representation(seed=k)
        models[name] = (pre, post)
    path = tmp_path / 'grid.png'
    chosen = plots.plot_representation_grid(
        models, y, path, title='MNIST, layer 5', units={'CR': (0, 1)}, max_points=300
    )
    assert list(chosen) == names and chosen['CR'] == (0, 1)
    width, height, size = _png_size(path)
    assert width > 1500 and height > 800 and size > 50_000


def test_plot_layer_dependency(tmp_path):
    layers = ['layer1', 'layer2', 'layer3', 'layer4', 'layer5', 'output']
    results = {
        'baseline': (2.85, 0.11),
        'cw_vr': {l: (3.0 - 0.1 * k, 0.05) for k, l in enumerate(layers)},
        'vr': {l: (3.1 - 0.05 * k, 0.08) for k, l in enumerate(layers[:4])},  # gaps allowed
    }
    path = tmp_path / 'fig3.png'
    plots.plot_layer_dependency(results, path, 'MNIST MLP', layers)
    width, height, size = _png_size(path)
    assert width >= 600 and height >= 400 and size > 10_000
    # A single-layer baseline dict is also a horizontal line; unknown layers are an error.
    plots.plot_layer_dependency(
        {'baseline': {'none': (2.9, 0.1)}, 'cr': {'layer1': (2.5, 0.1)}}, tmp_path / 'b.png', 't', ['layer1']
    )
    with pytest.raises(ValueError):
        plots.plot_layer_dependency({'cr': {'layer9': (2.5, 0.1)}}, tmp_path / 'c.png', 't', layers)
