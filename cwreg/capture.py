"""Take a layer's output from a Flax model you did not write, beside the model's output.

The representation penalties (`cwreg.penalties`) act on one layer's activations, e.g. the penultimate
features. A model written by someone else rarely returns them and does not ``sow`` them. The helpers here
capture the output of one named submodule's ``__call__`` without editing the model:

* Flax Linen: :func:`linen_apply`, a drop-in for ``model.apply`` (``nn.intercept_methods``).
* Flax NNX: :func:`nnx_call`, a drop-in for ``model(...)`` (``nnx.capture``).

The captured features are the very value the model computes, so gradients flow through them to the
parameters, under ``jax.jit``/``jax.grad`` and ``nnx.jit``/``nnx.value_and_grad`` alike. Capturing adds no
computation: the compiled program is the model's own.

Module paths name submodules as Flax does, as a ``'/'``-separated string or a tuple: Linen scope names
(``'Dense_1'``, ``'backbone/Dense_0'``, ``('backbone', 'Dense_0')``), NNX attribute paths (``'linear2'``,
``'layers/1'``, ``('layers', 1)``). ``''`` or ``()`` is the model itself. A wrong path, or a submodule the
call did not use, raises a ValueError that lists the paths there are.

Example (Linen)::

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from cwreg import capture, penalties
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.relu(nn.Dense(8)(x))
  ...     return nn.Dense(3)(x)
  >>> model, x, y = MLP(), jnp.ones((4, 5)), jnp.array([0, 1, 1, -1])
  >>> variables = model.init(jax.random.key(0), x)
  >>> logits, features = capture.linen_apply(model, variables, x, path='Dense_0')
  >>> logits.shape, features.shape  # features: Dense_0's output, before the relu
  ((4, 3), (4, 8))
  >>> omega = penalties.cw_vr(features, y, num_classes=3)

Only ``jax`` and ``flax`` are needed; ``flax.nnx`` is imported when :func:`nnx_call` is called, so this
module imports with any Flax that has Linen.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax
import flax.core.scope
import flax.linen as nn

PathLike = Union[str, Sequence[Union[str, int]]]
CollectionFilter = Any  # bool, str, a sequence of collection names or nn.DenyList, as in `Module.apply`.

# Private names, so that the capture never meets a collection, variable or sown name of the model's.
_LINEN_COLLECTION = 'cwreg_capture'
_SOWN_NAME = 'cwreg_call_output'


def _parse_path(path: PathLike) -> tuple[str, ...]:
    """'a/b', ('a', 'b') or ('layers', 1) -> ('a', 'b') / ('layers', '1'); '' and () -> ()."""
    if isinstance(path, str):
        return tuple(part for part in path.split('/') if part)
    if isinstance(path, Sequence):
        return tuple(str(part) for part in path)
    raise TypeError(f'path must be a "/"-separated string or a tuple of names, got {path!r}')


def _format_paths(paths) -> str:
    shown = sorted({'/'.join(p) if p else "'' (the model itself)" for p in paths})
    return ', '.join(shown) if shown else '(none)'


def _pick_call(outputs: tuple, call_index: Optional[int], where: str) -> Any:
    """One call's output out of the outputs of every call of the captured module."""
    if call_index is None:
        if len(outputs) != 1:
            raise ValueError(
                f'{where} was called {len(outputs)} times (a shared module); pass call_index= '
                f'(0 to {len(outputs) - 1}, in call order) to say which output to take.'
            )
        return outputs[0]
    if not -len(outputs) <= call_index < len(outputs):
        raise ValueError(f'call_index={call_index}, but {where} was called {len(outputs)} times.')
    return outputs[call_index]


# ----------------------------------------------------------------------------------------------------------
# Flax Linen.


