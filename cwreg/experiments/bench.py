"""Benchmarks behind launch/benchmark.py: medians of repeated, blocked timings, compared in one process.

The comparison point for the penalties is the straightforward masked formulation, the complexity of the
authors' released TF code: one mask per class, K per-class I×I covariance matrices (O(K·N·I²) time,
O(K·I²) memory), written in JAX and jitted the same way.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cwreg import penalties

PENALTY_SHAPES = ((100, 100, 10), (500, 128, 100), (100, 4096, 10), (100, 65536, 10))
# The masked cw-CR builds (and differentiates through) K I×I matrices: skip it above this many floats.
MASKED_MAX_FLOATS = 4e8


def median_time(fn: Callable[[], object], repeats: int, min_time: float = 0.2) -> float:
    """Median wall time (s) of `fn()` after one warm-up call, at least `repeats` runs or `min_time` s."""
    jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 100):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- The masked formulation (reference for speed; same values). -------------------------------------------


def _masked_class_statistics(z, y):
    """Per-class means via masks, one class at a time (vmapped): (K, N, I) centred-and-masked samples."""

    def one_class(mask):
        count = jnp.maximum(mask.sum(), 1.0)
        mean = (mask[:, None] * z).sum(0) / count
        return (z - mean) * mask[:, None], count

    return jax.vmap(one_class, in_axes=1)(y)


def masked_cw_cr(z, y):
    z = z.reshape(z.shape[0], -1)
    centred, counts = _masked_class_statistics(z, y)
    covariances = jnp.einsum('kni,knj->kij', centred, centred) / counts[:, None, None]
    num_classes, num_units = y.shape[1], z.shape[1]
    off = covariances * (1.0 - jnp.eye(num_units))
    return jnp.sum(off * off) / (num_classes * num_units * (num_units - 1.0))


def masked_cw_vr(z, y):
    z = z.reshape(z.shape[0], -1)
    centred, counts = _masked_class_statistics(z, y)
    return jnp.sum(jnp.sum(centred * centred, axis=1) / counts[:, None]) / (y.shape[1] * z.shape[1])


def masked_cr(z, y=None):
    z = z.reshape(z.shape[0], -1)
    centred = z - z.mean(0)
    covariance = centred.T @ centred / z.shape[0]
    num_units = z.shape[1]
    off = covariance * (1.0 - jnp.eye(num_units))
    return jnp.sum(off * off) / (num_units * (num_units - 1.0))


def masked_vr(z, y=None):
    z = z.reshape(z.shape[0], -1)
    return jnp.mean(jnp.var(z, axis=0))


def masked_l1r(z, y=None):
    return jnp.mean(jnp.abs(z))


MASKED = {'cr': masked_cr, 'cw_cr': masked_cw_cr, 'vr': masked_vr, 'cw_vr': masked_cw_vr, 'l1r': masked_l1r}


def _masked_floats(name: str, n: int, i: int, k: int) -> float:
    if name == 'cw_cr':
        return k * (i * i + n * i)
    if name == 'cr':
        return i * i
    if name == 'cw_vr':
        return k * n * i
    return n * i


def load_baseline(path: str):
    """A penalties module from a file, e.g. an earlier commit's: `git show REV:cwreg/penalties.py > FILE`."""
    import importlib.util  # pylint: disable=g-import-not-at-top

    spec = importlib.util.spec_from_file_location('baseline_penalties', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, min_time: float = 0.5, max_repeats: int = 2000
) -> dict[str, float]:
    """Median wall time (s) of each fn, timed in alternation so that machine drift hits all alike.

    At least ``repeats`` rounds, and more up to ``min_time`` s per fn (at most ``max_repeats``): calls of
    tens of µs vary by ±50 % with dispatch, so their medians need hundreds of rounds. The order alternates
    between rounds: the first call of a round measured 1–3 % slower than the same program called second.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    orders = (list(fns.items()), list(fns.items())[::-1])
    start, rounds = time.perf_counter(), 0
    while min(map(len, times.values())) < repeats or (
        time.perf_counter() - start < min_time * len(fns) and min(map(len, times.values())) < max_repeats
    ):
        rounds += 1
        for name, fn in orders[rounds % 2 == 0]:
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def penalty_rows(
    shapes: Sequence[tuple[int, int, int]] = PENALTY_SHAPES,
    names: Sequence[str] = tuple(penalties.PENALTIES),
    repeats: int = 5,
    seed: int = 0,
    baseline=None,
    synchronous: bool = True,
) -> list[dict]:
    """Median time of jitted value+grad of each penalty, ours vs the masked formulation (and a baseline).

    The class-wise penalties are timed with integer ids (the fastest form) and with one-hot rows; the
    masked formulation and ``baseline`` (a penalties module taking one-hot rows) get one-hot rows.
    ``vs_baseline`` is ours / baseline, both timed in alternation in this process.

    With ``synchronous`` (the default) XLA:CPU runs each call on the calling thread: calls of 10–50 µs
    then measure the program, not the hand-off to a worker thread, whose wake-up made one process's median
    of the same program 11 µs and another's 34 µs. The old value of the flag is restored on return.
    """
    previous = jax.config.read('jax_cpu_enable_async_dispatch')
    jax.config.update('jax_cpu_enable_async_dispatch', not synchronous)
    try:
        return _penalty_rows(shapes, names, repeats, seed, baseline)
    finally:
        jax.config.update('jax_cpu_enable_async_dispatch', previous)


def _penalty_rows(shapes, names, repeats, seed, baseline) -> list[dict]:
    rows = []
    for n, i, k in shapes:
        rng = np.random.default_rng(seed)
        z = jnp.asarray(np.maximum(rng.normal(size=(n, i)), 0.0).astype(np.float32))
        ids = jnp.asarray(rng.integers(0, k, n), jnp.int32)
        y = jax.nn.one_hot(ids, k)
        for name in names:
            f = penalties.PENALTIES[name]
            forms = {'ids': (lambda a, b, f=f, k=k: f(a, b, num_classes=k), ids)}
            if name in ('cw_cr', 'cw_vr'):
                forms['one-hot'] = (lambda a, b, f=f: f(a, b), y)
            for form, (fn, labels) in forms.items():
                ours = jax.jit(jax.value_and_grad(fn))
                fns = {'ours': lambda: ours(z, labels)}
                if baseline is not None:
                    base = jax.jit(jax.value_and_grad(lambda a, b, g=getattr(baseline, name): g(a, b)))
                    fns['baseline'] = lambda: base(z, y)
                times = _interleaved_medians(fns, repeats)
                if _masked_floats(name, n, i, k) <= MASKED_MAX_FLOATS:
                    # Timed apart: its large temporaries would slow whatever runs right after it.
                    masked = jax.jit(jax.value_and_grad(MASKED[name]))
                    times['masked'] = median_time(lambda: masked(z, y), repeats)
                row = {
                    'penalty': name,
                    'labels': form,
                    'N': n,
                    'I': i,
                    'K': k,
                    'ours_ms': 1e3 * times['ours'],
                }
                if 'baseline' in times:
                    row['baseline_ms'] = 1e3 * times['baseline']
                    row['vs_baseline'] = times['ours'] / times['baseline']
                if 'masked' in times:
                    row['masked_ms'] = 1e3 * times['masked']
                    row['ratio'] = times['masked'] / times['ours']
                    value, reference = float(ours(z, labels)[0]), float(masked(z, y)[0])
                    row['rel_diff'] = abs(value - reference) / max(abs(reference), 1e-30)
                rows.append(row)
    return rows


_ROW_KEYS = ('penalty', 'labels', 'N', 'I', 'K')


def penalty_rows_in_processes(
    processes: int,
    names: Sequence[str],
    repeats: int,
    baseline_path: Optional[str] = None,
    shapes: Sequence[tuple[int, int, int]] = PENALTY_SHAPES,
) -> list[dict]:
    """`penalty_rows` in ``processes`` fresh processes, one after another: per row, the median over them of
    each time and ratio, and the range of ``vs_baseline``.

    One process's buffer placement biases all its timings of a wide layer alike: VR at 65,536 units measured
    0.73× and 1.22× the same baseline in two processes, each ratio stable within its process.
    """
    program = (
        'import json, sys; from cwreg.experiments import bench; '
        'base = bench.load_baseline(sys.argv[3]) if sys.argv[3] else None; '
        'shapes = [tuple(s) for s in json.loads(sys.argv[4])]; '
        'rows = bench.penalty_rows(shapes, sys.argv[1].split(","), int(sys.argv[2]), baseline=base); '
        'print("ROWS " + json.dumps(rows))'
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))}
    runs = []
    for _ in range(processes):
        args = [sys.executable, '-c', program, ','.join(names), str(repeats), baseline_path or '']
        args.append(json.dumps([list(shape) for shape in shapes]))
        out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
        runs.append(json.loads(next(l for l in out.splitlines() if l.startswith('ROWS '))[5:]))
    rows = []
    for same in zip(*runs):
        row = {k: same[0][k] for k in _ROW_KEYS}
        for key in same[0]:
            values = [r[key] for r in same if r.get(key) is not None]
            if key not in _ROW_KEYS and values:
                row[key] = float(statistics.median(values))
        if 'vs_baseline' in row:
            ratios = [r['vs_baseline'] for r in same]
            row['vs_baseline_range'] = f'{min(ratios):.2f}–{max(ratios):.2f}'
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats to 3 significant digits, missing cells as '—'."""

    def cell(value: Optional[object]) -> str:
        if value is None:
            return '—'
        if isinstance(value, float):
            return f'{value:.3g}'
        return str(value)

    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(cell(row.get(c)) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


# --- Training-step overhead of the penalties. ---------------------------------------------------------------

#: (config file module, scenario arg, layers to penalize): the paper's default layer of each model.
TRAIN_MODELS = {
    'mnist_mlp': ('mnist_mlp', '', ('layer5',), (28, 28, 1)),
    'cifar_cnn': ('cifar10_cnn', '', ('fc',), (32, 32, 3)),
    'mnist_autoencoder': ('mnist_autoencoder', '', ('layer3',), (28, 28, 1)),
    'resnet32': ('resnet', 'resnet32', ('logits',), (32, 32, 3)),
}


def _chunk_runner(config, input_shape: tuple[int, ...], steps: int, num_examples: int = 2000, seed: int = 0):
    """A compiled `steps`-step train chunk on random data (one run, mapped as the trainer maps it)."""
    import functools

    from cwreg.training import config as config_lib
    from cwreg.training import devices
    from cwreg.training import step as step_lib

    task = step_lib.Task.from_config(config, 10)
    rng = np.random.default_rng(seed)
    images = rng.random((num_examples,) + input_shape, dtype=np.float32)
    labels = rng.integers(0, 10, num_examples).astype(np.int32)
    state = step_lib.initial_state(task, config_lib.create_optimizer(config), images, seed)
    order = np.concatenate(
        [rng.permutation(num_examples) for _ in range(-(-steps * config.batch_size // num_examples))]
    ).astype(np.int32)
    weights = {
        'penalty': np.float32(config.penalty.weight),
        'weight_penalty': np.float32(0.0),
        'dropout': np.float32(config.model.dropout),
    }
    step_fn = devices.device_map(functools.partial(step_lib.train_chunk, task, steps, config.batch_size))
    put = lambda x: jax.device_put(np.asarray(x)[None], jax.local_devices()[0])
    args = [
        put(images),
        put(labels),
        put(order),
        put(np.int32(0)),
        jax.tree.map(put, weights),
        put(np.asarray(jax.random.key_data(jax.random.key(seed)))),
    ]
    state = jax.tree.map(put, state)

    def run():
        return step_fn(state, *args)[1]['loss']

    return run


def _representation_width(config, input_shape: tuple[int, ...], layer: str) -> int:
    """I: the number of units of `layer` (H·W·C for a feature map)."""
    from cwreg.training import step as step_lib

    task = step_lib.Task.from_config(config, 10)
    images = jax.ShapeDtypeStruct((config.batch_size,) + input_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: task.model.init(jax.random.key(0), x, train=False), images)
    forward = step_lib._forward  # pylint: disable=protected-access
    # Evaluation mode: the same shapes, without the mapped axis batch norm syncs over or a dropout key.
    intermediates = jax.eval_shape(
        lambda v, x: forward(task, v['params'], v.get('batch_stats'), x, False)[1], variables, images
    )
    return int(np.prod(intermediates[layer].shape[1:]))


def _product_floor_runner(num_samples: int, num_units: int, steps: int, seed: int = 0):
    """`steps` chained repetitions of the two products exact CR needs for its value and its gradient.

    The covariance (or, for I > N, Gram) matrix and its product with the centred activations, as
    penalties.cr runs them: what CR costs at the least, without centring, masks or sums.
    """
    from jax import lax

    gram = penalties.use_gram_form(num_samples, num_units, 1)
    dot = lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST)

    def body(z, _):
        inner = dot(z, z.T) if gram else dot(z.T, z)
        grad = dot(inner, z) if gram else dot(z, inner)
        return z + 1e-9 * grad, None  # chains the repetitions so none is skipped

    chained = jax.jit(lambda z: lax.scan(body, z, None, length=steps)[0])
    z = jnp.asarray(np.random.default_rng(seed).random((num_samples, num_units), dtype=np.float32))
    return lambda: chained(z)


FLOOR = "(CR's 2 products alone)"
FLOOR_REPETITIONS = 500


def train_step_rows(
    models: Sequence[str],
    names: Sequence[str],
    steps: int = 50,
    repeats: int = 7,
    batch_size: Optional[int] = None,
) -> list[dict]:
    """Median ms/step of each model with no penalty and with each penalty, their ratio and difference.

    Baseline and penalty chunks are timed alternately, and the ratio (difference) is the median of
    per-repeat ratios (differences), so load from other processes on a shared machine affects both sides
    alike. The FLOOR row times, in the same loop, only the two products CR needs at the layer's shape; its
    overhead is its time as a share of the baseline step: what exact CR adds at the least.
    """
    import importlib

    rows = []
    for model in models:
        module, arg, layers, input_shape = TRAIN_MODELS[model]
        get_config = importlib.import_module(f'configs.{module}').get_config
        base = get_config(arg)
        if batch_size:
            base.batch_size = batch_size
        runners = {('none', ''): _chunk_runner(base, input_shape, steps)}
        iterations = {}  # per call, where it is not `steps`
        for name in names:
            for layer in layers:
                config = get_config(f'{arg},{name}' if arg else name)
                config.penalty.layer = layer
                if batch_size:
                    config.batch_size = batch_size
                runners[(name, layer)] = _chunk_runner(config, input_shape, steps)
        if set(names) & {'cr', 'cw_cr'}:
            width = _representation_width(base, input_shape, layers[0])
            # Enough repetitions per call that dispatch is negligible, even when a chunk has few steps.
            iterations[(FLOOR, layers[0])] = max(steps, FLOOR_REPETITIONS)
            runners[(FLOOR, layers[0])] = _product_floor_runner(
                base.batch_size, width, iterations[(FLOOR, layers[0])]
            )
        for run in runners.values():
            jax.block_until_ready(run())  # compile
        times = {key: [] for key in runners}
        for _ in range(repeats):
            for key, run in runners.items():
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times[key].append((time.perf_counter() - t0) / iterations.get(key, steps))
        base_times = np.array(times[('none', '')])
        for (name, layer), values in times.items():
            values = np.array(values)
            added = values if name == FLOOR else values - base_times
            rows.append(
                {
                    'model': model,
                    'penalty': name,
                    'layer': layer or '—',
                    'ms_per_step': 1e3 * float(np.median(values)),
                    'added_us': 1e6 * float(np.median(added)),
                    'overhead_%': 100.0 * float(np.median(added / base_times)),
                }
            )
    return rows


# --- Whole runs. --------------------------------------------------------------------------------------------


def epoch_rows(config, repeats: int = 3) -> list[dict]:
    """Wall time of full runs (e.g. 50 MNIST epochs), with and without per-epoch checkpoints.

    Medians over `repeats` runs of the training loop (first compilation, evaluations and checkpoints
    included) and of the whole run (data loading from the prepared TFDS files and initialisation too; the
    in-process dataset cache is cleared before each run).
    """
    import tempfile

    import ml_collections

    from cwreg.training import loop

    rows = []
    for checkpoint in (True, False):
        c = ml_collections.ConfigDict(config.to_dict())
        c.checkpoint = checkpoint
        results = []
        for _ in range(repeats):
            loop._load_data.cache_clear()  # pylint: disable=protected-access
            with tempfile.TemporaryDirectory() as workdir:
                results.append(loop.train_and_evaluate(c, workdir))
        loop = [r['train_loop_s'] for r in results]
        total = [r['wall_time_s'] for r in results]
        result = results[0]
        rows.append(
            {
                'scenario': result['scenario'],
                'regularizer': result['regularizer'],
                'checkpoints': 'every epoch' if checkpoint else 'none',
                'epochs': result['epochs'],
                'runs': repeats,
                'train_loop_s': float(np.median(loop)),
                'min_loop_s': min(loop),
                'total_wall_s': float(np.median(total)),
                'min_total_s': min(total),
                'ms_per_step': 1e3 * float(np.median(loop)) / result['steps'],
                f'{result["eval_split"]}_error_%': result['error'],
            }
        )
    return rows


def sweep_rows(config, group_sizes: Sequence[int], epochs: int = 2) -> list[dict]:
    """Runs per hour when λ-search runs are trained as vmapped groups of each size.

    Each group is trained for 1 and for 1 + `epochs` epochs, after a warm-up run that compiles; the difference
    of the two training loops is `epochs` epochs of steady state, extrapolated to config.num_epochs.
    """
    import tempfile

    import ml_collections

    from cwreg.training import loop

    def loop_seconds(size: int, num_epochs: int) -> tuple[float, int]:
        configs = []
        for r in range(size):
            c = ml_collections.ConfigDict(config.to_dict())
            c.num_epochs, c.checkpoint, c.penalty.weight = num_epochs, False, 10.0 ** (r - 3)
            c.eval_every_epochs = num_epochs
            configs.append(c)
        with tempfile.TemporaryDirectory() as root:
            results = loop.train_group(
                configs, [f'{root}/run{r}' for r in range(size)], f'{root}/group', on_nonfinite='record'
            )
        return results[0]['train_loop_s'], results[0]['steps']

    rows = []
    for size in group_sizes:
        loop_seconds(size, 1)  # warm-up: the timed runs below then both reuse the compiled programs
        short, short_steps = loop_seconds(size, 1)
        long, long_steps = loop_seconds(size, 1 + epochs)
        per_step = (long - short) / (long_steps - short_steps)
        per_run_hours = per_step * short_steps * config.num_epochs / size / 3600
        rows.append(
            {
                'group_size': size,
                'ms_per_step_per_run': 1e3 * per_step / size,
                f'runs_per_hour_({config.num_epochs}_epochs)': 1.0 / per_run_hours,
            }
        )
    return rows
