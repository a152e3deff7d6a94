"""The trainer's objective and mechanics, pinned against computations made outside the trainer.

The reference (tests/objective_reference.py) uses only the model's `apply`, hand-written formulas for the
loss, the penalties and the optimizers (the paper's settings), and `jax.grad`; nothing of cwreg.training or
cwreg.penalties. The trainer side goes through cwreg.training's public entry points (Task, create_optimizer,
initial_state, train_chunk, device_map, epoch_order, train_group).

Each test names the deliberate mutations of cwreg/training/ (one of cwreg/penalties.py) it was checked to
make fail ("Catches: ..."), one mutation at a time in a copy of the repository. Issue 11's six (½λΩ, no
momentum, Adam for RMSProp, decay factor 1, one permutation for all epochs, no evaluation mask) all passed
the trainer's and sweep's other tests.

Small MLPs on random 4×4 images keep each test to a few seconds. Parameters are float32; the trainer and
the reference agree to ~1e-6 of the update, the tolerance is 1e-4 of it, and every mutation named moves
the update by at least 1e-3 of it (the tests assert that margin where it is not obvious).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, TESTS_DIR):  # `configs` and the reference module are not part of the package.
    if path not in sys.path:
        sys.path.insert(0, path)

import objective_reference as ref  # noqa: E402

from configs import (
    cifar10_cnn,  # noqa: E402
    cifar100_cnn,  # noqa: E402
    mnist_mlp,  # noqa: E402
    resnet,  # noqa: E402
)
from cwreg.training import config as config_lib  # noqa: E402
from cwreg.training import data as data_lib  # noqa: E402
from cwreg.training import (
    devices,  # noqa: E402
    loop,  # noqa: E402
)
from cwreg.training import step as step_lib  # noqa: E402

NUM_CLASSES = 4
BATCH = 10
RTOL = 1e-4  # of the largest |Δw| of a leaf

# ------------------------------------------------------------------------------------------------------------
# Helpers.


def _config(
    optimizer: str = 'sgd',
    learning_rate: float = 0.1,
    penalty: str = 'none',
    lam: float = 0.0,
    weight_penalty: str = 'none',
    lam_w: float = 0.0,
    weight_decay: float = 0.0,
) -> ml_collections.ConfigDict:
    """The MNIST MLP's config at width 8, depth 2 (layers layer1..layer3), every penalty on layer2."""
    config = mnist_mlp.get_config('baseline')
    config.model.width, config.model.depth = 8, 2
    config.penalty.name, config.penalty.weight, config.penalty.layer = penalty, lam, 'layer2'
    config.weight_penalty.name, config.weight_penalty.weight = weight_penalty, lam_w
    config.weight_penalty.layer = 'layer2'
    config.weight_decay = weight_decay
    config.optimizer.name, config.optimizer.learning_rate = optimizer, learning_rate
    config.batch_size = BATCH
    return config


def _spec(config: ml_collections.ConfigDict) -> ref.Objective:
    """The reference objective of `config` (layer2's representation is produced by params['dense2'])."""
    none = lambda name: None if name == 'none' else name
    return ref.Objective(
        num_classes=NUM_CLASSES,
        penalty=none(config.penalty.name),
        lam=config.penalty.weight,
        layer='layer2',
        weight_penalty=none(config.weight_penalty.name),
        lam_w=config.weight_penalty.weight,
        weight_penalty_module='dense2',
        weight_decay=config.weight_decay,
    )


def _data(num_examples: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(num_examples, 4, 4, 1)).astype(np.float32)
    labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int32)
    return images, labels


