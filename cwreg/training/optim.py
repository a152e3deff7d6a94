"""TensorFlow 1.x's Adam and RMSProp as optax transformations: the update rules the paper ran (TF 1.5).

They differ from optax's defaults in where ε enters and where RMSProp's accumulator starts; both matter
early in training or for parameters whose gradients are tiny.

* Adam (``tf.train.AdamOptimizer``, Kingma & Ba's Algorithm 1 with the "ε̂" of their Section 2):
  ``θ ← θ − α_t m_t / (√v_t + ε)`` with ``α_t = α √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` and raw (not bias-corrected) moments.
  optax's ``adam`` adds ε to the bias-corrected √v̂_t instead, which equals TF1's with ε √(1 − β₂ᵗ) in
  place of ε: TF1's ε is ≈ 30× larger relative to √v̂ at step 1, the same in the limit.
* RMSProp (``tf.train.RMSPropOptimizer``, decay 0.9, momentum 0, ε = 1e-10): the mean square starts at
  1, not 0, and ε sits inside the square root. With optax's start at 0 the first steps divide by
  √((1 − 0.9) g²) ≈ 0.32 |g|, i.e. they are ≈ 1/(0.32 |g|) times larger (≈ 100× for |g| ≈ 0.03).

References: TensorFlow 1.15 ``training/adam.py`` and ``training/rmsprop.py`` docstrings and kernels
(``ApplyAdam``, ``ApplyRMSProp``); D. P. Kingma and J. Ba, *Adam*, ICLR 2015.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

#: TF 1.x's defaults (tf.train.AdamOptimizer, tf.train.RMSPropOptimizer).
TF1_ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)
TF1_RMSPROP = dict(decay=0.9, eps=1e-10, initial_scale=1.0)


class Tf1AdamState(NamedTuple):
    count: jax.Array  # steps taken, int32
    mu: optax.Updates  # raw first moment m_t
    nu: optax.Updates  # raw second moment v_t


def scale_by_tf1_adam(
    b1: float = TF1_ADAM['b1'], b2: float = TF1_ADAM['b2'], eps: float = TF1_ADAM['eps']
) -> optax.GradientTransformation:
    """Scales updates by TF 1.x Adam's rule, ``√(1 − β₂ᵗ) / (1 − β₁ᵗ) · m_t / (√v_t + ε)`` (no learning rate).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_tf1_adam(), optax.scale(-1e-3))
      >>> params = jnp.zeros(2)
      >>> updates, _ = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
      >>> [round(float(u), 7) for u in updates]  # step 1: ≈ -α · sign(g)
      [-0.001, 0.001]
    """

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return Tf1AdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step_size = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        scaled = jax.tree.map(lambda m, v: (step_size * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return scaled, Tf1AdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def tf1_adam(learning_rate: optax.ScalarOrSchedule, **kwargs: float) -> optax.GradientTransformation:
    """``tf.train.AdamOptimizer(learning_rate)``: :func:`scale_by_tf1_adam`, then −learning rate."""
    return optax.chain(scale_by_tf1_adam(**kwargs), optax.scale_by_learning_rate(learning_rate))


def tf1_rmsprop(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """``tf.train.RMSPropOptimizer(learning_rate)``: ms starts at 1, ``θ ← θ − α g / √(ms + 1e-10)``."""
    return optax.rmsprop(learning_rate, eps_in_sqrt=True, **TF1_RMSPROP)
