"""The host loop: a group of runs through its epochs, with checkpoints, metrics, evaluation and results.

A *group* is a set of runs that differ only in seed and λ (and dropout rate): they are trained together as
one vmapped program (one run is a group of one), which is what makes a λ search cheap on an accelerator.
The per-device step is `cwreg.training.step`; the run directory (config record, checkpoints, metrics
writer) is `cwreg.training.rundir`.

Input. Small datasets live in device memory; each epoch's order is a permutation drawn from
(seed, epoch), and ``steps_per_dispatch`` steps run as one ``lax.scan`` so a step never waits on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging as std_logging
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jaxlib
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cwreg.training import config as config_lib
from cwreg.training import data as data_lib
from cwreg.training import devices, registry, rundir
from cwreg.training import step as step_lib


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """The dataset a config asks for (cached: a sweep's groups share it)."""
    d = config.dataset
    dataset = _load_data(
        d.name,
        d.data_dir or None,
        bool(d.validation),
        int(d.get('validation_size', rundir.ADDED_FIELDS['dataset.validation_size'])),
        d.train_size or None,
        d.num_classes or None,
        bool(d.get('download', False)),
    )
    return data_lib.standardized(dataset) if d.get('standardize', False) else dataset


@functools.lru_cache(maxsize=2)
def _load_data(
    name, data_dir, validation, validation_size, train_size, num_classes, download
) -> data_lib.Dataset:
    return data_lib.load_dataset(
        name,
        data_dir=data_dir,
        validation=validation,
        validation_size=validation_size,
        train_size=train_size,
        num_classes=num_classes,
        download=download,
    )


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the message names the penalty, λ and step."""


class _BackendProbeFilter(std_logging.Filter):
    """JAX logs each accelerator backend it does not find ("Unable to initialize backend 'tpu'") at INFO."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (
            record.levelno >= std_logging.WARNING or 'Unable to initialize backend' not in record.getMessage()
        )


def quiet_backend_probing() -> None:
    """Drops JAX's INFO lines about absent backends (noise on a CPU); call before the first device query."""
    probe_logger = std_logging.getLogger('jax._src.xla_bridge')
    if not any(isinstance(f, _BackendProbeFilter) for f in probe_logger.filters):
        probe_logger.addFilter(_BackendProbeFilter())


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; str() says where, and what a rerun resumes from."""


def _interrupted(
    files: rundir._RunFiles, epoch: int, num_epochs: int, step: int, num_steps: int, checkpointing: bool
) -> TrainingInterrupted:
    try:
        files.wait()  # the save under way is what a rerun resumes from
    except Exception as e:  # pylint: disable=broad-except
        logging.error('The checkpoint save under way when the run was stopped failed: %r', e)
    where = f'Stopped in epoch {epoch + 1}/{num_epochs} at step {step}/{num_steps} of {files.group_dir}'
    if not checkpointing:
        return TrainingInterrupted(f'{where}; config.checkpoint is off, so the same command starts it over.')
    if files.saved_epoch is None:
        return TrainingInterrupted(f'{where}, before its first checkpoint; the same command starts it over.')
    return TrainingInterrupted(
        f'{where}; the same command resumes it from its checkpoint of epoch {files.saved_epoch}.'
    )


def run_command(main: Callable[[], Any]) -> Any:
    """Runs a launch script's work so that what a user causes ends in one line on stderr, not a traceback.

    Ctrl-C and SIGTERM say where the run stopped and that the same command resumes it (exit status 130 and
    143); a config the run cannot use, or a dataset not prepared, prints what to change (status 2).
    """
    stopped_by = []

    def on_sigterm(signum, frame):
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main()
    except KeyboardInterrupt as e:
        message = (
            str(e)
            if isinstance(e, TrainingInterrupted)
            else (
                'Stopped before training began; the same command starts it again (from its last checkpoint, '
                'if it has one).'
            )
        )
        print(message, file=sys.stderr, flush=True)
        sys.exit(128 + (stopped_by[0] if stopped_by else signal.SIGINT))
    except (config_lib.ConfigError, data_lib.DatasetNotPreparedError) as e:
        print(f'Error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _git_commit(directory: str) -> Optional[str]:
    """HEAD of the git checkout holding `directory` ('-dirty' with uncommitted changes), if there is one."""
    try:
        head = subprocess.run(
            ['git', '-C', directory, 'rev-parse', 'HEAD'],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ['git', '-C', directory, 'status', '--porcelain', '--untracked-files=no'],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ('-dirty' if dirty else '') if head else None


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """What produced a result: code versions and the devices it ran on (recorded in results.json)."""
    try:
        version = importlib.metadata.version('cwreg')
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        'cwreg': version,
        'git_commit': _git_commit(os.path.dirname(os.path.abspath(__file__))),
        'jax': jax.__version__,
        'jaxlib': jaxlib.__version__,
        'flax': flax.__version__,
        'optax': optax.__version__,
        'orbax_checkpoint': ocp.__version__,
        'device_kind': jax.devices()[0].device_kind,
        'device_count': jax.device_count(),
        'process_count': jax.process_count(),
        'backend': jax.default_backend(),
    }


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}'


def _steps_per_second(rate: float) -> str:
    return f'{rate:,.0f}' if rate >= 100 else f'{rate:.3g}'


def progress_line(
    epoch: int, num_epochs: int, step: int, num_steps: int, summary: dict[str, np.ndarray], rate: float
) -> str:
    """The one line a run prints per epoch: where it is, the epoch's metrics, speed and time left."""
    values = '  '.join(f'{k} {_brief(v)}' for k, v in summary.items())
    eta = (num_steps - step) / rate if rate > 0 else float('nan')
    return (
        f'epoch {epoch + 1}/{num_epochs}  step {step}/{num_steps}  {values}  '
        f'{_steps_per_second(rate)} steps/s  ETA {_duration(eta)}'
    )


