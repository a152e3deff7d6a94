r"""Table 8's data-size columns (CIFAR-10 CNN, 1k and 5k training images) in one command, resumable.

  python launch/cifar10_table8.py [--out_dir=DIR] [--toy]

1. prepares the CIFAR-10 subset in the checkout (--data_dir, default data/table8, ignored by git; 46.6 MB)
   from --source_dir (default ../shared/data/cifar10-partial), or reuses it if already prepared, so that
   folder alone can be carried to an accelerator (`--prepare_only` stops here);
2. runs the λ search + 5 seeds of every regularizer for configs/cifar10_cnn.py:size1k and :size5k
   (cwreg.experiments.sweep.run_sweep, vmapped groups of --max_group runs) under --work_dir (default workdirs/table8);
   re-running the same command skips finished runs and resumes interrupted ones;
3. writes table8.md (the two columns beside the paper's, the λ searches), runs.jsonl (one record per run)
   and report.md into --out_dir (default <work_dir>/tables; never docs/results unless asked).

λ is chosen on training images 5,000-9,999 (the paper's hold-out, images 40k-50k, is not in the subset):
see cwreg/experiments/table8.py. --toy runs the same pipeline at toy scale (300/100 images, 1 epoch, 2 λ, 2 seeds;
data/table8_toy, workdirs/table8_toy) in a few minutes on a CPU; its tables are titled as no result.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool('toy', False, 'Toy scale: the whole pipeline in minutes on a CPU (no result).')
flags.DEFINE_string(
    'source_dir',
    None,
    'Original CIFAR-10 python batches (default: '
    '../shared/data/cifar10-partial beside the checkout); unused if --data_dir is prepared.',
)
flags.DEFINE_string(
    'data_dir', None, 'Where the subset is prepared (default: data/table8, or data/table8_toy).'
)
flags.DEFINE_string('work_dir', None, 'Sweep directories (default: workdirs/table8, or workdirs/table8_toy).')
flags.DEFINE_string('out_dir', None, 'Where the tables go (default: <work_dir>/tables).')
flags.DEFINE_list('columns', 'size1k,size5k', 'Table 8 data-size columns to run.')
flags.DEFINE_list('regularizers', 'baseline,l1w,l2w,cr,cw_cr,vr,cw_vr,l1r', 'Regularizers (table rows).')
flags.DEFINE_integer('max_group', 6, 'Runs trained together as one vmapped program.')
flags.DEFINE_bool('prepare_only', False, 'Only prepare (or check) the subset and print its size.')
flags.DEFINE_string(
    'compilation_cache',
    None,
    "JAX's persistent compilation cache (default: "
    "<work_dir>/jax_cache; '' turns it off): a resumed sweep, and groups of equal shapes, "
    'reuse compiled programs.',
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError('Too many command-line arguments.')
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], 'GPU')
    from cwreg.experiments import table8
    from cwreg.training import loop

    cache = FLAGS.compilation_cache
    if cache is None:
        cache = os.path.join(
            FLAGS.work_dir or (table8.DEFAULT_WORK_DIR + ('_toy' if FLAGS.toy else '')), 'jax_cache'
        )
    if cache and not FLAGS.prepare_only:
        import jax

        jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache))
    loop.quiet_backend_probing()
    loop.run_command(
        lambda: table8.main(
            toy=FLAGS.toy,
            source_dir=FLAGS.source_dir or table8.DEFAULT_SOURCE_DIR,
            data_dir=FLAGS.data_dir,
            work_dir=FLAGS.work_dir,
            out_dir=FLAGS.out_dir,
            scenarios=FLAGS.columns,
            regularizers=FLAGS.regularizers,
            max_group=FLAGS.max_group,
            prepare_only=FLAGS.prepare_only,
        )
    )


if __name__ == '__main__':
    app.run(main)
