"""Flax Linen models of Choi & Rhee (AAAI 2019), with every representation sown by name.

The class-wise regularizers (cw-CR, cw-VR) and their class-agnostic counterparts (CR, VR, L1R) penalize the
activation vector ``z`` of *one* chosen layer (paper sec. "Class-wise Representation Regularizers"). To let a
config pick that layer by a string, every model here ``sow``s each hidden representation and its output into
the ``'intermediates'`` collection under a stable, flat name, always from the top-level module.

Sown-value layout (checked against flax 0.12.8)::

    logits, state = model.apply(variables, x, mutable=['intermediates'])
    state['intermediates'][name] == (array,)  # a plain ``dict`` of 1-tuples, one entry per sown name

* The names sit directly under ``'intermediates'`` (no sub-module nesting) because they are sown by the
  top-level module with explicit names.
* Each value is a 1-tuple because ``Module.sow``'s default ``reduce_fn`` appends to a tuple; calling the
  model once per ``apply`` yields exactly one element. Take ``state['intermediates'][name][0]``.
* ``model.init`` does not return ``'intermediates'`` (flax's ``init`` excludes that collection by default),
  so ``variables`` holds only ``'params'`` (plus ``'batch_stats'`` for :class:`ResNet`).
* For ResNet in train mode use ``mutable=['batch_stats', 'intermediates']``.

Naming rules:

* ``model.layer_names()`` lists the post-activation representations and the output, in forward order
  (``LAYERS`` is the same list for the default constructor arguments). These are what regularizers target.
* Every *hidden* layer (one followed by a ReLU) is also sown before its ReLU as ``<name>_preact``; the
  paper's PCA plots (Figure 2, bottom row) use representations "before ReLU". ``model.preact_names()``
  lists them. Output layers (logits, the autoencoder's sigmoid reconstruction) and the ResNet's
  average-pooled features have no ReLU and therefore no ``_preact`` entry.
* Sown names share flax's per-module name space with sub-modules, so parameter sub-modules are named
  differently (``dense{i}`` in the MLP/autoencoder, ``Conv_{i}``/``Dense_fc``/``Dense_logits`` in the CNN,
  ``Dense_logits`` in the ResNet): ``variables['params']`` and the sown names never collide.
* Sown arrays keep their natural shape: dense layers ``(N, units)``, conv feature maps ``(N, H, W, C)``.
  Regularizers that need vectors should flatten them.

All models take NHWC float images in [0, 1] and ``__call__(x, train=False)``; parameters are float32
(``param_dtype``) and ``dtype`` sets the computation dtype (e.g. ``jnp.bfloat16``), in which the sown
values and outputs are returned, so penalties should upcast them.

Dropout and batch normalization (the paper's non-penalty baselines; :class:`MLP` and :class:`CNN`), both
off by default, when the models are bitwise the ones without them:

* ``batchnorm=True`` puts ``BatchNorm`` between every hidden Dense/Conv and its ReLU, where Ioffe &
  Szegedy (2015, sec. 3.2) put it: normalizing ``Wu`` rather than the ReLU's non-negative, sparse output
  keeps the ReLU's input roughly Gaussian, and the ReLU then decides on a normalized value. That
  Dense/Conv has **no bias**: in training BN subtracts the batch mean, so a bias would get exactly zero
  gradient and cancel at evaluation too (the running mean absorbs it), a dead parameter; BN's offset β
  takes its role (as in I&S and the ResNet below). The sown ``<name>_preact`` is the BN output, i.e. the
  ReLU's input. Momentum 0.9, epsilon 1e-5 and ``axis_name=bn_axis_name`` as in :class:`ResNet`;
  ``train=False`` uses the running averages (sown values included), ``train=True`` with
  ``mutable=['batch_stats', ...]`` the batch statistics.
* ``dropout=True`` adds a dropout layer after every hidden ReLU, *after* its sow: the sown
  representations (and so the penalties on them) are the pre-dropout ones. The rate is a call argument,
  ``dropout_rate``, so that it can be a traced per-run scalar of a vmapped group of runs; the randomness
  comes from ``rngs={'dropout': key}`` and ``example_ids`` (see :func:`dropout`). ``train=False`` applies
  no dropout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

#: Suffix of the pre-ReLU copy of each hidden representation.
PREACT_SUFFIX = '_preact'

__all__ = [
    'PREACT_SUFFIX',
    'KERNEL_INITS',
    'dropout',
    'MLP',
    'CNN',
    'ResNet',
    'Autoencoder',
    'MODELS',
    'create_model',
]


def _flatten(x: jax.Array) -> jax.Array:
    """Flattens all but the batch axis: ``(N, ...) -> (N, prod(...))``."""
    return x.reshape((x.shape[0], -1))


#: Kernel initializers by config name. Flax's Dense/Conv default is LeCun normal (a truncated normal with
#: variance 1/fan_in); TF 1.x's ``tf.layers`` default, which the paper's code used, is Glorot uniform
#: (U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), fans counting the receptive field for convolutions).
KERNEL_INITS: dict[str, Callable[..., jax.Array]] = {
    'lecun_normal': nn.initializers.lecun_normal(),
    'glorot_uniform': nn.initializers.glorot_uniform(),
}


def _kernel_init(name: str) -> Callable[..., jax.Array]:
    try:
        return KERNEL_INITS[name]
    except KeyError:
        raise ValueError(f'Unknown kernel_init {name!r}; valid: {sorted(KERNEL_INITS)}.') from None


def _layer_kwargs(module: nn.Module, use_bias: bool = True) -> dict[str, Any]:
    """Dense/Conv keyword arguments of ``module``'s attributes: initializers, dtypes, whether a bias."""
    return dict(
        use_bias=use_bias,
        kernel_init=_kernel_init(module.kernel_init),
        bias_init=nn.initializers.constant(module.bias_init),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )


