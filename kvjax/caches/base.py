"""What every kvjax cache is: the protocol, its capabilities, and the helpers the kinds share.

A cache is an immutable pytree (a `flax.struct.dataclass`): arrays are leaves, sizes and bit
widths are static fields. Every operation returns a new cache; nothing is updated in place from
the caller's point of view (under `jit` with donation XLA reuses the buffers, which is the point).

`KVCache` (a `typing.Protocol`) is the contract: ten members.

  lengths                          int32 [B]: tokens each row has seen (= the position of its next
                                   token); rows are independent, so ragged batches need only n_valid.
  sizes -> Sizes                   static n_layers, batch, kv_heads, head_dim, capacity (slots/row).
  caps -> Capabilities             what the kind can do (a frozen record, below).
  attend(layer, q, k, v, n_valid=None, *, rope=None, scale=None) -> (out, cache)
      The one entry point of an attention layer. q [B, T, N, H], k/v [B, T, K, H] are the new
      tokens' un-rotated projections at positions `lengths[:, None] + arange(T)`; only the first
      n_valid[b] tokens of row b are real. The cache stores them its own way (rotated or not,
      quantized or not) and returns the attention [B, T, N, H] of the queries over what it holds,
      the new tokens included. `rope` is any object with `apply(x, positions)` (None: no rotary
      positions); `scale` the softmax scale (default 1/sqrt(H)).
  advance(n_valid) -> cache        after the last layer: `lengths += n_valid`, plus bookkeeping.
  write(layer, k, v, n_valid=None) -> cache   raw storage write, used by `kvjax.append`.
  view() -> CacheView              what attention reads, as dense arrays.
  reset() -> cache                 empty, same shapes.
  has_room(n) -> bool []           every row can take n more tokens (the decode loop's guard).
  overflowed() -> bool [B]         rows given more tokens than a limited cache holds.

`CacheBase` (through `Limited` / `Evicting`) derives everything else from those and from the
kind's class attributes: the sizes (`n_layers`, `batch`, ... read off the `_layout` leaf), `caps`,
`nbytes()`, `filled()`, `fits(n)`, `supports(verb)` and "not supported" optional verbs. So a new
kind writes its storage and attention and nothing else; kvjax's entry points rely on the derived
members too, so a kind that does not inherit `CacheBase` must provide them itself.

`Capabilities` (declared as class attributes of the kind, gathered by `CacheBase.caps`; never as
lists of kind names elsewhere):

  limited      True: a hard capacity; tokens past it are dropped inside jit and `overflowed()`
               flags the row. False: the kind evicts to make room and never overflows.
  exact        True: what `view()` shows for a held token is exactly what was given (no
               quantization, no sharing); with `limited` too, attention equals full attention.
               The one source of exactness: `CacheSpec.lossless` must never claim more.
  chunk_exact  True: feeding T tokens in one `attend` gives every query what feeding them one
               by one would (perplexity and prefill may then use chunks).
  growable     True: `grow(capacity)` may be called outside jit when `has_room` turns false
               (the `dynamic` allocation policy).
  error_bound  how far a held token's keys/values in `view()` may be from what was given,
               relative to the largest |value| given to that (layer, row, kv head): 0.0 for exact
               kinds, about 1 / (2^bits - 1) for quantized ones, None where the view is not the
               given tokens at all (`share:G` followers). `kvjax.testing` checks it.
  lossless_tokens  how many tokens a row can hold before its view stops being exactly the whole
               context (default `capacity`: right for kinds that drop nothing until full). A sparse
               policy or per-layer budgets (`pyramid`: the smallest layer's) must declare it.
               `kvjax.testing`'s `model-forward` decodes that many tokens (at most 10).
  verbs        the optional verbs implemented: `crop(length)`, `reorder(indices)`, `grow(capacity)`.
               A wrapper states what its inner caches allow (`share:2+tier:...` cannot crop).

Optional powers beyond the ten are extension protocols (`runtime_checkable`), asked with
`isinstance`, never with `hasattr`: `PagedStorage` (a page pool shared by rows: the engine and the
prefix store use it), `SlotShardable` (flash-decoding over a mesh axis of slots),
`LogicallyNamed` (its own logical sharding axes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn


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


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The static sizes of a cache: L layers, B rows, K kv heads, H head dim, S slots per row."""

  n_layers: int
  batch: int
  kv_heads: int
  head_dim: int
  capacity: int


