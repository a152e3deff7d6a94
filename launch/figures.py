r"""Figures 1–3 of the paper from a finished sweep; `--layers` also trains the Figure 3 runs first.

  python launch/figures.py --config=configs/mnist_mlp.py:default \
      --sweep_dir=workdirs/mnist_mlp_default --layer_dir=workdirs/mnist_mlp_layers \
      --layers=layer1,layer2,layer3,layer4,layer5,layer6

The PNGs go to reports/figures/ (git-ignored) unless --out says otherwise: writing into docs/results must be
explicit (--out=docs/results).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', 'configs/mnist_mlp.py:default', 'Scenario config.', lock_config=True
)
flags.DEFINE_string('sweep_dir', None, 'A finished sweep of the scenario (λ choices, final runs).')
flags.DEFINE_string('layer_dir', None, 'Where the layer-dependency runs go (Figure 3); empty: skip.')
flags.DEFINE_list('layers', [], 'Layers for Figure 3.')
flags.DEFINE_list('regularizers', 'cr,cw_cr,vr,cw_vr,l1r', 'Regularizers for Figure 3.')
flags.DEFINE_integer('seeds', 1, 'Seeds per (regularizer, layer) for Figure 3.')
flags.DEFINE_integer('seed', None, 'Final seed drawn in Figures 1-2 (default: the lowest final seed).')
# Never docs/results: a default run must not overwrite committed figures.
DEFAULT_OUT = os.path.join('reports', 'figures')
flags.DEFINE_string('out', DEFAULT_OUT, 'Output directory for the PNGs.')
flags.mark_flags_as_required(['sweep_dir'])


def main(argv):
    del argv
    from cwreg.experiments import figures

    for path in figures.representation_figures(FLAGS.sweep_dir, FLAGS.out, seed=FLAGS.seed):
        print('wrote', path)
    if FLAGS.layer_dir and FLAGS.layers:
        figures.run_layer_dependency(
            FLAGS.config,
            FLAGS.layer_dir,
            FLAGS.sweep_dir,
            FLAGS.regularizers,
            FLAGS.layers,
            seeds=range(FLAGS.seeds),
        )
        path = os.path.join(FLAGS.out, 'figure3.png')
        results = figures.layer_dependency_figure(
            FLAGS.layer_dir,
            FLAGS.sweep_dir,
            path,
            FLAGS.layers,
            title=figures.figure3_title(FLAGS.layer_dir, FLAGS.config.scenario),
        )
        print('wrote', path, results)


if __name__ == '__main__':
    app.run(main)