def _order_with_a_lopsided_first_batch(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation whose first batch holds classes 0, 0, 0, 0, 1, 1, 1, 1, 1, 2: class 2 a single sample
    and class 3 absent, so the class-wise penalties' per-class 1/|S_k| and 1/K both matter."""
    first = np.concatenate(
        [np.flatnonzero(labels == 0)[:4], np.flatnonzero(labels == 1)[:5], np.flatnonzero(labels == 2)[:1]]
    )
    rest = np.random.default_rng(seed).permutation(np.setdiff1d(np.arange(len(labels)), first))
    return np.concatenate([first, rest]).astype(np.int32)


def _train_chunks(config, images, labels, order, chunks=(2,), seed=0):
    """The trainer's steps: successive train_chunk dispatches of `chunks` steps, as the host loop does.

    Returns (model, initial params, final params).
    """
    task = step_lib.Task.from_config(config, NUM_CLASSES)
    state = step_lib.initial_state(task, config_lib.create_optimizer(config), images, seed)
    params = jax.device_get(state.params)
    weights = {
        'penalty': np.float32(config.penalty.weight),
        'weight_penalty': np.float32(config.weight_penalty.weight),
    }
    rng = jax.random.key_data(jax.random.key(seed))
    first_step = 0
    for count in chunks:
        chunk = devices.device_map(functools.partial(step_lib.train_chunk, task, count, config.batch_size))
        state, _ = chunk(
            *devices.replicate((state, images, labels, order, np.int32(first_step), weights, rng))
        )
        state = devices.unreplicate(state)
        first_step += count
    return task.model, params, jax.device_get(state.params)


def _relative_difference(actual, expected, start) -> float:
    """max over leaves of max|actual − expected| / max|expected − start|: error relative to the update."""

    def leaf(a, e, s):
        return float(np.max(np.abs(np.asarray(a) - e)) / max(np.max(np.abs(np.asarray(e) - s)), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(leaf, actual, expected, start)))


def _assert_same_update(actual, expected, start, rtol=RTOL):
    error = _relative_difference(actual, expected, start)
    assert error <= rtol, f'parameters differ from the reference by {error:.2e} of the update'


def _balanced_weight(model, term: ref.Objective, params, images, labels) -> float:
    """A weight for `term` (given at weight 1) whose gradient at `params` is as large as the task loss's.

    The penalties' values span orders of magnitude (cw-CR is ~1e-4 here); a weight that makes the term
    as strong as the loss is what lets a wrong factor on it show in the update.
    """

    def grads(objective):
        return ref.gradient(model, objective, params, images, labels)

    def norm(tree):
        return float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(tree))))

    loss = grads(term._replace(lam=0.0, lam_w=0.0, weight_decay=0.0))
    return norm(loss) / norm(jax.tree.map(jnp.subtract, grads(term), loss))


# ------------------------------------------------------------------------------------------------------------
# 1. Optimizer steps: four steps in two dispatches (2 + 2), with cw-VR on, against the hand-written rules.

# The paper's rates are 1e-4; for RMSProp and Adam 1e-2 keeps the updates far above the float32 rounding of
# the weights, so that a change of β₂ (≈0.3 % of the update here) is visible.
_OPTIMIZERS = {
    'sgd': (0.1, lambda lr: ref.sgd(ref.constant(lr))),
    'momentum': (0.1, lambda lr: ref.momentum(ref.constant(lr), mu=0.9)),
    'rmsprop': (1e-2, lambda lr: ref.rmsprop(ref.constant(lr), decay=0.9, eps=1e-8)),
    'adam': (1e-2, lambda lr: ref.adam(ref.constant(lr), b1=0.9, b2=0.999, eps=1e-8)),
}


@pytest.mark.parametrize('name', sorted(_OPTIMIZERS))
def test_optimizer_steps_equal_the_hand_written_update(name):
    """Catches: momentum dropped; RMSProp swapped for Adam; Adam's β₂ 0.999 → 0.99; Nesterov momentum;
    the task loss's mean → sum; train_chunk ignoring `first_step` (the second dispatch re-reads batch 0)."""
    learning_rate, optimizer = _OPTIMIZERS[name]
    config = _config(name, learning_rate, penalty='cw_vr', lam=1.0)
    images, labels = _data()
    order = _order_with_a_lopsided_first_batch(labels)
    model, start, final = _train_chunks(config, images, labels, order, chunks=(2, 2))
    expected = ref.reference_training(
        model, _spec(config), optimizer(learning_rate), start, images, labels, order, BATCH, num_steps=4
    )[-1]
    _assert_same_update(final, expected, start)


# ------------------------------------------------------------------------------------------------------------
# 2. Each term of the objective, one at a time, with SGD (whose update is the gradient itself: a factor on
#    a term shows undiluted, where Adam would normalize it away).


def _lambda_as_strong_as_the_loss(penalty: str, images, labels, order) -> float:
    config = _config(penalty=penalty, lam=1.0)
    model = config_lib.model_from_config(config, NUM_CLASSES)
    params = model.init(jax.random.key(config.seed), images[:1])['params']
    first = order[:BATCH]
    return _balanced_weight(model, _spec(config), params, images[first], labels[first])


