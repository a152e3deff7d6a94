r"""ResNet-32 / ResNet-110 on CIFAR-10 with He et al. (2016)'s recipe, paper Table 4.

Recipe: SGD momentum 0.9, learning rate 0.1 divided by 10 at 32k and 48k iterations, weight decay 1e-4,
64k iterations, batch 128, 4-pixel pad + random crop + horizontal flip; the representation regularizer on
the output layer ('logits'), as in the paper.

Command (the argument: resnet32 or resnet110, and a regularizer):

  python launch/train.py --config=configs/resnet.py:resnet32,cw_vr --workdir=/tmp/resnet32_cw_vr

Expected: ResNet-32 ≈ 1 h and ResNet-110 ≈ 3 h on one modern GPU (64k steps); not practical on a 2-core CPU
(≈ 1 s/step). Test error (paper): ResNet-32 7.39 (cw-VR 7.17); ResNet-110 6.31 ± 0.14 mean (cw-VR 6.18);
He et al.: 7.51 and 6.61 ± 0.16.
"""

import ml_collections

from configs import default

SCENARIOS = ('resnet32', 'resnet110')
WEIGHTS = default.WEIGHTS


def get_config(arg: str = 'resnet32') -> ml_collections.ConfigDict:
    regularizer, scenario = default.parse_arg(arg, SCENARIOS + ('default',))
    scenario = 'resnet32' if scenario == 'default' else scenario
    config = default.get_config()
    config.scenario = f'{scenario}/default'
    config.dataset.name = 'cifar10'
    config.dataset.augment = True
    config.model.name = 'resnet'
    config.model.depth = int(scenario[len('resnet') :])
    config.penalty.layer = config.weight_penalty.layer = 'logits'
    config.weight_decay = 1e-4
    config.optimizer.name = 'momentum'
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = 'piecewise'
    config.optimizer.boundaries = (32000, 48000)
    config.batch_size = 128
    config.num_train_steps = 64000
    config.eval_every_epochs = 10
    default.set_regularizer(config, regularizer, WEIGHTS[regularizer])
    return config
