"""Is a run bitwise the same at two commits, and in two vmapped groups? (docs/results/README.md)

Trains cw-VR (λ = 10) final runs of the default MNIST column for 1 epoch, as the group of seeds 1–6 and as
the group of seeds 3, 11, 12, and prints each run's final test loss and error. Run it from the root of a
checkout of each commit (it imports that checkout's code, the layouts before and after issue #13 alike):

  python docs/results/checks/grouping_check.py /path/to/tensorflow_datasets OUT.json
"""

import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.getcwd())
if os.path.isdir('cwreg/experiments'):
    from cwreg.experiments import sweep
    from cwreg.training import loop
else:  # the layout before issue #13 (commit fdf0566)
    from cwreg import sweep
    from cwreg import train as loop

spec = importlib.util.spec_from_file_location('mnist_mlp', 'configs/mnist_mlp.py')
mnist_mlp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mnist_mlp)
base = mnist_mlp.get_config('default')
base.num_epochs = base.eval_every_epochs = 1
base.checkpoint = False
base.dataset.data_dir = sys.argv[1]
out = {}
for name, seeds in (('seeds 1-6', [1, 2, 3, 4, 5, 6]), ('seeds 3, 11, 12', [3, 11, 12])):
    configs = [sweep.run_config(base, 'cw_vr', 10.0, s, False) for s in seeds]
    d = tempfile.mkdtemp()
    results = loop.train_group(configs, [os.path.join(d, f's{s}') for s in seeds], os.path.join(d, 'g'))
    out[name] = {s: {'loss': r['loss'], 'error': r['error']} for s, r in zip(seeds, results)}
with open(sys.argv[2], 'w') as f:
    json.dump(out, f, indent=1)