OPTIONAL_VERBS = ("crop", "reorder", "grow")


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a cache kind can do (see the module docstring)."""

  limited: bool
  exact: bool
  chunk_exact: bool
  growable: bool = False
  error_bound: float | None = 0.0
  lossless_tokens: int = 0
  verbs: frozenset = frozenset()


@runtime_checkable
class KVCache(Protocol):
  """The ten members every cache kind has (see the module docstring). Structural: a kind need not
  inherit from anything, though `Limited` / `Evicting` supply the rest of what kvjax uses."""

  lengths: jax.Array

  @property
  def sizes(self) -> Sizes: ...

  @property
  def caps(self) -> Capabilities: ...

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None): ...

  def advance(self, n_valid): ...

  def write(self, layer: int, k, v, n_valid=None): ...

  def view(self) -> "CacheView": ...

  def reset(self): ...

  def has_room(self, n: int) -> jax.Array: ...

  def overflowed(self) -> jax.Array: ...


REQUIRED_MEMBERS = ("lengths", "sizes", "caps", "attend", "advance", "write", "view", "reset",
                    "has_room", "overflowed")
# What kvjax's entry points use besides the ten; `CacheBase` derives every one of them.
DERIVED_MEMBERS = ("n_layers", "batch", "kv_heads", "head_dim", "capacity", "limited", "exact",
                   "chunk_exact", "nbytes", "filled", "fits")


@runtime_checkable
class PagedStorage(Protocol):
  """A cache whose tokens live in a pool of pages shared by its rows (`paged:P`): the engine,
  the prefix store and `kvjax.append` ask it for pages before writing."""

  page_size: int

  @property
  def n_pages(self) -> int: ...

  def free_pages(self) -> jax.Array: ...

  def pages_short(self, n) -> jax.Array: ...

  def compact(self): ...

  def widen(self, batch: int, room: int): ...


@runtime_checkable
class SlotShardable(Protocol):
  """A cache that can split its slots over a mesh axis (flash-decoding across devices)."""

  def with_slot_sharding(self, slot_sharding): ...


@runtime_checkable
class LogicallyNamed(Protocol):
  """A cache that names the logical axes of its own leaves (for `kvjax.sharding`)."""

  def logical_axes(self): ...


# The logical axes of a cache's arrays, by which `kvjax.sharding` places them on a mesh.
LOGICAL_AXES = ("layers", "batch", "kv_heads", "slots", "head_dim")


class Names(tuple):
  """The logical axis names of one array's dimensions (a tuple JAX treats as a leaf)."""


def cache_logical_axes(cache):
  """A pytree like the cache's arrays with the `Names` of each array's dimensions.

  Kinds may define `logical_axes()` (`LogicallyNamed`); otherwise names follow the
  [L, B, K, S, H] convention by rank: 5 -> all five, 4 -> (layers, batch, kv_heads, slots),
  2 -> (batch, slots), 1 -> (batch,), other ranks -> unnamed (replicated)."""
  if isinstance(cache, LogicallyNamed):
    return cache.logical_axes()
  by_rank = {5: LOGICAL_AXES, 4: LOGICAL_AXES[:4], 2: ("batch", "slots"), 1: ("batch",)}
  return jax.tree_util.tree_map(lambda x: Names(by_rank.get(x.ndim, (None,) * x.ndim)), cache)


def missing_members(cache) -> list[str]:
  """Members of the protocol, and derived members kvjax relies on, that `cache` lacks (empty
  for a conforming kind)."""
  return [m for m in REQUIRED_MEMBERS + DERIVED_MEMBERS if not hasattr(cache, m)]


def check_cache(cache, what: str = "cache") -> None:
  """Raises TypeError naming what is missing when `cache` does not follow the protocol."""
  missing = missing_members(cache)
  if missing:
    hint = ("; inherit kvjax.Limited or kvjax.Evicting for the derived ones"
            if not set(missing) & set(REQUIRED_MEMBERS) else "")
    raise TypeError(f"{what}: {type(cache).__name__} is not a kvjax cache; it lacks "
                    f"{', '.join(missing)} (see kvjax.caches.base.KVCache){hint}")


def supports(cache, verb: str) -> bool:
  """Whether the kind of `cache` implements the optional verb ('crop', 'reorder', 'grow')."""
  if verb not in OPTIONAL_VERBS:
    raise ValueError(f"supports: unknown verb {verb!r}; optional verbs are {OPTIONAL_VERBS}")
  own = getattr(cache, "supports", None)
  if callable(own):  # CacheBase's, or a wrapper's that asks the caches it wraps
    return bool(own(verb))
  return _overrides(cache, verb)


def _overrides(cache, verb: str) -> bool:
  method = getattr(type(cache), verb, None)
  return method is not None and method is not getattr(CacheBase, verb)


