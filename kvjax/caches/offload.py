"""Offloaded full cache: every token lives in host memory, the most recent ones also on the device.

Layout (L layers, B rows, K kv heads, S capacity, R recent slots, H head dim):

  host_k, host_v  [L, B, K, S, H]  in host memory (`pinned_host`): the token at position p of a row
                                   sits in slot p, keys already rotated (as in `FullCache`). Written
                                   through on every append, so the host copy is always complete.
  ring_k, ring_v  [L, B, K, R, H]  on the device: the R most recent tokens of each row, the token at
                                   position p in ring slot p mod R (R is a multiple of the block size).
  lengths         [B]              tokens seen per row, on the device.

Device memory is R slots per row whatever the capacity; the S-slot buffers take host memory only.
Attention walks the filled blocks in slot order (`blockwise_attention`); a block is assembled from
the device ring for the slots a row still holds there (positions >= lengths - R) and from the host
copy for older slots. A host block is copied to the device only when some row needs a slot of it
that is no longer on the device (a `lax.cond` inside the block loop), so decoding reads the old
part of the sequence from host memory block by block and the recent part not at all.

Inside `jit` the only operations touching host arrays are `dynamic_slice` (immediately moved to the
device) and `dynamic_update_slice` of an update moved to the host: the two transfer patterns XLA's
host offloading supports. Reordering rows (beam search) and `view()` move whole buffers.

Where the backend offers no `pinned_host` memory, the cache runs the same code with the "host"
buffers on the device (emulation; `nbytes()` then reports them as 'emulated_host').

Invariants (tests/caches/test_offload.py, against a NumPy oracle):
  * after any sequence of appends (ragged rows included) the host copy holds, for every row, exactly
    what a full cache holds (slots [0, lengths) in order), and the ring holds the last
    min(lengths, R) of them at slot position mod R; `view()` equals the full cache's view;
  * attention, hence logits, equal the full cache's (exact up to float summation order), chunked
    prefill equals token-by-token decoding, jit equals no jit, inputs are never modified;
  * `nbytes()` splits device and host bytes; the device part does not grow with the capacity.
  * overflow behaves like `FullCache`: tokens at positions >= S are dropped, lengths keep counting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base, registry, terms
from kvjax.caches.terms import SpecError
from kvjax.caches import codec as codec_lib

EMULATED = "device"  # host_kind of a cache whose "host" buffers live on the device


def host_memory_kind(device=None) -> str | None:
  """'pinned_host' when the device can address pinned host memory, else None (emulate)."""
  device = device or jax.devices()[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except (NotImplementedError, AttributeError, jax.errors.JaxRuntimeError):
    return None  # a backend without memory kinds (the PJRT plugin does not implement them)
  return "pinned_host" if "pinned_host" in kinds else None


@struct.dataclass
class OffloadCache(base.Limited):
  """Full cache with the S-slot buffers in host memory and an R-slot recent ring on the device.

  host_k, host_v: [L, B, K, S, H] (host); ring_k, ring_v: [L, B, K, R, H]; lengths: int32 [B].
  growable (static): the `dynamic` policy (see `FullCache`).
  """

  host_k: jax.Array
  host_v: jax.Array
  ring_k: jax.Array
  ring_v: jax.Array
  lengths: jax.Array
  block_size: int = struct.field(pytree_node=False, default=256)
  host_kind: str = struct.field(pytree_node=False, default="pinned_host")
  growable: bool = struct.field(pytree_node=False, default=False)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
           dtype=jnp.float32, block_size: int | None = None, recent: int | None = None,
           host_kind: str | None = None, growable: bool = False) -> "OffloadCache":
    """Empty cache. recent: device slots per row (default one block; a multiple of block_size).

    host_kind: memory kind of the big buffers; default 'pinned_host' where available, else the
    emulation ("device").
    """
    if capacity <= 0:
      raise ValueError(f"OffloadCache: capacity must be positive, got {capacity}")
    bs = block_size or base.pick_block_size(capacity)
    if capacity % bs:
      raise ValueError(f"OffloadCache: block_size {bs} must divide capacity {capacity}")
    recent = bs if recent is None else recent
    if recent <= 0 or recent % bs or recent > capacity:
      raise ValueError(f"OffloadCache: recent={recent} device slots must be a positive multiple of "
                       f"block_size {bs} and at most the capacity {capacity}")
    kind = host_kind or host_memory_kind() or EMULATED
    if kind not in ("pinned_host", EMULATED):
      raise ValueError(f"OffloadCache: host_kind must be 'pinned_host' or {EMULATED!r}, got {kind!r}")
    if kind == "pinned_host" and host_memory_kind() is None:
      raise ValueError(f"OffloadCache: the {jax.devices()[0].platform} backend has no pinned_host "
                       f"memory; pass host_kind={EMULATED!r} to keep the 'host' buffers on the device")
    host_shape = (n_layers, batch, kv_heads, capacity, head_dim)
    ring_shape = (n_layers, batch, kv_heads, recent, head_dim)
    cache = cls(host_k=jnp.zeros(host_shape, dtype), host_v=jnp.zeros(host_shape, dtype),
                ring_k=jnp.zeros(ring_shape, dtype), ring_v=jnp.zeros(ring_shape, dtype),
                lengths=jnp.zeros((batch,), jnp.int32), block_size=bs, host_kind=kind,
                growable=growable)
    return cache.replace(host_k=cache._to_host(cache.host_k), host_v=cache._to_host(cache.host_v))

  # ---- memory spaces ----------------------------------------------------------------------------
  def _to_host(self, x):
    return x if self.host_kind == EMULATED else jax.device_put(x, jax.memory.Space.Host)

  def _to_device(self, x):
    return x if self.host_kind == EMULATED else jax.device_put(x, jax.memory.Space.Device)

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.host_k

  @property
  def capacity(self) -> int:
    return self.host_k.shape[3]

  @property
  def recent(self) -> int:
    """R: device slots per row (the most recent tokens)."""
    return self.ring_k.shape[3]

  @property
  def head_dim(self) -> int:
    return self.host_k.shape[4]

  # ---- writes -----------------------------------------------------------------------------------
  def _write_host(self, buf, layer: int, x):
    """Stores x [B, T, K, H] of one layer at slots lengths[b] + t of `buf` [L, B, K, S, H] (host).

    One `dynamic_update_slice` per row, in a `fori_loop` over rows. Near the end of the buffer the
    start is clamped to keep the update in bounds, so the update is shifted and its first slots
    keep what the buffer held there (read back from the host): tokens past the capacity are
    dropped, never written onto others.
    """
    s, kh, h = self.capacity, self.kv_heads, self.head_dim
    width = min(x.shape[1], s)  # token t >= S has position >= S: always dropped
    x = x[:, :width].transpose(0, 2, 1, 3).astype(buf.dtype)  # [B, K, T', H]
    j = jnp.arange(width, dtype=jnp.int32)

    def row(b, buf):
      start = jnp.minimum(self.lengths[b], s - width)
      shift = self.lengths[b] - start  # > 0 only when the row's tokens run past the capacity
      idx = (layer, b, 0, start, 0)
      old = self._to_device(jax.lax.dynamic_slice(buf, idx, (1, 1, kh, width, h)))[0, 0]
      new = jnp.take(jax.lax.dynamic_index_in_dim(x, b, 0, keepdims=False),
                     jnp.clip(j - shift, 0, width - 1), axis=1)  # [K, T', H]
      update = jnp.where((j >= shift)[None, :, None], new, old)
      return jax.lax.dynamic_update_slice(buf, self._to_host(update[None, None]), idx)

    return jax.lax.fori_loop(0, self.batch, row, buf)

  def _write_ring(self, ring, layer: int, x, n_valid):
    """Stores the real tokens of x [B, T, K, H] that stay among the R most recent into `ring`."""
    t = x.shape[1]
    positions = base.row_slots(self.lengths, t)  # [B, T]
    end = jnp.minimum(self.lengths + n_valid, self.capacity)  # [B]
    keep = ((jnp.arange(t)[None, :] < n_valid[:, None]) & (positions < self.capacity)
            & (positions >= end[:, None] - self.recent))
    slots = jnp.where(keep, attn.ring_slot(positions, self.recent), self.recent)  # R: dropped
    rows = jnp.arange(self.batch)[:, None]
    return ring.at[layer, rows, :, slots, :].set(x.astype(ring.dtype), mode="drop")

  def write(self, layer: int, k, v, n_valid=None) -> "OffloadCache":
    """Stores k, v [B, T, K, H] of one layer at each row's next slots (lengths unchanged).

    Padding tokens (t >= n_valid[b]) reach the host buffer past the row's valid region (the next
    append overwrites them) but never the ring, where they would evict real tokens.
    """
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1], what="OffloadCache.write")
    return self.replace(host_k=self._write_host(self.host_k, layer, k),
                        host_v=self._write_host(self.host_v, layer, v),
                        ring_k=self._write_ring(self.ring_k, layer, k, n_valid),
                        ring_v=self._write_ring(self.ring_v, layer, v, n_valid))

  def advance(self, n_valid) -> "OffloadCache":
    return self.replace(lengths=self.lengths + n_valid)

  # ---- attention --------------------------------------------------------------------------------
  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Rotates, stores, and attends over the filled blocks of `layer`. Returns (out [B,T,N,H], cache)."""
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.apply_rope(rope, q, positions)
    cache = self.write(layer, attn.apply_rope(rope, k, positions), v, n_valid)
    kv_len = jnp.minimum(self.lengths + n_valid, self.capacity)  # [B]
    on_host = jnp.maximum(kv_len - self.recent, 0)  # [B]: slots below this are read from the host
    bs, r = self.block_size, self.recent
    shape = (1, self.batch, self.kv_heads, bs, self.head_dim)

    def load_block(start):
      slots = start + jnp.arange(bs, dtype=jnp.int32)
      from_host = (slots[None, :] < on_host[:, None])[:, None, :, None]  # [B, 1, bs, 1]

      def read_host(_):
        idx = (layer, 0, 0, start, 0)
        kb = jax.lax.dynamic_slice(cache.host_k, idx, shape)
        vb = jax.lax.dynamic_slice(cache.host_v, idx, shape)
        return cache._to_device(kb)[0], cache._to_device(vb)[0]

      def skip(_):
        zeros = jnp.zeros(shape[1:], cache.ring_k.dtype)
        return zeros, zeros

      host_k, host_v = jax.lax.cond(start < jnp.max(on_host), read_host, skip, None)
      ring_idx = (layer, 0, 0, attn.ring_slot(start, r), 0)
      ring_k = jax.lax.dynamic_slice(cache.ring_k, ring_idx, shape)[0]
      ring_v = jax.lax.dynamic_slice(cache.ring_v, ring_idx, shape)[0]
      return jnp.where(from_host, host_k, ring_k), jnp.where(from_host, host_v, ring_v)

    qg = attn.prepare_queries(q, self.kv_heads, scale)
    return attn.attend_prefix_blocks(qg, load_block, positions, kv_len, bs), cache

  # ---- inspection -------------------------------------------------------------------------------
  def view(self) -> base.CacheView:
    """The host copy (complete) as a full cache's view. Moves both buffers to the device."""
    return base.prefix_view(self, self._to_device(self.host_k), self._to_device(self.host_v))

  def ring_positions(self) -> jax.Array:
    """int32 [B, R]: the position each ring slot holds (-1 where it holds none)."""
    slot = jnp.arange(self.recent, dtype=jnp.int32)[None, :]
    pos = attn.ring_position(slot, self.filled()[:, None], self.recent)
    return jnp.where(pos >= 0, pos, -1)

  def nbytes(self) -> dict[str, int]:
    """{'device': ring + lengths, 'pinned_host': host buffers} (or 'emulated_host' when emulating)."""
    out = base.tree_nbytes(self)
    if self.host_kind == EMULATED:
      host = base.tree_nbytes((self.host_k, self.host_v))["device"]
      out["device"] -= host
      out["emulated_host"] = host
    return out

  def reset(self) -> "OffloadCache":
    """Empty cache of the same shapes (buffers keep stale values, hidden by lengths = 0)."""
    return self.replace(lengths=jnp.zeros_like(self.lengths))

  # ---- beam search / speculative decoding -------------------------------------------------------
  def crop(self, length) -> "OffloadCache":
    """Forgets every token at position >= length (per row if [B]); refills the ring from the host."""
    lengths = jnp.minimum(self.lengths, jnp.asarray(length, jnp.int32))
    cache = self.replace(lengths=lengths)
    end = cache.filled()
    r = self.recent
    shape = (self.n_layers, 1, self.kv_heads, r, self.head_dim)

    def row(b, rings):
      start = jnp.clip(end[b] - r, 0, self.capacity - r)
      idx = (0, b, 0, start, 0)
      out = []
      for host, ring in zip((self.host_k, self.host_v), rings):
        block = self._to_device(jax.lax.dynamic_slice(host, idx, shape))
        # slice index j holds position start + j, which belongs in ring slot (start + j) mod R
        block = jnp.roll(block, attn.ring_slot(start, r), axis=3).astype(ring.dtype)
        out.append(jax.lax.dynamic_update_slice(ring, block, (0, b, 0, 0, 0)))
      return tuple(out)

    ring_k, ring_v = jax.lax.fori_loop(0, self.batch, row, (self.ring_k, self.ring_v))
    return cache.replace(ring_k=ring_k, ring_v=ring_v)

  def reorder(self, indices) -> "OffloadCache":
    """Row b of the result is row indices[b] (beam reordering; moves the host buffers through the device)."""
    indices = jnp.asarray(indices, jnp.int32)

    def take_host(x):
      return self._to_host(jnp.take(self._to_device(x), indices, axis=1))

    return self.replace(host_k=take_host(self.host_k), host_v=take_host(self.host_v),
                        ring_k=jnp.take(self.ring_k, indices, axis=1),
                        ring_v=jnp.take(self.ring_v, indices, axis=1),
                        lengths=jnp.take(self.lengths, indices, axis=0))

  def grow(self, capacity: int) -> "OffloadCache":
    """Same contents in larger host buffers (outside jit; the device ring keeps its size)."""
    if capacity < self.capacity:
      raise ValueError(f"grow: new capacity {capacity} is smaller than the current {self.capacity}")
    if capacity % self.block_size:
      raise ValueError(f"grow: capacity {capacity} must be a multiple of block_size {self.block_size}")
    pad = [(0, 0)] * 5
    pad[3] = (0, capacity - self.capacity)

    def bigger(x):
      return self._to_host(jnp.pad(self._to_device(x), pad))

    return self.replace(host_k=bigger(self.host_k), host_v=bigger(self.host_v))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32, block_size=None,
              recent=None, host_kind=None) -> OffloadCache:
  """`offload` (and `dynamic+offload`). Options: block_size, recent (device slots), host_kind."""
  return OffloadCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                           head_dim=config.head_dim, capacity=capacity, dtype=dtype,
                           block_size=block_size, recent=recent, host_kind=host_kind,
                           growable=spec.mode == "dynamic")


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Host buffers for `context` slots, the device ring (one block by default), lengths."""
  recent = base.pick_block_size(context)
  per_token = codec_lib.of_dtype(dtype).token_bytes(config.head_dim)  # a cast: H x itemsize
  return 2 * registry.streams(config, batch) * (context + recent) * per_token + 4 * batch


def _check_offload(spec):
  if spec.bounded:
    raise SpecError("offload moves old blocks of an unbounded cache to host memory; "
                    "a window/tier cache is already bounded")


OFFLOAD = terms.flag_term("offload", "older blocks live in host memory", kind="offload", rank=10,
                          check=_check_offload, order=50)

registry.register_kind("offload", from_spec, estimate_bytes=estimate_bytes, terms=(OFFLOAD,),
                       lossless=lambda spec: True,
                       capacity=registry.unbounded_capacity, builtin=True,
                       description="every token in host memory, the recent block on the device")
