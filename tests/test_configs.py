"""Configs are data: loading one imports only ml_collections and cwreg.names (no TensorFlow, tfds, orbax,
clu, not even JAX), quickly; cwreg.names agrees with the penalty library; every regularizer loads."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `configs` is a top-level package of the repository, not of cwreg.
    sys.path.insert(0, REPO_ROOT)

from configs import cifar10_cnn, cifar100_cnn, default, mnist_autoencoder, mnist_mlp, resnet  # noqa: E402
from cwreg import names, penalties  # noqa: E402

CONFIGS = sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, 'configs')) if f.endswith('.py') and f != '__init__.py'
)
HEAVY = ('tensorflow', 'tensorflow_datasets', 'orbax', 'clu', 'jax')

# What `--config=configs/NAME.py:ARG` does (ml_collections' config_flags): load the file as a module, call
# get_config(ARG); timed from before the first import.
_LOAD = r"""
import importlib.util, json, sys, time
start = time.perf_counter()
name, arg = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(arg) if arg else module.get_config()
seconds = time.perf_counter() - start
heavy = sorted(m for m in sys.modules if m.split('.')[0] in json.loads(sys.argv[3]))
print(json.dumps({'seconds': seconds, 'heavy': heavy, 'scenario': config.scenario}))
"""


@pytest.mark.parametrize('name', CONFIGS)
def test_loading_a_config_imports_nothing_heavy_and_is_quick(name):
    arg = {'default': None, 'resnet': 'resnet32,cw_vr'}.get(name, 'cw_vr')
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, '-c', _LOAD, name, arg or '', json.dumps(HEAVY)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded['heavy'] == [], f'configs/{name}.py imports {loaded["heavy"]}'
    assert loaded['seconds'] < 3.0, loaded


def test_names_module_imports_nothing_heavy():
    code = (
        'import sys, json; import cwreg.names; '
        'print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))' % (HEAVY,)
    )
    proc = subprocess.run(
        [sys.executable, '-c', code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_names_agree_with_the_penalty_library():
    assert names.PENALTIES == tuple(penalties.PENALTIES)
    assert names.WEIGHT_PENALTIES == tuple(penalties.WEIGHT_PENALTIES)
    assert set(names.DISPLAY_NAMES) == set(names.REGULARIZERS)
    assert set(names.UNSEARCHED) <= set(names.REGULARIZERS)
    assert set(names.SWEEP_REGULARIZERS) <= set(names.REGULARIZERS)


@pytest.mark.parametrize('family', [default, mnist_mlp, cifar10_cnn, cifar100_cnn, mnist_autoencoder, resnet])
def test_every_family_has_a_weight_for_every_regularizer(family):
    assert set(family.WEIGHTS) == set(names.REGULARIZERS)


@pytest.mark.parametrize('family', [mnist_mlp, cifar10_cnn, cifar100_cnn])
def test_dropout_and_batchnorm_configs_load(family):
    """Issue #14: `--config=configs/mnist_mlp.py:dropout` (and the CNNs') trains dropout at the family's rate
    (the MLP: the one its search chose; the CNNs, unsearched: 0.5), and `:batchnorm` batch norm; both validate."""
    from cwreg.training import config as config_lib
    from cwreg.training import registry

    dropout, batchnorm = family.get_config('dropout'), family.get_config('batchnorm')
    rate = family.WEIGHTS['dropout']
    assert 0 < rate < 1 and (dropout.model.dropout, dropout.model.batchnorm) == (rate, False)
    assert (batchnorm.model.dropout, batchnorm.model.batchnorm) == (0.0, True)
    assert registry.regularizer_name(dropout) == 'dropout' and registry.regularizer_weight(dropout) == rate
    assert registry.regularizer_name(batchnorm) == 'batchnorm'
    config_lib.validate_config(dropout)
    config_lib.validate_config(batchnorm)


@pytest.mark.parametrize('family,arg', [(mnist_autoencoder, ''), (resnet, 'resnet32,')])
@pytest.mark.parametrize('regularizer', ['dropout', 'batchnorm'])
def test_families_without_dropout_or_batchnorm_reject_them(family, arg, regularizer):
    from cwreg.training import config as config_lib

    config = family.get_config(arg + regularizer)  # loads; the trainer rejects it
    with pytest.raises(config_lib.ConfigError, match=f'config.model.{regularizer}'):
        config_lib.validate_config(config)


def test_set_regularizer_rejects_unknown_names_with_the_trainers_error():
    from cwreg.training import config as config_lib

    with pytest.raises(config_lib.ConfigError, match='Unknown regularizer'):
        names.set_regularizer(default.get_config(), 'decov', 1.0)