# ------------------------------------------------------------------------------------------------------------
# Training.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains one run, checkpointing every epoch (resumes from `workdir`), and writes results.json.

    Raises config_lib.ConfigError before training for a config it cannot run or a workdir holding another config's run,
    NonFiniteLossError as soon as the loss is not finite, and TrainingInterrupted on Ctrl-C or SIGTERM.
    """
    return train_group([config], [workdir], workdir, on_nonfinite='raise')[0]


def train_group(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    group_dir: str,
    on_nonfinite: str = 'raise',
    save_variables: bool = False,
) -> list[dict[str, Any]]:
    """Trains runs that differ only in seed and λ as one vmapped program; writes each run's results.json.

    Args:
      configs: one config per run; all equal except `seed`, `penalty.weight`, `weight_penalty.weight` and
        `model.dropout` (each > 0 in all runs or in none).
      workdirs: one directory per run (results.json goes there).
      group_dir: where the group's config.json, checkpoints and metrics go (a resumed group continues from
        there; one holding other configs raises config_lib.ConfigMismatchError).
      on_nonfinite: 'raise' stops at the first non-finite loss; 'record' marks that run 'diverged' (its
        results.json says so) and trains the others on.
      save_variables: also write each run's final variables to `<workdir>/final_variables.msgpack`.
    Returns:
      the results dict of each run.
    """
    rundir._quiet_orbax()
    for config in configs:
        config_lib.validate_config(config)
    if len({registry._group_key(c) for c in configs}) > 1:
        raise config_lib.ConfigError(
            'Runs of a group may differ only in seed and penalty weights (and dropout rate).'
        )
    group_dir = os.path.abspath(group_dir)
    rundir.check_workdir_config(group_dir, configs)
    os.makedirs(group_dir, exist_ok=True)
    with rundir._RunFiles(group_dir) as files:
        return _train_group(configs, workdirs, files, on_nonfinite, save_variables)


@dataclasses.dataclass
class _Group:
    """What the loop of one group works with: its runs, the step's static parts, the data and its sizes."""

    configs: list[ml_collections.ConfigDict]
    task: step_lib.Task
    dataset: data_lib.Dataset
    num_steps: int
    steps_per_epoch: int

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.configs[0]

    @property
    def num_runs(self) -> int:
        return len(self.configs)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.num_steps / self.steps_per_epoch)

    @classmethod
    def load(cls, configs: list[ml_collections.ConfigDict]) -> '_Group':
        dataset = load_data(configs[0])
        num_train = len(dataset.train.labels)
        num_steps = config_lib.check_data_fits(configs[0], num_train)
        task = step_lib.Task.from_config(configs[0], dataset.num_classes)
        return cls(configs, task, dataset, num_steps, num_train // configs[0].batch_size)


@dataclasses.dataclass
class _Progress:
    """Where a group's training stands: its (device) state, step and epoch, and the runs that diverged."""

    p_state: Any
    step: int
    epoch: int
    diverged: list[Optional[int]]


def _initial_progress(group: _Group, files: rundir._RunFiles) -> tuple[step_lib.TrainState, int, list]:
    """The group's initial state, or that of its newest checkpoint: (host state, first epoch, diverged)."""
    config, task, num_runs = group.config, group.task, group.num_runs
    tx = config_lib.create_optimizer(config)
    seeds = [c.seed for c in group.configs]
    state = jax.device_get(step_lib.initial_states(task, tx, group.dataset.train.images, seeds))
    state = state.replace(step=np.asarray(state.step[0]))  # one step counter for the whole group
    restored = files.restore({'state': state, 'epoch': 0, 'diverged': np.zeros(num_runs, np.int64)})
    if restored is None:
        return state, 0, [None] * num_runs
    if int(restored['state'].step) > group.num_steps:
        raise config_lib.ConfigMismatchError(
            f'{files.group_dir} holds a run trained for {int(restored["state"].step)} steps, more than the '
            f'{group.num_steps} asked for (num_epochs={config.num_epochs}, num_train_steps='
            f'{config.num_train_steps}). Use another workdir, or delete this one to start over.'
        )
    state, first_epoch = restored['state'], int(restored['epoch'])
    logging.info('Resumed %s at epoch %d (step %d).', files.group_dir, first_epoch, int(state.step))
    return state, first_epoch, [int(s) or None for s in restored['diverged']]


class _Programs:
    """The group's device programs: training chunks (one compiled program per length) and evaluation.

    Runs are vmapped (axis 0 of state, order, weights, rng); devices are mapped around them.
    """

    def __init__(self, group: _Group, p_state: step_lib.TrainState):
        configs, task = group.configs, group.task
        self.task, self.global_batch = task, group.config.batch_size
        weights = {
            'penalty': np.array([c.penalty.weight if task.penalty else 0.0 for c in configs], np.float32),
            'weight_penalty': np.array([c.weight_penalty.weight for c in configs], np.float32),
            'dropout': np.array([c.model.dropout for c in configs], np.float32),
        }
        # Raw key data (uint32), as host arrays: train_chunk wraps it back into typed keys.
        rngs = np.stack(
            [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(c.seed), 2))) for c in configs]
        )
        train = group.dataset.train
        self.images, self.labels = devices.replicate(train.images), devices.replicate(train.labels)
        per_step = devices.eval_step_size(group.config.eval_batch_size, self.global_batch)
        self.eval_arrays = devices.shard(
            devices._eval_layout(group.dataset.eval, self.global_batch, per_step, jax.local_device_count())
        )
        self.p_weights, self.p_rngs = devices.replicate(weights), devices.replicate(rngs)
        self.state_axes = _state_axes(p_state)
        self.p_eval = devices.device_map(
            jax.vmap(
                functools.partial(step_lib.eval_chunk, task), in_axes=(self.state_axes, None, None, None)
            )
        )
        self.compiled = {}

    def run_steps(
        self, p_state: step_lib.TrainState, p_order: jax.Array, first_step: int, count: int
    ) -> tuple[step_lib.TrainState, dict[str, jax.Array]]:
        """`count` steps of every run from step `first_step` of the epoch; (new state, per-step metrics)."""
        if count not in self.compiled:
            chunk = functools.partial(step_lib.train_chunk, self.task, count, self.global_batch)
            self.compiled[count] = devices.device_map(
                jax.vmap(
                    chunk, in_axes=(self.state_axes, None, None, 0, None, 0, 0), out_axes=(self.state_axes, 0)
                ),
                donate_argnums=(0,),
            )
        return self.compiled[count](
            p_state,
            self.images,
            self.labels,
            p_order,
            devices.replicate(np.int32(first_step)),
            self.p_weights,
            self.p_rngs,
        )

    def evaluate(self, p_state: step_lib.TrainState, prefix: str = '') -> dict[str, np.ndarray]:
        return _evaluate(self.p_eval, p_state, self.eval_arrays, self.task, prefix=prefix)