@pytest.mark.parametrize('penalty', sorted(ref.PENALTIES))
def test_representation_penalty_enters_as_lambda_omega(penalty):
    """J̃ = CE + λ Ω(z_layer2, y) with Ω by the paper's formula, K = 4 classes though the first batch holds 3.

    Catches: λΩ → ½λΩ (also the two-device test); the task loss's mean → sum; one-hot labels of K + 1
    classes (cw-CR and cw-VR: their 1/K).
    """
    images, labels = _data()
    order = _order_with_a_lopsided_first_batch(labels)
    lam = _lambda_as_strong_as_the_loss(penalty, images, labels, order)
    config = _config(penalty=penalty, lam=lam)
    model, start, final = _train_chunks(config, images, labels, order, chunks=(2,))
    sgd = ref.sgd(ref.constant(0.1))
    expected = ref.reference_training(model, _spec(config), sgd, start, images, labels, order, BATCH, 2)[-1]
    _assert_same_update(final, expected, start)
    # The test can see ½λΩ: that objective's update is far outside the tolerance.
    half = ref.reference_training(
        model, _spec(config)._replace(lam=lam / 2), sgd, start, images, labels, order, BATCH, 2
    )[-1]
    assert _relative_difference(half, expected, start) > 100 * RTOL


@pytest.mark.parametrize('weight_penalty', sorted(ref.WEIGHT_PENALTIES))
def test_weight_penalty_is_of_the_chosen_layers_kernel(weight_penalty):
    """J̃ = CE + λ_w W(kernel of dense2): Σ|w| for L1W, ½Σw² for L2W; biases and other layers untouched.

    Catches: the weight penalty over all layers instead of layer2's; L2W without the ½ (in
    cwreg/penalties.py); λ_w W → ½λ_w W.
    """
    images, labels = _data()
    order = _order_with_a_lopsided_first_batch(labels)
    config = _config(weight_penalty=weight_penalty, lam_w=0.1)
    model, start, final = _train_chunks(config, images, labels, order, chunks=(2,))
    sgd = ref.sgd(ref.constant(0.1))
    expected = ref.reference_training(model, _spec(config), sgd, start, images, labels, order, BATCH, 2)[-1]
    _assert_same_update(final, expected, start)
    double = ref.reference_training(
        model, _spec(config)._replace(lam_w=0.2), sgd, start, images, labels, order, BATCH, 2
    )[-1]
    assert _relative_difference(double, expected, start) > 100 * RTOL


def test_weight_decay_is_half_squared_norm_of_every_kernel():
    """J̃ = CE + wd · ½ Σ_{all kernels} w² (He et al.'s weight decay; biases excluded), with L1W on too.

    Catches: weight decay doubled; weight decay dropped when a weight penalty is also on.
    """
    images, labels = _data()
    order = _order_with_a_lopsided_first_batch(labels)
    config = _config(weight_penalty='l1w', lam_w=0.01, weight_decay=0.1)
    model, start, final = _train_chunks(config, images, labels, order, chunks=(2,))
    sgd = ref.sgd(ref.constant(0.1))
    expected = ref.reference_training(model, _spec(config), sgd, start, images, labels, order, BATCH, 2)[-1]
    _assert_same_update(final, expected, start)
    double = ref.reference_training(
        model, _spec(config)._replace(weight_decay=0.2), sgd, start, images, labels, order, BATCH, 2
    )[-1]
    assert _relative_difference(double, expected, start) > 100 * RTOL


# ------------------------------------------------------------------------------------------------------------
# 3. Learning rates: the trainer's optimizer fed a constant gradient of 1 on one scalar parameter, so its
#    t-th update is −η(t)·(the optimizer's recursion of 1s), which is written out in closed form here.


def _updates_for_unit_gradients(config, num_steps: int) -> np.ndarray:
    tx = config_lib.create_optimizer(config)
    param = jnp.zeros(())

    def body(opt_state, _):
        update, opt_state = tx.update(jnp.ones(()), opt_state, param)
        return opt_state, update

    return np.asarray(jax.jit(lambda: jax.lax.scan(body, tx.init(param), None, length=num_steps)[1])())


