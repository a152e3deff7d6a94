"""A run's directory: the configs it was started with (config.json), checkpoints, metrics, results.json.

A run is its whole config: a workdir records the configs it was started with, and refuses others.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging as std_logging
import os
import shutil
import time
from typing import Any, Optional, Sequence

from absl import logging
from clu import metric_writers
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cwreg import names
from cwreg.training.config import ConfigMismatchError

#: Fields that change how a run is executed or reported, not what it trains: a workdir resumes with them
#: changed, and a sweep reuses a run whatever they were.
EXECUTION_FIELDS = (
    'dataset.data_dir',
    'dataset.download',
    'checkpoint',
    'eval_every_epochs',
    'steps_per_dispatch',
    'eval_batch_size',
)
#: Fields added after runs were recorded without them, with the value those runs had: an absent field of a
#: recorded config compares as this value, so adding a field does not retrain what it would not change.
ADDED_FIELDS = {'dataset.validation_size': names.VALIDATION_SIZE}
#: How long a run trains. A workdir's run may be continued into a longer one: its first epochs are the same.
LENGTH_FIELDS = ('num_epochs', 'num_train_steps')
CONFIG_FILE = 'config.json'
SAVER_THREADS = 'cwreg-checkpoint-save'
_ABSENT = '(absent)'


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def training_config(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
    """The fields of a config (or its to_dict()) that decide what a run trains: flat, as JSON stores them."""
    tree = config if isinstance(config, dict) else config.to_dict()
    flat = {**ADDED_FIELDS, **json.loads(json.dumps(_flatten(tree), default=str))}  # tuples == lists
    return {k: v for k, v in flat.items() if k not in EXECUTION_FIELDS}


def config_differences(
    recorded: ml_collections.ConfigDict | dict[str, Any],
    asked: ml_collections.ConfigDict | dict[str, Any],
    ignore: Sequence[str] = (),
) -> list[str]:
    """'field: recorded -> asked' for each field that decides what a run trains and differs in the two."""
    old, new = training_config(recorded), training_config(asked)
    return [
        f'{k}: {old.get(k, _ABSENT)!r} -> {new.get(k, _ABSENT)!r}'
        for k in sorted(set(old) | set(new))
        if k not in ignore and old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]


def _read_json(path: str) -> Optional[Any]:
    """The contents of a JSON file; None, with a warning naming it, if it is truncated or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logging.warning('%s is unreadable (%s: %s); ignoring it.', path, type(e).__name__, e)
        return None


def write_json(path: str, value: Any) -> None:
    """Writes whole or not at all: a reader (or a kill) never sees half a file."""
    partial = f'{path}.{os.getpid()}.tmp'
    with open(partial, 'w') as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(partial, path)


def recorded_configs(group_dir: str) -> Optional[list[dict[str, Any]]]:
    """The configs a group directory was started with (config.json; results.json of a workdir without)."""
    recorded = None
    if os.path.exists(os.path.join(group_dir, CONFIG_FILE)):
        recorded = _read_json(os.path.join(group_dir, CONFIG_FILE))
        recorded = recorded.get('runs') if isinstance(recorded, dict) else None
    elif os.path.exists(os.path.join(group_dir, 'results.json')):
        result = _read_json(os.path.join(group_dir, 'results.json'))
        recorded = [result['config']] if isinstance(result, dict) and 'config' in result else None
    return recorded if isinstance(recorded, list) and all(isinstance(c, dict) for c in recorded) else None


