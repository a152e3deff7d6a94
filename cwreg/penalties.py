"""Representation and weight penalties of Choi & Rhee (AAAI 2019).

All five representation penalties share one signature::

    penalty(activations, labels=None, *, num_classes=None, where=None, axis_name=None,
            grad_reduction='pmean', precision=lax.Precision.HIGHEST) -> scalar

``activations`` has shape ``(N, ...)`` and is flattened to ``(N, I)`` with ``I`` the product of the
non-batch dimensions (every H·W·C position of a conv feature map is a unit, as in the paper). The result
is float32 (float64 for float64 activations; bf16/f16 are accumulated in float32).

Labels (used by cw-CR and cw-VR; CR, VR and L1R accept and ignore them) come in the forms pipelines make:

* integer class ids of shape ``(N,)`` with the static keyword ``num_classes=K``: the fastest form;
* one-hot rows of shape ``(N, K)``, float or bool;
* non-negative per-class weights of shape ``(N, K)``, e.g. mixup targets.

K is the number of classes of the dataset, absent classes included. An id outside ``[0, K)`` (e.g. −1
padding) and an all-zero row (what ``jax.nn.one_hot(-1, K)`` gives) mean "no class": the sample counts in
no class. ``where`` (bool, shape ``(N,)``, as in ``jnp.sum(..., where=)`` and optax) masks padded samples
for all five penalties: a masked sample counts in no statistic and no count and gets a zero gradient.

Statistics. With weights w_nk (w_nk ∈ {0, 1} for hard labels, the paper's case) and W_k = Σ_n w_nk::

    μ^k = Σ_n w_nk z_n / W_k        c^k = Σ_n w_nk (z_n − μ^k)(z_n − μ^k)ᵀ / W_k        v^k_i = c^k_ii

For one-hot rows these are the paper's eqs. (4)–(6) with ``1/|S_k|``; the all-class statistics (eqs. (1)–(3),
``1/N``) are the single class of every unmasked sample. For soft targets (label smoothing, mixup) every
sample enters every class it has weight in, centred at that class's mean: this is a well-defined weighted
statistic, but usually not what a user wants. Label smoothing, for example, makes every class's statistics
those of the whole batch. Pass the hard ids there. Normalization follows the authors' released code. It
equals Table 1 except for CR/cw-CR, where Table 1's printed 2/(I(I−1)) prefactor disagrees with Table 1's
own gradient by a factor 2; code and gradient agree::

    Ω_CR    = Σ_{i≠j} c_ij² / (I(I−1))              Ω_VR    = Σ_i v_i / I
    Ω_cw-CR = Σ_k Σ_{i≠j} (c^k_ij)² / (K I(I−1))     Ω_cw-VR = Σ_k Σ_i v^k_i / (K I)
    Ω_L1R   = Σ_n Σ_i |z_in| / (N I)

A class absent from the batch, or with a single sample, contributes exactly 0 (the authors' code returns
NaN for an absent class).

Cost and exactness. Σ_k ‖C_k‖²_F is computed either from K per-class I×I covariances (cost K·N·I² on XLA,
which has no grouped product: a segment-summed or ragged form measured no faster than the one-hot product)
or from the N×N Gram matrix of class-centred activations restricted to same-class pairs (cost N²·I), since
‖Z_kᵀ Z_k‖_F = ‖Z_k Z_kᵀ‖_F. The cheaper form is chosen from the static shapes (``use_gram_form``):

* The covariance form sums the off-diagonal entries directly. In float32 its value and gradient are within
  1e-4 relative of float64 when the off-diagonal part is at least 1e-3 of Σ_k ‖C_k‖²_F, and within 1e-7 of
  that total otherwise (tested).
* The Gram form subtracts the diagonal from the whole Frobenius norm, so it cancels when the off-diagonal
  part is small. Its value and gradient errors are at most ``gram_form_error_bound(I)`` = 4 ε √I times
  Σ_k ‖C_k‖²_F and its gradient (ε = 2^-24 in float32: 2.4e-7 × √I, 1.5e-5 at I = 4096; tested on badly
  scaled and 1e9-scale inputs), and its gradient is Table 1's at every point, also where the rounded
  value is clamped at 0. Float64 inputs make the bound 4.4e-16 × √I.
* Where the covariance form costs at most 32× the Gram form (``use_exact_fallback``: K·I ≤ 32 N, e.g.
  MNIST's cw-CR layer), a Gram result within 2·10⁴ bounds of cancelling is recomputed by the covariance
  form, one class at a time, so the covariance form's bounds hold there too (tested). That rare branch
  does no work when not taken (XLA:CPU still sets up its buffers on every call, about 0.1 µs each), and
  under vmap the whole batch takes it if any member needs it. Only wider layers keep the Gram form's bound.
* Values and gradients are finite wherever the float64 value is finite in float32: second moments are
  rescaled by powers of 2, which is exact, so results are those of the unscaled formulas in the normal
  range. jit and eager agree.

Products run at ``lax.Precision.HIGHEST`` (exact float32, no TF32 on GPUs); pass ``precision`` to trade
exactness for speed, as Flax layers allow.

Gradients. CR, cw-CR, VR and cw-VR are differentiated with Table 1's closed form, installed as a JVP rule:
forward and reverse mode both cost one more product of the forward pass's size for CR/cw-CR and an
elementwise product for VR/cw-VR, and nothing differentiates the class statistics (their share of the
gradient is exactly 0). Higher derivatives are autodiff of the rule. Per-class sums and look-ups are
segment sums and gathers on CPU (thin one-hot products run several times slower there) and one-hot
products elsewhere; both define the same numbers.

Multiple devices. With ``axis_name`` inside ``jax.pmap`` or ``jax.shard_map`` every statistic and count is
that of the global batch (all devices along the axis), and the value is identical on every device.
``grad_reduction`` says how your code combines the per-device parameter gradients:

* ``'pmean'`` (default; the Flax examples' idiom ``grads = lax.pmean(grads, axis_name)`` of a per-device
  loss ``task_d + λ Ω``): each device's gradient of Ω is D times its slice of the global gradient, so the
  pmean of the parameter gradients is exactly the single-device gradient of the mean task loss + λΩ.
* ``'psum'``: each device's gradient is its slice of the global gradient, for code that sums parameter
  gradients (``lax.psum``) of per-device losses scaled by 1/D.

Without ``axis_name``, ``jax.jit`` over a batch sharded on a mesh computes the global penalty and gradient
(XLA partitions the computation).

Reference: D. Choi and W. Rhee, "Utilizing Class Information for Deep Network Representation Shaping",
AAAI 2019, arXiv:1809.09307. CR is DeCov (Cogswell et al., ICLR 2016).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Protocol

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from cwreg import labels as labels_lib
from cwreg.labels import AxisName, axis_size, pmax, psum

Array = jax.Array
PrecisionLike = Any

# A form's (value, gradient or None), whether those may be off (a scalar bool, or None where they never
# are), and the robust recomputation for that case.
_Form = tuple[tuple[Array, Optional[Array]], Optional[Array], Optional[Callable[[Any], Any]]]

DEFAULT_PRECISION = lax.Precision.HIGHEST
GRAD_REDUCTIONS = ('pmean', 'psum')


def gram_form_error_bound(num_units: int, dtype=jnp.float32) -> float:
    """The Gram form's bound on |error| / Σ_k ‖C_k‖²_F (normalized like Ω) for value and gradient.

    Measured in float32 at up to 0.9 ε √I (ε = 2^-24) on badly scaled inputs of 64 to 65,536 units;
    stated with a margin of 4 and tested.
    """
    return 4.0 * float(jnp.finfo(dtype).eps) / 2.0 * math.sqrt(num_units)


class Penalty(Protocol):
    def __call__(
        self,
        activations: chex.Array,
        labels: Optional[chex.Array] = None,
        *,
        num_classes: Optional[int] = None,
        where: Optional[chex.Array] = None,
        axis_name: AxisName = None,
        grad_reduction: str = 'pmean',
        precision: PrecisionLike = DEFAULT_PRECISION,
    ) -> Array: ...


# ----------------------------------------------------------------------------------------------------------
# Class membership: hard labels (ids) or one weighted class.


def _pow2_scale(largest: Array) -> tuple[Array, Array]:
    """A power of 2 near ``largest`` (≥ 0) and its inverse: multiplying by either is exact, brings values
    near 1 and costs no division (one XLA:CPU task fewer)."""
    _, exponent = jnp.frexp(largest)
    exponent = jnp.clip(exponent, -126, 126)  # both powers normal floats
    one = jnp.ones((), largest.dtype)
    return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


@jax.custom_batching.custom_vmap
def _any_in_batch(flag: Array) -> Array:
    """``flag``; under vmap, whether it holds for any member of the batch, unbatched.

    A conditional on a batched predicate runs both branches under vmap. The conditionals here choose between
    two computations of the same numbers (one costlier, for rare inputs), so the whole batch may take the
    costly one when any member needs it, and the usual case stays a single branch.
    """
    return flag


@_any_in_batch.def_vmap
def _any_in_batch_vmap(axis_size, in_batched, flag):
    del axis_size
    return (_any_in_batch(jnp.any(flag)) if in_batched[0] else flag), False


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _usual_unless(usual: Callable[..., Any], *operands) -> Any:
    """``result`` or, where ``take_rare`` holds, ``robust(result)``, of ``usual(*operands)``'s triple.

    ``robust`` computes the same numbers for rare inputs (soft labels; values that overflowed or may have
    cancelled). This is ``lax.cond(take_rare, robust, lambda r: r, result)`` without a conditional around the
    usual case: XLA:CPU splits large loops into parallel tasks in the entry computation, while bodies and
    calls, never in a conditional's branches (its ParallelTaskAssigner), and the ids' path ran 1.3-1.4×
    slower for one-hot float labels inside one at 65,536 units. ``robust`` runs in a while loop of 0 or 1
    trips whose carry starts as usual's result (no copy, no zeros). One such loop per penalty: a conditional
    or loop costs XLA:CPU about as much as several fused loops at small sizes. Reverse mode cannot
    differentiate a while loop: derivatives are those of ``lax.cond``, for every order (first derivatives of
    a penalty evaluate this on primal values, in Table 1's rule).
    """
    result, take_rare, robust = usual(*operands)

    def replace(carry):  # robust takes the carry: a closure over result would copy it
        return jnp.zeros((), bool), robust(carry[1])

    return lax.while_loop(lambda carry: carry[0], replace, (_any_in_batch(take_rare), result))[1]


@_usual_unless.defjvp
def _usual_unless_jvp(usual, primals, tangents):
    take_rare = _any_in_batch(usual(*primals)[1])

    def rare(*ops):
        result, _, robust = usual(*ops)
        return robust(result)

    branches = lambda *ops: lax.cond(take_rare, rare, lambda *o: usual(*o)[0], *ops)
    return jax.jvp(branches, tuple(primals), tuple(tangents))


def _settled(result: Any, suspect: Optional[Array], robust: Optional[Callable[[Any], Any]]) -> Any:
    """``result``, or ``robust(result)`` where ``suspect`` holds (a form's guard, for its rare inputs)."""
    if suspect is None:
        return result
    return lax.cond(_any_in_batch(suspect), robust, lambda r: r, result)


def _fixed_pow2(n: int) -> float:
    """2^⌈log2 n⌉: dividing sums of n terms by it keeps them in range, exactly."""
    return float(2.0 ** math.ceil(math.log2(max(n, 1))))


class _HardClasses:
    """Sample n is in class ids[n], or in none when ids[n] == K (absent, padded or masked)."""

    def __init__(
        self,
        ids: Array,
        num_classes: int,
        dtype,
        precision: PrecisionLike,
        float_labels: Optional[tuple[Array, Array]] = None,
    ):
        self.ids, self.num_classes, self.dtype, self.precision = ids, num_classes, dtype, precision
        # Float labels the ids were read from: weights (N, K) and soft_rows (N,), those not hard (see centre).
        self.weights, self.soft_rows = (None, None) if float_labels is None else float_labels

    def _one_hot(self, ids: Optional[Array] = None) -> Array:
        return labels_lib.one_hot(self.ids if ids is None else ids, self.num_classes, self.dtype)

    def _product(self, a: Array, b: Array) -> Array:
        return jnp.tensordot(a, b, axes=1, precision=self.precision)

    def valid(self) -> Array:
        return self.ids < self.num_classes

    def class_weights(self) -> Array:
        return self._one_hot()

    def sums(self, values: Array) -> Array:
        """Σ_{n∈S_k} values_n: (N, ...) -> (K, ...)."""
        num_classes = self.num_classes

        def by_product(v, ids):
            # Masked rows may hold anything (even NaN): the product must not see them.
            v = jnp.where(self._expand(ids < num_classes, v), v, 0)
            return self._product(self._one_hot(ids).T, v)

        if num_classes == 1:  # XLA:CPU sums over the leading axis of a wide array up to 40× slower.
            return by_product(values, self.ids)
        return lax.platform_dependent(
            values,
            self.ids,
            default=by_product,
            cpu=lambda v, ids: jax.ops.segment_sum(v, ids, num_segments=num_classes),
        )

    @staticmethod
    def _expand(mask: Array, like: Array) -> Array:
        return mask.reshape(mask.shape + (1,) * (like.ndim - 1))

    def lookup(self, class_values: Array) -> Array:
        """The entry of each sample's class, 0 for no class: (K, ...) -> (N, ...)."""
        by_product = lambda v, ids: self._product(self._one_hot(ids), v)
        if self.num_classes == 1:
            return by_product(class_values, self.ids)
        # A zero row for "no class" keeps every index in range: a plain gather, faster than a filling one.
        with_none = lambda v, ids: jnp.concatenate([v, jnp.zeros((1,) + v.shape[1:], v.dtype)])[ids]
        return lax.platform_dependent(class_values, self.ids, default=by_product, cpu=with_none)

    def counts(self, axis_name: AxisName) -> Array:
        # From float labels, their column sums (exact for hard rows) as a product: no combiner scalars for
        # XLA:CPU to set up on every call (as a reduction, one-hot cw-VR at 100×100 units ran 4 % slower).
        if self.weights is not None:
            ones = jnp.ones((self.weights.shape[0],), self.dtype)
            return psum(jnp.matmul(ones, self.weights, precision=self.precision), axis_name)
        return psum(self.sums(jnp.ones(self.ids.shape, self.dtype)), axis_name)

    def square_sums(self, x: Array) -> Array:
        """Σ_{n∈S_k} ‖x_n‖²: (N, I) -> (K,)."""
        # A product per row, not jnp.sum: XLA:CPU sums wide rows slower.
        return self.sums(jnp.einsum('ni,ni->n', x, x, precision=self.precision))

    def centre(self, z: Array, means: Array) -> Array:
        """z_n − μ^{k(n)}, 0 outside every class, NaN for a row of ``soft_rows``.

        Soft rows have a class (``labels``): their NaN rows make every statistic of these labels NaN, which
        the non-finite guard of ``_statistic`` sees. Fused into the subtraction, that costs no XLA:CPU task.
        """
        # Masking z before the subtraction lets XLA:CPU fuse the gather into it (after it, 2.5× slower).
        rows = jnp.where(self.valid()[:, None], z, 0)
        if self.soft_rows is not None:
            rows = jnp.where(self.soft_rows[:, None], jnp.nan, rows)
        return rows - self.lookup(means)

    def scale_rows(self, class_values: Array, x: Array) -> Array:
        """x_n times its class's entry of class_values ((K,) or (K, I)); 0 for no class."""
        per_sample = self.lookup(class_values)
        return (per_sample[:, None] if per_sample.ndim == 1 else per_sample) * x

    def gathered(self, axis_name: AxisName) -> '_HardClasses':
        ids = lax.all_gather(self.ids, axis_name, tiled=True)
        return _HardClasses(ids, self.num_classes, self.dtype, self.precision)

    def pair_weights(self, class_values: Array, others: '_HardClasses') -> Array:
        """(N, M): class_values[k] where sample n and sample m of ``others`` are both in class k, else 0."""
        k = self.num_classes

        def same_index(ids, other_ids):
            same = (ids[:, None] == other_ids[None, :]) & (ids < k)[:, None]
            return same.astype(self.dtype)

        if k == 1:
            same = self._product(self._one_hot(), self._one_hot(others.ids).T)
        else:
            same = lax.platform_dependent(
                self.ids,
                others.ids,
                cpu=same_index,
                default=lambda a, b: self._product(self._one_hot(a), self._one_hot(b).T),
            )
        return self.lookup(class_values)[:, None] * same

    def scatter(self, centred: Array) -> Array:
        """Σ_{n∈S_k} x_n x_nᵀ: (K, I, I). Rows outside every class are 0 in ``centred``."""
        if self.num_classes == 1:
            return jnp.matmul(centred.T, centred, precision=self.precision)[None]
        return jnp.einsum('nk,ni,nj->kij', self._one_hot(), centred, centred, precision=self.precision)

    def apply(self, scale: Array, matrices: Array, centred: Array) -> Array:
        """scale_k Σ_j M^k_ij x_jn for the class k of each sample n: (N, I); scale has shape (K,)."""
        if self.num_classes == 1:
            return jnp.matmul(centred, scale[0] * matrices[0], precision=self.precision)
        return jnp.einsum(
            'nk,kij,nj->ni', scale * self._one_hot(), matrices, centred, precision=self.precision
        )


class _OneClass:
    """Every sample in one class, sample n with weight w_n (None: all 1, and the count is static)."""

    num_classes = 1

    def __init__(self, weights: Optional[Array], num_samples: int, dtype, precision: PrecisionLike):
        self.weights, self.num_samples, self.dtype, self.precision = weights, num_samples, dtype, precision

    def _column(self) -> Array:
        if self.weights is None:
            return jnp.ones((self.num_samples, 1), self.dtype)
        return self.weights[:, None]

    def valid(self) -> Optional[Array]:
        return None if self.weights is None else self.weights > 0

    def sums(self, values: Array) -> Array:
        if self.weights is not None:  # Rows of weight 0 may hold anything (even NaN): keep them out.
            values = jnp.where(_HardClasses._expand(self.valid(), values), values, 0)
        # A product with the column, not jnp.sum: XLA:CPU's leading-axis sums of wide arrays are slow.
        return jnp.tensordot(self._column().T, values, axes=1, precision=self.precision)

    def counts(self, axis_name: AxisName) -> Array:
        if self.weights is None:
            return jnp.full((1,), self.num_samples * axis_size(axis_name), self.dtype)
        return psum(jnp.sum(self.weights, keepdims=True), axis_name)

    def square_sums(self, x: Array) -> Array:
        """Σ_n w_n ‖x_n‖² (1,): without weights one reduction to a scalar (per-row sums and their sum were 4
        XLA:CPU tasks); with them, per-row sums weighted by a product (w_n x_n would be a second (N, I) array:
        at 65,536 units it took one-hot cw-VR's buffer past glibc's 32 MB mmap threshold, 1.22×)."""
        if self.weights is None:
            return jnp.einsum('ni,ni->', x, x, precision=self.precision)[None]
        rows = jnp.einsum('ni,ni->n', x, x, precision=self.precision)
        return jnp.matmul(self.weights, rows, precision=self.precision)[None]

    def centre(self, z: Array, means: Array) -> Array:
        centred = z - means[0]
        return centred if self.weights is None else jnp.where(self.valid()[:, None], centred, 0)

    def scale_rows(self, class_values: Array, x: Array) -> Array:
        scaled = class_values[0] * x
        return scaled if self.weights is None else self.weights[:, None] * scaled

    def gathered(self, axis_name: AxisName) -> '_OneClass':
        weights = None if self.weights is None else lax.all_gather(self.weights, axis_name, tiled=True)
        return _OneClass(weights, self.num_samples * axis_size(axis_name), self.dtype, self.precision)

    def pair_weights(self, class_values: Array, others: '_OneClass') -> Array:
        if self.weights is None:
            return class_values[0]  # The same for every pair: a scalar broadcasts.
        return class_values[0] * self.weights[:, None] * others.weights[None, :]

    def scatter(self, centred: Array) -> Array:
        left = centred if self.weights is None else self.weights[:, None] * centred
        return jnp.matmul(left.T, centred, precision=self.precision)[None]

    def apply(self, scale: Array, matrices: Array, centred: Array) -> Array:
        out = jnp.matmul(centred, scale[0] * matrices[0], precision=self.precision)
        return out if self.weights is None else self.weights[:, None] * out


# ----------------------------------------------------------------------------------------------------------
# Statistics: the global-batch value and, if asked, Table 1's gradient for this device's z.


def _inverse_counts(members, axis_name: AxisName) -> Array:
    """1/W_k, 0-safe: an empty class has no members, and its mean is 0."""
    counts = members.counts(axis_name)
    return 1.0 / jnp.where(counts > 0, counts, 1.0)


def _class_means(members, z: Array, axis_name: AxisName) -> tuple[Array, Array]:
    """μ^k (K, I) and 1/W_k."""
    inv_counts = _inverse_counts(members, axis_name)
    return psum(members.sums(z), axis_name) * inv_counts[:, None], inv_counts


def _class_centred(members, z: Array, axis_name: AxisName) -> tuple[Array, Array]:
    """(z_n − μ^{k(n)}, 0 outside every class) and 1/W_k."""
    means, inv_counts = _class_means(members, z, axis_name)
    return members.centre(z, means), inv_counts


def _variance_value(members, x: Array, inv_counts: Array, axis_name: AxisName, divisor: float) -> Array:
    """Σ_k (1/W_k) Σ_n w_nk ‖x_n‖² / divisor for class-centred rows x (0 outside every class)."""
    return jnp.sum(psum(members.square_sums(x), axis_name) * (inv_counts * (1.0 / divisor)))


def _variance_sum(members, z: Array, axis_name: AxisName, divisor: float, with_gradient: bool) -> _Form:
    """Σ_k Σ_i v^k_i / divisor and, if asked, its gradient 2 w_nk/W_k (z_n − μ^k) / divisor.

    The gradient has no μ terms: the means' share of it is −2/W_k Σ_n w_nk (z_n − μ^k) = 0.
    """
    sums, inv_counts = psum(members.sums(z), axis_name), _inverse_counts(members, axis_name)
    centred = members.centre(z, sums * inv_counts[:, None])
    value = _variance_value(members, centred, inv_counts, axis_name, divisor)
    grad = members.scale_rows((2.0 / divisor) * inv_counts, centred) if with_gradient else None

    def rescaled(current):
        # Squares of entries near 1e19, or their sums, overflow where the statistic, a mean, need not:
        # computed again from x / max|x|, exact to rounding. Recomputing x here keeps it fused into its
        # consumers above. The means come from the class sums, not as a loop operand of their own (one more
        # XLA:CPU task at 100×100 units); one class's sum, a single product, is recomputed, as XLA:CPU copied
        # it into the loop (VR then ran 1.15× the baseline instead of 1.07×).
        class_sums = psum(members.sums(z), axis_name) if isinstance(members, _OneClass) else sums
        x = members.centre(z, class_sums * inv_counts[:, None])
        unit, inverse = _pow2_scale(pmax(jnp.max(jnp.abs(x)), axis_name))
        value = (_variance_value(members, x * inverse, inv_counts, axis_name, divisor) * unit) * unit
        return value, current[1]

    # inf, or NaN where a product with one-hot rows met inf. The value is global: one branch on all devices.
    return (value, grad), ~jnp.isfinite(value), rescaled


def use_gram_form(num_samples: int, num_units: int, num_classes: int) -> bool:
    """Whether the N×N Gram form of Σ_k ‖C_k‖²_F is cheaper than K per-class I×I covariances.

    The covariance form costs K·N·I² flops and K·I² memory, the Gram form N²·I flops and N² memory
    (N = global batch size). Only the covariance form is free of cancellation (module docstring).
    """
    return num_samples * num_samples < num_classes * num_samples * num_units


# Off-diagonal masks up to this many units are baked into the program as constants (≤ 1 MiB); wider ones
# are built from iotas at run time rather than bloat it.
_CONSTANT_MASK_MAX_UNITS = 512


def _off_diagonal_mask(num_units: int, dtype) -> Array:
    if num_units <= _CONSTANT_MASK_MAX_UNITS:
        return jnp.asarray(1.0 - np.eye(num_units), dtype)
    return 1.0 - jnp.eye(num_units, dtype=dtype)


def _off_diagonal_by_covariance(
    members, z: Array, axis_name: AxisName, divisor: float, with_gradient: bool
) -> _Form:
    """Σ_k Σ_{i≠j} (c^k_ij)² / divisor from per-class covariances (no cancellation), and its gradient.

    The gradient (4 w_nk/W_k) Σ_{j≠i} c^k_ij (z_jn − μ^k_j) / divisor has no μ terms: each class's gradient is a
    linear map of its centred activations, whose weighted sum is 0.
    """
    centred, inv_counts = _class_centred(members, z, axis_name)
    mask = _off_diagonal_mask(z.shape[1], centred.dtype)
    covariances = psum(members.scatter(centred), axis_name) * inv_counts[:, None, None]
    off_diagonal = covariances * mask
    # Squares of entries near 1e19 overflow: scaled by the largest entry, a variance (|c_ij| ≤ √(c_ii c_jj));
    # off-diagonal ones lost below it are below 1e-38 of the total. Over the masked entries instead, CR at
    # 100×100 units took 1.12× the baseline's time, not 1.04×.
    scale, inverse = _pow2_scale(jnp.max(jnp.abs(covariances)))
    shrunk = off_diagonal * inverse
    value = (jnp.sum(shrunk * shrunk) / divisor) * scale * scale
    grad = members.apply((4.0 / divisor) * inv_counts, off_diagonal, centred) if with_gradient else None
    return (value, grad), None, None


def use_exact_fallback(num_samples: int, num_units: int, num_classes: int) -> bool:
    """Whether a Gram-form result that may have cancelled is recomputed by the covariance form.

    Wherever the covariance form costs at most ``EXACT_FALLBACK_MAX_COST`` times the Gram form
    (K·N·I² ≤ that × N²·I, i.e. K·I ≤ that × N: MNIST's and CIFAR-100's class-wise shapes among them).
    """
    return num_classes * num_units <= EXACT_FALLBACK_MAX_COST * num_samples


#: See use_exact_fallback. Wider layers keep the Gram form and its stated bound.
EXACT_FALLBACK_MAX_COST = 32
# The Gram difference is trusted above this many error bounds of the total: its relative error is then at
# most 1/_GRAM_TRUST = 5e-5, within the 1e-4 the covariance form meets.
_GRAM_TRUST = 2e4


def _sum_over_classes(one_class: Callable[[Array], Any], weights: Array) -> Any:
    """Σ_k one_class(weights[:, k]), one class at a time: vmap or lax.map would hold K results of (N, I)."""

    def add_class(total, w):
        return jax.tree.map(jnp.add, total, one_class(w)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one_class, weights[:, 0]))
    return lax.scan(add_class, zeros, weights.T)[0]


def _class_by_class(
    fn,
    weights: Array,
    z: Array,
    axis_name: AxisName,
    divisor: float,
    with_gradient: bool,
    precision,
    always_robust: bool = False,
):
    """Σ_k fn for class k alone, as one weighted class (weights[:, k]): exact for any weights.

    z is not masked here: each class masks its own rows (``_OneClass``), so no masked copy of z stays live
    beside each class's centred one (two N×I temporaries made the program's buffer exceed glibc's 32 MB mmap
    threshold at 65,536 units, and every call then faulted its pages in again: one-hot cw-VR ran 1.28×).
    """

    def one_class(w):
        result, suspect, robust = fn(
            _OneClass(w, z.shape[0], z.dtype, precision), z, axis_name, divisor, with_gradient
        )
        return robust(result) if always_robust else _settled(result, suspect, robust)

    return _sum_over_classes(one_class, weights)


def _off_diagonal_class_by_class(
    members, z: Array, axis_name: AxisName, divisor: float, with_gradient: bool
) -> tuple[Array, Optional[Array]]:
    """The covariance form with one class's I×I temporaries at a time (the K-fold ones of the one-hot
    product slowed the Gram form beside it, as an untaken branch, by 1.6–1.7×)."""
    if members.num_classes == 1:
        return _off_diagonal_by_covariance(members, z, axis_name, divisor, with_gradient)[0]
    return _class_by_class(
        _off_diagonal_by_covariance,
        members.class_weights(),
        z,
        axis_name,
        divisor,
        with_gradient,
        members.precision,
    )


class _CentredRows:
    """Products of the class-centred rows x = ``members.centre(z, means)`` with those of all devices."""

    def __init__(self, members, z: Array, means: Array, axis_name: AxisName):
        self.members = members
        self.x = members.centre(z, means)
        self.others = self.x if axis_size(axis_name) == 1 else lax.all_gather(self.x, axis_name, tiled=True)

    def centred(self) -> Array:
        return self.x

    def gram_and_square_sums(self) -> tuple[Array, Array]:
        """⟨x_n, x_m⟩ (N, M) for the M rows of all devices, and this device's per-class Σ_n w_nk x_n² (K, I)."""
        gram = jnp.matmul(self.x, self.others.T, precision=self.members.precision)
        return gram, self.members.sums(self.x * self.x)

    def times(self, a: Array) -> Array:
        """a @ (the M rows of all devices): (N, M) -> (N, I)."""
        return jnp.matmul(a, self.others, precision=self.members.precision)


def _fold_column_blocks(step: Callable[[Any, int, Any], Any], num_units: int, block: int, init: Any) -> Any:
    """Folds ``step(start, size, carry)`` over blocks of ``block`` columns: the full ones in a loop, then the rest."""
    full, rest = divmod(num_units, block)
    carry = lax.fori_loop(0, full, lambda j, c: step(j * block, block, c), init)
    return step(full * block, rest, carry) if rest else carry


def _columns(a: Array, start, size: int) -> Array:
    return lax.dynamic_slice_in_dim(a, start, size, axis=1)


class _CentredRowsInBlocks:
    """The same products for one weighted class on one device, computed from z a block of columns at a time.

    Whole rows keep two (N, I) temporaries live at once (x and a product's operand or output: dots fuse no
    elementwise producer on XLA:CPU) beside the class sum of the weighted path's loop over classes. At
    65,536 units that reserved 53 MB in every program with float labels, even where the path is never taken,
    and above glibc's 32 MB mmap threshold every call faulted its pages in again (one-hot cw-CR ran 1.23× the
    baseline). In blocks only the last product's output is (N, I); x is recomputed from z where it is used.
    """

    def __init__(self, members: '_OneClass', z: Array, inv_counts: Array, block: int):
        self.members, self.z, self.block = members, z, block
        add_sums = lambda start, size, sums: lax.dynamic_update_slice_in_dim(
            sums, members.sums(_columns(z, start, size)), start, axis=1
        )
        sums = _fold_column_blocks(add_sums, z.shape[1], block, jnp.zeros((1, z.shape[1]), z.dtype))
        self.means = sums * inv_counts[:, None]

    def centred(self) -> Array:
        return self.members.centre(self.z, self.means)  # Elementwise: fused into its consumers.

    def _x(self, start, size: int) -> Array:
        return self.members.centre(_columns(self.z, start, size), _columns(self.means, start, size))

    def gram_and_square_sums(self) -> tuple[Array, Array]:
        def step(start, size, carry):
            gram, square_sums = carry
            x = self._x(start, size)
            gram = gram + jnp.matmul(x, x.T, precision=self.members.precision)
            return gram, lax.dynamic_update_slice_in_dim(square_sums, self.members.sums(x * x), start, axis=1)

        (n, i), dtype = self.z.shape, self.z.dtype
        return _fold_column_blocks(step, i, self.block, (jnp.zeros((n, n), dtype), jnp.zeros((1, i), dtype)))

    def times(self, a: Array) -> Array:
        def step(start, size, out):
            product = jnp.matmul(a, self._x(start, size), precision=self.members.precision)
            return lax.dynamic_update_slice_in_dim(out, product, start, axis=1)

        return _fold_column_blocks(step, self.z.shape[1], self.block, jnp.zeros(self.z.shape, self.z.dtype))


#: Column blocks of _CentredRowsInBlocks hold about this many elements (1 MiB of float32). At (100, 65536)
#: one-hot cw-CR's program reserved 28.9 MB with it (as with ids), 30.4 MB with 2**19 and 33.6 MB with 2**20.
COLUMN_BLOCK_ELEMENTS = 2**18


def _centred_rows(members, z: Array, axis_name: AxisName) -> tuple[Any, Array]:
    """The class-centred rows of z and 1/W_k: whole, or in blocks of columns for one weighted class on one
    device when z spans several blocks (the hard classes' x shares the gradient's buffer, so whole rows cost
    them no second temporary)."""
    num_samples, num_units = z.shape
    block = max(128, 2 ** int(math.log2(max(COLUMN_BLOCK_ELEMENTS // num_samples, 1))))
    weighted_class = isinstance(members, _OneClass) and members.weights is not None
    if weighted_class and axis_size(axis_name) == 1 and num_units > block:
        inv_counts = _inverse_counts(members, axis_name)
        return _CentredRowsInBlocks(members, z, inv_counts, block), inv_counts
    means, inv_counts = _class_means(members, z, axis_name)
    return _CentredRows(members, z, means, axis_name), inv_counts


def _off_diagonal_by_gram(
    members, z: Array, axis_name: AxisName, divisor: float, with_gradient: bool, exact_fallback: bool = False
) -> _Form:
    """Σ_k Σ_{i≠j} (c^k_ij)² / divisor from same-class entries of the Gram matrix, and its gradient.

    ‖C_k‖²_F = (1/W_k²) Σ_{n,m} w_nk w_mk ⟨x_n, x_m⟩² with x the class-centred activations; the diagonal
    Σ_k Σ_i (c^k_ii)² comes from per-class sums of squares (K×I, never K×I×I). Its error is at most
    ``gram_form_error_bound(I)`` B times the total Σ_k ‖C_k‖²_F. With ``exact_fallback``, a difference
    below 2·10⁴ B of the total, where that error could exceed 5e-5 of the result, is recomputed by the
    covariance form (a rare, costlier branch).
    """
    rows, inv_counts = _centred_rows(members, z, axis_name)
    other_members = members if axis_size(axis_name) == 1 else members.gathered(axis_name)
    gram, square_sums = rows.gram_and_square_sums()
    # One power of 2 for every device: the difference below compares global sums.
    scale, inverse = _pow2_scale(pmax(jnp.max(jnp.abs(gram)), axis_name))
    weighted = members.pair_weights(inv_counts * inv_counts, other_members) * (gram * inverse)
    frobenius = psum(jnp.sum(weighted * (gram * inverse)), axis_name)
    variances = psum(square_sums, axis_name) * inv_counts[:, None]
    shrunk_variances = variances * inverse
    difference = frobenius - jnp.sum(shrunk_variances * shrunk_variances)
    # A sum of squares: a rounded difference below 0 is clamped; the gradient stays Table 1's.
    value = (jnp.maximum(difference, 0.0) / divisor) * scale * scale
    grad = None
    if with_gradient:
        # ∂/∂x_n = 4 Σ_m a_nm ⟨x_n, x_m⟩ x_m − 4 (w_nk c^k_ii / W_k)_i ∘ x_n.
        pairs = rows.times(weighted) * scale
        grad = (4.0 / divisor) * (pairs - members.scale_rows(inv_counts[:, None] * variances, rows.centred()))
    if not exact_fallback:
        return (value, grad), None, None
    trust = _GRAM_TRUST * gram_form_error_bound(z.shape[1], z.dtype)
    exact = lambda _: _off_diagonal_class_by_class(members, z, axis_name, divisor, with_gradient)
    return (value, grad), difference < trust * frobenius, exact


def _statistic(
    z: Array,
    arrays: dict[str, Array],
    axis_name: AxisName,
    with_gradient: bool,
    *,
    kind: str,
    divisor: float,
    num_classes: int,
    one_class: bool,
    precision: PrecisionLike,
) -> tuple[Array, Optional[Array]]:
    """The statistic ``kind`` ('variance' or 'covariance') of z for the labels in ``arrays``.

    ``arrays`` holds 'weights' (N,) for one weighted class (``one_class``); 'ids' (N,) for integer labels;
    or 'ids', 'weights' (N, K) and 'soft_rows' (the rows neither one-hot nor zero) for float labels, whose
    hard rows take the ids' path.
    """
    num_samples, num_units = z.shape[0] * axis_size(axis_name), z.shape[1]

    def form(classes: int) -> tuple[Callable[..., _Form], bool]:
        """The form for ``classes`` classes, and whether it flags inputs it may get wrong."""
        if kind == 'variance':
            return _variance_sum, True
        if not use_gram_form(num_samples, num_units, classes):
            return _off_diagonal_by_covariance, False
        exact = use_exact_fallback(num_samples, num_units, classes)
        return functools.partial(_off_diagonal_by_gram, exact_fallback=exact), exact

    def run(fn, members, z):
        return fn(members, z, axis_name, divisor, with_gradient)

    def members(arrays, z):
        if one_class:
            return _OneClass(arrays.get('weights'), z.shape[0], z.dtype, precision)
        float_labels = (arrays['weights'], arrays['soft_rows']) if 'weights' in arrays else None
        return _HardClasses(arrays['ids'], num_classes, z.dtype, precision, float_labels)

    def masked(z, arrays):  # Masked rows may hold anything (even NaN): the products must not see them.
        weights = arrays.get('weights') if one_class else None
        return z if weights is None else jnp.where(weights[:, None] > 0, z, 0)

    classes = 1 if one_class else num_classes
    soft_labels = not one_class and 'weights' in arrays
    fn, guarded = form(classes)

    def usual(z, arrays):
        result, suspect, exact = run(fn, members(arrays, z), masked(z, arrays))
        if not soft_labels:
            return result, suspect, exact  # exact runs only where suspect holds
        # Float labels: one-hot and zero rows take the ids' path, others the weighted one (exact for any
        # weights, K times the work: each class is one weighted class, centred at its own mean). A soft row
        # makes the ids' path NaN (_HardClasses.centre): one check of the value, rather than a reduction over
        # the rows and a conditional (5 XLA:CPU tasks, 1.3× the baseline at 100×100 units). Overflow and NaN
        # inputs take the weighted path too, which settles each class's own rare cases.
        off = ~jnp.isfinite(result[0])
        # The variance's robust form is exact everywhere and costs one more reduction: taken always here,
        # rather than a conditional per class (nested in the rare branch, it cost every call 0.8 µs).
        soft = lambda _: _class_by_class(
            form(1)[0], arrays['weights'], z, axis_name, divisor, with_gradient, precision, kind == 'variance'
        )
        return result, off if suspect is None else off | suspect, soft

    if not (soft_labels or guarded):
        return usual(z, arrays)[0]
    return _usual_unless(usual, z, arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3))
def _with_table1_gradient(
    statistic: Callable[..., tuple[Array, Optional[Array]]], z: Array, arrays, axis_name: AxisName
) -> Array:
    """``statistic(z, arrays, axis_name, with_gradient=False)[0]``, differentiated with its own gradient.

    ``statistic`` computes a global-batch value and, with ``with_gradient``, its closed-form gradient for
    this device's z (Table 1's). Autodiff would also differentiate every product of the forward pass, the
    class means included, whose share of the gradient is exactly 0. As a JVP rule the closed form serves
    forward and reverse mode alike, and higher derivatives are autodiff of the rule. Labels get no
    derivative.
    """
    return statistic(z, arrays, axis_name, with_gradient=False)[0]


@_with_table1_gradient.defjvp
def _with_table1_gradient_jvp(statistic, axis_name, primals, tangents):
    (z, arrays), (z_dot, _) = primals, tangents
    value, grad = statistic(z, arrays, axis_name, with_gradient=True)
    return value, psum(jnp.sum(grad * z_dot), axis_name)


def _replicated(value: Array, axis_name: AxisName, grad_reduction: str) -> Array:
    """Returns ``value`` (already global) with per-device gradients for ``grad_reduction``.

    A device's loss adds the replicated Ω to its own task loss. Under ``jax.pmap``, and under
    ``jax.shard_map`` with or without varying-axis checking, autodiff then hands each device D times its
    slice of ∇Ω (psum transposes to psum there, and so does the implicit broadcast of the replicated Ω into
    a varying loss). The pmean of the parameter gradients is then exact: 'pmean' keeps autodiff's gradient.
    'psum' hands autodiff the share Ω/D, whose per-device gradient is the slice itself. The returned value
    is ``value`` in both.
    """
    if axis_name is None or grad_reduction == 'pmean':
        return value
    share = value / axis_size(axis_name)
    return lax.stop_gradient(value) + (share - lax.stop_gradient(share))


def _check_options(name: str, grad_reduction: str) -> None:
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f'{name}: grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}.')


def _explicit_batch_axes(activations) -> Optional[tuple[Any, Any]]:
    """(mesh, axes) when the batch dimension is sharded over mesh axes of explicit type, else None."""
    sharding = getattr(jax.typeof(activations), 'sharding', None)
    spec = getattr(sharding, 'spec', None)
    if not spec or spec[0] is None:
        return None
    return sharding.mesh, spec[0]


def _on_global_batch(penalty: Callable[..., Array], activations, labels, where, **options) -> Array:
    """``penalty`` of a batch sharded explicitly over mesh axes, computed per shard with global statistics.

    Under sharding in types, XLA cannot choose the output sharding of the per-class sums itself; mapping
    the penalty over the batch's mesh axes with ``axis_name`` gives the global value and gradient.
    """
    mesh, axes = _explicit_batch_axes(activations)
    inputs = {'activations': activations, 'labels': labels, 'where': where}
    inputs = {k: v for k, v in inputs.items() if v is not None}

    def per_shard(shard):
        return penalty(
            shard['activations'], shard.get('labels'), where=shard.get('where'), axis_name=axes, **options
        )

    specs = ({k: PartitionSpec(axes) for k in inputs},)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(inputs)


def _penalty(
    kind: str,
    class_wise: bool,
    name: str,
    activations,
    labels,
    num_classes,
    where,
    axis_name,
    grad_reduction,
    precision,
) -> Array:
    """Reads the inputs of penalty ``name`` and evaluates Ω with Table 1's gradient."""
    _check_options(name, grad_reduction)
    if axis_name is None and _explicit_batch_axes(activations) is not None:
        options = (
            dict(num_classes=num_classes, precision=precision) if class_wise else dict(precision=precision)
        )
        return _on_global_batch(PENALTIES[name], activations, labels, where, **options)
    z = labels_lib.as_units(activations)
    mask = labels_lib.as_mask(where, z.shape[0])
    num_units = z.shape[1]
    if class_wise:
        read, num_classes = labels_lib.as_labels(labels, z.shape[0], num_classes, mask, name, z.dtype)
        arrays = {'ids': read.ids}
        if read.weights is not None:
            arrays.update(weights=read.weights, soft_rows=read.soft_rows)
    else:
        num_classes = 1
        arrays = {} if mask is None else {'weights': mask.astype(z.dtype)}
    if kind == 'covariance':
        if num_units < 2:  # No pair of distinct units.
            return _replicated(jnp.zeros((), z.dtype), axis_name, grad_reduction)
        divisor = float(num_classes) * float(num_units) * float(num_units - 1)
    else:
        divisor = float(num_classes) * float(num_units)
    statistic = functools.partial(
        _statistic,
        kind=kind,
        divisor=divisor,
        num_classes=num_classes,
        one_class=not class_wise,
        precision=precision,
    )
    value = _with_table1_gradient(statistic, z, arrays, axis_name)
    return _replicated(value, axis_name, grad_reduction)


@jax.custom_jvp
def _abs(x: Array) -> Array:
    """|x| whose derivative is sign(x), 0 at 0 as in Table 1's L1R gradient (jax.grad(jnp.abs)(0.) is 1)."""
    return jnp.abs(x)


@_abs.defjvp
def _abs_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


@jax.custom_jvp
def _with_tangent_of(value: Array, reference: Array) -> Array:
    """``value``, differentiated as ``reference`` (the same quantity, computed in a way that may overflow)."""
    del reference
    return value


@_with_tangent_of.defjvp
def _with_tangent_of_jvp(primals, tangents):
    return _with_tangent_of(*primals), tangents[1]


# ----------------------------------------------------------------------------------------------------------
# Public penalties.

_ARGS_DOC = """
  Args:
    activations: (N, ...) representation of one layer; flattened to (N, I).
    labels: {labels}
    num_classes: K, static; needed with integer class ids.
    where: optional bool (N,): the samples that count (False for padding). Masked samples count in no
      statistic and no count and get a zero gradient; under ``axis_name`` the counts are global.
    axis_name: mapped axis over which the batch is split (pmap / shard_map); statistics are global.
    grad_reduction: 'pmean' (default) or 'psum', how your code combines per-device parameter gradients
      under ``axis_name`` (module docstring). Ignored without ``axis_name``.
    precision: matmul precision; ``lax.Precision.HIGHEST`` (exact float32) by default.

  Returns:
    Scalar, float32 (float64 for float64 activations).{returns}
"""
_CLASS_LABELS = (
    'integer class ids (N,) with ``num_classes``, one-hot rows (N, K) or non-negative '
    'per-class weights (N, K); ids outside [0, K) and all-zero rows are in no class.'
)
_IGNORED_LABELS = 'ignored (accepted for a uniform signature); mask samples with ``where``.'


def _document(labels: str, returns: str = ''):
    def decorate(fn):
        fn.__doc__ = fn.__doc__ + _ARGS_DOC.format(labels=labels, returns=returns)
        return fn

    return decorate


@_document(_IGNORED_LABELS, ' 0 when I = 1.')
def cr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
    grad_reduction: str = 'pmean',
    precision: PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    r"""Covariance Regularizer (CR, = DeCov of Cogswell et al. 2016; Choi & Rhee, Table 1).

    .. math::
      Ω_{CR} = \frac{1}{I(I-1)} \sum_{i \ne j} c_{ij}^2, \quad
      c_{ij} = \frac{1}{N} \sum_n (z_{in} - μ_i)(z_{jn} - μ_j)

    Example::

      >>> import jax.numpy as jnp
      >>> from cwreg import penalties
      >>> z = jnp.array([[0., 1.], [2., 3.], [4., 2.]])
      >>> float(penalties.cr(z))  # c_12 = 2/3
      0.444444477558136
    """
    del labels, num_classes
    return _penalty(
        'covariance', False, 'cr', activations, None, None, where, axis_name, grad_reduction, precision
    )


@_document(_CLASS_LABELS, ' Absent and single-sample classes contribute 0.')
def cw_cr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
    grad_reduction: str = 'pmean',
    precision: PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    r"""Class-wise Covariance Regularizer (cw-CR; Choi & Rhee, eq. (7) and Table 1).

    .. math::
      Ω_{cw-CR} = \frac{1}{K I(I-1)} \sum_k \sum_{i \ne j} (c^k_{ij})^2, \quad
      c^k_{ij} = \frac{\sum_n w_{nk} (z_{in} - μ^k_i)(z_{jn} - μ^k_j)}{\sum_n w_{nk}}

    Example::

      >>> import jax.numpy as jnp
      >>> from cwreg import penalties
      >>> z = jnp.array([[0., 1.], [2., 3.], [4., 1.], [9., 9.]])
      >>> y = jnp.array([0, 0, 1, -1])  # −1: in no class
      >>> float(penalties.cw_cr(z, y, num_classes=2))  # c^0_12 = 1; class 1 has one sample
      0.5
    """
    return _penalty(
        'covariance',
        True,
        'cw_cr',
        activations,
        labels,
        num_classes,
        where,
        axis_name,
        grad_reduction,
        precision,
    )


@_document(_IGNORED_LABELS)
def vr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
    grad_reduction: str = 'pmean',
    precision: PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    r"""Variance Regularizer (VR; Choi & Rhee, Table 1).

    .. math::
      Ω_{VR} = \frac{1}{I} \sum_i v_i, \quad v_i = \frac{1}{N} \sum_n (z_{in} - μ_i)^2

    Example::

      >>> import jax.numpy as jnp
      >>> from cwreg import penalties
      >>> z = jnp.array([[0., 1.], [2., 3.], [7., 7.]])
      >>> float(penalties.vr(z, where=jnp.array([True, True, False])))  # v = (1, 1)
      1.0
    """
    del labels, num_classes
    return _penalty(
        'variance', False, 'vr', activations, None, None, where, axis_name, grad_reduction, precision
    )


@_document(_CLASS_LABELS, ' Absent and single-sample classes contribute 0.')
def cw_vr(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
    grad_reduction: str = 'pmean',
    precision: PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    r"""Class-wise Variance Regularizer (cw-VR; Choi & Rhee, Table 1).

    .. math::
      Ω_{cw-VR} = \frac{1}{K I} \sum_k \sum_i v^k_i, \quad
      v^k_i = \frac{\sum_n w_{nk} (z_{in} - μ^k_i)^2}{\sum_n w_{nk}}

    Example::

      >>> import jax.numpy as jnp
      >>> from cwreg import penalties
      >>> z = jnp.array([[0., 1.], [2., 3.], [4., 1.]])
      >>> float(penalties.cw_vr(z, jnp.array([0, 0, 1]), num_classes=2))  # v^0 = (1, 1), v^1 = 0
      0.5
    """
    return _penalty(
        'variance',
        True,
        'cw_vr',
        activations,
        labels,
        num_classes,
        where,
        axis_name,
        grad_reduction,
        precision,
    )


@_document(_IGNORED_LABELS)
def l1r(
    activations: chex.Array,
    labels: Optional[chex.Array] = None,
    *,
    num_classes: Optional[int] = None,
    where: Optional[chex.Array] = None,
    axis_name: AxisName = None,
    grad_reduction: str = 'pmean',
    precision: PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    r"""L1 representation regularizer (L1R; Glorot et al. 2011; Choi & Rhee, Discussion).

    .. math:: Ω_{L1R} = \frac{1}{N I} \sum_n \sum_i |z_{in}|

    Its class-wise counterpart is the same function (paper's Discussion). Example::

      >>> import jax.numpy as jnp
      >>> from cwreg import penalties
      >>> float(penalties.l1r(jnp.array([[-1., 3.], [2., 0.]])))
      1.5
    """
    del labels, num_classes, precision
    _check_options('l1r', grad_reduction)
    if axis_name is None and _explicit_batch_axes(activations) is not None:
        return _on_global_batch(l1r, activations, None, where)
    z = labels_lib.as_units(activations)
    mask = labels_lib.as_mask(where, z.shape[0])
    if mask is None:
        count = float(z.shape[0] * axis_size(axis_name))
    else:
        z = jnp.where(mask[:, None], z, 0)  # before |z|: its derivative at a masked NaN would be NaN
        count = jnp.maximum(psum(jnp.sum(mask, dtype=z.dtype), axis_name), 1.0)
    normalizer = count * float(z.shape[1])
    value = psum(jnp.sum(_abs(z)), axis_name) / normalizer  # XLA:CPU's fastest reduction: nothing fused in

    def rescaled():
        # A sum past 3.4e38 of a representable mean: each term divided by 2^⌈log2(N I)⌉ first, exactly.
        shrink = _fixed_pow2(z.shape[0] * axis_size(axis_name) * z.shape[1])
        terms = jnp.abs(lax.stop_gradient(z)) * (1.0 / shrink)
        return (psum(jnp.sum(terms), axis_name) / lax.stop_gradient(normalizer)) * shrink

    exact = lax.cond(_any_in_batch(value == jnp.inf), rescaled, lambda: lax.stop_gradient(value))
    value = _with_tangent_of(exact, value)
    return _replicated(value, axis_name, grad_reduction)


PENALTIES: Mapping[str, Penalty] = {
    'cr': cr,
    'cw_cr': cw_cr,
    'vr': vr,
    'cw_vr': cw_vr,
    'l1r': l1r,
}


def get_penalty(name: str) -> Penalty:
    """Looks up a representation penalty by its registry name."""
    try:
        return PENALTIES[name]
    except KeyError:
        raise ValueError(
            f'Unknown representation penalty {name!r}; valid names: {sorted(PENALTIES)}.'
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Weight penalties.


def _kernels(params: chex.ArrayTree) -> list[Array]:
    """The 'kernel' leaves (Dense/Conv weight matrices); biases, BatchNorm scales and offsets don't count."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [
        leaf for path, leaf in leaves if getattr(path[-1], 'key', getattr(path[-1], 'name', None)) == 'kernel'
    ]


def l1w(params: chex.ArrayTree) -> Array:
    r"""L1 weight penalty :math:`Σ_w |w|` over the 'kernel' leaves of a params pytree.

    Pass a subtree (e.g. ``params['layer5']``) to penalize one layer's weights, as in the paper.
    """
    return sum((jnp.sum(jnp.abs(w.astype(jnp.float32))) for w in _kernels(params)), jnp.zeros(()))


def l2w(params: chex.ArrayTree) -> Array:
    r"""L2 weight penalty :math:`\frac{1}{2} Σ_w w^2` over the 'kernel' leaves (``tf.nn.l2_loss``).

    Pass a subtree (e.g. ``params['layer5']``) to penalize one layer's weights, as in the paper.
    """
    return 0.5 * sum((jnp.sum(jnp.square(w.astype(jnp.float32))) for w in _kernels(params)), jnp.zeros(()))


WEIGHT_PENALTIES: Mapping[str, Callable[[chex.ArrayTree], Array]] = {'l1w': l1w, 'l2w': l2w}
