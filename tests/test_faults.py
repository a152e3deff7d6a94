"""Faults and what a researcher reads: corrupt checkpoints, interrupts, closing on every exit, progress lines,
provenance, --help. The runs are test_train's small MNIST MLP on mock data (10 steps per epoch)."""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

from clu import metric_writers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_train as T

from configs import cifar10_cnn, cifar100_cnn, default, mnist_autoencoder, mnist_mlp, resnet
from cwreg import names
from cwreg.training import config as config_lib
from cwreg.training import loop, rundir
from cwreg.training import step as step_lib

REPO_ROOT = T.REPO_ROOT


def _run(data_dir: str, workdir: str, **overrides):
    with T._mock_tfds(T._NUM_TRAIN, T._NUM_TEST):
        return loop.train_and_evaluate(T._small_mlp_config(data_dir, **overrides), workdir)


def _damage_checkpoint(workdir: str, step: int) -> None:
    """Truncates every file of a committed checkpoint to half its size, as a full disk or a kill might."""
    for path in glob.glob(os.path.join(workdir, 'checkpoints', str(step), '**'), recursive=True):
        if os.path.isfile(path):
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)


def _warnings(caplog) -> str:
    return '\n'.join(r.getMessage() for r in caplog.records if r.levelname in ('WARNING', 'ERROR'))


# --------------------------------------------------------------------------------------------------------
# A corrupt checkpoint.
# --------------------------------------------------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, monkeypatch, caplog):
    data_dir, workdir, reference = str(tmp_path / 'tfds'), str(tmp_path / 'run'), str(tmp_path / 'reference')
    _run(data_dir, reference)
    _run(data_dir, workdir, num_epochs=2)
    assert T._checkpoint_steps(workdir) == [1, 2]
    _damage_checkpoint(workdir, 2)
    with caplog.at_level('WARNING'), T._record_epochs(monkeypatch) as epochs:
        _run(data_dir, workdir)
    assert epochs == [1, 2]  # resumed from epoch 1's checkpoint
    assert os.path.join(workdir, 'checkpoints', '2') in _warnings(caplog)
    (aside,) = os.listdir(os.path.join(workdir, 'corrupt_checkpoints'))  # kept for a post-mortem, not deleted
    assert aside.startswith('2-')
    T._assert_same_run(workdir, reference)


def test_no_intact_checkpoint_starts_over(tmp_path, monkeypatch, caplog):
    data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
    _run(data_dir, workdir, num_epochs=2)
    for step in (1, 2):
        _damage_checkpoint(workdir, step)
    with caplog.at_level('WARNING'), T._record_epochs(monkeypatch) as epochs:
        result = _run(data_dir, workdir, num_epochs=2)
    assert epochs == [0, 1] and result['steps'] == 20 and result['status'] == 'finished'
    for step in (1, 2):
        assert os.path.join(workdir, 'checkpoints', str(step)) in _warnings(caplog)
    assert T._checkpoint_steps(workdir) == [1, 2]