def check_workdir_config(group_dir: str, configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigMismatchError, listing the fields that differ, if `group_dir` holds another config."""
    recorded = recorded_configs(group_dir)
    if recorded is None:
        return
    if len(recorded) != len(configs):
        raise ConfigMismatchError(
            f'{group_dir} holds a group of {len(recorded)} run(s), not of these '
            f'{len(configs)}. Use another directory, or delete this one to start over.'
        )
    for r, (old, new) in enumerate(zip(recorded, configs)):
        differences = config_differences(old, new, ignore=LENGTH_FIELDS)
        if differences:
            which = f' (run {r} of its group)' if len(configs) > 1 else ''
            raise ConfigMismatchError(
                f'{group_dir} holds a run of another config{which}; fields that differ (recorded -> asked): '
                f'{"; ".join(differences)}. Use another workdir, or delete this one to start over.'
            )


def _record_configs(group_dir: str, configs: Sequence[ml_collections.ConfigDict]) -> None:
    if jax.process_index() == 0:
        write_json(os.path.join(group_dir, CONFIG_FILE), {'runs': [c.to_dict() for c in configs]})


class _OrbaxInfoFilter(std_logging.Filter):
    """Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def _quiet_orbax() -> None:
    absl_logger = std_logging.getLogger('absl')
    if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxInfoFilter())


class _RunFiles:
    """A group's checkpoint manager, metric writer and save worker; a `with` block closes them on every exit.

    Saves are synchronous, but run on a worker thread (one at a time) while training goes on: orbax's own
    async mode still blocks the training loop ~30 ms per save, 5 % of an MNIST epoch.
    """

    def __init__(self, group_dir: str):
        self.group_dir = group_dir
        # Only TensorBoard: clu's logging writer would repeat every epoch's progress line on stderr.
        self.writer = (
            metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(group_dir)])
            if jax.process_index() == 0
            else metric_writers.MultiWriter([])
        )
        self.checkpoints = ocp.CheckpointManager(
            os.path.join(group_dir, 'checkpoints'),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2, create=True, enable_async_checkpointing=False
            ),
        )
        self._saver = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=SAVER_THREADS)
        self._pending = None
        self.saved_epoch = None  # the newest epoch whose checkpoint is committed

    def restore(self, target: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The newest checkpoint that restores into `target`'s structure, or None if none does.

        An unreadable one (truncated, corrupt) is moved aside to `corrupt_checkpoints/`, with a warning.
        """
        for step in sorted(self.checkpoints.all_steps(), reverse=True):
            try:
                restored = self.checkpoints.restore(step, args=ocp.args.StandardRestore(target))
                self.saved_epoch = int(restored['epoch'])
                return restored
            except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
                self._move_aside(step, e)
        self.checkpoints.reload()
        return None

    def _move_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.group_dir, 'checkpoints', str(step))
        stamp = time.strftime('%Y%m%d-%H%M%S')
        aside = os.path.join(self.group_dir, 'corrupt_checkpoints', f'{step}-{stamp}')
        logging.warning(
            'Checkpoint %s is unreadable (%s: %s); moved to %s, resuming from an older one or '
            'from the start.',
            path,
            type(error).__name__,
            str(error)[:300],
            aside,
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(path, aside)
        self.checkpoints.reload()

    def save(self, epoch: int, snapshot: dict[str, Any]) -> None:
        self.wait()
        self._pending = (
            epoch,
            self._saver.submit(self.checkpoints.save, epoch, args=ocp.args.StandardSave(snapshot)),
        )

    def wait(self) -> None:
        """Blocks until the pending save is committed; re-raises its error."""
        if self._pending is not None:
            (epoch, future), self._pending = self._pending, None
            future.result()
            self.saved_epoch = epoch

    def __enter__(self) -> '_RunFiles':
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self.wait()
        except Exception as save_error:  # pylint: disable=broad-except
            if error is None:
                raise
            # Another error stops the run already: report the save's too rather than lose it.
            logging.error('The checkpoint save pending when the run stopped failed too: %r', save_error)
        finally:
            self._saver.shutdown()
            self.checkpoints.close()
            self.writer.close()


def _write_results(workdir: str, result: dict[str, Any], final_state, run: Optional[int]) -> None:
    """results.json (and, for `run` not None, that run's final variables) in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    if run is not None:
        variables = {'params': final_state.params, 'batch_stats': final_state.batch_stats}
        variables = jax.tree.map(lambda x: np.asarray(x[run]), variables)
        with open(os.path.join(workdir, 'final_variables.msgpack'), 'wb') as f:
            f.write(
                flax.serialization.msgpack_serialize({k: v for k, v in variables.items() if v is not None})
            )
    write_json(os.path.join(workdir, 'results.json'), result)
