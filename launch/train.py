r"""Trains one run of a paper scenario and prints its test error.

  python launch/train.py --config=configs/mnist_mlp.py:cw_vr --workdir=/tmp/mnist_cw_vr \
      [--config.penalty.weight=0.1 --config.penalty.layer=layer4 --config.dataset.data_dir=...]

--config=FILE:REGULARIZER,SCENARIO (both optional: baseline, default):
  configs/mnist_mlp.py          scenarios: default, size1k, size5k, width2, width8
  configs/mnist_autoencoder.py  scenarios: default
  configs/cifar10_cnn.py        scenarios: default, size1k, size5k, width32, width512, momentum, rmsprop
  configs/cifar100_cnn.py       scenarios: default, size1k, size5k, width32, width512, classes4, classes16,
                                classes64
  configs/resnet.py             scenarios: resnet32, resnet110
  regularizers: baseline, l1w, l2w, dropout (rate 0.5), batchnorm (MLP and CNN), cr, cw_cr, vr, cw_vr, l1r

--config.FIELD=VALUE overrides any field; configs/default.py gives each one's meaning and default:
  scenario, seed, batch_size, num_epochs, num_train_steps, eval_batch_size, eval_every_epochs,
  steps_per_dispatch, checkpoint, weight_decay,
  dataset.{name, data_dir, validation, validation_size, train_size, num_classes, augment, standardize, download},
  model.{name, width, depth, kernel_init, bias_init, dropout, batchnorm}, penalty.{name, weight, layer},
  weight_penalty.{name, weight, layer},
  optimizer.{name, learning_rate, momentum, tf1, schedule, boundaries, decay_factor}

A workdir remembers its config (config.json): the same command resumes a stopped run from its last
checkpoint, and a different config in the same workdir stops before training, listing the fields that
differ. Prints one line per epoch; metrics go to TensorBoard (the workdir), the final ones to results.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.json.')
flags.DEFINE_bool(
    'distributed',
    False,
    'Multi-host: call jax.distributed.initialize() first; the flags below '
    'may stay unset where JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).',
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (--distributed).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (--distributed).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError('Too many command-line arguments.')
    # TensorFlow is only used by tfds for reading; keep it off the accelerators JAX uses.
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], 'GPU')
    if FLAGS.distributed:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; GPUs use NCCL
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from cwreg.training import loop

    loop.quiet_backend_probing()
    logging.info(
        'JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(), jax.local_devices()
    )
    results = loop.run_command(lambda: loop.train_and_evaluate(FLAGS.config, FLAGS.workdir))
    metric = 'error (%)' if results['error'] is not None else 'MSE'
    value = results['error'] if results['error'] is not None else results['loss']
    print(
        f'{results["scenario"]} {results["regularizer"]} (λ={results["weight"]}, seed {results["seed"]}): '
        f'{results["eval_split"]} {metric} = {value:.4g}'
    )


if __name__ == '__main__':
    app.run(main)
