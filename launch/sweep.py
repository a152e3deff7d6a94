r"""λ search over S selection seeds, then F final seeds, for every regularizer of one scenario; resumable.

  python launch/sweep.py --config=configs/mnist_mlp.py:default --sweep_dir=workdirs/mnist_mlp_default \
      [--regularizers=baseline,cw_vr] [--selection_seeds=3] [--final_seeds=10] [--max_group=6] \
      [--config.dataset.data_dir=...] [--restore_from=docs/results/records/mnist_mlp_default.jsonl]

--selection_seeds=1 --final_seeds=5 is the paper's protocol (one validation run per λ, 5 seeds); the default
(3 and 10) chooses λ by a mean over 3 seeds and measures it on 10 others (cwreg/experiments/sweep.py).

--config=FILE:SCENARIO (its regularizer is ignored; the sweep sets each one in turn):
  configs/mnist_mlp.py          scenarios: default, size1k, size5k, width2, width8
  configs/mnist_autoencoder.py  scenarios: default
  configs/cifar10_cnn.py        scenarios: default, size1k, size5k, width32, width512, momentum, rmsprop
  configs/cifar100_cnn.py       scenarios: default, size1k, size5k, width32, width512, classes4, classes16,
                                classes64
  configs/resnet.py             scenarios: resnet32, resnet110
  --regularizers: any of baseline, l1w, l2w, dropout, batchnorm, cr, cw_cr, vr, cw_vr, l1r

--config.FIELD=VALUE overrides any field; configs/default.py gives each one's meaning and default:
  scenario, seed, batch_size, num_epochs, num_train_steps, eval_batch_size, eval_every_epochs,
  steps_per_dispatch, checkpoint, weight_decay,
  dataset.{name, data_dir, validation, validation_size, train_size, num_classes, augment, standardize, download},
  model.{name, width, depth, kernel_init, bias_init, dropout, batchnorm}, penalty.{name, weight, layer},
  weight_penalty.{name, weight, layer},
  optimizer.{name, learning_rate, momentum, tf1, schedule, boundaries, decay_factor}

Re-running the same command skips finished runs and resumes interrupted ones; a run counts as finished only
if its results.json records the config asked for (a changed field trains it again). Independent
regularizers can go to parallel processes by giving each process its own --regularizers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from cwreg import names

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Scenario config (its regularizer is ignored).', lock_config=True
)
flags.DEFINE_string('sweep_dir', None, 'Directory of the sweep (one sub-directory per run).')
flags.DEFINE_list('regularizers', ','.join(names.SWEEP_REGULARIZERS), 'Regularizers to run.')
flags.DEFINE_list('weights', ','.join(f'{w:g}' for w in names.WEIGHT_GRID), 'The λ grid of the select phase.')
flags.DEFINE_integer('selection_seeds', 3, 'S: seeds 0..S-1 train each λ; λ is chosen by their mean.')
flags.DEFINE_integer('final_seeds', 10, 'F: final runs per regularizer, seeds S..S+F-1.')
flags.DEFINE_integer('max_group', 6, 'Runs trained together as one vmapped program.')
flags.DEFINE_list(
    'restore_from',
    [],
    'Records files (docs/results/records/*.jsonl) whose runs count as done: restored into --sweep_dir '
    'first, so only what they lack is trained (sweep.restore_from_records).',
)
flags.mark_flags_as_required(['config', 'sweep_dir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError('Too many command-line arguments.')
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], 'GPU')
    from cwreg.experiments import sweep
    from cwreg.training import loop

    loop.quiet_backend_probing()
    protocol = sweep.Protocol.of(FLAGS.selection_seeds, FLAGS.final_seeds)
    for path in FLAGS.restore_from:
        count = sweep.restore_from_records(FLAGS.config, FLAGS.sweep_dir, path, protocol)
        print(f'Restored {count} runs from {path} into {FLAGS.sweep_dir}.')
    chosen = loop.run_command(
        lambda: sweep.run_sweep(
            FLAGS.config,
            FLAGS.sweep_dir,
            regularizers=FLAGS.regularizers,
            grid=[float(w) for w in FLAGS.weights],
            protocol=protocol,
            max_group=FLAGS.max_group,
        )
    )
    print('Chosen λ:', ', '.join(f'{r}={w}' for r, w in chosen.items()))


if __name__ == '__main__':
    app.run(main)
