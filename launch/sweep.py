r"""λ search + 5 seeds for every regularizer of one scenario (the paper's protocol), resumable.

  python launch/sweep.py --config=configs/mnist_mlp.py:default --sweep_dir=workdirs/mnist_mlp_default \
      [--regularizers=baseline,cw_vr] [--seeds=5] [--max_group=6] [--config.dataset.data_dir=...]

Re-running the same command skips finished runs and resumes interrupted ones. Independent regularizers can
go to parallel processes by giving each process its own --regularizers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Scenario config (its regularizer is ignored).',
                                lock_config=True)
flags.DEFINE_string('sweep_dir', None, 'Directory of the sweep (one sub-directory per run).')
flags.DEFINE_list('regularizers', 'baseline,l1w,l2w,cr,cw_cr,vr,cw_vr,l1r', 'Regularizers to run.')
flags.DEFINE_list('weights', '0.001,0.01,0.1,1,10,100', 'The λ grid of the select phase.')
flags.DEFINE_integer('seeds', 5, 'Final runs per regularizer (seeds 0..n-1).')
flags.DEFINE_integer('max_group', 6, 'Runs trained together as one vmapped program.')
flags.mark_flags_as_required(['config', 'sweep_dir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError('Too many command-line arguments.')
    import tensorflow as tf
    tf.config.experimental.set_visible_devices([], 'GPU')
    from cwreg import sweep
    chosen = sweep.run_sweep(FLAGS.config, FLAGS.sweep_dir, regularizers=FLAGS.regularizers,
                             grid=[float(w) for w in FLAGS.weights], seeds=range(FLAGS.seeds),
                             max_group=FLAGS.max_group)
    print('Chosen λ:', ', '.join(f'{r}={w}' for r, w in chosen.items()))


if __name__ == '__main__':
    app.run(main)
