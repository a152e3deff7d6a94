r"""MNIST 6-layer MLP (5 hidden ReLU layers of 100 units + output), paper Table 7 and Figures 1–3.

Paper protocol: Adam, learning rate 1e-4, batch 100, 50 epochs, every regularizer on layer 5.

Command (one run; the argument is a regularizer and a scenario, both optional):

  python launch/train.py --config=configs/mnist_mlp.py:cw_vr --workdir=/tmp/mnist_cw_vr

Scenarios (Table 7 columns): default (50k/60k training images, width 100), size1k, size5k (first 1k/5k
training images), width2, width8 (hidden width). The λ below is the one our λ search picked for the default
column (docs/results/README.md; dropout: its rate); the sweep searches {0.001, …, 100} itself.

Expected: 22–28 s of training on a 2-core CPU (28–36 s for the whole command, with imports, loading and
compilation), well under a minute on one GPU; test error ≈ 2.2–2.6 % (ours, 10 seeds: baseline 2.58 ± 0.07,
cw-VR 2.40 ± 0.24, cw-CR 2.23 ± 0.14, CR 2.29 ± 0.07, VR 2.36 ± 0.14, dropout 2.20 ± 0.08; paper: baseline
2.85 ± 0.11, cw-VR 2.42 ± 0.06, cw-CR 2.49 ± 0.10, CR 2.50 ± 0.05, VR 2.65 ± 0.11).
"""

import ml_collections

from configs import default

SCENARIOS = ('default', 'size1k', 'size5k', 'width2', 'width8')
#: λ chosen by our validation search on the default scenario (mean over 3 selection seeds;
#: docs/results/README.md, tables.md); dropout's is its rate; batch norm has none.
WEIGHTS = {
    'baseline': 0.0,
    'l1w': 0.001,
    'l2w': 0.01,
    'dropout': 0.1,
    'batchnorm': 0.0,
    'cr': 100.0,
    'cw_cr': 100.0,
    'vr': 0.1,
    'cw_vr': 10.0,
    'l1r': 1.0,
}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    regularizer, scenario = default.parse_arg(arg, SCENARIOS)
    config = default.get_config()
    config.scenario = f'mnist_mlp/{scenario}'
    config.dataset.name = 'mnist'
    config.model.name = 'mlp'
    config.penalty.layer = config.weight_penalty.layer = 'layer5'
    # Table 7: data size 50k by default: the first 50k training images (the last 10k are the validation
    # split, which for MNIST the paper does not merge back).
    config.dataset.train_size = {'size1k': 1000, 'size5k': 5000}.get(scenario, 50_000)
    if scenario.startswith('width'):
        config.model.width = int(scenario[len('width') :])
    default.set_regularizer(config, regularizer, WEIGHTS[regularizer])
    return config
