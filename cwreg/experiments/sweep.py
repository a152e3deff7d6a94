"""The paper's experimental protocol for one scenario (suppl. A.1), with more seeds; resumable and vmapped.

For each regularizer (baseline, L1W, L2W, dropout, batch norm, CR, cw-CR, VR, cw-VR, L1R):

1. *select*: train each λ of the grid ({0.001, 0.01, 0.1, 1, 10, 100}; dropout: the rate, {0.1, …, 0.5})
   with each of S selection seeds on the training split minus its last 10,000 examples, and evaluate on
   those 10,000 (the validation split);
2. pick the λ with the lowest validation error averaged over the S seeds (MSE for the autoencoder; ties go
   to the smaller λ, the rule of :func:`cwreg.experiments.report.select_weight`, which the report uses to display it);
3. *final*: train the F final seeds with that λ on the full training split and evaluate on the test split.

The baseline and batch norm have no λ: they have final runs only. :data:`PAPER` (S = 1, F = 5) is the
paper's protocol; :data:`POWERED` (S = 3, F = 10) is the default. The final seeds are disjoint from the
selection seeds (for MNIST a select run *is* a final run of the same seed: both train on the first 50k
images) and the same for every regularizer, so that comparisons between regularizers are paired by seed.

Layout: ``<sweep_dir>/<regularizer>/select_w<λ>_s<seed>/`` and ``<sweep_dir>/<regularizer>/final_s<seed>/``,
each with its own ``results.json`` (and, for final runs, ``stats.json``: the Table 5 statistics of the
regularized layer on the test set). Runs of one phase of one regularizer differ only in λ or seed, so they
are trained together as one vmapped program (:func:`cwreg.training.loop.train_group`), checkpointed every epoch in a
group directory: a killed sweep, re-run with the same arguments, skips finished runs and resumes unfinished
groups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cwreg import names
from cwreg.experiments import records as records_lib
from cwreg.experiments import report
from cwreg.experiments import stats as stats_lib
from cwreg.training import config as config_lib
from cwreg.training import data as data_lib
from cwreg.training import loop, registry, rundir

DONE = ('finished', 'diverged')
VARIABLES_FILE = 'final_variables.msgpack'


def run_config(
    base: ml_collections.ConfigDict, regularizer: str, weight: float, seed: int, validation: bool
) -> ml_collections.ConfigDict:
    """`base` (a scenario's baseline config) with one regularizer at weight λ, a seed and a data split."""
    config = ml_collections.ConfigDict(base.to_dict())
    names.set_regularizer(config, regularizer, weight)
    config.seed = seed
    config.dataset.validation = validation
    config.lock()
    return config


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which seeds choose λ and which seeds measure it; disjoint, and shared by every regularizer."""

    selection_seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]

    def __post_init__(self):
        if not self.selection_seeds or not self.final_seeds:
            raise ValueError(f'A protocol needs at least one selection and one final seed, got {self}.')
        if set(self.selection_seeds) & set(self.final_seeds):
            raise ValueError(
                f'Selection and final seeds must be disjoint (a final run of a selection seed '
                f'repeats its selection run), got {self}.'
            )

    @classmethod
    def of(cls, num_selection: int, num_final: int) -> 'Protocol':
        """Selection seeds 0..S−1, final seeds S..S+F−1."""
        if num_selection < 1 or num_final < 1:
            raise ValueError(
                f'Need >= 1 selection and >= 1 final seed, got S={num_selection}, F={num_final}.'
            )
        return cls(tuple(range(num_selection)), tuple(range(num_selection, num_selection + num_final)))


PAPER = Protocol.of(1, 5)
POWERED = Protocol.of(3, 10)


def search_grid(
    regularizer: str,
    grid: Sequence[float] = names.WEIGHT_GRID,
    dropout_grid: Sequence[float] = names.DROPOUT_GRID,
) -> tuple[float, ...]:
    """The λ values the select phase tries for `regularizer` (none for the baseline and batch norm)."""
    if regularizer in names.UNSEARCHED:
        return ()
    return tuple(dropout_grid if regularizer == 'dropout' else grid)


def run_dir(sweep_dir: str, regularizer: str, phase: str, weight: float = 0.0, seed: int = 0) -> str:
    name = f'select_w{weight:g}_s{seed}' if phase == 'select' else f'final_s{seed}'
    return os.path.join(sweep_dir, regularizer, name)


def _identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run is: every field that decides what it trains (`rundir.training_config`)."""
    return rundir.training_config(config)


def _read_results(workdir: str) -> Optional[dict[str, Any]]:
    """A run's results.json; None if it has none, or, with a warning naming it, if it is truncated."""
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
        if not isinstance(result, dict):
            raise ValueError(f'a JSON {type(result).__name__}, not an object')
        return result
    except (OSError, ValueError) as e:
        logging.warning(
            '%s is unreadable (%s: %s); the run counts as not done and is trained again.',
            path,
            type(e).__name__,
            e,
        )
        return None


def _is_of(result: dict[str, Any], config: ml_collections.ConfigDict) -> bool:
    return isinstance(result.get('config'), dict) and not rundir.config_differences(result['config'], config)


def status(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Optional[str]:
    """The `status` of a run's results.json; None if it has none (not started or interrupted) or an unreadable
    one, or if `config` is given and the results are of another run: one whose recorded config differs from
    `config` in any field that decides what it trains (e.g. a final run whose λ the search has since changed,
    or another learning rate, width, layer, train size, batch size or number of epochs)."""
    result = _read_results(workdir)
    if result is None or (config is not None and not _is_of(result, config)):
        return None
    return result.get('status')


def _discard_results(workdir: str) -> None:
    """Removes a run's outputs before it is retrained, so a stale result is never read in the meantime."""
    for name in ('results.json', VARIABLES_FILE, 'stats.json'):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            logging.warning(
                '%s is not of the run to train now (another config, or unreadable); removing it.', path
            )
            os.remove(path)


@dataclasses.dataclass
class Progress:
    """Logs 'runs done / total' with an ETA from the wall time of the runs trained in this process."""

    total: int
    done: int = 0
    trained: int = 0
    seconds: float = 0.0

    def update(self, finished: int, trained: int = 0, seconds: float = 0.0) -> None:
        if not finished and self.done:
            return
        self.done += finished
        self.trained += trained
        self.seconds += seconds
        left = self.total - self.done
        eta = (self.seconds / self.trained * left) if self.trained else float('nan')
        eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) else '?'
        logging.info('Sweep progress: %d/%d runs done, ETA %s.', self.done, self.total, eta_text)
        print(f'[sweep] {self.done}/{self.total} runs done, ETA {eta_text}', flush=True)


def _train(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    group_root: str,
    progress: Progress,
    max_group: int,
) -> None:
    """Trains the runs not done yet, `max_group` at a time as vmapped groups."""
    todo = [(c, w) for c, w in zip(configs, workdirs) if status(w, c) not in DONE]
    progress.update(len(configs) - len(todo))
    for _, workdir in todo:
        _discard_results(workdir)
    for start in range(0, len(todo), max_group):
        group = todo[start : start + max_group]
        # The group directory is named after its runs, so a resumed sweep finds its own checkpoints.
        identities = '|'.join(f'{w}:{json.dumps(_identity(c), sort_keys=True)}' for c, w in group)
        key = hashlib.sha1(identities.encode()).hexdigest()[:10]
        t0 = time.time()
        group_dir = os.path.join(group_root, f'group_{key}')
        loop.train_group(
            [c for c, _ in group],
            [w for _, w in group],
            group_dir,
            on_nonfinite='record',
            save_variables=True,
        )
        # Every run of the group has its results and final variables now: its checkpoints are dead weight.
        shutil.rmtree(os.path.join(group_dir, 'checkpoints'), ignore_errors=True)
        progress.update(len(group), trained=len(group), seconds=time.time() - t0)


def chosen_weight(
    sweep_dir: str,
    regularizer: str,
    base: Optional[ml_collections.ConfigDict] = None,
    seeds: Optional[Sequence[int]] = None,
) -> Optional[float]:
    """The λ of the regularizer's select runs with the lowest mean validation error (None if none finished).

    The baseline and batch norm have no λ: 0. With `base` (the config given to `run_sweep`), only runs of
    that config count: a run left in the sweep directory by another learning rate, width, number of epochs…
    is ignored. With `seeds` (a protocol's selection seeds), only those seeds count, and only a λ finished
    for all of them competes: a λ at which a seed diverged is not chosen. Without them, every run does.
    """
    if regularizer in names.UNSEARCHED:
        return 0.0
    runs = [
        run
        for run in report.load_runs([os.path.join(sweep_dir, regularizer)]).runs
        if run.phase == 'select' and (seeds is None or run.seed in seeds)
    ]
    if base is not None:
        runs = [
            run
            for run in runs
            if _is_of(
                _read_results(os.path.dirname(run.path)) or {},
                run_config(base, regularizer, run.weight, run.seed, validation=True),
            )
        ]
    if seeds is not None:  # a λ competes only on its whole set of seeds, not on a lucky part of it
        complete = {
            w for w in {r.weight for r in runs} if {r.seed for r in runs if r.weight == w} >= set(seeds)
        }
        runs = [run for run in runs if run.weight in complete]
    weight, _ = report.select_weight(runs)
    return weight


def run_sweep(
    base: ml_collections.ConfigDict,
    sweep_dir: str,
    regularizers: Sequence[str] = names.REGULARIZERS,
    grid: Sequence[float] = names.WEIGHT_GRID,
    protocol: Protocol = POWERED,
    max_group: int = 6,
    statistics: bool = True,
    dropout_grid: Sequence[float] = names.DROPOUT_GRID,
) -> dict[str, Optional[float]]:
    """Runs (or resumes) the protocol above for `base`'s scenario; returns the chosen λ per regularizer."""
    for name in regularizers:
        if name not in names.REGULARIZERS:
            raise ValueError(f'Unknown regularizer {name!r}; valid: {list(names.REGULARIZERS)}.')
    for name in regularizers:  # e.g. dropout for the autoencoder: fail before anything trains
        config_lib.validate_config(
            run_config(
                base,
                name,
                (search_grid(name, grid, dropout_grid) or (0.0,))[0],
                protocol.final_seeds[0],
                validation=False,
            )
        )
    sweep_dir = os.path.abspath(sweep_dir)
    grids = {r: search_grid(r, grid, dropout_grid) for r in regularizers}
    progress = Progress(
        total=sum(len(g) * len(protocol.selection_seeds) + len(protocol.final_seeds) for g in grids.values())
    )
    chosen = {}
    for regularizer in regularizers:
        root = os.path.join(sweep_dir, regularizer)
        select = [(w, s) for w in grids[regularizer] for s in protocol.selection_seeds]
        _train(
            [run_config(base, regularizer, w, s, validation=True) for w, s in select],
            [run_dir(sweep_dir, regularizer, 'select', weight=w, seed=s) for w, s in select],
            root,
            progress,
            max_group,
        )
        chosen[regularizer] = chosen_weight(sweep_dir, regularizer, base, protocol.selection_seeds)
        if chosen[regularizer] is None:
            logging.warning('%s: every λ diverged; no final runs.', regularizer)
            progress.update(len(protocol.final_seeds))
            continue
        logging.info('%s: chose λ=%g on the validation split.', regularizer, chosen[regularizer])
        final_dirs = [run_dir(sweep_dir, regularizer, 'final', seed=s) for s in protocol.final_seeds]
        _train(
            [
                run_config(base, regularizer, chosen[regularizer], s, validation=False)
                for s in protocol.final_seeds
            ],
            final_dirs,
            root,
            progress,
            max_group,
        )
        if statistics:
            for workdir in final_dirs:
                write_statistics(workdir)
    return chosen


def restore_from_records(
    base: ml_collections.ConfigDict, sweep_dir: str, records_path: str, protocol: Protocol = POWERED
) -> int:
    """Writes into `sweep_dir` the results.json (and a final run's stats.json) of each run in a records file.

    A sweep resumed there afterwards counts those runs as done and trains only what the records lack, e.g.
    more selection seeds for a column whose sweep directory is gone but whose records are committed. A
    restored run is exactly its record: error, loss, penalty, wall time, status, Table 5 statistics and the
    commit that trained it (``provenance.git_commit``, with ``restored_from`` naming the file). Its config is
    the one `run_sweep` would ask for, so a run the sweep wants differently (another λ now chosen, another
    number of epochs…) is trained again as usual. It has no final variables: figures need retrained runs.
    Only runs of `protocol` are restored: a record of a seed outside its selection (final) seeds is not a
    select (final) run of this sweep. Existing results.json files are left as they are.

    Returns:
      How many runs were restored.

    Raises:
      ValueError: a record of another scenario or another number of epochs than `base`, or one whose
        regularizer and λ the sweep would not record as such (e.g. a λ for the baseline).
    """
    restored = 0
    for record in records_lib.read_records(records_path):
        seeds = protocol.selection_seeds if record['phase'] == 'select' else protocol.final_seeds
        if record['seed'] not in seeds:
            continue
        config = run_config(
            base, record['regularizer'], record['weight'], record['seed'], record['phase'] == 'select'
        )
        identity = registry.run_identity(config)
        mismatched = {k: (record[k], identity[k]) for k in identity if record[k] != identity[k]}
        if record['epochs'] != config.num_epochs:
            mismatched['epochs'] = (record['epochs'], config.num_epochs)
        if mismatched:
            raise ValueError(
                f'{records_path}: a record is not a run of this sweep (record vs sweep: {mismatched}); '
                f'restore only records of {base.scenario} at {base.num_epochs} epochs.'
            )
        workdir = run_dir(sweep_dir, record['regularizer'], record['phase'], record['weight'], record['seed'])
        if os.path.exists(os.path.join(workdir, 'results.json')):
            continue
        os.makedirs(workdir, exist_ok=True)
        if record['phase'] == 'final' and record.get('stats'):
            split = 'validation' if config.dataset.validation else 'test'
            stats = {**record['stats'], 'layer': config.penalty.layer, 'split': split}
            rundir.write_json(os.path.join(workdir, 'stats.json'), stats)
        result = {
            **identity,
            **{k: record[k] for k in ('eval_split', 'error', 'loss', 'penalty_value', 'steps', 'status')},
            'epochs': record['epochs'],
            'wall_time_s': record['wall_time_s'],
            'config': config.to_dict(),
            'provenance': {'git_commit': record['commit'], 'restored_from': os.path.basename(records_path)},
        }
        rundir.write_json(os.path.join(workdir, 'results.json'), result)  # whole or not at all
        restored += 1
    return restored


# ------------------------------------------------------------------------------------------------------------
# Representation statistics of finished runs (Table 5) and activations for the figures.


def load_variables(workdir: str) -> dict[str, Any]:
    with open(os.path.join(workdir, VARIABLES_FILE), 'rb') as f:
        return flax.serialization.msgpack_restore(f.read())


def representations(
    config: ml_collections.ConfigDict,
    variables: Optional[dict[str, Any]],
    images: np.ndarray,
    layers: Sequence[str],
    num_classes: int,
    batch_size: int = 1000,
) -> dict[str, np.ndarray]:
    """Sown representations (e.g. 'layer5', 'layer5_preact') of `images`, flattened to (N, I).

    `variables=None` uses the model at initialization (seed `config.seed`).
    """
    model = config_lib.model_from_config(config, num_classes)
    if variables is None:
        variables = model.init(jax.random.key(config.seed), jnp.asarray(images[:1]), train=False)

    @jax.jit
    def forward(x):
        _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
        return {name: state['intermediates'][name][0].reshape(x.shape[0], -1) for name in layers}

    chunks = [forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: np.concatenate([np.asarray(c[name], np.float32) for c in chunks]) for name in layers}


def write_statistics(workdir: str, dataset: Optional[data_lib.Dataset] = None) -> Optional[dict]:
    """Writes `stats.json` (Table 5 statistics of the regularized layer on the evaluation split)."""
    if status(workdir) != 'finished' or not os.path.exists(os.path.join(workdir, VARIABLES_FILE)):
        return None
    with open(os.path.join(workdir, 'results.json')) as f:
        config = ml_collections.ConfigDict(json.load(f)['config'])
    if dataset is None:
        dataset = loop.load_data(config)
    layer = config.penalty.layer
    reps = representations(config, load_variables(workdir), dataset.eval.images, [layer], dataset.num_classes)
    values = stats_lib.representation_statistics(reps[layer], dataset.eval.labels)
    with open(os.path.join(workdir, 'stats.json'), 'w') as f:
        json.dump(
            {**values, 'layer': layer, 'split': 'validation' if config.dataset.validation else 'test'},
            f,
            indent=2,
        )
    return values
