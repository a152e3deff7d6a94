r"""CIFAR-10 CNN of the paper's Table 6 (4 conv + FC 128 + output), paper Tables 2 and 8.

Paper protocol: Adam 1e-4 (Momentum / RMSProp scenarios), batch 100, every regularizer on the fully
connected layer ('fc'). The paper does not state the number of epochs; we use 50 like MNIST.

Command:

  python launch/train.py --config=configs/cifar10_cnn.py:cw_vr --workdir=/tmp/c10_cw_vr

Scenarios (Table 8 columns): default, size1k, size5k (first 1k/5k training images; runnable offline on
`cifar10_partial`: add --config.dataset.name=cifar10_partial), width32, width512 (FC width), momentum,
rmsprop (optimizer).

Expected: ≈ 50 epochs × 500 steps at ≈ 0.38 s/step ≈ 2.6 h on a 2-core CPU; ≈ 5 min on one GPU. Test error
(paper, default): baseline 26.64 ± 0.16, cw-VR 21.58 ± 0.21 (best: VR 21.44 ± 0.88).
"""

import ml_collections

from configs import default

SCENARIOS = ('default', 'size1k', 'size5k', 'width32', 'width512', 'momentum', 'rmsprop')
WEIGHTS = default.WEIGHTS


def configure(config: ml_collections.ConfigDict, scenario: str) -> None:
    """The CNN family's scenario columns, shared by CIFAR-10 and CIFAR-100."""
    config.model.name = 'cnn'
    config.model.width = 128
    config.penalty.layer = config.weight_penalty.layer = 'fc'
    if scenario.startswith('size'):
        config.dataset.train_size = {'size1k': 1000, 'size5k': 5000}[scenario]
    elif scenario.startswith('width'):
        config.model.width = int(scenario[len('width') :])
    elif scenario in ('momentum', 'rmsprop'):
        config.optimizer.name = scenario


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    regularizer, scenario = default.parse_arg(arg, SCENARIOS)
    config = default.get_config()
    config.scenario = f'cifar10_cnn/{scenario}'
    config.dataset.name = 'cifar10'
    configure(config, scenario)
    default.set_regularizer(config, regularizer, WEIGHTS[regularizer])
    return config
