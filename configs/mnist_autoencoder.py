r"""MNIST autoencoder 784-400-200-100-200-400-784 with the penalty on the 100-unit code, paper Table 10.

L2 reconstruction loss; class labels are used only by the class-wise penalties. Adam 1e-4, batch 100,
50 epochs (the paper's defaults).

Command:

  python launch/train.py --config=configs/mnist_autoencoder.py:cw_vr --workdir=/tmp/mnist_ae_cw_vr

The λ below are those the 50-epoch λ search chose (docs/results/legacy/README.md, Table 10; a search of the
earlier trainer, before per-run records); the sweep searches the grid itself.

Expected: about 1.5 minutes on a 2-core CPU, under a minute on one GPU; test MSE (mean over pixels, sigmoid
outputs, 5 seeds there) ≈ 3.2e-3–3.3e-3 with these λ (CR 3.22e-3, cw-CR 3.26e-3, VR 3.30e-3, cw-VR 3.27e-3),
baseline 3.66e-3. The paper's numbers are on a larger scale it does not
define (baseline 1.44e-2 ± 3.4e-4, cw-VR 1.19e-2 ± 2.5e-4, cw-CR 1.22e-2, CR and VR 1.29e-2); compare
relative reductions (paper 10–17 %).
"""

import ml_collections

from configs import default

SCENARIOS = ('default',)
#: λ of the 50-epoch search (docs/results/legacy); dropout and batch norm: rejected for the autoencoder.
WEIGHTS = {**default.WEIGHTS, 'cr': 0.01, 'cw_cr': 0.01, 'vr': 0.001, 'cw_vr': 0.001}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    regularizer, scenario = default.parse_arg(arg, SCENARIOS)
    config = default.get_config()
    config.scenario = f'mnist_autoencoder/{scenario}'
    config.dataset.name = 'mnist'
    config.model.name = 'autoencoder'
    config.penalty.layer = config.weight_penalty.layer = 'layer3'
    config.dataset.train_size = 50_000  # as the MNIST MLP (Table 7's 50k)
    default.set_regularizer(config, regularizer, WEIGHTS[regularizer])
    return config
