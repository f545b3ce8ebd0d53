"""What every kvjax cache is, and the helpers the kinds share.

A cache is an immutable pytree (a `flax.struct.dataclass`): arrays are leaves, sizes and bit
widths are static fields. Every operation returns a new cache; nothing is updated in place from
the caller's point of view (under `jit` with donation XLA reuses the buffers, which is the point).

The protocol every kind implements (methods, so the decoder never needs to know the kind):

  attend(layer, q, k, v, rope, n_valid) -> (out, cache)
      The decoder's only entry point. q [B, T, N, H], k/v [B, T, K, H] are the new tokens'
      un-rotated projections; the new tokens sit at positions `lengths[:, None] + arange(T)`.
      The cache stores them its own way (rotated or not, quantized or not) and returns attention
      of the queries over what it holds, the new tokens included.
  advance(n_valid) -> cache          after all layers: `lengths += n_valid`, plus the kind's bookkeeping.
  write(layer, k, v, n_valid) -> cache   raw storage write used by `kvjax.append`.
  view() -> CacheView                what attention reads, as dense arrays.
  reset() -> cache                   empty, same shapes.
  nbytes() -> {memory_kind: bytes}   measured from the real arrays.
  has_room(n), fits(n), overflowed(), and the class attribute `limited`: capacity facts, shared
      by the two mixins below (`Limited` kinds overflow, `Evicting` kinds never do).

`lengths` [B] counts the tokens each row has seen (= the position of its next token); rows are
independent, so ragged batches need no padding tricks beyond `n_valid`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class CapacityError(ValueError):
  """A write would go past a cache's fixed capacity."""


@struct.dataclass
class CacheView:
  """Dense picture of a cache, for tests and inspection.

  keys, values: [L, B, K, S, H] as stored (dequantized, in slot order).
  mask: bool [L, B, K, S]: which slots hold a live token.
  positions: int32 [L, B, K, S]: the token position held by each slot (-1 where empty).
  """

  keys: jax.Array
  values: jax.Array
  mask: jax.Array
  positions: jax.Array


class _Layered:
  """n_layers / batch / kv_heads read off the leading [L, B, K] axes of the leaf `_layout` names."""

  @property
  def _layout(self) -> jax.Array:
    raise NotImplementedError

  @property
  def n_layers(self) -> int:
    return self._layout.shape[0]

  @property
  def batch(self) -> int:
    return self._layout.shape[1]

  @property
  def kv_heads(self) -> int:
    return self._layout.shape[2]


class Limited(_Layered):
  """Mixin for kinds with a hard capacity (full, offload, quantized).

  `lengths` keeps counting every token given; writes past `capacity` are dropped inside jit and
  the row is flagged by `overflowed()`. Outside jit, `kvjax.append` raises `CapacityError` first.
  """

  limited = True

  def overflowed(self) -> jax.Array:
    """bool [B]: rows that were given more tokens than the capacity (those tokens were dropped)."""
    return self.lengths > self.capacity

  def has_room(self, n: int) -> jax.Array:
    """bool []: every row can take n more tokens (traceable; the decode loop's guard)."""
    return jnp.max(self.lengths) + n <= self.capacity

  def fits(self, n_tokens: int) -> bool:
    """Python bool: a row of n_tokens tokens fits (checked before jitting)."""
    return n_tokens <= self.capacity

  def filled(self) -> jax.Array:
    """int32 [B]: slots that hold a token."""
    return jnp.minimum(self.lengths, self.capacity)


class Evicting(_Layered):
  """Mixin for kinds that make room by dropping tokens (window/sinks, H2O, tiers).

  Any stream length fits in their fixed memory, so nothing ever overflows; `capacity` is what
  they hold at most, not a limit on the stream.
  """

  limited = False

  def has_room(self, n: int) -> jax.Array:
    """Always true: the kind evicts to make room."""
    return jnp.asarray(True)

  def fits(self, n_tokens: int) -> bool:
    """Always true: any stream length fits."""
    return True

  def overflowed(self) -> jax.Array:
    """bool [B]: never (eviction is the design, not an overflow)."""
    return jnp.zeros((self.batch,), bool)


def is_concrete(x: Any) -> bool:
  """True when `x` has a value now (not a tracer inside jit)."""
  return not isinstance(x, jax.core.Tracer)


def check_new_kv(k, v, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, what="append"):
  """Validates the `[L, B, K, T, H]` keys/values given to `kvjax.append`."""
  for name, x in (("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{what}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != 5:
      raise ValueError(f"{what}: {name} must have rank 5 [layers, batch, kv_heads, tokens, head_dim], "
                       f"got shape {tuple(x.shape)}")
    expected = (n_layers, batch, kv_heads, None, head_dim)
    for axis, (got, want) in enumerate(zip(x.shape, expected)):
      if want is not None and got != want:
        axis_name = ("layers", "batch", "kv_heads", "tokens", "head_dim")[axis]
        raise ValueError(f"{what}: {name} has {axis_name}={got} but the cache has {axis_name}={want} "
                         f"(shape {tuple(x.shape)}, expected [{n_layers}, {batch}, {kv_heads}, T, {head_dim}])")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{what}: {name} must be a floating array, got dtype {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"{what}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")


def normalize_n_valid(n_valid, batch: int, tokens: int, what="append") -> jax.Array:
  """`None` -> all T tokens of every row; else an int32 [B] array checked against 0 <= n <= T."""
  if n_valid is None:
    return jnp.full((batch,), tokens, jnp.int32)
  n_valid = jnp.asarray(n_valid)
  if n_valid.shape != (batch,):
    raise ValueError(f"{what}: n_valid must have shape [batch]=({batch},), got {tuple(n_valid.shape)}")
  if not jnp.issubdtype(n_valid.dtype, jnp.integer):
    raise TypeError(f"{what}: n_valid must be integer, got dtype {n_valid.dtype}")
  if is_concrete(n_valid) and ((n_valid < 0).any() or (n_valid > tokens).any()):
    raise ValueError(f"{what}: n_valid must lie in [0, {tokens}], got {n_valid.tolist()}")
  return n_valid.astype(jnp.int32)


def tree_nbytes(tree) -> dict[str, int]:
  """Bytes of every array leaf of `tree`, split by memory kind ('device', 'pinned_host', ...)."""
  out: dict[str, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    kind = "device"
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and getattr(sharding, "memory_kind", None):
      kind = sharding.memory_kind
    out[kind] = out.get(kind, 0) + int(leaf.size) * leaf.dtype.itemsize
  return out


def pick_block_size(capacity: int, preferred: int = 256) -> int:
  """Largest block size <= preferred that divides capacity (whole capacity if none >= 16 does)."""
  if capacity <= preferred:
    return capacity
  for bs in range(preferred, 15, -1):
    if capacity % bs == 0:
      return bs
  return capacity


def row_slots(lengths: jax.Array, tokens: int) -> jax.Array:
  """[B, T] positions of T new tokens appended after each row's `lengths`."""
  return lengths[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None, :]
