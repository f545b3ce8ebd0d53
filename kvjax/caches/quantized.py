"""Quantized KV cache (KIVI-style): bit-packed int8/int4/int3/int2 codes plus a full-precision residual.

Layout, per layer l, row b, kv head k (S = capacity rounded up to a multiple of the group G):

  quantized region, positions [0, qcount[b]): token p in slot p of the `kvjax.caches.codec`
  TokenStores k and v (logical [L, B, K, S, H]); with intN (read as kq/ks/kz, vq/vs/vz):
    kq    uint8   [L, B, K, S, Hp]      key codes, packed along H (Hp = packed bytes of H codes)
    ks/kz float16 [L, B, K, S/G, H]     keys: per channel, one scale/zero per group of G tokens
    vq    uint8   [L, B, K, S, Hp]      value codes
    vs/vz float16 [L, B, K, S, H/Gv]    values: per token, one scale/zero per group of Gv = min(G, H)
                                        channels
    (int8 is symmetric: scales only, kz/vz are None; int4/int3/int2 are asymmetric.)
  with fp8 (fp8_e4m3 / fp8_e5m2): float8 codes [L, B, K, S, H] and one scale [L, B, K, S, 1] per
  token, for keys and values alike (groups of G tokens still set when tokens are flushed).
  residual region, positions [qcount[b], lengths[b]): full precision, in
    rk/rv [L, B, K, F, H]               slot i holds position qcount[b] + i; F = R + G slots

Keys are stored rotated by RoPE (as in HF's quantized cache and KIVI): rotation happens once, before
quantization, and reading a key never needs its position again.

Flush rule (what "the cache holds" means). After a write of new tokens, a row holding c residual
tokens quantizes its oldest floor(max(c - R, 0) / G) groups of G tokens, so c < R + G always and,
once a row has R tokens, at least its newest R are full precision (R = 0 for plain `intN`: the
newest < G tokens wait in a G-token staging buffer because a per-channel key group needs G tokens).
Groups are aligned to absolute positions (group m = positions [mG, (m+1)G)), so the stored contents
after any sequence of writes depend only on the tokens, never on how they were chunked:
`qcount = G * floor(max(lengths - R, 0) / G)` (until a `crop`).

What a query sees (`attend`). A call with T new tokens stages them after the residual and flushes the
groups that are due, then each query attends over the quantized region as it was *before the call*
(dequantized block by block; the groups just flushed are masked out) and over the residual plus the
new tokens at full precision (causally). So a query at position p whose call started at position s
sees positions [0, Q(s)) dequantized and [Q(s), p] at full precision, with
Q(n) = G * floor(max(n - R, 0) / G). Token-by-token decoding is the case s = p; chunked prefill
sees the tokens of its own chunk at full precision (never less precision than token-by-token).
Both guarantees are tested against a NumPy oracle. (Flushing before reading lets XLA update the
packed buffers in place; reading first made it copy them every layer.)

Cost per step: a loop over the filled quantized blocks only (ceil(max qcount / block) iterations,
each unpacking and dequantizing one [B, K, block, H] block: the whole cache is never dequantized at
once), a dense pass over the F + T residual slots, and an online-softmax merge of the two parts.

Invariants checked by tests/caches/test_quantized.py:
  * `view()` equals the NumPy oracle's quantize-in-groups simulation after any sequence of appends
    (ragged n_valid), residual tokens bit-exact; rows never see each other;
  * memory measured from the arrays at G = 32 vs fp32: int8 <= 0.28x, int4 <= 0.16x, int2 <= 0.10x;
  * jit == no jit; inputs are never mutated; chunked == token-by-token contents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base, packing, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches.codec import TokenStore
from kvjax.caches.full import FullCache
from kvjax.caches.registry import SpecError


def _block_size(capacity: int, group: int, preferred: int = 256) -> int:
  """Largest multiple of `group` that divides `capacity` and is <= max(preferred, group)."""
  m = capacity // group
  best = 1
  for d in range(1, m + 1):
    if m % d == 0 and d * group <= max(preferred, group):
      best = d
  return best * group


@struct.dataclass
class QuantizedCache(base.Limited):
  """Bit-packed quantized cache with a full-precision residual; see the module docstring.

  lengths: int32 [B] tokens seen per row.  qcount: int32 [B] tokens in the quantized region (a
  multiple of G).  growable (static): the `dynamic` policy (see `FullCache`).
  """

  exact = False  # keys and values come back dequantized

  @property
  def error_bound(self) -> float:
    return self.codec.error_bound
  chunk_exact = False  # a chunk's own tokens are seen at full precision (see the module docstring)

  k: TokenStore
  v: TokenStore
  rk: jax.Array
  rv: jax.Array
  lengths: jax.Array
  qcount: jax.Array
  codec: codec_lib.Codec = struct.field(pytree_node=False, default=codec_lib.of_bits(8))
  group: int = struct.field(pytree_node=False, default=32)
  residual: int = struct.field(pytree_node=False, default=0)
  block_size: int = struct.field(pytree_node=False, default=256)
  growable: bool = struct.field(pytree_node=False, default=False)
  sliding: int | tuple | None = struct.field(pytree_node=False, default=None)  # see `FullCache.sliding`

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
           bits: int = 8, group: int = 32, residual: int | None = None, dtype=jnp.float32,
           block_size: int | None = None, growable: bool = False,
           codec: codec_lib.Codec | None = None, sliding: int | None = None) -> "QuantizedCache":
    """Empty cache holding up to `capacity` tokens per row (rounded up to a multiple of `group`).
    Tokens are stored through `codec` (intN or fp8; default: intN from `bits`)."""
    if codec is None:
      if bits not in codec_lib.SUPPORTED_BITS:
        raise ValueError(f"QuantizedCache: unsupported bit width {bits}; supported: "
                         f"{codec_lib.SUPPORTED_BITS}")
      codec = codec_lib.of_bits(bits, group)
    if codec.is_float:
      raise ValueError(f"QuantizedCache: {codec.format} is not a quantized format; use intN or fp8")
    if capacity <= 0 or group <= 0:
      raise ValueError(f"QuantizedCache: capacity ({capacity}) and group ({group}) must be positive")
    r = residual or 0
    if r % group:
      raise ValueError(f"QuantizedCache: residual {r} must be a multiple of group {group}")
    vgroup = min(group, head_dim)
    if head_dim % vgroup:
      raise ValueError(f"QuantizedCache: group {group} must divide head_dim {head_dim} (values are "
                       "quantized per token over groups of channels)")
    s = -(-capacity // group) * group
    bs = block_size or _block_size(s, group)
    if s % bs or bs % group:
      raise ValueError(f"QuantizedCache: block_size {bs} must be a multiple of group {group} "
                       f"dividing the capacity {s}")
    lbk = (n_layers, batch, kv_heads)
    shape = lbk + (s, head_dim)
    zeros = jnp.zeros
    return cls(
        k=codec.along_tokens(group).empty(shape), v=codec.fitted(head_dim).empty(shape),
        rk=zeros(lbk + (r + group, head_dim), dtype), rv=zeros(lbk + (r + group, head_dim), dtype),
        lengths=zeros((batch,), jnp.int32), qcount=zeros((batch,), jnp.int32),
        codec=codec, group=group, residual=r, block_size=bs, growable=growable,
        sliding=base.check_sliding(sliding, "QuantizedCache", n_layers))

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.k.data

  @property
  def capacity(self) -> int:
    return self.k.data.shape[3]

  @property
  def bits(self) -> int | None:
    """The integer width (None with fp8)."""
    return self.codec.bits

  # The six arrays of an intN cache under their KIVI names (None where absent).
  kq = property(lambda self: self.k.data)
  ks = property(lambda self: self.k.scale)
  kz = property(lambda self: self.k.zero)
  vq = property(lambda self: self.v.data)
  vs = property(lambda self: self.v.scale)
  vz = property(lambda self: self.v.zero)

  @property
  def head_dim(self) -> int:
    return self.rk.shape[4]

  @property
  def staging(self) -> int:
    """F: full-precision slots per (layer, row, head) = residual + group."""
    return self.rk.shape[3]

  @property
  def value_group(self) -> int:
    return min(self.group, self.head_dim)

  @property
  def symmetric(self) -> bool:
    return self.codec.kind != "int" or self.codec.symmetric

  def quantized_bytes(self) -> int:
    """Bytes of the codes and their scales/zero points (the residual buffer excluded)."""
    return self.k.nbytes() + self.v.nbytes()

  # ---- storage (staging and flushing: `_stage`, `_flush` below the class) -------------------
  def _flushed_groups(self, n_valid) -> jax.Array:
    """int32 [B]: groups each row quantizes after taking n_valid more tokens."""
    held = self.lengths - self.qcount + n_valid
    return jnp.maximum(held - self.residual, 0) // self.group

  # ---- protocol -------------------------------------------------------------------------------
  def write(self, layer: int, k, v, n_valid=None) -> "QuantizedCache":
    """Stores k, v [B, T, K, H] (as given) of one layer after each row's tokens; lengths unchanged."""
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1], what="write")
    ext_k, ext_v = _stage(self, layer, k, v)
    return _flush(self, layer, ext_k, ext_v, n_valid)

  def advance(self, n_valid) -> "QuantizedCache":
    n_valid = jnp.asarray(n_valid, jnp.int32)
    return self.replace(lengths=self.lengths + n_valid,
                        qcount=self.qcount + self._flushed_groups(n_valid) * self.group)

  def load_block(self, layer: int, start) -> tuple[jax.Array, jax.Array]:
    """Dequantized keys, values [B, K, block_size, H] (fp32) of slots [start, start + block_size)."""
    bs, g = self.block_size, self.group
    tok = lambda a: jax.lax.dynamic_slice_in_dim(a[layer], start, bs, axis=2)
    grp = lambda a: jax.lax.dynamic_slice_in_dim(a[layer], start // g, bs // g, axis=2)
    return tuple(s.map_parts(*_spans(s, tok, grp)).decode(jnp.float32) for s in (self.k, self.v))

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Rotates, stages, flushes, attends (quantized blocks as before the call + exact residual).

    q [B, T, N, H], k/v [B, T, K, H] un-rotated; returns (out [B, T, N, H], cache).
    """
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.apply_rope(rope, q, positions)
    ext_k, ext_v = _stage(self, layer, attn.apply_rope(rope, k, positions), v)
    qg = attn.prepare_queries(q, self.kv_heads, scale)  # [B, T, K, G, H]
    # Flush first, read after (as the full cache does), so XLA updates the buffers in place; the
    # groups flushed now sit at slots >= the old qcount, which the read below masks out.
    cache = _flush(self, layer, ext_k, ext_v, n_valid)

    # Part 1: the quantized region as it was before this call (every slot < qcount is visible,
    # but for a sliding layer's window).
    qlen, w = self.qcount, base.layer_sliding(self.sliding, layer)

    def visible_q(slots):
      mask = (slots[None, :] < qlen[:, None])[:, None, None, :]  # [B, 1, 1, bs]
      if w is not None:
        mask = mask & (slots[None, None, :] > positions[:, :, None] - w)[:, None]  # [B, 1, T, bs]
      return mask

    n_blocks = attn.n_filled_blocks(qlen, self.block_size)
    part_q = attn.blockwise_stats(
        qg, lambda start: cache.load_block(layer, start), visible_q, n_blocks, self.block_size,
        attn.window_first_block(positions, w, n_blocks, self.block_size))

    # Part 2: residual + new tokens at full precision; slot i holds position qcount + i.
    held = self.lengths - self.qcount + n_valid  # [B]
    i = jnp.arange(ext_k.shape[2], dtype=jnp.int32)[None, None, :]
    visible_r = (i < held[:, None, None]) & (self.qcount[:, None, None] + i <= positions[:, :, None])
    if w is not None:
      visible_r &= self.qcount[:, None, None] + i > positions[:, :, None] - w
    part_r = attn.attention_stats(qg, ext_k, ext_v, visible_r[:, None])

    return attn.finish_stats(attn.combine_stats(part_q, part_r), q.dtype), cache

  def view(self) -> base.CacheView:
    """Dequantized keys/values [L, B, K, S, H] in position order (slot p = position p)."""
    keys, values = self.k.decode(jnp.float32), self.v.decode(jnp.float32)
    s = self.capacity
    slots = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    live = slots < jnp.minimum(self.lengths, s)[:, None]  # [B, S]
    in_residual = live & (slots >= self.qcount[:, None])
    idx = jnp.clip(slots - self.qcount[:, None], 0, self.staging - 1)[None, :, None, :, None]
    idx = jnp.broadcast_to(idx, (self.n_layers, self.batch, self.kv_heads, s, 1))
    res_k = jnp.take_along_axis(self.rk, idx, axis=3)
    res_v = jnp.take_along_axis(self.rv, idx, axis=3)
    sel = in_residual[None, :, None, :, None]
    keys = jnp.where(sel, res_k.astype(jnp.float32), keys).astype(self.rk.dtype)
    values = jnp.where(sel, res_v.astype(jnp.float32), values).astype(self.rv.dtype)
    shape = (self.n_layers, self.batch, self.kv_heads, s)
    mask = jnp.broadcast_to(live[None, :, None, :], shape)
    positions = jnp.broadcast_to(jnp.where(live, slots, -1)[None, :, None, :], shape)
    return base.CacheView(keys=keys, values=values, mask=mask, positions=positions)

  def reset(self) -> "QuantizedCache":
    """Empty cache of the same shapes (stale codes stay, hidden by lengths = qcount = 0)."""
    return self.replace(lengths=jnp.zeros_like(self.lengths), qcount=jnp.zeros_like(self.qcount))

  # ---- beam search / speculative decoding -----------------------------------------------------
  def crop(self, length) -> "QuantizedCache":
    """Forgets every token at position >= length (scalar or per row [B]).

    Cropping into the quantized region moves the kept tokens of the cut group back into the
    residual as their dequantized values, so attention over the kept tokens is unchanged.
    """
    new_len = jnp.minimum(self.lengths, jnp.broadcast_to(jnp.asarray(length, jnp.int32),
                                                         self.lengths.shape))
    into_q = new_len < self.qcount  # [B]
    g = self.group
    new_q = jnp.where(into_q, (new_len // g) * g, self.qcount)
    start = jnp.minimum(new_q, self.capacity - g)  # the cut group (clamped when it is past the end)
    tok = (start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :])[None, :, None, :, None]
    grp = (start // g)[None, :, None, None, None]
    take = lambda idx: lambda a: jnp.take_along_axis(a, idx, axis=3)
    k, v = (s.map_parts(*(take(i) for i in _spans(s, tok, grp))).decode(jnp.float32)
            for s in (self.k, self.v))  # [L, B, K, G, H]
    pad = ((0, 0),) * 3 + ((0, self.staging - g), (0, 0))
    sel = into_q[None, :, None, None, None]
    rk = jnp.where(sel, jnp.pad(k, pad).astype(self.rk.dtype), self.rk)
    rv = jnp.where(sel, jnp.pad(v, pad).astype(self.rv.dtype), self.rv)
    return self.replace(lengths=new_len, qcount=new_q, rk=rk, rv=rv)

  def reorder(self, indices) -> "QuantizedCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    rows = lambda a: jnp.take(a, indices, axis=1)
    return self.replace(k=self.k.map(rows), v=self.v.map(rows), rk=rows(self.rk), rv=rows(self.rv),
                        lengths=jnp.take(self.lengths, indices), qcount=jnp.take(self.qcount, indices))

  def grow(self, capacity: int) -> "QuantizedCache":
    """Same contents with room for `capacity` tokens (outside jit; shapes change)."""
    s = -(-capacity // self.group) * self.group
    if s < self.capacity:
      raise ValueError(f"grow: new capacity {capacity} is smaller than the current {self.capacity}")
    def pad(extra):
      def go(a):
        widths = [(0, 0)] * a.ndim
        widths[3] = (0, extra)
        return jnp.pad(a, widths)
      return go
    ds, dg = s - self.capacity, (s - self.capacity) // self.group
    k, v = (st.map_parts(*(pad(e) for e in _spans(st, ds, dg))) for st in (self.k, self.v))
    return self.replace(k=k, v=v, block_size=_block_size(s, self.group))


# ---------------------------------------------------------------------------------------------
# Staging and flushing (the flush rule of the module docstring)
# ---------------------------------------------------------------------------------------------
def _spans(store: TokenStore, tok, grp):
  """(data index, side index): KIVI key scales are indexed by group of tokens, the rest by token."""
  return tok, (grp if store.codec.scale_span > 1 else tok)


def _stage(cache: QuantizedCache, layer: int, k, v):
  """Puts new tokens k, v [B, T, K, H] after each row's residual tokens.

  Returns ext_k, ext_v [B, K, F + T, H]: slot i holds position qcount[b] + i for
  i < lengths[b] - qcount[b] + n_valid[b] (later slots are stale or padding).
  """
  t = k.shape[1]
  used = cache.lengths - cache.qcount  # [B]
  slots = used[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  rows = jnp.arange(cache.batch)[:, None]
  pad = ((0, 0), (0, 0), (0, t), (0, 0))
  ext_k = jnp.pad(cache.rk[layer], pad).at[rows, :, slots].set(k.astype(cache.rk.dtype))
  ext_v = jnp.pad(cache.rv[layer], pad).at[rows, :, slots].set(v.astype(cache.rv.dtype))
  return ext_k, ext_v


def _flush(cache: QuantizedCache, layer: int, ext_k, ext_v, n_valid) -> QuantizedCache:
  """Quantizes each row's oldest whole groups beyond the residual out of ext_k, ext_v
  [B, K, F + T, H] (from `_stage`); keeps the rest in rk/rv. Keys are encoded per channel over
  groups of G tokens with intN, values per token."""
  b, f, g = cache.batch, cache.staging, cache.group
  width = ext_k.shape[2]  # F + T
  m = (width - 1 - cache.residual) // g  # most groups any row can flush in this call (static)
  n_groups = cache._flushed_groups(n_valid)  # [B]
  rows = jnp.arange(b)[:, None]
  new_k = cache.k.codec.encode(ext_k[:, :, :m * g])  # M whole groups of every row
  new_v = cache.v.codec.encode(ext_v[:, :, :m * g])
  j = jnp.arange(m * g, dtype=jnp.int32)[None, :]
  tok = jnp.where(j < n_groups[:, None] * g, cache.qcount[:, None] + j, cache.capacity)  # [B, M*G]
  jg = jnp.arange(m, dtype=jnp.int32)[None, :]
  grp = jnp.where(jg < n_groups[:, None], cache.qcount[:, None] // g + jg, cache.capacity // g)
  scatter = lambda idx: lambda buf, x: buf.at[layer, rows, :, idx].set(
      x.transpose(0, 2, 1, 3), mode="drop")
  put = lambda store, new: store.map_parts(*map(scatter, _spans(store, tok, grp)), new)
  # The residual slides down by the flushed tokens.
  shift = n_groups[:, None] * g + jnp.arange(f, dtype=jnp.int32)[None, :]  # [B, F]
  shift = jnp.minimum(shift, width - 1)[:, None, :, None]
  return cache.replace(
      k=put(cache.k, new_k), v=put(cache.v, new_v),
      rk=cache.rk.at[layer].set(jnp.take_along_axis(ext_k, shift, axis=2)),
      rv=cache.rv.at[layer].set(jnp.take_along_axis(ext_v, shift, axis=2)))


# ---------------------------------------------------------------------------------------------
# Construction and the library verb
# ---------------------------------------------------------------------------------------------
def from_full(cache: FullCache, bits: int, group: int = 32, residual: int | None = None,
              capacity: int | None = None) -> QuantizedCache:
  """A QuantizedCache holding the tokens of a FullCache (keys as stored there: rotated).

  The result is what feeding those tokens through the quantized cache would store: whole groups
  beyond the newest `residual` (+ < group) tokens are quantized, the rest kept exact.
  """
  q = QuantizedCache.init(n_layers=cache.n_layers, batch=cache.batch, kv_heads=cache.kv_heads,
                          head_dim=cache.head_dim, capacity=capacity or cache.capacity, bits=bits,
                          group=group, residual=residual, dtype=cache.k.dtype)
  n_valid = cache.filled()
  for layer in range(cache.n_layers):
    q = q.write(layer, cache.k[layer].transpose(0, 2, 1, 3), cache.v[layer].transpose(0, 2, 1, 3),
                n_valid)
  return q.advance(n_valid)


def quantize(x, bits: int = 8, group: int = 32, *, residual: int | None = None, axis: int = -1,
             symmetric: bool | None = None):
  """Library verb (`kvjax.quantize`): quantize a FullCache or an array.

  * `quantize(full_cache, bits=4, group=32, residual=64)` -> QuantizedCache with the same tokens.
  * `quantize(array, bits, group, axis=...)` -> `packing.Quantized` (groups of `group` consecutive
    elements along `axis`; `packing.dequantize` inverts it). int8 is symmetric by default.
  """
  if isinstance(x, QuantizedCache):
    raise TypeError("quantize: the cache is already quantized")
  if isinstance(x, FullCache):
    if symmetric is not None or axis != -1:
      raise TypeError("quantize(cache): axis/symmetric are fixed by the cache layout")
    return from_full(x, bits, group, residual)
  if residual is not None:
    raise TypeError("quantize(array): residual applies to caches only")
  if not hasattr(x, "shape"):
    raise TypeError(f"quantize: expected a FullCache or an array, got {type(x).__name__}")
  return packing.quantize(jnp.asarray(x), bits, group, axis, symmetric)


dequantize = packing.dequantize


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32,
              sliding: int | None = None, **options):
  """`intN[+residual:R][+group:G]` specs (and `dynamic+intN`); sliding: a sliding-window
  layer's W (see `FullCache.sliding`)."""
  registry.no_options("quantized", options)
  if spec.offload:
    raise SpecError(f"{spec}: offloading a quantized cache is not yet supported; drop 'offload'")
  codec = codec_lib.for_spec(spec, dtype)
  if codec.is_float:
    raise SpecError(f"{spec}: the quantized cache needs an intN or fp8 term")
  vgroup = min(spec.group, config.head_dim)
  if config.head_dim % vgroup:
    raise SpecError(f"group:{spec.group} must divide the head dim {config.head_dim} (values are "
                    "quantized per token over groups of channels)")
  return QuantizedCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                             head_dim=config.head_dim, capacity=capacity, codec=codec,
                             group=spec.group, residual=spec.residual, dtype=dtype,
                             growable=spec.mode == "dynamic", sliding=sliding)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Keys and values of S = context rounded up to G tokens at the codec's bytes per token, the
  R + G full-precision staging slots, lengths and qcount."""
  h, g = config.head_dim, spec.group
  if h % min(g, h):
    raise SpecError(f"{str(spec)!r}: group:{g} does not divide head_dim {h}")
  codec = codec_lib.for_spec(spec, dtype)
  s = -(-context // g) * g
  stored = codec.along_tokens(g).bytes_for(s, h) + codec.fitted(h).bytes_for(s, h)
  staging = 2 * ((spec.residual or 0) + g) * h * jnp.dtype(dtype).itemsize
  return registry.streams(config, batch) * (stored + staging) + 8 * batch


INT_WORDS = tuple(codec_lib.INT_FORMATS)
# fp8 words -> the codec's format: its aliases ("fp8" is e4m3) and the formats themselves
FP8_WORDS = {**{a: f for a, f in codec_lib.ALIASES.items() if f in codec_lib.FP8_FORMATS},
             **{f: f for f in codec_lib.FP8_FORMATS}}


def _read_storage(word, text):
  terms.no_value(word, text)
  if word in FP8_WORDS:  # 8 bits a value, in a float format with one scale per token
    return {"bits": 8, "storage": FP8_WORDS[word]}
  return {"bits": int(word[3:])}


def _check_storage(spec):
  if spec.bits not in packing.SUPPORTED_BITS:
    raise SpecError(f"int{spec.bits}: unsupported bit width; supported: {', '.join(INT_WORDS)}")
  if spec.storage is not None:
    if spec.storage not in FP8_WORDS.values() or spec.bits != 8:
      raise SpecError(f"storage {spec.storage!r} is unknown; expected one of {sorted(FP8_WORDS)}")
    if spec.group != 32:
      raise SpecError(f"group:{spec.group} sizes intN groups; {_show_storage(spec)} keeps one "
                      "scale per token (drop group:G)")


def _show_storage(spec) -> str:
  if spec.storage is None:
    return f"int{spec.bits}"
  return "fp8" if spec.storage == "fp8_e4m3" else spec.storage


def _check_residual(spec):
  terms.needs(spec, f"residual:{spec.residual}", "bits",
              hint=f"a quantized storage term ({', '.join(INT_WORDS + tuple(FP8_WORDS))})")
  if spec.residual % spec.group:
    raise SpecError(f"residual:{spec.residual} must be a multiple of group:{spec.group}")


STORAGE = terms.Term(
    name="storage", usage=" | ".join(INT_WORDS) + " | fp8 | fp8_e5m2",
    words=INT_WORDS + tuple(FP8_WORDS), fields=(("bits", None), ("storage", None)),
    doc="compressed storage of every kind that stores tokens: bit-packed intN with per-group "
        "float16 scales, or fp8 (e4m3; e5m2: more range, less precision) with one scale per token",
    parse=_read_storage, show=_show_storage, kind="quantized", rank=20, check=_check_storage,
    order=20)
RESIDUAL = terms.int_term("residual", "the R most recent tokens stay full precision (needs intN)",
                          usage="residual:R", check=_check_residual, order=21)
GROUP = terms.int_term("group", "quantization group size (default 32)", usage="group:G",
                       default=32, order=22)

registry.register_kind("quantized", from_spec, estimate_bytes=estimate_bytes, options=("sliding",),
                       terms=(STORAGE, RESIDUAL, GROUP),
                       capacity=registry.unbounded_capacity, builtin=True,
                       description="every token, bit-packed intN with a full-precision residual")
