r"""CIFAR-100 CNN (paper Table 6 architecture), paper Tables 3 and 9.

Paper protocol: Adam 1e-4, batch 500 ("such that class-wise operations can be appropriately performed"),
every regularizer on the fully connected layer ('fc'); 50 epochs (not stated in the paper).

Command:

  python launch/train.py --config=configs/cifar100_cnn.py:cw_vr,classes16 --workdir=/tmp/c100_cw_vr

Scenarios (Table 9 columns): default (100 classes), size1k, size5k, width32, width512, classes4, classes16,
classes64 (the first k classes, relabelled 0..k-1).

Expected: ≈ 3 h on a 2-core CPU, ≈ 5 min on one GPU. Test error (paper, default): baseline 61.26 ± 0.52,
cw-VR 56.75 ± 0.64; 16 classes: baseline 45.75, cw-VR 41.38.
"""

import ml_collections

from configs import cifar10_cnn, default

SCENARIOS = ('default', 'size1k', 'size5k', 'width32', 'width512', 'classes4', 'classes16', 'classes64')
WEIGHTS = cifar10_cnn.WEIGHTS


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    regularizer, scenario = default.parse_arg(arg, SCENARIOS)
    config = default.get_config()
    config.scenario = f'cifar100_cnn/{scenario}'
    config.dataset.name = 'cifar100'
    config.batch_size = 500
    if scenario.startswith('classes'):
        config.dataset.num_classes = int(scenario[len('classes') :])
        cifar10_cnn.configure(config, 'default')
    else:
        cifar10_cnn.configure(config, scenario)
    default.set_regularizer(config, regularizer, WEIGHTS[regularizer])
    return config
