"""The training objective and the optimizers written out by hand, for tests/test_objective.py.

Nothing here imports cwreg: the penalties are the formulas of the paper (eqs. 1–6, with the normalization
of the authors' code that the README states), the loss is written with logsumexp, and the optimizers are
their textbook update rules with the hyperparameters spelled out. The trainer must agree with these.

    J̃ = mean cross-entropy + λ Ω(z_layer, y) + λ_w W(kernel of the penalized layer) + wd · ½ Σ_kernels w²
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------------------------------
# Task loss and representation penalties. z: (N, I) activations, labels: (N,) ints, K: classes of the dataset.


def cross_entropy(logits, labels):
    """Mean over the batch of −log softmax(logits)[label]."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def _covariance(z, weights):
    """c_ij = 1/n Σ_n w_n (z_in − μ_i)(z_jn − μ_j) over the n samples with weight 1 (the paper's 1/N)."""
    count = jnp.maximum(jnp.sum(weights), 1.0)  # an absent class: all weights 0, c = 0
    mean = weights @ z / count
    centred = weights[:, None] * (z - mean)
    return centred.T @ centred / count


def _off_diagonal_square_sum(c):
    return jnp.sum(jnp.square(c)) - jnp.sum(jnp.square(jnp.diag(c)))


def _per_class(statistic, z, labels, num_classes):
    """Σ_k statistic(c^k) over the K classes of the dataset (an absent class has c^k = 0)."""
    return sum(statistic(_covariance(z, (labels == k).astype(z.dtype))) for k in range(num_classes))


def vr(z, labels, num_classes):
    """Ω_VR = Σ_i v_i / I."""
    return jnp.sum(jnp.var(z, axis=0)) / z.shape[1]


def cr(z, labels, num_classes):
    """Ω_CR = Σ_{i≠j} c_ij² / (I(I−1))."""
    units = z.shape[1]
    return _off_diagonal_square_sum(_covariance(z, jnp.ones(z.shape[0]))) / (units * (units - 1))


def cw_vr(z, labels, num_classes):
    """Ω_cw-VR = Σ_k Σ_i v^k_i / (K I), v^k over the class's own samples with 1/|S_k|."""
    return _per_class(lambda c: jnp.sum(jnp.diag(c)), z, labels, num_classes) / (num_classes * z.shape[1])


def cw_cr(z, labels, num_classes):
    """Ω_cw-CR = Σ_k Σ_{i≠j} (c^k_ij)² / (K I(I−1))."""
    units = z.shape[1]
    return _per_class(_off_diagonal_square_sum, z, labels, num_classes) / (num_classes * units * (units - 1))


def l1r(z, labels, num_classes):
    """Ω_L1R = Σ_n Σ_i |z_in| / (N I)."""
    return jnp.mean(jnp.abs(z))


PENALTIES: dict[str, Callable] = {'vr': vr, 'cr': cr, 'cw_vr': cw_vr, 'cw_cr': cw_cr, 'l1r': l1r}

# Weight penalties of one layer's kernel (biases are not weights here), and weight decay over all kernels.
WEIGHT_PENALTIES: dict[str, Callable] = {
    'l1w': lambda kernel: jnp.sum(jnp.abs(kernel)),
    'l2w': lambda kernel: 0.5 * jnp.sum(jnp.square(kernel)),  # tf.nn.l2_loss, as the paper's code
}


def all_kernels(params):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == 'kernel']


class Objective(NamedTuple):
    """One run's objective; `penalty`/`weight_penalty` are names above or None."""

    num_classes: int
    penalty: Any = None
    lam: float = 0.0
    layer: str = ''
    weight_penalty: Any = None
    lam_w: float = 0.0
    weight_penalty_module: str = ''  # the params entry of the penalized layer, e.g. 'dense2'
    weight_decay: float = 0.0


def objective(model, spec: Objective, params, images, labels):
    """J̃ of one batch, from the model's own apply (and its sown representations)."""
    logits, state = model.apply({'params': params}, images, mutable=['intermediates'])
    total = cross_entropy(logits, labels)
    if spec.penalty is not None:
        z = state['intermediates'][spec.layer][0]
        z = z.reshape(z.shape[0], -1)
        total += spec.lam * PENALTIES[spec.penalty](z, labels, spec.num_classes)
    if spec.weight_penalty is not None:
        kernel = params[spec.weight_penalty_module]['kernel']
        total += spec.lam_w * WEIGHT_PENALTIES[spec.weight_penalty](kernel)
    total += spec.weight_decay * 0.5 * sum(jnp.sum(jnp.square(w)) for w in all_kernels(params))
    return total


@functools.lru_cache(maxsize=None)
def _compiled_gradient(model, names: Objective):
    """∇J̃ of objectives that differ only in their weights (λ, λ_w, wd): one compile for all of them."""

    def value(params, images, labels, lam, lam_w, weight_decay):
        spec = names._replace(lam=lam, lam_w=lam_w, weight_decay=weight_decay)
        return objective(model, spec, params, images, labels)

    return jax.jit(jax.grad(value))


def gradient(model, spec: Objective, params, images, labels):
    names = spec._replace(lam=0.0, lam_w=0.0, weight_decay=0.0)
    return _compiled_gradient(model, names)(params, images, labels, spec.lam, spec.lam_w, spec.weight_decay)


# ------------------------------------------------------------------------------------------------------------
# Optimizers: init(params) -> state; update(grads, state, step) -> (Δparams, state); step counts from 0.

_map = jax.tree.map


def sgd(lr):
    return (lambda params: None, lambda g, state, step: (_map(lambda g: -lr(step) * g, g), None))


def momentum(lr, mu=0.9):
    """Heavy ball (TF's MomentumOptimizer): m ← μ m + g; w ← w − η m."""

    def update(g, m, step):
        m = _map(lambda m, g: mu * m + g, m, g)
        return _map(lambda m: -lr(step) * m, m), m

    return (lambda params: _map(jnp.zeros_like, params), update)


def rmsprop(lr, decay=0.9, eps=1e-8):
    """ν ← ρ ν + (1−ρ) g²; w ← w − η g / √(ν + ε), ν starting at 0 (optax 0.2.8's defaults)."""

    def update(g, nu, step):
        nu = _map(lambda n, g: decay * n + (1 - decay) * g * g, nu, g)
        return _map(lambda g, n: -lr(step) * g / jnp.sqrt(n + eps), g, nu), nu

    return (lambda params: _map(jnp.zeros_like, params), update)


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba with bias correction; ε outside the square root."""

    def update(g, state, step):
        m, v = state
        m = _map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = _map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        t = step + 1
        delta = _map(lambda m, v: -lr(step) * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps), m, v)
        return delta, (m, v)

    return (lambda params: (_map(jnp.zeros_like, params), _map(jnp.zeros_like, params)), update)


def constant(rate):
    return lambda step: rate


def reference_training(
    model, spec: Objective, optimizer, params, images, labels, order, batch_size, num_steps, first_step=0
):
    """`num_steps` steps on batches order[s·B:(s+1)·B]; returns the parameters after each step."""
    init, update = optimizer
    state = init(params)
    history = []
    for step in range(num_steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        delta, state = update(
            gradient(model, spec, params, images[index], labels[index]), state, first_step + step
        )
        params = _map(jnp.add, params, delta)
        history.append(params)
    return history