def _train_epoch(group: _Group, programs: _Programs, progress: _Progress, on_nonfinite: str) -> list[dict]:
    """Trains every run through epoch `progress.epoch` (from wherever the epoch stands); its step metrics."""
    config, configs = group.config, group.configs
    num_train = len(group.dataset.train.labels)
    p_order = devices.replicate(
        np.stack([step_lib.epoch_order(c.seed, progress.epoch, num_train) for c in configs])
    )
    in_epoch, epoch_metrics = 0, []
    while in_epoch < group.steps_per_epoch and progress.step < group.num_steps:
        per_dispatch = config.steps_per_dispatch if group.task.fuse_steps else 1
        count = min(per_dispatch, group.steps_per_epoch - in_epoch, group.num_steps - progress.step)
        progress.p_state, metrics = programs.run_steps(progress.p_state, p_order, in_epoch, count)
        # Fetching blocks, which also paces XLA's CPU collectives (they deadlock if 100+ are queued).
        metrics = jax.tree.map(lambda m: np.asarray(m[0]), metrics)  # (runs, steps)
        _check_finite(metrics, progress.step, progress.diverged, configs, on_nonfinite)
        epoch_metrics.append(metrics)
        in_epoch += count
        progress.step += count
    return epoch_metrics


def _end_epoch(
    group: _Group,
    programs: _Programs,
    progress: _Progress,
    files: rundir._RunFiles,
    epoch_metrics: list[dict],
    since: tuple[float, int],
) -> None:
    """The epoch's summary (and evaluation, every eval_every_epochs) to TensorBoard and stdout; a checkpoint.

    `since`: (time, step) where the speed is measured from.
    """
    config, epoch, step, num_epochs = group.config, progress.epoch, progress.step, group.num_epochs
    summary = _epoch_summary(group.task, epoch_metrics, config.batch_size)
    if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == num_epochs:
        summary.update(programs.evaluate(progress.p_state, prefix='eval_'))
    rate = (step - since[1]) / max(time.time() - since[0], 1e-9)
    for r in range(group.num_runs):
        files.writer.write_scalars(
            step, {f'{k}/run{r}' if group.num_runs > 1 else k: v[r] for k, v in summary.items()}
        )
    files.writer.write_scalars(step, {'steps_per_sec': rate})
    if jax.process_index() == 0:
        print(progress_line(epoch, num_epochs, step, group.num_steps, summary, rate), flush=True)
    if config.checkpoint:
        # A host copy: the next dispatch donates p_state's buffers.
        files.save(
            epoch + 1,
            {
                'state': jax.device_get(devices.unreplicate(progress.p_state)),
                'epoch': epoch + 1,
                'diverged': np.array([d or 0 for d in progress.diverged], np.int64),
            },
        )


