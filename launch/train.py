r"""Trains one run of a paper scenario and prints its test error.

  python launch/train.py --config=configs/mnist_mlp.py:cw_vr --workdir=/tmp/mnist_cw_vr \
      [--config.penalty.weight=0.1 --config.penalty.layer=layer4 --config.dataset.data_dir=...]

A workdir that holds checkpoints resumes from the latest one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.json.')
flags.DEFINE_bool('distributed', False, 'Multi-host: call jax.distributed.initialize() first; the flags below '
                  'may stay unset where JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).')
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
    from cwreg import train
    logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
                 jax.local_devices())
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    metric = 'error (%)' if results['error'] is not None else 'MSE'
    value = results['error'] if results['error'] is not None else results['loss']
    print(f"{results['scenario']} {results['regularizer']} (λ={results['weight']}, seed {results['seed']}): "
          f"{results['eval_split']} {metric} = {value:.4g}")


if __name__ == '__main__':
    app.run(main)