# Over 60 lines only by its docstring (arguments, example): the code itself is under 60.
def linen_apply(
    model: nn.Module,
    variables: Any,
    *args: Any,
    path: PathLike,
    rngs: Optional[Any] = None,
    mutable: CollectionFilter = False,
    method: Optional[Union[str, Callable[..., Any]]] = None,
    call_index: Optional[int] = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``model.apply`` that also returns the output of the submodule at ``path``.

    The output of the ``__call__`` of the submodule named ``path`` is captured (through
    ``nn.intercept_methods``, without editing the model) and returned beside the model's output.
    ``variables``, ``*args``, ``rngs``, ``mutable``, ``method`` and ``**kwargs`` are passed to
    ``model.apply`` unchanged, so batch statistics and dropout work as they do there.

    Example::

      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from cwreg import capture
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train: bool):
      ...     x = nn.Dense(8)(x)
      ...     x = nn.BatchNorm(use_running_average=not train)(x)
      ...     x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
      ...     return nn.Dense(3)(x)
      >>> model, x = Net(), jnp.ones((4, 5))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> logits, features, updates = capture.linen_apply(
      ...     model, variables, x, train=True, path='BatchNorm_0', mutable=['batch_stats'],
      ...     rngs={'dropout': jax.random.key(1)})
      >>> features.shape, list(updates)
      ((4, 8), ['batch_stats'])

    Args:
      model: the (unbound) Linen module, as for ``model.apply``.
      variables: its variables, e.g. ``{'params': params, 'batch_stats': stats}``.
      *args: positional arguments of the model's call.
      path: the submodule whose ``__call__`` output to take: its scope path, e.g. ``'Dense_1'``,
        ``'backbone/Dense_0'`` or ``('backbone', 'Dense_0')``; ``''`` for the model itself.
      rngs: PRNG keys by name (``{'dropout': key}``), as for ``model.apply``.
      mutable: collections to update (``['batch_stats']``, ``True``, ...), as for ``model.apply``.
      method: the method to apply instead of ``__call__``, as for ``model.apply``.
      call_index: for a submodule called several times (shared weights), which call's output to take (0
        is the first call); needed exactly then.
      **kwargs: keyword arguments of the model's call.

    Returns:
      ``(output, features)`` when ``mutable`` is False, else ``(output, features, updates)``: ``output`` is
      what ``model.apply`` returns without ``mutable``, ``features`` the submodule's output (of whatever
      shape and pytree structure it has, e.g. ``(N, ..., C)`` for a layer applied to a batch of N), and
      ``updates`` the updated mutable collections, as ``model.apply`` returns them.

    Raises:
      ValueError: no submodule at ``path`` was called; the message lists the module paths that were.
    """
    target = _parse_path(path)
    called: set[tuple[str, ...]] = set()
    active: list[tuple[str, ...]] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        if context.method_name != '__call__':
            return next_fun(*call_args, **call_kwargs)
        module_path = tuple(context.module.path)
        # A `super().__call__` inside the module's own __call__ is part of the same call: record only the
        # outermost one.
        nested = module_path in active
        active.append(module_path)
        try:
            output = next_fun(*call_args, **call_kwargs)
        finally:
            active.pop()
        if not nested:
            called.add(module_path)
            if module_path == target:
                context.module.sow(_LINEN_COLLECTION, _SOWN_NAME, output)
        return output

    with_capture = (
        [_LINEN_COLLECTION]
        if mutable is False
        else flax.core.scope.union_filters(mutable, [_LINEN_COLLECTION])
    )
    with nn.intercept_methods(interceptor):
        output, state = model.apply(
            variables, *args, rngs=rngs, mutable=with_capture, method=method, **kwargs
        )
    state = dict(state)
    node = state.pop(_LINEN_COLLECTION, {})
    for name in (*target, _SOWN_NAME):
        node = node.get(name, {})
    outputs = tuple(node) if isinstance(node, tuple) else ()
    where = f'the Linen submodule {"/".join(target) or "(the model itself)"!r}'
    if not outputs:
        raise ValueError(
            f'No submodule at path {_format_paths([target])} was called by '
            f'{type(model).__name__}. Module paths called: {_format_paths(called)}.'
        )
    features = _pick_call(outputs, call_index, where)
    if mutable is False:
        return output, features
    return output, features, state


# ----------------------------------------------------------------------------------------------------------
# Flax NNX.


def _nnx():
    """flax.nnx with `nnx.capture`, or an ImportError that says what is missing."""
    try:
        from flax import nnx  # pylint: disable=g-import-not-at-top
    except ImportError as error:
        raise ImportError(
            f'cwreg.capture.nnx_call needs flax.nnx, which flax {flax.__version__} lacks.'
        ) from error
    if not all(hasattr(nnx, name) for name in ('capture', 'iter_modules', 'Intermediate')):
        raise ImportError(
            f'cwreg.capture.nnx_call needs flax.nnx.capture (flax >= 0.12.6); flax '
            f'{flax.__version__} is installed. Upgrade flax, or sow the features yourself.'
        )
    return nnx


@functools.cache
def _captured_type():
    """A private `nnx.Intermediate` subclass: only our sow lands in it, and nothing of the model's."""
    nnx = _nnx()

    class CwregCaptured(nnx.Intermediate):
        """The output of the submodule captured by `cwreg.capture.nnx_call`."""

    return CwregCaptured