def _train_group(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    files: rundir._RunFiles,
    on_nonfinite: str,
    save_variables: bool,
) -> list[dict[str, Any]]:
    start_time = time.time()
    files.writer.write_hparams(_flat_hparams(configs[0]))
    group = _Group.load(configs)
    state, first_epoch, diverged = _initial_progress(group, files)
    rundir._record_configs(files.group_dir, configs)
    progress = _Progress(devices.replicate(state), int(state.step), first_epoch, diverged)
    programs = _Programs(group, progress.p_state)
    logging.info(
        'Training %d run(s) of %s: %d epochs × %d steps, batch %d on %d device(s).',
        group.num_runs,
        registry.describe(group.config),
        group.num_epochs,
        group.steps_per_epoch,
        group.config.batch_size,
        jax.local_device_count(),
    )
    timer, first_step = time.time(), progress.step
    try:
        for progress.epoch in range(first_epoch, group.num_epochs):
            epoch_metrics = _train_epoch(group, programs, progress, on_nonfinite)
            _end_epoch(group, programs, progress, files, epoch_metrics, since=(timer, first_step))
        files.wait()  # results only once every checkpoint is safe
    except KeyboardInterrupt:
        raise _interrupted(
            files,
            progress.epoch,
            group.num_epochs,
            progress.step,
            group.num_steps,
            bool(group.config.checkpoint),
        ) from None
    train_seconds = time.time() - timer
    final = programs.evaluate(progress.p_state)
    files.writer.flush()
    timing = {'start_time': start_time, 'train_loop_s': train_seconds}
    return _finish(group, progress, final, workdirs, timing, save_variables)


