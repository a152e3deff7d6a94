"""Which regularizer a config trains with, and at what weight: the inverse of `cwreg.names.set_regularizer`."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from cwreg import penalties
from cwreg.names import NO_PENALTY, REGULARIZERS  # noqa: F401  (REGULARIZERS: re-exported)


def regularizer_name(config: ml_collections.ConfigDict) -> str:
    """The regularizer a config trains with (a penalty first, then dropout, then batch norm)."""
    if config.penalty.name != NO_PENALTY and config.penalty.weight > 0:
        return config.penalty.name
    if config.weight_penalty.name != NO_PENALTY and config.weight_penalty.weight > 0:
        return config.weight_penalty.name
    if config.model.get('dropout', 0.0) > 0:  # `get`: results.json of before these fields
        return 'dropout'
    if config.model.get('batchnorm', False):
        return 'batchnorm'
    return 'baseline'


def regularizer_weight(config: ml_collections.ConfigDict) -> float:
    """λ of regularizer_name's regularizer: the rate for dropout, 0 for batch norm and the baseline."""
    name = regularizer_name(config)
    if name in penalties.PENALTIES:
        return float(config.penalty.weight)
    if name in penalties.WEIGHT_PENALTIES:
        return float(config.weight_penalty.weight)
    if name == 'dropout':
        return float(config.model.dropout)
    return 0.0


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Which run of a scenario's protocol `config` is, as its results.json records it."""
    return {
        'scenario': config.scenario,
        'regularizer': regularizer_name(config),
        'weight': regularizer_weight(config),
        'seed': config.seed,
        'phase': 'select' if config.dataset.validation else 'final',
    }


def describe(config: ml_collections.ConfigDict) -> str:
    shaping = ''.join(
        [
            f', dropout {config.model.dropout}' if config.model.dropout else '',
            ', batch norm' if config.model.batchnorm else '',
        ]
    )
    return (
        f'{config.scenario} seed {config.seed}: penalty {config.penalty.name} (λ={config.penalty.weight}, '
        f'layer {config.penalty.layer}), weight penalty {config.weight_penalty.name} '
        f'(λ={config.weight_penalty.weight}){shaping}'
    )


def _group_key(config: ml_collections.ConfigDict) -> str:
    """Everything but seed, the penalty weights and the dropout rate: runs sharing it can be one group.

    Of each weight and the rate only whether it is > 0 counts: that decides the program (a penalty term,
    dropout layers); the values are traced per-run inputs.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = 0
    config.penalty.weight = float(config.penalty.weight > 0)
    config.weight_penalty.weight = float(config.weight_penalty.weight > 0)
    config.model.dropout = float(config.model.dropout > 0)
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