# Over 60 lines only by its docstring (arguments, example): the code itself is under 60.
def nnx_call(
    model: Any, *args: Any, path: PathLike, call_index: Optional[int] = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``model(*args, **kwargs)`` for a Flax NNX model, also returning the submodule at ``path``'s output.

    The output of the ``__call__`` of the submodule at attribute path ``path`` is sown (as an
    ``nnx.Intermediate`` of a private type) and collected with ``nnx.capture``, without editing the model.
    Call it inside your ``nnx.jit``/``nnx.value_and_grad`` function: the features are the traced value
    the model computes, so gradients of a penalty on them reach the parameters. The model's state updates
    (batch statistics, RNG counts) happen as in ``model(...)``.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from cwreg import capture, penalties
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.layers = nnx.List([nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])
      ...   def __call__(self, x):
      ...     return self.layers[1](nnx.relu(self.layers[0](x)))
      >>> model, x, y = MLP(nnx.Rngs(0)), jnp.ones((4, 5)), jnp.array([0, 1, 1, -1])
      >>> def loss_fn(model):
      ...   logits, features = capture.nnx_call(model, x, path='layers/0')  # features: (4, 8)
      ...   return penalties.cw_vr(features, y, num_classes=3)
      >>> loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)

    Args:
      model: the NNX module.
      *args: positional arguments of its call.
      path: the submodule whose ``__call__`` output to take, by attribute path: ``'linear2'``,
        ``'layers/1'``, ``('layers', 1)``; ``''`` for the model itself.
      call_index: for a submodule called several times (shared weights), which call's output to take (0
        is the first call); needed exactly then.
      **kwargs: keyword arguments of its call.

    Returns:
      ``(output, features)``: the model's output and the submodule's output (of whatever shape and pytree
      structure it has, e.g. ``(N, ..., C)`` for a layer applied to a batch of N).

    Raises:
      ValueError: there is no submodule at ``path`` (the message lists the module paths there are), or it
        was not called.
      ImportError: the installed flax has no ``nnx.capture``.
      RuntimeError: called inside another ``nnx.capture`` (Flax's captures do not nest).

    Notes:
      While it runs, ``nnx.capture`` collects only this helper's capture: values that the model sows
      itself are not kept; wrap the model in ``nnx.capture`` yourself to collect those. The class that
      defines the submodule's ``__call__`` is patched for the length of the call (as ``nnx.capture``'s
      ``method_outputs`` does), which also reaches copies that NNX transforms inside the model call.
    """
    nnx = _nnx()
    captured_type = _captured_type()
    target = _parse_path(path)
    modules = {
        tuple(str(part) for part in module_path): (tuple(module_path), module)
        for module_path, module in nnx.iter_modules(model)
    }
    if target not in modules:
        raise ValueError(
            f'{type(model).__name__} has no submodule at path {_format_paths([target])}. Module '
            f'paths: {_format_paths(modules)}.'
        )
    real_path, submodule = modules[target]
    if hasattr(model, '__captures__'):
        raise RuntimeError('cwreg.capture.nnx_call was called inside nnx.capture, which does not nest.')
    owner = next((cls for cls in type(submodule).__mro__ if '__call__' in vars(cls)), None)
    if owner is None or owner is object:
        raise ValueError(
            f'The submodule at path {_format_paths([target])} ({type(submodule).__name__}) has no __call__.'
        )
    original = vars(owner)['__call__']

    # The class that defines the submodule's __call__ sows its output, for the length of this call.
    # Every instance of it in the model does (we read only `path`); a patch of the class, not the instance,
    # also reaches the copies that NNX transforms inside the model (nnx.remat, nnx.scan) call.
    @functools.wraps(original)
    def sowing_call(self, *call_args, **call_kwargs):
        output = original(self, *call_args, **call_kwargs)
        if hasattr(self, '__captures__'):  # A module of this model, not of some other one.
            self.sow(captured_type, _SOWN_NAME, output)
        return output

    def forward(module, *call_args, **call_kwargs):
        return module(*call_args, **call_kwargs)

    setattr(owner, '__call__', sowing_call)
    try:
        output, state = nnx.capture(forward, captured_type)(model, *args, **kwargs)
    finally:
        setattr(owner, '__call__', original)
    node = state
    try:
        for name in real_path:
            node = node[name]
        outputs = node[_SOWN_NAME].get_value()
    except (KeyError, TypeError, IndexError):
        outputs = ()
    where = f'the NNX submodule {"/".join(target) or "(the model itself)"!r}'
    if not outputs:
        raise ValueError(
            f'{where} ({type(submodule).__name__}) was not called by '
            f'{type(model).__name__}.__call__. Module paths: {_format_paths(modules)}.'
        )
    return output, _pick_call(tuple(outputs), call_index, where)
