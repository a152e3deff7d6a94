"""Every field of a cwreg run, with its default; the per-family configs override a few.

Scenario configs take an argument after the file name, a comma-separated list of a regularizer and
scenario tokens, e.g. ``--config=configs/mnist_mlp.py:cw_vr,size1k``. Any field can still be overridden
on the command line: ``--config.penalty.weight=0.1 --config.penalty.layer=layer3``.
"""

import ml_collections

from cwreg.names import (
    REGULARIZERS,
    VALIDATION_SIZE,
    set_regularizer,  # noqa: F401  (re-exported for the family configs)
)

#: λ of a single run where no λ search has been run for the scenario (the sweep searches
#: cwreg.names.WEIGHT_GRID); dropout's is its rate, batch norm has none. The autoencoder and the ResNet
#: have no dropout or optional batch norm: the trainer rejects those two there (ConfigError).
WEIGHTS = {
    'baseline': 0.0,
    'l1w': 0.001,
    'l2w': 0.001,
    'dropout': 0.5,
    'batchnorm': 0.0,
    'cr': 0.1,
    'cw_cr': 0.1,
    'vr': 0.1,
    'cw_vr': 0.1,
    'l1r': 0.1,
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.scenario = 'mnist_mlp/default'  # family/scenario: names the row/column of the paper's tables
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = 'mnist'  # a tfds name: mnist, fashion_mnist, cifar10, cifar100, cifar10_partial
    config.dataset.data_dir = ''  # tfds data_dir; '' = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    config.dataset.validation = False  # True: evaluate on the last validation_size training examples
    config.dataset.validation_size = VALIDATION_SIZE  # the paper's 10k; Table 8's CIFAR subset: 5k
    config.dataset.train_size = 0  # >0: keep the first n training examples (paper's 1k/5k scenarios)
    config.dataset.num_classes = 0  # >0: keep classes 0..k-1 (paper's CIFAR-100 16/64-class scenarios)
    config.dataset.augment = False  # pad-4 random crop + horizontal flip, on device (ResNet)
    config.dataset.standardize = False  # True: (x - mean) / std with the training split's pixel mean and std
    config.dataset.download = (
        True  # online: let tfds download a missing dataset; offline: launch/prepare_data.py
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = 'mlp'  # mlp, cnn, resnet, autoencoder
    config.model.width = 100  # MLP hidden width; CNN fully-connected width
    config.model.depth = 5  # MLP hidden layers; ResNet depth (32, 110)
    config.model.kernel_init = 'lecun_normal'  # Flax's default; 'glorot_uniform' is TF 1.x's (the paper's)
    config.model.bias_init = 0.0  # constant initial bias of every Dense/Conv layer
    config.model.dropout = 0.0  # >0: dropout with this rate after every hidden layer (MLP, CNN)
    config.model.batchnorm = False  # batch normalization before every hidden ReLU (MLP, CNN)

    config.penalty = ml_collections.ConfigDict()
    config.penalty.name = 'none'  # none, cr, cw_cr, vr, cw_vr, l1r
    config.penalty.weight = 0.0  # λ
    config.penalty.layer = 'layer5'  # a sown representation name of the model

    config.weight_penalty = ml_collections.ConfigDict()
    config.weight_penalty.name = 'none'  # none, l1w, l2w
    config.weight_penalty.weight = 0.0
    config.weight_penalty.layer = 'layer5'  # the layer whose kernel is penalized, or 'all'

    config.weight_decay = 0.0  # coefficient of ½‖w‖² over all kernels (He et al.'s 1e-4 for ResNet)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = 'adam'  # adam, momentum, rmsprop, sgd
    config.optimizer.learning_rate = 1e-4
    config.optimizer.momentum = 0.9
    # True: TF 1.x's update rules, as the paper ran them: Adam adds ε to √v before the bias correction
    # (ε̂ of Kingma & Ba); RMSProp's accumulator starts at 1 with ε = 1e-10. False: optax's defaults.
    config.optimizer.tf1 = False
    config.optimizer.schedule = 'constant'  # constant, piecewise
    config.optimizer.boundaries = ()  # piecewise: steps at which the rate is multiplied by decay_factor
    config.optimizer.decay_factor = 0.1

    config.batch_size = 100  # global batch, split over devices
    config.num_epochs = 50
    config.num_train_steps = -1  # >0 overrides num_epochs
    config.eval_batch_size = 1000
    config.eval_every_epochs = 5  # evaluating 10k images costs ~20 % of an MNIST epoch
    config.steps_per_dispatch = 500  # steps fused into one lax.scan per host round trip (CPU convnets: 1)
    config.checkpoint = True  # orbax checkpoint every epoch; a restarted run resumes from the latest
    return config


def parse_arg(arg: str, scenarios: tuple[str, ...]) -> tuple[str, str]:
    """Splits 'cw_vr,size1k' into (regularizer, scenario); both optional, defaults baseline/default."""
    regularizer, scenario = 'baseline', 'default'
    for token in filter(None, (arg or '').split(',')):
        if token in REGULARIZERS:
            regularizer = token
        elif token in scenarios:
            scenario = token
        else:
            raise ValueError(
                f'Unknown config token {token!r}; regularizers: {list(REGULARIZERS)}, '
                f'scenarios: {list(scenarios)}.'
            )
    return regularizer, scenario