# --------------------------------------------------------------------------------------------------------
# Everything is closed on every exit path.
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def closed(monkeypatch) -> list[str]:
    """Records the closing of the trainer's checkpoint manager, metric writer and save worker."""
    log = []

    class Manager(ocp.CheckpointManager):
        def close(self):
            log.append('checkpoints')
            super().close()

    class Writer(metric_writers.AsyncMultiWriter):
        def close(self):
            log.append('writer')
            super().close()

    class Executor(concurrent.futures.ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            if self._thread_name_prefix == rundir.SAVER_THREADS:  # not clu's own pools
                log.append('saver')
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr(rundir.ocp, 'CheckpointManager', Manager)
    monkeypatch.setattr(rundir.metric_writers, 'AsyncMultiWriter', Writer)
    monkeypatch.setattr(rundir.concurrent.futures, 'ThreadPoolExecutor', Executor)
    return log


def test_an_error_in_the_host_loop_closes_everything(tmp_path, closed):
    config = T._diverging_config(str(tmp_path / 'tfds'), T._HUGE_WEIGHT)
    with T._mock_tfds(T._NUM_TRAIN, T._NUM_TEST), pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert sorted(closed) == ['checkpoints', 'saver', 'writer']


def test_a_failed_save_is_raised_not_lost_and_everything_is_closed(tmp_path, closed, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError('No space left on device')

    monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
    with pytest.raises(OSError, match='No space left'):
        _run(str(tmp_path / 'tfds'), str(tmp_path / 'run'), num_epochs=1)
    assert sorted(closed) == ['checkpoints', 'saver', 'writer']
    assert not os.path.exists(tmp_path / 'run' / 'results.json')


def test_a_failed_save_is_logged_when_another_error_stops_the_run(tmp_path, closed, monkeypatch, caplog):
    def slow_failing_save(self, *args, **kwargs):
        time.sleep(0.5)
        raise OSError('No space left on device')

    def interrupt_at_epoch_1(seed, epoch, num_examples):
        if epoch == 1:
            raise RuntimeError('a bug in the host loop')
        return original(seed, epoch, num_examples)

    original = step_lib.epoch_order
    monkeypatch.setattr(ocp.CheckpointManager, 'save', slow_failing_save)
    monkeypatch.setattr(step_lib, 'epoch_order', interrupt_at_epoch_1)
    with caplog.at_level('ERROR'), pytest.raises(RuntimeError, match='a bug'):
        _run(str(tmp_path / 'tfds'), str(tmp_path / 'run'))
    assert 'No space left on device' in _warnings(caplog)
    assert sorted(closed) == ['checkpoints', 'saver', 'writer']


# --------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM.
# --------------------------------------------------------------------------------------------------------


def test_ctrl_c_says_where_the_run_stopped_and_closes_everything(tmp_path, closed, monkeypatch):
    def interrupt_at_epoch_1(seed, epoch, num_examples):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(seed, epoch, num_examples)

    original = step_lib.epoch_order
    monkeypatch.setattr(step_lib, 'epoch_order', interrupt_at_epoch_1)
    workdir = str(tmp_path / 'run')
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        _run(str(tmp_path / 'tfds'), workdir)
    assert str(stopped.value) == (
        f'Stopped in epoch 2/3 at step 10/30 of {workdir}; the same command resumes '
        'it from its checkpoint of epoch 1.'
    )
    assert isinstance(stopped.value, KeyboardInterrupt)  # what callers that catch Ctrl-C expect
    assert sorted(closed) == ['checkpoints', 'saver', 'writer']
    assert T._checkpoint_steps(workdir) == [1]  # the save under way was waited for


@pytest.mark.parametrize('how,status', [('sigint', 130), ('sigterm', 143)])
def test_run_command_turns_an_interrupt_into_one_line(how, status, capsys):
    def work():
        if how == 'sigterm':
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts this
        raise loop.TrainingInterrupted(
            'Stopped in epoch 2/3 at step 10/30 of /w; the same command resumes it.'
        )

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        loop.run_command(work)
    assert exit_.value.code == status
    err = capsys.readouterr().err
    expected = (
        'Stopped in epoch 2/3 at step 10/30 of /w; the same command resumes it.'
        if how == 'sigint'
        else 'Stopped before training began; the same command starts it again (from its last checkpoint, if '
        'it has one).'
    )
    assert err == expected + '\n'
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_command_prints_a_config_error_without_a_traceback(capsys):
    def work():
        raise config_lib.ConfigMismatchError(
            '/w holds a run of another config; fields that differ: seed: 0 -> 1.'
        )

    with pytest.raises(SystemExit) as exit_:
        loop.run_command(work)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == 'Error: /w holds a run of another config; fields that differ: seed: 0 -> 1.\n'


# The launch scripts themselves, on mock data: the parent stops them once a checkpoint exists.
_LAUNCH = textwrap.dedent("""
    import runpy, sys, time
    tests_dir, script, num_train, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    sys.path.insert(0, tests_dir)
    import test_train as T
    from cwreg.training import config as config_lib
    from cwreg.training import step as step_lib
    from cwreg.training import rundir
    from cwreg.training import loop
    from cwreg import names

    original = step_lib.epoch_order
    def slow_epoch_order(*args):  # slow epochs, so that the parent can stop the run between checkpoints
        time.sleep(delay)
        return original(*args)
    step_lib.epoch_order = slow_epoch_order
    sys.argv = [script] + sys.argv[5:]
    with T._mock_tfds(num_train, T._NUM_TEST):
        runpy.run_path(script, run_name='__main__')
""")


def _launch(tmp_path, name: str, args: list[str], num_train: int, delay: float) -> subprocess.Popen:
    script = tmp_path / 'launch.py'
    script.write_text(_LAUNCH)
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES='',
        PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
    )
    env.pop('JAX_PLATFORMS', None)  # let JAX probe for accelerators, as a user's run does
    with open(tmp_path / f'{name}.out', 'w') as out, open(tmp_path / f'{name}.err', 'w') as err:
        command = [sys.executable, str(script), T.TESTS_DIR, args[0], str(num_train), str(delay), *args[1:]]
        # A shell's background job (`nohup .ci/run &`) ignores SIGINT, and children inherit that: Python then
        # installs no Ctrl-C handler. Give the launched run the terminal's disposition, as a user's has.
        restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, preexec_fn=restore_sigint
        )