def test_resnet_schedule_divides_the_rate_by_ten_after_32k_and_48k_steps():
    """He et al. 2016 (the paper's Table 4 recipe): momentum 0.9, rate 0.1, ÷10 at 32k and 48k of 64k steps.

    Step t (counting from 0) is the (t+1)-th update: updates 0..31999 at 0.1, 32000..47999 at 0.01, then 0.001.
    Catches: the decay factor set to 1; a boundary off by one step; momentum dropped.
    """
    config = resnet.get_config('resnet32')
    assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum) == (
        'momentum',
        0.1,
        0.9,
    )
    assert (config.num_train_steps, config.batch_size, config.weight_decay) == (64_000, 128, 1e-4)
    updates = _updates_for_unit_gradients(config, 64_000)
    t = np.arange(64_000)
    rate = np.where(t < 32_000, 0.1, np.where(t < 48_000, 0.01, 0.001))
    velocity = (1 - 0.9 ** (t + 1)) / (1 - 0.9)  # m_t = 0.9 m_{t−1} + 1
    np.testing.assert_allclose(updates, -rate * velocity, rtol=1e-5)
    # At and around the boundaries, spelled out (velocity = 10 there).
    for step, expected_rate in [
        (0, 0.1),
        (31_998, 0.1),
        (31_999, 0.1),
        (32_000, 0.01),
        (32_001, 0.01),
        (47_999, 0.01),
        (48_000, 0.001),
        (48_001, 0.001),
        (63_999, 0.001),
    ]:
        np.testing.assert_allclose(-updates[step] / velocity[step], expected_rate, rtol=1e-5, err_msg=step)