def _batchnorm(module: nn.Module, train: bool, name: str) -> nn.Module:
    """Batch normalization as in :class:`ResNet`: momentum 0.9, epsilon 1e-5, synced over bn_axis_name."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=module.bn_axis_name,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


def dropout(h: jax.Array, rate: jax.Array, key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """Inverted dropout with a traced ``rate``: zeroes each unit with probability ``rate``, scales the rest.

    ``keep = u >= rate`` with ``u ~ U[0, 1)`` and ``out = where(keep, h / (1 - rate), 0)``; rate 0 keeps
    every unit and divides by exactly 1, so it equals no dropout bitwise (values and gradients). Flax's
    ``nn.Dropout`` needs a static rate; here it may be a per-run traced scalar of a vmapped group.

    Example ``n``'s mask is drawn from ``fold_in(key, example_ids[n])`` alone, so it does not depend on
    which other examples share the batch, nor on how a data-parallel batch is split over devices (pass
    each example's index in the global batch).

    Args:
        h: activations ``(N, ...)``.
        rate: drop probability in [0, 1), a scalar (may be traced).
        key: a PRNG key, the same for every example (and device) of one layer and step.
        example_ids: ``(N,)`` integers, distinct per example of the global batch.
    """
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), h.shape[1:], jnp.float32)
    keep = jax.vmap(draw)(example_ids) >= rate
    return jnp.where(keep, h / jnp.asarray(1.0 - rate, h.dtype), jnp.zeros((), h.dtype))


def _dropout_layers(
    module: nn.Module, train: bool, rate: Optional[jax.Array], example_ids: Optional[jax.Array], batch: int
) -> Callable[[jax.Array, int], jax.Array]:
    """``drop(h, layer)``: dropout of hidden layer ``layer`` in training, the identity otherwise.

    Layer ``l`` uses ``fold_in(make_rng('dropout'), l)``: one flax ``'dropout'`` key per call, so the caller
    controls the randomness through ``rngs={'dropout': key}``.
    """
    if not (module.dropout and train):
        return lambda h, layer: h
    if rate is None:
        raise ValueError(f'{type(module).__name__}(dropout=True) needs dropout_rate= in training.')
    key = module.make_rng('dropout')
    ids = jnp.arange(batch) if example_ids is None else example_ids
    return lambda h, layer: dropout(h, rate, jax.random.fold_in(key, layer), ids)


def _check_layer(model: nn.Module, layer: str) -> None:
    if layer not in model.layer_names():
        raise ValueError(
            f'{type(model).__name__} sows no layer {layer!r}; valid: {list(model.layer_names())}.'
        )


class MLP(nn.Module):
    """The paper's MNIST multilayer perceptron (appendix A.2: 6 layers, 100 hidden units each).

    ``depth`` hidden ``Dense(width) + ReLU`` layers and a ``Dense(num_classes)`` output layer. With the
    defaults this is the paper's "6-layer MLP", whose layers 1-6 (6 = output) are the x-axis of the
    layer-dependency study (Figure 3); the headline results regularize layer 5.

    Sown (``depth=5``): ``'layer1'`` ... ``'layer5'`` (post-ReLU, ``(N, width)``), ``'layer6'`` (= the
    returned logits, ``(N, num_classes)``), and ``'layer1_preact'`` ... ``'layer5_preact'``.
    In general the output is ``f'layer{depth + 1}'``.

    With ``batchnorm`` each hidden layer is ``Dense (no bias) - BatchNorm - ReLU`` (BatchNorm modules
    ``bn{i}``); with ``dropout`` a dropout layer follows each hidden ReLU (the module docstring says why
    and how).

    Attributes:
        num_classes: number of output logits.
        width: units per hidden layer.
        depth: number of hidden layers.
        dropout: a dropout layer after every hidden ReLU (its rate is ``__call__``'s ``dropout_rate``).
        batchnorm: batch normalization between every hidden Dense and its ReLU.
        kernel_init: a key of :data:`KERNEL_INITS`, for every Dense kernel.
        bias_init: the constant initial value of every Dense bias.
        bn_axis_name: pmap/shard_map axis over which to average BN batch statistics (``None``: per device).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    num_classes: int = 10
    width: int = 100
    depth: int = 5
    dropout: bool = False
    batchnorm: bool = False
    kernel_init: str = 'lecun_normal'
    bias_init: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    LAYERS: ClassVar[tuple[str, ...]] = tuple(f'layer{i}' for i in range(1, 7))

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f'MLP depth must be >= 1, got {self.depth}.')
        super().__post_init__()

    def layer_names(self) -> tuple[str, ...]:
        """Sown representation names of this instance (hidden layers then output), excluding ``_preact``."""
        return tuple(f'layer{i}' for i in range(1, self.depth + 2))

    def preact_names(self) -> tuple[str, ...]:
        """Names of the sown pre-ReLU hidden representations."""
        return tuple(f'layer{i}{PREACT_SUFFIX}' for i in range(1, self.depth + 1))

    def param_names(self, layer: str) -> tuple[str, ...]:
        """Parameter sub-modules whose kernels produce representation ``layer`` (``layer{i}`` ← ``dense{i}``)."""
        _check_layer(self, layer)
        return (f'dense{layer[len("layer") :]}',)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        dropout_rate: Optional[jax.Array] = None,
        example_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Maps images ``(N, H, W, C)`` (or already-flat ``(N, D)``) to logits ``(N, num_classes)``.

        ``train`` turns dropout on and makes BatchNorm use (and update) batch statistics;
        ``dropout_rate`` and ``example_ids`` are described in :func:`dropout` (needed in training only,
        with ``rngs={'dropout': key}``, and only by a model with ``dropout``).
        """
        h = _flatten(jnp.asarray(x, self.dtype))
        drop = _dropout_layers(self, train, dropout_rate, example_ids, h.shape[0])
        for i in range(1, self.depth + 1):
            h = nn.Dense(self.width, **_layer_kwargs(self, use_bias=not self.batchnorm), name=f'dense{i}')(h)
            if self.batchnorm:
                h = _batchnorm(self, train, f'bn{i}')(h)
            self.sow('intermediates', f'layer{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'layer{i}', h)
            h = drop(h, i)
        out_name = f'layer{self.depth + 1}'
        logits = nn.Dense(self.num_classes, **_layer_kwargs(self), name=f'dense{self.depth + 1}')(h)
        self.sow('intermediates', out_name, logits)
        return logits


class CNN(nn.Module):
    """The paper's CIFAR-10/100 CNN (appendix A.3, Table 6).

    ``conv32 - conv64 - maxpool - conv128 - maxpool - conv128 - maxpool - fc(fc_width) - dense(num_classes)``,
    with 3x3 stride-1 ``'SAME'`` convolutions followed by ReLU and 2x2 stride-2 max-pools. On 32x32 inputs
    the flattened features entering ``fc`` are ``4 * 4 * 128 = 2048``. The paper regularizes ``'fc'`` and
    studies ``fc_width`` in {32, 128, 512}.

    Sown (32x32x3 input, ``N`` images), post-ReLU and before the following pool:

    ======================  =====================
    ``'conv1'``             ``(N, 32, 32, 32)``
    ``'conv2'``             ``(N, 32, 32, 64)``
    ``'conv3'``             ``(N, 16, 16, 128)``
    ``'conv4'``             ``(N, 8, 8, 128)``
    ``'fc'``                ``(N, fc_width)``
    ``'logits'``            ``(N, num_classes)``
    ======================  =====================

    plus ``'conv1_preact'`` ... ``'conv4_preact'`` and ``'fc_preact'`` of the same shapes.

    With ``batchnorm`` each hidden layer is ``Conv/Dense (no bias) - BatchNorm - ReLU`` (BatchNorm modules
    ``BatchNorm_{i}`` and ``BatchNorm_fc``); with ``dropout`` a dropout layer follows each hidden ReLU, the
    convolutions' before their max-pool.

    Attributes:
        num_classes: number of output logits (10 for CIFAR-10, 100 for CIFAR-100).
        fc_width: units of the fully connected hidden layer.
        dropout: a dropout layer after every hidden ReLU (its rate is ``__call__``'s ``dropout_rate``).
        batchnorm: batch normalization between every hidden Conv/Dense and its ReLU.
        kernel_init: a key of :data:`KERNEL_INITS`, for every Conv and Dense kernel.
        bias_init: the constant initial value of every Conv and Dense bias.
        bn_axis_name: pmap/shard_map axis over which to average BN batch statistics (``None``: per device).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    num_classes: int = 10
    fc_width: int = 128
    dropout: bool = False
    batchnorm: bool = False
    kernel_init: str = 'lecun_normal'
    bias_init: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    LAYERS: ClassVar[tuple[str, ...]] = ('conv1', 'conv2', 'conv3', 'conv4', 'fc', 'logits')
    #: (features, max-pool afterwards) per conv layer, from Table 6.
    CONVS: ClassVar[tuple[tuple[int, bool], ...]] = ((32, False), (64, True), (128, True), (128, True))

    def layer_names(self) -> tuple[str, ...]:
        """Sown representation names (forward order), excluding ``_preact``."""
        return self.LAYERS

    def preact_names(self) -> tuple[str, ...]:
        """Names of the sown pre-ReLU hidden representations."""
        return tuple(f'{name}{PREACT_SUFFIX}' for name in self.LAYERS[:-1])

    def param_names(self, layer: str) -> tuple[str, ...]:
        """Parameter sub-modules whose kernels produce representation ``layer``."""
        _check_layer(self, layer)
        if layer.startswith('conv'):
            return (f'Conv_{layer[len("conv") :]}',)
        return (f'Dense_{layer}',)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        dropout_rate: Optional[jax.Array] = None,
        example_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Maps images ``(N, H, W, C)`` to logits ``(N, num_classes)``; the arguments are :class:`MLP`'s."""
        h = jnp.asarray(x, self.dtype)
        drop = _dropout_layers(self, train, dropout_rate, example_ids, h.shape[0])
        hidden = _layer_kwargs(self, use_bias=not self.batchnorm)
        for i, (features, pool) in enumerate(self.CONVS, start=1):
            h = nn.Conv(
                features, kernel_size=(3, 3), strides=(1, 1), padding='SAME', **hidden, name=f'Conv_{i}'
            )(h)
            if self.batchnorm:
                h = _batchnorm(self, train, f'BatchNorm_{i}')(h)
            self.sow('intermediates', f'conv{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'conv{i}', h)
            h = drop(h, i)
            if pool:
                h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding='VALID')
        h = _flatten(h)
        h = nn.Dense(self.fc_width, **hidden, name='Dense_fc')(h)
        if self.batchnorm:
            h = _batchnorm(self, train, 'BatchNorm_fc')(h)
        self.sow('intermediates', f'fc{PREACT_SUFFIX}', h)
        h = nn.relu(h)
        self.sow('intermediates', 'fc', h)
        h = drop(h, len(self.CONVS) + 1)
        logits = nn.Dense(self.num_classes, **_layer_kwargs(self), name='Dense_logits')(h)
        self.sow('intermediates', 'logits', logits)
        return logits


# He et al. 2015 ("Delving deep into rectifiers") init with n = k*k*out_channels, as in the reference
# fb.resnet.torch CIFAR code (and torchvision's ``kaiming_normal_(mode='fan_out')``): a plain, untruncated
# normal with variance 2 / fan_out.
_he_normal_fan_out: Callable[..., jax.Array] = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class _BasicBlock(nn.Module):
    """Residual basic block (He et al. 2016, Fig. 2 left) that returns the sum *before* the final ReLU.

    ``conv3x3(stride) - BN - ReLU - conv3x3 - BN`` plus the option-A shortcut: identity, or, when the block
    changes shape, spatial subsampling by taking every other pixel and zero-padding the extra channels (no
    parameters). The zero channels are appended after the input channels. The parent applies the ReLU, so
    that it can sow the pre-activation of the last block of each stage under a flat name.
    """

    features: int
    strides: int
    bn: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, strides=(self.strides, self.strides), name='conv1')(x)
        y = nn.relu(self.bn(name='bn1')(y))
        y = self.conv(self.features, strides=(1, 1), name='conv2')(y)
        y = self.bn(name='bn2')(y)
        shortcut = x
        if self.strides != 1:
            shortcut = shortcut[:, :: self.strides, :: self.strides, :]
        extra = self.features - shortcut.shape[-1]
        if extra < 0:
            raise ValueError(
                f'Option-A shortcut cannot shrink channels: {shortcut.shape[-1]} -> {self.features}.'
            )
        if extra > 0:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return y + shortcut


class ResNet(nn.Module):
    """CIFAR-10 ResNet-``depth`` (``depth = 6n + 2``) of He et al. 2016, sec. 4.2; the paper's Table 4 models.

    ``conv3x3(16) - BN - ReLU``, then three stages of ``n`` basic blocks with 16, 32, 64 filters (the first
    block of stages 2 and 3 has stride 2), option-A (parameter-free, zero-padding) shortcuts, global average
    pooling and a ``Dense(num_classes)`` output. Convolutions have no bias (BN follows each) and use He-normal
    init with **fan_out** (``variance_scaling(2.0, 'fan_out', 'normal')``); the output Dense keeps flax's
    default init. BatchNorm uses momentum 0.9 (flax's running-average decay), epsilon 1e-5 and
    ``axis_name=bn_axis_name`` so that a ``pmap``-ed trainer can average batch statistics across devices.

    Parameter counts: 464,154 for ResNet-32 (n=5) and 1,727,962 for ResNet-110 (n=18), matching He et al.'s
    0.46M and 1.7M (BN scale/offset included; running statistics in ``'batch_stats'`` excluded).

    Sown (32x32x3 input, ``N`` images): ``'stage1'`` ``(N, 32, 32, 16)``, ``'stage2'`` ``(N, 16, 16, 32)``,
    ``'stage3'`` ``(N, 8, 8, 64)`` (post-ReLU outputs of each stage), ``'pool'`` ``(N, 64)``, ``'logits'``
    ``(N, num_classes)``, plus ``'stage{1,2,3}_preact'`` (the last block's residual sum before its ReLU).
    The paper regularizes ``'logits'`` ("the output layer").

    Call with ``train=True`` and ``mutable=['batch_stats']`` to use and update batch statistics.

    Attributes:
        num_classes: number of output logits.
        depth: total weighted depth, ``6n + 2`` (32 or 110 in the paper).
        bn_axis_name: pmap/shard_map axis over which to average BN batch statistics (``None``: per device).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    num_classes: int = 10
    depth: int = 32
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    LAYERS: ClassVar[tuple[str, ...]] = ('stage1', 'stage2', 'stage3', 'pool', 'logits')
    STAGE_FEATURES: ClassVar[tuple[int, ...]] = (16, 32, 64)

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6 != 0:
            raise ValueError(
                f'ResNet depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {self.depth}.'
            )
        super().__post_init__()

    @property
    def blocks_per_stage(self) -> int:
        """``n = (depth - 2) / 6`` basic blocks per stage."""
        return (self.depth - 2) // 6

    def layer_names(self) -> tuple[str, ...]:
        """Sown representation names (forward order), excluding ``_preact``."""
        return self.LAYERS

    def preact_names(self) -> tuple[str, ...]:
        """Names of the sown pre-ReLU stage outputs."""
        return tuple(f'stage{i}{PREACT_SUFFIX}' for i in range(1, 4))

    def param_names(self, layer: str) -> tuple[str, ...]:
        """Parameter sub-modules producing ``layer``: a stage's blocks, or the output Dense ('pool' has none)."""
        _check_layer(self, layer)
        if layer.startswith('stage'):
            return tuple(f'{layer}_block{b}' for b in range(1, self.blocks_per_stage + 1))
        return ('Dense_logits',) if layer == 'logits' else ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``(N, H, W, 3)`` to logits ``(N, num_classes)``."""
        conv = functools.partial(
            nn.Conv,
            kernel_size=(3, 3),
            padding='SAME',
            use_bias=False,
            kernel_init=_he_normal_fan_out,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        bn = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        h = jnp.asarray(x, self.dtype)
        h = nn.relu(bn(name='stem_bn')(conv(16, strides=(1, 1), name='stem_conv')(h)))
        for s, features in enumerate(self.STAGE_FEATURES, start=1):
            for b in range(1, self.blocks_per_stage + 1):
                strides = 2 if (s > 1 and b == 1) else 1
                h = _BasicBlock(features, strides, bn=bn, conv=conv, name=f'stage{s}_block{b}')(h)
                if b == self.blocks_per_stage:
                    self.sow('intermediates', f'stage{s}{PREACT_SUFFIX}', h)
                h = nn.relu(h)
            self.sow('intermediates', f'stage{s}', h)
        h = jnp.mean(h, axis=(1, 2))
        self.sow('intermediates', 'pool', h)
        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='Dense_logits'
        )(h)
        self.sow('intermediates', 'logits', logits)
        return logits


class Autoencoder(nn.Module):
    """The paper's MNIST autoencoder (appendix A.2: hidden units 400, 200, 100, 200, 400; output 784).

    Hidden ``Dense + ReLU`` layers and a ``Dense(output_dim) + sigmoid`` output trained with an L2
    reconstruction loss; the paper regularizes the third layer, the 100-unit code.

    Sown (defaults): ``'layer1'`` ... ``'layer5'`` (post-ReLU, ``(N, hidden[i])``; ``'layer3'`` is the code),
    ``'layer6'`` (the reconstruction in [0, 1], ``(N, output_dim)``, also returned), and
    ``'layer1_preact'`` ... ``'layer5_preact'``. In general the output is ``f'layer{len(hidden) + 1}'``.

    Attributes:
        hidden: units of each hidden layer.
        output_dim: size of the flattened reconstruction (784 = 28 * 28 for MNIST).
        kernel_init: a key of :data:`KERNEL_INITS`, for every Dense kernel.
        bias_init: the constant initial value of every Dense bias.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    hidden: tuple[int, ...] = (400, 200, 100, 200, 400)
    output_dim: int = 784
    kernel_init: str = 'lecun_normal'
    bias_init: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    LAYERS: ClassVar[tuple[str, ...]] = tuple(f'layer{i}' for i in range(1, 7))

    def __post_init__(self) -> None:
        if len(self.hidden) < 1:
            raise ValueError('Autoencoder needs at least one hidden layer.')
        super().__post_init__()

    def layer_names(self) -> tuple[str, ...]:
        """Sown representation names of this instance (hidden layers then output), excluding ``_preact``."""
        return tuple(f'layer{i}' for i in range(1, len(self.hidden) + 2))

    def preact_names(self) -> tuple[str, ...]:
        """Names of the sown pre-ReLU hidden representations."""
        return tuple(f'layer{i}{PREACT_SUFFIX}' for i in range(1, len(self.hidden) + 1))

    def param_names(self, layer: str) -> tuple[str, ...]:
        """Parameter sub-modules whose kernels produce representation ``layer`` (``layer{i}`` ← ``dense{i}``)."""
        _check_layer(self, layer)
        return (f'dense{layer[len("layer") :]}',)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``(N, 28, 28, 1)`` (or flat ``(N, 784)``) to reconstructions ``(N, output_dim)``."""
        del train  # No dropout / batch norm.
        h = _flatten(jnp.asarray(x, self.dtype))
        for i, units in enumerate(self.hidden, start=1):
            h = nn.Dense(units, **_layer_kwargs(self), name=f'dense{i}')(h)
            self.sow('intermediates', f'layer{i}{PREACT_SUFFIX}', h)
            h = nn.relu(h)
            self.sow('intermediates', f'layer{i}', h)
        out = len(self.hidden) + 1
        h = nn.Dense(self.output_dim, **_layer_kwargs(self), name=f'dense{out}')(h)
        recon = nn.sigmoid(h)
        self.sow('intermediates', f'layer{out}', recon)
        return recon


#: Model registry used by configs (``config.model.name``).
MODELS: dict[str, type[nn.Module]] = {
    'mlp': MLP,
    'cnn': CNN,
    'resnet': ResNet,
    'autoencoder': Autoencoder,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a key of :data:`MODELS` (``'mlp'``, ``'cnn'``, ``'resnet'``, ``'autoencoder'``).
        **kwargs: constructor attributes of that model, e.g. ``num_classes=100`` or ``depth=110``.

    Returns:
        The unbound Flax module.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid names) or invalid attributes
            (e.g. a ResNet depth that is not ``6n + 2``).
    """
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(sorted(MODELS))}.') from None
    return cls(**kwargs)