def _stop_after_first_checkpoint(proc: subprocess.Popen, pattern: str, signum: int) -> None:
    deadline = time.time() + 300
    try:
        while not glob.glob(pattern):  # orbax renames a checkpoint to its step once committed
            assert proc.poll() is None, 'the run ended before its first checkpoint'
            assert time.time() < deadline, 'no checkpoint after 300 s'
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def _outputs(tmp_path, name: str) -> tuple[str, str]:
    return (tmp_path / f'{name}.out').read_text(), (tmp_path / f'{name}.err').read_text()


_PROGRESS = re.compile(
    r'^epoch (\d+)/3  step (\d+)/30  train_loss \S+  train_penalty \S+  train_error \S+  '
    r'(eval_loss \S+  eval_penalty \S+  eval_error \S+  )?[\d,.]+ steps/s  ETA \d+:\d\d:\d\d$'
)


@pytest.mark.slow
def test_launch_train_stops_in_one_line_resumes_and_refuses_another_config(tmp_path):
    workdir = str(tmp_path / 'run')
    args = [
        'launch/train.py',
        '--config=configs/mnist_mlp.py:cw_vr,size1k',
        f'--workdir={workdir}',
        f'--config.dataset.data_dir={tmp_path / "tfds"}',
        '--config.num_epochs=3',
        '--config.eval_batch_size=50',
        '--config.steps_per_dispatch=4',
    ]
    # 8 s before each epoch: under CI's load the first checkpoint's commit can lag by seconds.
    proc = _launch(tmp_path, 'stopped', args, T._NUM_TRAIN, delay=8.0)
    _stop_after_first_checkpoint(proc, os.path.join(workdir, 'checkpoints', '[0-9]*'), signal.SIGINT)
    out, err = _outputs(tmp_path, 'stopped')
    assert proc.returncode == 130, err[-3000:]
    assert 'Traceback' not in err and 'Unable to initialize backend' not in err, err[-3000:]
    (line,) = [l for l in err.splitlines() if 'Stopped' in l]
    saved = max(T._checkpoint_steps(workdir))
    assert line.startswith('Stopped in epoch ') and line.endswith(
        f'of {workdir}; the same command resumes it from its checkpoint of epoch {saved}.'
    ), line
    assert out.splitlines() and all(_PROGRESS.match(l) for l in out.splitlines()), out

    proc = _launch(tmp_path, 'resumed', args, T._NUM_TRAIN, delay=0.0)
    assert proc.wait(timeout=300) == 0, _outputs(tmp_path, 'resumed')[1][-3000:]
    out, err = _outputs(tmp_path, 'resumed')
    progress = [_PROGRESS.match(l) for l in out.splitlines()[:-1]]
    assert all(progress) and [int(m.group(1)) for m in progress] == list(range(saved + 1, 4)), out
    assert out.splitlines()[-1].startswith(
        f'mnist_mlp/size1k cw_vr (λ={mnist_mlp.WEIGHTS["cw_vr"]}, seed 0): test error (%) = '
    )
    assert 'train_loss' not in err  # no copy of the progress lines from clu's logging writer

    proc = _launch(tmp_path, 'other', args + ['--config.model.width=50'], T._NUM_TRAIN, delay=0.0)
    assert proc.wait(timeout=300) == 2
    out, err = _outputs(tmp_path, 'other')
    assert 'Traceback' not in err
    (line,) = [l for l in err.splitlines() if l.startswith('Error:')]
    assert 'model.width: 100 -> 50' in line and workdir in line, err[-3000:]


@pytest.mark.slow
def test_launch_sweep_stops_in_one_line_on_sigterm(tmp_path):
    sweep_dir = str(tmp_path / 'sweep')
    args = [
        'launch/sweep.py',
        '--config=configs/mnist_mlp.py:size1k',
        f'--sweep_dir={sweep_dir}',
        '--regularizers=baseline',
        '--selection_seeds=1',
        '--final_seeds=1',
        f'--config.dataset.data_dir={tmp_path / "tfds"}',
        '--config.num_epochs=3',
        '--config.eval_batch_size=50',
        '--config.steps_per_dispatch=4',
    ]
    proc = _launch(tmp_path, 'sweep', args, 11_000, delay=8.0)  # the λ search holds out 10k examples
    _stop_after_first_checkpoint(
        proc, os.path.join(sweep_dir, 'baseline', 'group_*', 'checkpoints', '[0-9]*'), signal.SIGTERM
    )
    out, err = _outputs(tmp_path, 'sweep')
    assert proc.returncode == 143, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    (line,) = [l for l in err.splitlines() if 'Stopped' in l]
    assert line.startswith('Stopped in epoch ') and 'the same command resumes it from its checkpoint' in line


