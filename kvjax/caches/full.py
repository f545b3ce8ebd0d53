"""Full (static, preallocated) KV cache, and the doubling "dynamic" growth of it.

Layout: keys and values are `[L, B, K, S, H]` buffers allocated once at a fixed capacity S. Row b's
token at position p lives in slot p, keys stored already rotated by RoPE (they never move, so they
never need re-rotation).

Invariants (checked by tests/caches/test_full.py against a NumPy oracle):
  * after any sequence of appends, slots [0, lengths[b]) of row b hold exactly the concatenation of
    what was appended to row b, in order; `view().mask` is true on those slots only;
  * rows never see each other's slots: every write and every read is indexed by the row's own length;
  * overflow: a token whose position is >= S is not stored (the write is dropped, never clamped onto
    another slot); `lengths` keeps counting and `overflowed()` turns true for that row. Outside `jit`
    `kvjax.append` raises `CapacityError` instead; `kvjax.generate` checks capacity before it runs.

Attention reads only the blocks below the longest row (`blockwise_attention`), so a step's cost
follows the tokens held. "Dynamic" caching is the same pytree grown by `grow()` (doubling the
capacity) between jitted segments: one compile per capacity bucket.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax import kernels
from kvjax.caches import base, registry, slot_sharded, terms
from kvjax.caches.terms import SpecError
from kvjax.caches import codec as codec_lib


@struct.dataclass
class FullCache(base.Limited):
  """Preallocated cache. k, v: [L, B, K, S, H]; lengths: int32 [B] tokens seen per row.

  growable (static): the `dynamic` policy: `generate` doubles the capacity between jitted segments
  when a row runs out of slots, instead of refusing up front.
  sliding (static): a sliding-window layer's W (Gemma 3's local layers): attention also hides
  keys at positions <= q_pos - W; every token is still held. None: plain causal attention. A
  tuple gives each layer its own (None for a global layer): one cache over a model's sliding and
  global layers (`hybrid.build` merges a layout's groups of one spec that differ in window).
  slot_sharding (static): set by `kvjax.sharding.shard_cache` when the slots are split over
  devices: writes and attention then run per device under `jax.shard_map` and combine their
  softmax statistics across the slot axes (flash-decoding); None otherwise.
  kernel (static): "auto" | "jnp" | "pallas", the attention kernel of decode steps (Pallas) and
  of prefill chunks (`jax.nn.dot_product_attention`) (`kvjax.kernels`; `choice` says which runs).
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  block_size: int = struct.field(pytree_node=False, default=256)
  growable: bool = struct.field(pytree_node=False, default=False)
  slot_sharding: Any = struct.field(pytree_node=False, default=None)
  sliding: int | tuple | None = struct.field(pytree_node=False, default=None)
  kernel: str = struct.field(pytree_node=False, default="auto")

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
           dtype=jnp.float32, block_size: int | None = None, growable: bool = False,
           sliding: int | None = None) -> "FullCache":
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"FullCache: capacity must be positive, got {capacity}")
    shape = (n_layers, batch, kv_heads, capacity, head_dim)
    bs = block_size or base.pick_block_size(capacity)
    if capacity % bs:
      raise ValueError(f"FullCache: block_size {bs} must divide capacity {capacity}")
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32), block_size=bs, growable=growable,
               sliding=base.check_sliding(sliding, "FullCache", n_layers))

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.k

  # ---- protocol -------------------------------------------------------------------------------
  def write(self, layer: int, k, v, n_valid=None) -> "FullCache":
    """Stores k, v [B, T, K, H] of one layer at each row's own next slots (lengths unchanged).

    Tokens at positions >= capacity are dropped (scatter mode "drop"), never clamped. Padding tokens
    (t >= n_valid[b]) are written too but stay outside the valid region: the next append of that
    row overwrites them.
    """
    if self.slot_sharding is not None:
      new_k, new_v = slot_sharded.write(self.k, self.v, self.lengths, layer, k, v, self.slot_sharding)
      return self.replace(k=new_k, v=new_v)
    slots = base.row_slots(self.lengths, k.shape[1])  # [B, T]
    rows = jnp.arange(self.batch)[:, None]  # [B, 1]
    new_k = self.k.at[layer, rows, :, slots, :].set(k.astype(self.k.dtype), mode="drop")
    new_v = self.v.at[layer, rows, :, slots, :].set(v.astype(self.v.dtype), mode="drop")
    return self.replace(k=new_k, v=new_v)

  def advance(self, n_valid) -> "FullCache":
    return self.replace(lengths=self.lengths + n_valid)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Rotates, stores, and attends over the filled blocks of `layer`. Returns (out [B,T,N,H], cache)."""
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.apply_rope(rope, q, positions)
    cache = self.write(layer, attn.apply_rope(rope, k, positions), v)
    kv_len = jnp.minimum(self.lengths + n_valid, self.capacity)
    window = base.layer_sliding(self.sliding, layer)
    if self.slot_sharding is not None:
      qg = attn.prepare_queries(q, self.kv_heads, scale)
      out = slot_sharded.attend(cache.k, cache.v, layer, qg, positions, kv_len,
                                cache.slot_sharding, cache.block_size, window,
                                self.choice(q.shape[1], layer))
      return out.astype(q.dtype), cache
    bs = self.block_size
    shape = (1, self.batch, self.kv_heads, bs, self.head_dim)

    def load_block(start):
      idx = (layer, 0, 0, start, 0)
      return jax.lax.dynamic_slice(cache.k, idx, shape)[0], jax.lax.dynamic_slice(cache.v, idx, shape)[0]

    qg = attn.prepare_queries(q, self.kv_heads, scale)

    def jnp_path():
      return attn.attend_prefix_blocks(qg, load_block, positions, kv_len, bs, window)

    choice = self.choice(q.shape[1], layer)
    if choice.is_jnp:
      return jnp_path(), cache
    if q.shape[1] > 1:  # a chunk: the layer's whole buffer (prefix + chunk) under a mask
      return kernels.contiguous_prefill(choice, qg, cache.k[layer], cache.v[layer], positions,
                                        kv_len, window, jnp_path), cache
    start = None if window is None else jnp.maximum(positions[:, 0] - window + 1, 0)
    return kernels.contiguous_decode(choice, qg, cache.k[layer], cache.v[layer], kv_len, start,
                                     jnp_path), cache

  def choice(self, queries: int, layer: int = 0, on: str | None = None) -> kernels.Choice:
    """The kernel `attend` runs for `queries` tokens per row at `layer` (`kvjax.kernels.choose`;
    on: the platform, default the current one)."""
    shards = 1 if self.slot_sharding is None else self.slot_sharding.shards()
    return kernels.choose(self.kernel, "full", queries=queries, head_dim=self.head_dim,
                          window=base.layer_sliding(self.sliding, layer),
                          slots=self.capacity // shards,  # a device's slots
                          sharded=self.slot_sharding is not None, on=on)

  def view(self) -> base.CacheView:
    return base.prefix_view(self, self.k, self.v)

  def reset(self) -> "FullCache":
    """Empty cache of the same shapes (buffers keep stale values, hidden by lengths = 0)."""
    return self.replace(lengths=jnp.zeros_like(self.lengths))

  # ---- beam search / speculative decoding -------------------------------------------------------
  def crop(self, length) -> "FullCache":
    """Forgets every token at position >= length (per row if length is [B])."""
    return self.replace(lengths=jnp.minimum(self.lengths, jnp.asarray(length, jnp.int32)))

  def reorder(self, indices) -> "FullCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    return self.replace(k=jnp.take(self.k, indices, axis=1), v=jnp.take(self.v, indices, axis=1),
                        lengths=jnp.take(self.lengths, indices, axis=0))

  # ---- slots split over devices (kvjax.sharding) -----------------------------------------------
  def with_slot_sharding(self, slot_sharding) -> "FullCache":
    """The same cache, told that its slots are split over `slot_sharding.slots` mesh axes."""
    shards = slot_sharding.shards()
    if self.capacity % shards:
      raise ValueError(f"FullCache: capacity {self.capacity} does not split over {shards} devices")
    if self.growable:
      raise ValueError("a dynamic (growable) cache cannot split its slots over devices")
    local = self.capacity // shards
    return self.replace(slot_sharding=slot_sharding,
                        block_size=base.pick_block_size(local, self.block_size))

  def grow(self, capacity: int) -> "FullCache":
    """Same contents in a larger buffer (call outside jit; shapes change)."""
    if self.slot_sharding is not None:
      raise ValueError("grow: a cache whose slots are split over devices has a fixed capacity")
    if capacity < self.capacity:
      raise ValueError(f"grow: new capacity {capacity} is smaller than the current {self.capacity}")
    pad = [(0, 0)] * 5
    pad[3] = (0, capacity - self.capacity)
    return self.replace(k=jnp.pad(self.k, pad), v=jnp.pad(self.v, pad),
                        block_size=base.pick_block_size(capacity))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32,
              sliding: int | None = None, **options) -> FullCache:
  """`full` and `dynamic` specs (dynamic: the same pytree, grown by `generate`). sliding: the
  window W of a sliding-window layer (see `FullCache`)."""
  registry.no_options("full", options)
  return FullCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                        head_dim=config.head_dim, capacity=capacity, dtype=dtype,
                        growable=spec.mode == "dynamic", sliding=sliding)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Bytes of `from_spec(spec, config, batch=batch, capacity=context, dtype=dtype)`."""
  per_token = codec_lib.of_dtype(dtype).token_bytes(config.head_dim)  # a cast: H x itemsize
  return 2 * registry.streams(config, batch) * context * per_token + 4 * batch


def _read_mode(word, text):
  terms.no_value(word, text)
  return {"mode": word}


def _check_mode(spec):
  if spec.mode not in ("full", "dynamic", "none"):
    raise SpecError(f"unknown cache mode {spec.mode!r}; expected full, dynamic or none")
  if spec.mode == "none" and len(spec.terms()) > 1:
    raise SpecError("'none' (no cache) cannot be combined with other cache terms")
  if spec.mode == "dynamic" and spec.bounded:
    raise SpecError("'dynamic' grows an unbounded cache; it contradicts window/tier budgets")


MODE = terms.Term(
    name="mode", usage="full | dynamic | none", words=("full", "dynamic", "none"),
    doc="how the token axis is allocated: static and preallocated (default), grown between "
        "segments, or no cache at all (recompute the prefix every step)",
    fields=(("mode", "full"),), parse=_read_mode, show=lambda spec: spec.mode, kind="full",
    check=_check_mode, order=0)

registry.register_kind("full", from_spec, estimate_bytes=estimate_bytes, terms=(MODE,),
                       options=("sliding",),
                       capacity=registry.unbounded_capacity, builtin=True,
                       lossless=lambda spec: True,
                       description="every token, preallocated (dynamic: grown between segments)")