@pytest.mark.parametrize(
    'config',
    [
        mnist_mlp.get_config('cw_vr'),
        cifar10_cnn.get_config('cw_vr'),
        cifar100_cnn.get_config('cw_vr'),
        cifar10_cnn.get_config('cw_vr,momentum'),
        cifar10_cnn.get_config('cw_vr,rmsprop'),
    ],
    ids=['mnist_mlp', 'cifar10_cnn', 'cifar100_cnn', 'cifar10_momentum', 'cifar10_rmsprop'],
)
def test_paper_configs_keep_their_constant_rate_of_1e_4(config):
    """The paper's MNIST/CIFAR protocol: a constant rate of 1e-4 (Adam; Momentum 0.9, RMSProp ρ 0.9) for 25k+
    steps (CIFAR-10: 50 epochs × 500).

    Catches: RMSProp swapped for Adam; momentum dropped.
    """
    updates = _updates_for_unit_gradients(config, 25_000)
    t = np.arange(25_000)
    scale = {  # what each optimizer makes of gradients that are all 1
        'adam': np.ones(len(t)) / (1 + 1e-8),  # bias-corrected moments are exactly 1
        'momentum': (1 - 0.9 ** (t + 1)) / (1 - 0.9),
        'rmsprop': 1 / np.sqrt(1 - 0.9 ** (t + 1) + 1e-8),  # ν_t = 1 − 0.9^(t+1)
    }[config.optimizer.name]
    # Adam's float32 second moment drifts by ~1e-5 over 25k steps: a rate off by 0.01 % would still show.
    np.testing.assert_allclose(updates, -1e-4 * scale, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# 4. Data order.


def test_each_epoch_order_is_a_permutation_that_changes_every_epoch():
    """Catches: the same permutation in every epoch (epoch not folded into the key)."""
    orders = {(seed, epoch): step_lib.epoch_order(seed, epoch, 100) for seed in (0, 1) for epoch in range(5)}
    for order in orders.values():
        assert np.issubdtype(order.dtype, np.integer)
        np.testing.assert_array_equal(np.sort(order), np.arange(100))
    keys = list(orders)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not np.array_equal(orders[a], orders[b]), (a, b)
    # A function of (seed, epoch) only: a resumed run replays the same epoch.
    np.testing.assert_array_equal(step_lib.epoch_order(1, 3, 100), orders[1, 3])


def test_training_follows_each_epochs_order_and_evaluation_ignores_the_padding(tmp_path, monkeypatch):
    """A whole run through train_group: 2 epochs of 4 steps (dispatched 3 + 1), momentum SGD with cw-VR,
    then evaluation of 23 test examples in batches of 10 (7 padding examples in the last batch).

    The final parameters equal 8 reference steps over epoch_order(seed, 0) then epoch_order(seed, 1); the
    test loss and error equal those of the 23 examples computed at once from the final parameters.
    Catches: the same permutation in every epoch (here: epoch 0's order reused by the host loop); the
    evaluation padding mask removed; momentum dropped.
    """
    images, labels = _data(40, seed=0)
    test_images, test_labels = _data(23, seed=1)
    dataset = data_lib.Dataset(
        train=data_lib.Split(images, labels),
        eval=data_lib.Split(test_images, test_labels),
        num_classes=NUM_CLASSES,
        name='mnist',
    )
    monkeypatch.setattr(loop, 'load_data', lambda config: dataset)  # the data source is not under test
    config = _config('momentum', 0.05, penalty='cw_vr', lam=1.0)
    config.dataset.train_size = 0
    config.num_epochs, config.steps_per_dispatch = 2, 3
    config.eval_batch_size, config.eval_every_epochs, config.checkpoint = 10, 1, False
    workdir = str(tmp_path / 'run')
    (results,) = loop.train_group([config], [workdir], workdir, save_variables=True)
    with open(os.path.join(workdir, 'final_variables.msgpack'), 'rb') as f:
        final = flax.serialization.msgpack_restore(f.read())['params']

    model = config_lib.model_from_config(config, NUM_CLASSES)
    start = model.init(jax.random.key(config.seed), images[:1])['params']  # initial_state's documented init
    momentum = ref.momentum(ref.constant(0.05), mu=0.9)
    epochs = np.concatenate(
        [step_lib.epoch_order(config.seed, 0, 40), step_lib.epoch_order(config.seed, 1, 40)]
    )
    expected = ref.reference_training(model, _spec(config), momentum, start, images, labels, epochs, BATCH, 8)
    _assert_same_update(final, expected[-1], start)
    same_order = np.tile(epochs[:40], 2)
    repeated = ref.reference_training(
        model, _spec(config), momentum, start, images, labels, same_order, BATCH, 8
    )
    assert _relative_difference(repeated[-1], expected[-1], start) > 100 * RTOL

    logits = model.apply({'params': final}, test_images)
    np.testing.assert_allclose(results['loss'], ref.cross_entropy(logits, test_labels), rtol=1e-5)
    error = 100.0 * np.mean(np.argmax(logits, -1) != test_labels)
    np.testing.assert_allclose(results['error'], error, atol=1e-4)
    assert (results['steps'], results['epochs']) == (8, 2)


# ------------------------------------------------------------------------------------------------------------
# 5. Two devices: the step equals one reference step on the whole global batch.

_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax
    import numpy as np
    import test_objective as t
    import objective_reference as ref
    from cwreg.training import config as config_lib
    from cwreg.training import step as step_lib
    from cwreg.training import devices
    from cwreg.training import loop

    assert jax.local_device_count() == 2, jax.devices()
    images, labels = t._data()
    order = t._order_with_a_lopsided_first_batch(labels)
    lam = t._lambda_as_strong_as_the_loss('cw_vr', images, labels, order)
    config = t._config('sgd', 0.1, penalty='cw_vr', lam=lam, weight_penalty='l2w', lam_w=0.1, weight_decay=0.1)
    model, start, final = t._train_chunks(config, images, labels, order, chunks=(1, 1))
    expected = ref.reference_training(model, t._spec(config), ref.sgd(ref.constant(0.1)), start, images, labels,
                                      order, t.BATCH, 2)[-1]
    print(t._relative_difference(final, expected, start))
""")


@pytest.mark.slow  # ~10 s: a second Python with TensorFlow and a pmap compile
def test_two_devices_step_on_their_shares_of_the_global_objective(tmp_path):
    """2 CPU devices, 5 examples each: the penalty over the global batch, the weight terms counted once, the
    gradients summed. Runs in a subprocess (the device count is fixed when JAX starts).

    Catches: psum of the gradients → pmean; λΩ → ½λΩ; weight terms not divided by the device count.
    """
    script = tmp_path / 'two_devices.py'
    script.write_text(_TWO_DEVICE_SCRIPT)
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=2',
        JAX_PLATFORMS='cpu',
        PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = float(proc.stdout.strip().splitlines()[-1])
    assert error <= RTOL, f'2-device parameters differ from the reference by {error:.2e} of the update'