# --------------------------------------------------------------------------------------------------------
# What a researcher reads.
# --------------------------------------------------------------------------------------------------------


def test_one_progress_line_per_epoch_on_stdout_and_none_in_the_logs(tmp_path, capsys, caplog):
    with caplog.at_level('INFO'):
        _run(str(tmp_path / 'tfds'), str(tmp_path / 'run'), eval_every_epochs=2)
    lines = capsys.readouterr().out.splitlines()
    matches = [_PROGRESS.match(line) for line in lines]
    assert all(matches) and len(lines) == 3, lines
    assert [(m.group(1), m.group(2)) for m in matches] == [('1', '10'), ('2', '20'), ('3', '30')]
    assert [bool(m.group(3)) for m in matches] == [
        False,
        True,
        True,
    ]  # evaluated every 2 epochs and at the end
    assert not [r for r in caplog.records if 'train_loss' in r.getMessage()], caplog.text


def test_progress_line_rounds_its_numbers():
    line = loop.progress_line(
        2,
        50,
        1500,
        25_000,
        {'train_loss': np.array([0.123456789]), 'train_error': np.array([12.3456789])},
        1234.5678,
    )
    assert line == (
        'epoch 3/50  step 1500/25000  train_loss 0.1235  train_error 12.35  1,235 steps/s  ETA 0:00:19'
    )
    assert loop.progress_line(0, 1, 1, 100_000, {}, 0.5).endswith('0.5 steps/s  ETA 55:33:18')


def test_backend_probing_is_not_logged(caplog):
    loop.quiet_backend_probing()
    import logging  # pylint: disable=g-import-not-at-top

    probe = logging.getLogger('jax._src.xla_bridge')
    with caplog.at_level('INFO', logger='jax._src.xla_bridge'):
        probe.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
        probe.warning(
            'An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.'
        )
    assert [r.levelname for r in caplog.records] == ['WARNING']


def test_results_record_provenance(tmp_path):
    result = _run(str(tmp_path / 'tfds'), str(tmp_path / 'run'), num_epochs=1)
    provenance = T._read_results(str(tmp_path / 'run'))['provenance']
    assert provenance == json.loads(json.dumps(result['provenance']))
    import flax
    import optax  # pylint: disable=g-import-not-at-top,multiple-imports

    assert provenance['cwreg'] == '0.1.0'
    assert (provenance['jax'], provenance['flax'], provenance['optax']) == (
        jax.__version__,
        flax.__version__,
        optax.__version__,
    )
    assert provenance['device_kind'] == jax.devices()[0].device_kind
    assert provenance['device_count'] == jax.device_count()
    head = subprocess.run(['git', '-C', REPO_ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    if head.returncode == 0:
        # The commit when this process first asked (HEAD may have moved since): one of HEAD's history.
        commit = provenance['git_commit'].removesuffix('-dirty')
        assert (
            subprocess.run(['git', '-C', REPO_ROOT, 'merge-base', '--is-ancestor', commit, 'HEAD']).returncode
            == 0
        )


_CONFIGS = {
    'configs/mnist_mlp.py': mnist_mlp,
    'configs/mnist_autoencoder.py': mnist_autoencoder,
    'configs/cifar10_cnn.py': cifar10_cnn,
    'configs/cifar100_cnn.py': cifar100_cnn,
    'configs/resnet.py': resnet,
}


@pytest.mark.parametrize('script', ['launch/train.py', 'launch/sweep.py'])
def test_help_lists_configs_scenarios_regularizers_and_fields(script):
    proc = subprocess.run(
        [sys.executable, script, '--help'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert 'Try --helpfull' in proc.stdout, proc.stderr[-3000:]  # (absl's --help exits with status 1)
    text = ' '.join(proc.stdout.split())  # the listing wraps lines
    for path, module in _CONFIGS.items():
        listed = re.search(re.escape(path) + r' scenarios: (\w+(?:, \w+)*)', text)
        assert listed and listed.group(1).split(', ') == list(module.SCENARIOS), (path, text)
    for regularizer in names.REGULARIZERS:
        assert re.search(rf'\b{regularizer}\b', text), regularizer
    assert 'configs/default.py' in text
    for field in rundir._flatten(default.get_config().to_dict()):
        section, _, name = field.rpartition('.')
        assert re.search(rf'\b{section}\.{{[^}}]*\b{name}\b' if section else rf'\b{name}\b', text), field