def _finish(
    group: _Group,
    progress: _Progress,
    final: dict[str, np.ndarray],
    workdirs: list[str],
    timing: dict[str, float],
    save_variables: bool,
) -> list[dict[str, Any]]:
    """Each run's results dict, written to its workdir's results.json (and its variables, if asked)."""
    final_state = devices.unreplicate(progress.p_state)
    diverged, results = progress.diverged, []
    for r, (run_config, workdir) in enumerate(zip(group.configs, workdirs)):
        result = {
            **registry.run_identity(run_config),
            'eval_split': 'validation' if run_config.dataset.validation else 'test',
            'error': None if group.task.reconstruction or diverged[r] else final['error'][r],
            'loss': None if diverged[r] else final['loss'][r],
            'penalty_value': None if diverged[r] else final['penalty'][r],
            'epochs': group.num_epochs,
            'steps': progress.step,
            'wall_time_s': (time.time() - timing['start_time']) / group.num_runs,
            'train_loop_s': timing['train_loop_s'],
            'runs_in_group': group.num_runs,
            'status': 'diverged' if diverged[r] else 'finished',
            'diverged_at_step': diverged[r],
            'config': run_config.to_dict(),
            'provenance': provenance(),
        }
        if jax.process_index() == 0:
            rundir._write_results(workdir, result, final_state, r if save_variables else None)
        logging.info(
            'Final %s of %s: error=%s loss=%s penalty=%s',
            result['eval_split'],
            registry.describe(run_config),
            result['error'],
            result['loss'],
            result['penalty_value'],
        )
        results.append(result)
    return results


def _check_finite(metrics, step: int, diverged: list, configs, on_nonfinite: str) -> None:
    """Marks runs whose loss or penalty went non-finite in this chunk; raises instead for 'raise'."""
    for r in range(len(configs)):
        bad = np.flatnonzero(~np.isfinite(metrics['loss'][r] + metrics['penalty'][r]))
        if bad.size and diverged[r] is None:
            diverged[r] = step + int(bad[0]) + 1
            message = (
                f'Non-finite training loss at step {diverged[r]}: {registry.describe(configs[r])}; '
                f'loss={metrics["loss"][r][bad[0]]}, penalty={metrics["penalty"][r][bad[0]]}.'
            )
            if on_nonfinite == 'raise':
                raise NonFiniteLossError(message)
            logging.warning('%s The run is recorded as diverged.', message)


def _state_axes(state):
    """vmap axes of a group's TrainState: every leaf is per run except the shared step counter."""
    axes = jax.tree.map(lambda _: 0, state)
    return axes.replace(step=None)


def _brief(values) -> str:
    values = np.atleast_1d(values)
    return ','.join(f'{v:.4g}' for v in values[:4]) + ('…' if len(values) > 4 else '')


def _epoch_summary(
    task: step_lib.Task, epoch_metrics: list[dict], global_batch: int
) -> dict[str, np.ndarray]:
    metrics = {k: np.concatenate([m[k] for m in epoch_metrics], axis=-1) for k in epoch_metrics[0]}
    summary = {'train_loss': metrics['loss'].mean(-1), 'train_penalty': metrics['penalty'].mean(-1)}
    if not task.reconstruction:
        summary['train_error'] = 100.0 * (
            1.0 - metrics['correct'].sum(-1) / (metrics['correct'].shape[-1] * global_batch)
        )
    return summary


def _evaluate(p_eval, p_state, eval_arrays, task: step_lib.Task, prefix: str = '') -> dict[str, np.ndarray]:
    """Error (%), mean loss and mean per-batch penalty on the evaluation split, one value per run."""
    sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64), p_eval(p_state, *eval_arrays))
    count = np.maximum(sums['count'], 1.0)
    out = {
        'loss': sums['loss'] / count,
        'penalty': sums['penalty'] / np.maximum(sums['penalty_batches'], 1.0),
    }
    if not task.reconstruction:
        out['error'] = 100.0 * (1.0 - sums['correct'] / count)
    return {prefix + k: v for k, v in out.items()}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(f'{prefix}{key}.', value)
            elif isinstance(value, (int, float, str, bool)):
                flat[prefix + key] = value

    visit('', config.to_dict())
    return flat
