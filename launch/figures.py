r"""Figures 1–3 of the paper from a finished sweep; `--layers` also trains the Figure 3 runs first.

  python launch/figures.py --config=configs/mnist_mlp.py:default \
      --sweep_dir=workdirs/mnist_mlp_default --layer_dir=workdirs/mnist_mlp_layers \
      --layers=layer1,layer2,layer3,layer4,layer5,layer6 [--selection_seeds=3 --final_seeds=10]

Figure 3 trains each of --regularizers on each layer but the config's own (whose runs are the sweep's final
runs) with the λ the sweep chose over its selection seeds, on its final seeds: pass the sweep's
--selection_seeds/--final_seeds. It also writes figure3.md, its numbers with paired CIs
(`cwreg.experiments.layers`). Resumable like a sweep. The outputs go to reports/figures/ (git-ignored)
unless --out says otherwise: writing into docs/results must be explicit (--out=docs/results).

Figure 3 from committed records instead (no sweep directory, nothing trained):

  python launch/figures.py --layers=layer1,layer2,layer3,layer4,layer5,layer6 --out=docs/results \
      --records=docs/results/records/mnist_mlp_default.jsonl,docs/results/records/mnist_mlp_layers.jsonl
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
flags.DEFINE_list('records', [], 'Records files of a sweep and its layer runs: draw Figure 3 from them.')
flags.DEFINE_string('layer_dir', None, 'Where the layer-dependency runs go (Figure 3); empty: skip.')
flags.DEFINE_list('layers', [], 'Layers for Figure 3, in x-axis order.')
flags.DEFINE_list('regularizers', 'cr,cw_cr,vr,cw_vr', 'Regularizers for Figure 3 (the paper: these four).')
flags.DEFINE_integer('selection_seeds', 3, "The sweep's S: λ is its choice over seeds 0..S-1.")
flags.DEFINE_integer('final_seeds', 10, "The sweep's F: layer runs use seeds S..S+F-1.")
flags.DEFINE_integer('seed', None, 'Final seed drawn in Figures 1-2 (default: the lowest final seed).')
flags.DEFINE_bool('representations', True, "Draw Figures 1-2 (they need the final runs' variables).")
# Never docs/results: a default run must not overwrite committed figures.
DEFAULT_OUT = os.path.join('reports', 'figures')
flags.DEFINE_string('out', DEFAULT_OUT, 'Output directory for the PNGs and figure3.md.')
flags.register_validator(
    'sweep_dir', lambda v: bool(v or FLAGS.records), message='Give --sweep_dir or --records.'
)


def main(argv):
    del argv
    from cwreg.experiments import figures, layers, records, report, sweep

    if FLAGS.records:
        if not FLAGS.layers:
            raise app.UsageError('--records draws Figure 3: give its --layers (x-axis order).')
        _figure3(records.load_records(FLAGS.records).runs)
        return
    if FLAGS.representations:
        for path in figures.representation_figures(FLAGS.sweep_dir, FLAGS.out, seed=FLAGS.seed):
            print('wrote', path)
    if FLAGS.layer_dir and FLAGS.layers:
        protocol = sweep.Protocol.of(FLAGS.selection_seeds, FLAGS.final_seeds)
        layers.run_layer_dependency(
            FLAGS.config, FLAGS.layer_dir, FLAGS.sweep_dir, FLAGS.regularizers, FLAGS.layers, protocol
        )
        _figure3(report.load_runs([FLAGS.sweep_dir, FLAGS.layer_dir]).runs)


def _figure3(runs):
    """figure3.png and figure3.md in --out, from the runs of a sweep and its layer runs."""
    from cwreg.experiments import layers, report

    default_layer = FLAGS.config.penalty.layer
    path = os.path.join(FLAGS.out, 'figure3.png')
    layers.figure(runs, FLAGS.layers, default_layer, path)
    report.write_text(
        layers.document(runs, FLAGS.layers, default_layer), os.path.join(FLAGS.out, 'figure3.md')
    )
    print('wrote', path, 'and figure3.md')


if __name__ == '__main__':
    app.run(main)
