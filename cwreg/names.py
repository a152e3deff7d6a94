"""The names configs, the trainer and the experiments share, each defined once; imports nothing heavy.

Configs (configs/*.py) import only this module and ml_collections, so loading one imports neither JAX nor
TensorFlow. `cwreg.penalties` defines the penalties themselves; tests/test_configs.py checks that
PENALTIES and WEIGHT_PENALTIES name exactly its functions, in its order.
"""

from __future__ import annotations

from typing import Any

#: The `name` of config.penalty / config.weight_penalty when it is off.
NO_PENALTY = 'none'
#: Representation penalties (cwreg.penalties.PENALTIES), in the paper's order, then L1R.
PENALTIES: tuple[str, ...] = ('cr', 'cw_cr', 'vr', 'cw_vr', 'l1r')
#: Weight penalties (cwreg.penalties.WEIGHT_PENALTIES).
WEIGHT_PENALTIES: tuple[str, ...] = ('l1w', 'l2w')
#: The paper's regularizers (plus L1R), in the paper's order (Tables 2-10): 'baseline', weight penalties,
#: the two non-penalty regularizers it compares with (dropout, batch norm), representation penalties.
REGULARIZERS: tuple[str, ...] = ('baseline', *WEIGHT_PENALTIES, 'dropout', 'batchnorm', *PENALTIES)
#: What a sweep runs unless told otherwise (and Table 8's rows): all but the dropout and batch-norm
#: comparisons.
SWEEP_REGULARIZERS: tuple[str, ...] = tuple(r for r in REGULARIZERS if r not in ('dropout', 'batchnorm'))

#: The paper's display name of each regularizer (tables, figures, plots).
DISPLAY_NAMES: dict[str, str] = {
    'baseline': 'Baseline',
    'l1w': 'L1W',
    'l2w': 'L2W',
    'dropout': 'Dropout',
    'batchnorm': 'Batch norm',
    'cr': 'CR (DeCov)',
    'cw_cr': 'cw-CR',
    'vr': 'VR',
    'cw_vr': 'cw-VR',
    'l1r': 'L1R',
}

#: The paper's validation hold-out (suppl. A.1): the last 10,000 training examples choose λ.
VALIDATION_SIZE: int = 10_000

#: The paper's λ grid (suppl. A.1).
WEIGHT_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: Dropout's rate takes λ's place: the usual range (Srivastava et al. 2014 use 0.5 for hidden layers).
DROPOUT_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
#: Regularizers without a λ: no search, their final seeds are trained directly.
UNSEARCHED: tuple[str, ...] = ('baseline', 'batchnorm')


class ConfigError(ValueError):
    """A config a run cannot use, or that does not match its workdir; the message says what is accepted."""


def set_regularizer(config: Any, regularizer: str, weight: float) -> None:
    """Turns on exactly one of REGULARIZERS with weight λ (baseline: none), in place, in an ml_collections config.

    'dropout' takes the rate as its weight (config.model.dropout); 'batchnorm' has no strength and
    ignores the weight (config.model.batchnorm = True). Every other regularizer turns both off.
    """
    if regularizer not in REGULARIZERS:
        raise ConfigError(f'Unknown regularizer {regularizer!r}; valid choices: {sorted(REGULARIZERS)}.')
    config.penalty.name, config.penalty.weight = NO_PENALTY, 0.0
    config.weight_penalty.name, config.weight_penalty.weight = NO_PENALTY, 0.0
    config.model.dropout, config.model.batchnorm = 0.0, False
    if regularizer in PENALTIES:
        config.penalty.name, config.penalty.weight = regularizer, float(weight)
    elif regularizer in WEIGHT_PENALTIES:
        config.weight_penalty.name, config.weight_penalty.weight = regularizer, float(weight)
    elif regularizer == 'dropout':
        config.model.dropout = float(weight)
    elif regularizer == 'batchnorm':
        config.model.batchnorm = True