class CacheBase:
  """Derived members shared by the kinds: sizes read off the leading [L, B, K] axes of the leaf
  `_layout` names, byte accounting, positions, and "not supported" defaults for optional verbs."""

  exact = True
  chunk_exact = True
  growable = False
  error_bound = 0.0  # exact storage; lossy kinds override (see the module docstring)

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

  @property
  def capacity(self) -> int:
    """Slots per row: axis 3 of an [L, B, K, S, H] layout (kinds laid out otherwise override)."""
    return self._layout.shape[3]

  @property
  def head_dim(self) -> int:
    return self._layout.shape[4]

  @property
  def sizes(self) -> Sizes:
    return Sizes(self.n_layers, self.batch, self.kv_heads, self.head_dim, self.capacity)

  @property
  def lossless_tokens(self) -> int:
    """Tokens a row holds before its view stops being the whole context (see the docstring)."""
    return self.capacity

  @property
  def caps(self) -> Capabilities:
    """The kind's capabilities, gathered from its class attributes (wrappers override those to
    say what their inner caches allow)."""
    return Capabilities(limited=bool(self.limited), exact=bool(self.exact),
                        chunk_exact=bool(self.chunk_exact), growable=bool(self.growable),
                        error_bound=self.error_bound,
                        lossless_tokens=int(self.lossless_tokens),
                        verbs=frozenset(v for v in OPTIONAL_VERBS if self.supports(v)))

  def token_positions(self, tokens: int) -> jax.Array:
    """int32 [B, T]: the positions of T tokens appended now (for models with learned positions)."""
    return row_slots(self.lengths, tokens)

  def nbytes(self) -> dict[str, int]:
    """Bytes of every array leaf, split by memory kind ('device', 'pinned_host', ...)."""
    return tree_nbytes(self)

  def supports(self, verb: str) -> bool:
    """Whether this cache implements the optional verb: by default, whether its class defines
    it. A kind that wraps other caches overrides this to ask them (`kvjax.supports` calls it)."""
    return _overrides(self, verb)

  def _unsupported(self, verb: str):
    return NotImplementedError(f"{type(self).__name__} does not support {verb}")

  def crop(self, length):
    raise self._unsupported("crop")

  def reorder(self, indices):
    raise self._unsupported("reorder")

  def grow(self, capacity: int):
    raise NotImplementedError(f"{type(self).__name__} never grows: its memory is fixed"
                              + ("" if self.limited else " and it evicts to make room"))


class Limited(CacheBase):
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


class Evicting(CacheBase):
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


def attend_inputs(cache, q, k, v, n_valid):
  """The checks and derived values every `attend` starts with.

  Raises clear errors for wrong shapes (q [B, T, N, H], k/v [B, T, K, H] against the cache's B, K,
  H) and returns (n_valid int32 [B] (None -> all T), positions int32 [B, T] of the new tokens).
  """
  what = f"{type(cache).__name__}.attend"
  attn.check_attend_args(q, k, v, kv_heads=cache.kv_heads, head_dim=cache.head_dim, what=what)
  if q.shape[0] != cache.batch:
    raise ValueError(f"{what}: q has batch {q.shape[0]} but the cache has {cache.batch} rows")
  n_valid = normalize_n_valid(n_valid, cache.batch, q.shape[1], what=what)
  return n_valid, row_slots(cache.lengths, q.shape[1])


def prefix_view(cache, keys, values) -> "CacheView":
  """The view of a kind whose slot s holds position s (full, offload): keys, values
  [L, B, K, S, H]; slots below `filled()` are live."""
  slots = jnp.arange(cache.capacity, dtype=jnp.int32)
  live = slots[None, :] < cache.filled()[:, None]  # [B, S]
  shape = (cache.n_layers, cache.batch, cache.kv_heads, cache.capacity)
  mask = jnp.broadcast_to(live[None, :, None, :], shape)
  positions = jnp.broadcast_to(jnp.where(live, slots[None, :], -1)[None, :, None, :], shape)
  return CacheView(keys=keys, values=values, mask=mask, positions=positions)


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


def check_sliding(sliding, what: str, n_layers: int | None = None):
  """`sliding` checked: None, a positive int (every layer slides over W tokens), or a tuple of
  those per layer (a cache over sliding and global layers at once: None for a global layer).
  A tuple whose entries are all equal comes back as that one value."""
  def one(w):
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
      raise ValueError(f"{what}: sliding must be a positive int (the window W), None, or a tuple "
                       f"of those per layer, got {sliding!r}")
    return w
  if isinstance(sliding, (tuple, list)):
    sliding = tuple(one(w) for w in sliding)
    if n_layers is not None and len(sliding) != n_layers:
      raise ValueError(f"{what}: sliding has {len(sliding)} entries for {n_layers} layers")
    return sliding[0] if len(set(sliding)) == 1 else sliding
  return one(sliding)


def layer_sliding(sliding, layer: int):
  """The window W of `layer` under a cache's `sliding` (None, W, or a tuple per layer)."""
  return sliding[layer] if isinstance(sliding, tuple) else sliding


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
