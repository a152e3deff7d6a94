r"""Benchmarks: penalty value+grad vs the masked per-class formulation, and train-step overhead.

  python launch/benchmark.py --suite=penalties [--baseline=/tmp/penalties_at_rev.py] [--processes=5]
  python launch/benchmark.py --suite=train --models=mnist_mlp,cifar_cnn
  python launch/benchmark.py --suite=epochs --repeats=3 --config.dataset.data_dir=data/tfds   (50 MNIST epochs)
  python launch/benchmark.py --suite=sweep --config.dataset.data_dir=data/tfds    (runs per hour)

Prints markdown tables of medians and ratios measured in one process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum('suite', 'penalties', ['penalties', 'train', 'epochs', 'sweep'], 'What to time.')
flags.DEFINE_list('penalties', 'cr,cw_cr,vr,cw_vr,l1r', 'Penalties to time.')
flags.DEFINE_string(
    'baseline',
    None,
    'A penalties.py to time beside ours (--suite=penalties), e.g. '
    '`git show REV:cwreg/penalties.py > /tmp/p.py`: the vs_baseline column is ours/baseline.',
)
flags.DEFINE_list('models', 'mnist_mlp,cifar_cnn', 'Models for --suite=train.')
flags.DEFINE_integer('repeats', 7, 'Timed repetitions (medians are reported).')
flags.DEFINE_integer(
    'processes',
    1,
    '--suite=penalties: run it in this many fresh processes and report per-row medians over them (a '
    "process's buffer placement biases its wide-layer ratios).",
)
flags.DEFINE_integer('steps', 50, 'Steps per timed chunk (--suite=train).')
flags.DEFINE_list('group_sizes', '1,6', 'Runs per vmapped group (--suite=sweep).')
config_flags.DEFINE_config_file(
    'config', 'configs/mnist_mlp.py:cw_vr', 'Run config (epochs, sweep).', lock_config=True
)


def main(argv):
    del argv
    from cwreg.experiments import bench

    if FLAGS.suite == 'penalties':
        if FLAGS.processes > 1:
            rows = bench.penalty_rows_in_processes(
                FLAGS.processes, FLAGS.penalties, FLAGS.repeats, FLAGS.baseline
            )
        else:
            baseline = bench.load_baseline(FLAGS.baseline) if FLAGS.baseline else None
            rows = bench.penalty_rows(names=FLAGS.penalties, repeats=FLAGS.repeats, baseline=baseline)
        columns = ['penalty', 'labels', 'N', 'I', 'K', 'ours_ms', 'masked_ms', 'ratio', 'rel_diff']
        if FLAGS.baseline:
            columns[6:6] = ['baseline_ms', 'vs_baseline'] + (
                ['vs_baseline_range'] if FLAGS.processes > 1 else []
            )
        print(bench.format_table(rows, columns))
    elif FLAGS.suite == 'train':
        rows = bench.train_step_rows(FLAGS.models, FLAGS.penalties, steps=FLAGS.steps, repeats=FLAGS.repeats)
        print(
            bench.format_table(rows, ['model', 'penalty', 'layer', 'ms_per_step', 'added_us', 'overhead_%'])
        )
    elif FLAGS.suite == 'epochs':
        rows = bench.epoch_rows(FLAGS.config, repeats=FLAGS.repeats)
        print(bench.format_table(rows, list(rows[0])))
    else:
        rows = bench.sweep_rows(FLAGS.config, [int(g) for g in FLAGS.group_sizes])
        print(bench.format_table(rows, list(rows[0])))


if __name__ == '__main__':
    app.run(main)
