"""What kvjax needs of a model: a step function.

Everything in kvjax that runs a model (`generate`, `perplexity`, prefix caching, `bench`, the CLI,
the experiments) sees it only through this contract:

  model.params                      a pytree of weights (traced, never baked into a compilation).
  model.config                      any object with int `n_layers`, `n_kv_heads`, `head_dim`,
                                    `vocab_size`; caches are built from it.
  model.step(params, tokens, cache, n_valid) -> (logits, cache)
      tokens int32 [B, T] continue each row at `cache.lengths`; only the first n_valid[b] (int32
      [B]) are real; logits [B, T, V]. Inside, each attention layer calls
      `out, cache = cache.attend(layer, q, k, v, n_valid, rope=...)`, and after the last layer
      `cache = cache.advance(n_valid)`. It must be traceable: a user's own `jax.jit` or
      `lax.scan` can call it.

Optional:

  model.step_last(params, tokens, cache, n_valid) -> (logits [B, V], cache)
      the logits of each row's last real token only (prefill needs nothing else; skipping the LM
      head for the others saves a [B, T, V] product). Derived from `step` when absent.
  model.dtype                       the compute dtype (default: that of the largest params leaf).
  model.tokenizer                   `encode(str) -> list[int]`, `decode(ids) -> str`, `eos_id`:
                                    needed for text prompts only.

kvjax jits `step` itself, passing `params` and the cache as traced arguments and the step
function as a static one (`static_step`): write `step` as a method of an object that holds no
arrays (a frozen dataclass of settings, like kvjax's `LlamaDecoder`), so equal settings share one
compiled executable. A `step` bound to an object that holds the params still works: kvjax then
keys its compilations by that object's identity and holds it only by a weak reference, so a
deleted model is not kept alive by JAX's compilation cache.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


@runtime_checkable
class ModelConfig(Protocol):
  n_layers: int
  n_kv_heads: int
  head_dim: int
  vocab_size: int


@runtime_checkable
class DecoderModel(Protocol):
  params: Any
  config: Any

  def step(self, params, tokens, cache, n_valid): ...


def default_dtype():
  """fp32 on CPU (bf16 is slower there), bf16 on accelerators."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def check_model(model, what: str = "generate") -> None:
  """Raises TypeError naming what is missing when `model` does not follow the contract."""
  missing = [m for m in ("params", "config", "step") if not hasattr(model, m)]
  if missing:
    raise TypeError(f"{what}: the model ({type(model).__name__}) lacks {', '.join(missing)}; a "
                    "kvjax model has params, config and step(params, tokens, cache, n_valid) "
                    "(see kvjax.models.protocol)")
  if not callable(model.step):
    raise TypeError(f"{what}: model.step must be callable")
  cfg = model.config
  for field in ("n_layers", "n_kv_heads", "head_dim", "vocab_size"):
    value = getattr(cfg, field, None)
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise TypeError(f"{what}: model.config must have a positive int {field}, got {value!r}")


def model_dtype(model):
  """The model's compute dtype: `model.dtype` if it has one, else that of its largest float
  params leaf (fp32 when it has none)."""
  dtype = getattr(model, "dtype", None)
  if dtype is not None:
    return jnp.dtype(dtype)
  leaves = [x for x in jax.tree_util.tree_leaves(model.params)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(max(leaves, key=lambda x: x.size).dtype)


def last_logits(logits: jax.Array, n_valid: jax.Array) -> jax.Array:
  """logits [B, T, V] -> [B, V] at index n_valid[b] - 1 of each row (0 for an empty row)."""
  index = jnp.maximum(n_valid - 1, 0)[:, None, None]
  return jnp.take_along_axis(logits, index, axis=1)[:, 0]


def _value_hashable(obj) -> bool:
  """True for objects compared by value and hashable now (a frozen dataclass of settings); False
  for identity-compared ones and for value types holding arrays (which cannot be hashed)."""
  cls = type(obj)
  if cls.__hash__ is None or cls.__hash__ is object.__hash__ or cls.__eq__ is object.__eq__:
    return False
  try:
    hash(obj)
  except TypeError:
    return False
  return True


class StepFunction:
  """The static half of a model: its step (and step_last), hashable, holding no params.

  Built by `static_step(model)`; passed to `jax.jit` as a static argument. Two handles are equal
  when they compute the same function: same method of equal (value-hashable) owners, the same
  plain callable, or the same (weakly held) owner object.
  """

  __slots__ = ("_key", "_owner", "_ref", "_func", "_last", "__weakref__")

  def __init__(self, model):
    step = model.step
    owner = getattr(step, "__self__", None)
    self._owner = self._ref = None
    if owner is not None and not isinstance(owner, type):
      func = step.__func__
      last = getattr(type(owner), "step_last", None)
      if _value_hashable(owner):
        self._owner = owner
        self._key = ("value", owner, func, last)
      else:
        self._ref = weakref.ref(owner)
        self._key = ("ref", id(owner), func, last)
      self._func, self._last = func, last
    else:  # a plain callable attribute (function, partial, callable object)
      self._func = step
      self._last = getattr(model, "step_last", None)
      self._key = ("callable", step, self._last)

  def _self(self):
    if self._ref is not None:
      owner = self._ref()
      if owner is None:
        raise RuntimeError("the model this step belongs to was deleted")
      return owner
    return self._owner

  def step(self, params, tokens, cache, n_valid):
    owner = self._self()
    return self._func(params, tokens, cache, n_valid) if owner is None else \
        self._func(owner, params, tokens, cache, n_valid)

  def step_last(self, params, tokens, cache, n_valid):
    if self._last is not None:
      owner = self._self()
      return self._last(params, tokens, cache, n_valid) if owner is None else \
          self._last(owner, params, tokens, cache, n_valid)
    logits, cache = self.step(params, tokens, cache, n_valid)
    return last_logits(logits, n_valid), cache

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    if not isinstance(other, StepFunction) or self._key != other._key:
      return False
    return self._ref is None or self._ref() is other._ref()

  def __repr__(self):
    return f"StepFunction({self._key[0]}, {getattr(self._func, '__qualname__', self._func)!r})"


def static_step(model) -> StepFunction:
  """The hashable static handle of `model.step` that kvjax's jitted functions take."""
  return StepFunction(model)
