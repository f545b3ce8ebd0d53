"""Tiered cache: recent tokens at high precision, older ones at lower precision, oldest dropped.

Spec: `tier:64:fp32,512:int8,4096:int2` (newest tier first). Each tier is a ring buffer of its own
budget b_i, and the tiers form a chain: a token enters tier 0, and each time a new token arrives
the token that falls out of tier i moves (re-encoded at tier i+1's precision) into tier i+1; what
falls out of the last tier is gone. Memory is fixed: sum(b_i) slots per row, layer and kv head.

Which tier holds what is a function of age alone. With n tokens seen (n = lengths) and
end_i = b_0 + ... + b_i (start_i = end_{i-1}, start_0 = 0), the token at position p has age
a = n - 1 - p and sits in tier i iff start_i <= a < end_i, at slot p mod b_i. So no positions are
stored: slot s of tier i holds the position p in [n - end_i, n - start_i) with p = s (mod b_i)
(empty when p < 0).

Precision. Each tier stores its tokens through a `kvjax.caches.codec.Codec`: float tiers (fp32,
bf16, fp16) a cast of the value; integer tiers (int8, int4, int3, int2) bit-packed per-token codes
with one float16 scale (and zero point) per `group` consecutive channels of the head dim (int8
symmetric, narrower widths asymmetric); fp8 tiers (fp8 = fp8_e4m3, fp8_e5m2) float8 codes with one
scale per token. Codes are decoded inside attention. A token moving down the chain is decoded from its
current tier and encoded into the next, so a token in tier i holds
Q_i(Q_{i-1}(...Q_0(x))) (x = its rotated key or its value): exactly what token-by-token decoding
would leave there.

RoPE: keys are rotated at their original positions before they are stored (and quantized); they
never move in position, so they never need re-rotation.

Chunks. `attend` with T > 1 new tokens runs the single-token step T times in a `lax.scan`: every
query sees exactly what the cache holds when its token arrives (itself included), with each older
token at the precision its age gives it at that moment, so chunked prefill == token-by-token
decode. Padding tokens (t >= n_valid[b]) leave row b untouched and see garbage nobody reads.

Invariants (tests/caches/test_tiered.py, against a NumPy oracle of the definition above):
  * after any sequence of appends (ragged n_valid included), tier i of row b holds exactly the
    positions whose age falls in [start_i, end_i), each as the chain of encodings above;
  * at most sum(b_i) tokens per row are held; every array has a fixed shape; `limited = False`
    (a ring never overflows) and `has_room`/`fits` are always true;
  * every query attends over exactly the tokens of age < sum(b_i) as of its arrival;
  * with only fp32 tiers and a total budget above the sequence length, logits equal the full
    cache's.

`crop` is not supported (tokens that aged into a lower-precision tier cannot move back up, and
dropped tokens are gone; keep a copy of the cache instead), nor `grow` (the budgets fix the memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches.codec import TokenStore, stores_map  # noqa: F401  (re-exported)
from kvjax.caches.registry import SpecError

# The per-token storage lives in kvjax.caches.codec; these names stay importable from here.
FLOAT_FORMATS = codec_lib.FLOAT_FORMATS
INT_FORMATS = codec_lib.INT_FORMATS


def parse_format(name: str, dtype=jnp.float32, group: int = 32) -> codec_lib.Codec:
  """The codec of a tier format name (fp32 bf16 fp16 int8 int4 int3 int2 fp8 fp8_e4m3 fp8_e5m2)."""
  try:
    return codec_lib.parse(name, dtype, group)
  except SpecError:
    raise SpecError(f"tier format {name!r} is unknown; expected one of "
                    f"{', '.join(codec_lib.FORMATS)}") from None


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class Tier:
  """One ring of `budget` slots: k, v TokenStores of logical shape [L, B, K, budget, H]."""

  k: TokenStore
  v: TokenStore
  budget: int = struct.field(pytree_node=False)
  name: str = struct.field(pytree_node=False)


def tier_positions(lengths: jax.Array, start: int, budget: int) -> jax.Array:
  """int32 [B, budget]: the position slot s of a tier holds after `lengths` tokens (-1 empty).

  The tier holds ages [start, start + budget): positions [n - start - budget, n - start).
  """
  slots = jnp.arange(budget, dtype=jnp.int32)[None, :]
  p = attn.ring_position(slots, lengths[:, None] - start, budget)
  return jnp.where(p >= 0, p, -1).astype(jnp.int32)


@struct.dataclass
class TieredCache(base.Evicting):
  """A chain of ring buffers, newest tier first; see the module docstring.

  tiers: tuple of `Tier`; lengths: int32 [B] tokens seen per row.
  """

  tiers: tuple
  lengths: jax.Array

  # A chain of rings never overflows: kvjax.append must not raise capacity errors. Chunks are fed
  # token by token inside `attend`, so chunked feeding is exact (base.CacheBase.chunk_exact).

  @property
  def exact(self) -> bool:
    """Only a chain of fp32 tiers stores tokens exactly."""
    return all(t.k.codec.format == "fp32" for t in self.tiers)

  @property
  def error_bound(self) -> float:
    """A token in tier i went through every encoding before it: the bounds add up."""
    return sum(t.k.codec.error_bound for t in self.tiers)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, tiers, group: int = 32,
           dtype=jnp.float32) -> "TieredCache":
    """tiers: (budget, format) pairs, newest first; formats: codec.FORMATS (fp32 bf16 fp16 int8
    int4 int3 int2 fp8 fp8_e4m3 fp8_e5m2), or `Codec`s."""
    if not tiers:
      raise SpecError("a tiered cache needs at least one tier")
    built = []
    for budget, name in tiers:
      if not isinstance(budget, int) or budget <= 0:
        raise SpecError(f"tier budget must be a positive int, got {budget!r}")
      codec = name if isinstance(name, codec_lib.Codec) else parse_format(name, dtype, group)
      if codec.kind == "int" and head_dim % codec.group:
        raise SpecError(f"tier {budget}:{name}: head_dim {head_dim} is not a multiple of the "
                        f"quantization group {codec.group}; pick group:G dividing {head_dim}")
      shape = (n_layers, batch, kv_heads, budget, head_dim)
      # Separate buffers for k and v: a donated cache must not hold one buffer twice.
      built.append(Tier(k=codec.empty(shape), v=codec.empty(shape), budget=budget,
                        name=name if isinstance(name, str) else codec.format))
    return cls(tiers=tuple(built), lengths=jnp.zeros((batch,), jnp.int32))

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def budgets(self) -> tuple[int, ...]:
    return tuple(t.budget for t in self.tiers)

  @property
  def starts(self) -> tuple[int, ...]:
    """Age at which each tier begins."""
    out, acc = [], 0
    for b in self.budgets:
      out.append(acc)
      acc += b
    return tuple(out)

  @property
  def _layout(self):
    return self.tiers[0].k.data

  @property
  def capacity(self) -> int:
    """Slots per row, all tiers together: what the cache holds at most, not a stream limit."""
    return sum(self.budgets)

  @property
  def head_dim(self) -> int:
    return self.tiers[0].k.head_dim

  def filled(self) -> jax.Array:
    """int32 [B]: tokens each row holds (the newest sum(budgets) of those it has seen)."""
    return jnp.minimum(self.lengths, self.capacity)

  # ---- one token through one layer ------------------------------------------------------------
  def _push(self, stores, k_t, v_t, pos_t, valid_t):
    """Moves one token per row into tier 0 and cascades the displaced ones down the chain.

    stores: tuple of (k_store, v_store) of one layer, each [B, K, b_i, ...].
    k_t, v_t: [B, K, H] the new token (key rotated); pos_t: int32 [B]; valid_t: bool [B].
    """
    rows = jnp.arange(k_t.shape[0])
    keep = valid_t[:, None, None]
    incoming = (k_t.astype(jnp.float32), v_t.astype(jnp.float32))
    out = []
    last = len(self.tiers) - 1
    for i, (tier, start, (ks, vs)) in enumerate(zip(self.tiers, self.starts, stores)):
      slot = attn.ring_slot(pos_t - start, tier.budget)  # [B]: the slot the incoming token takes
      new_pair = []
      leaving = []
      for store, x in ((ks, incoming[0]), (vs, incoming[1])):
        here = store.map(lambda a: a[rows, :, slot])  # [B, K, ...] the displaced token
        if i < last:  # what falls out of the last tier is simply overwritten
          leaving.append(here.decode(jnp.float32))
        enc = store.codec.encode(x)
        enc = stores_map(lambda e, h: jnp.where(keep, e, h), enc, here)  # padding: unchanged
        new_pair.append(stores_map(lambda a, e: a.at[rows, :, slot].set(e), store, enc))
      out.append(tuple(new_pair))
      incoming = tuple(leaving)
    return tuple(out)

  def _layer(self, layer: int):
    return tuple((t.k.map(lambda a: a[layer]), t.v.map(lambda a: a[layer])) for t in self.tiers)

  def _with_layer(self, layer: int, stores) -> "TieredCache":
    tiers = tuple(
        t.replace(k=stores_map(lambda a, p: a.at[layer].set(p), t.k, ks),
                  v=stores_map(lambda a, p: a.at[layer].set(p), t.v, vs))
        for t, (ks, vs) in zip(self.tiers, stores))
    return self.replace(tiers=tiers)

  def _held(self, stores, lengths, dtype):
    """Keys, values [B, K, S, H] (decoded) and positions [B, S] of one layer, tiers in order."""
    keys = jnp.concatenate([ks.decode(dtype) for ks, _ in stores], axis=2)
    values = jnp.concatenate([vs.decode(dtype) for _, vs in stores], axis=2)
    pos = jnp.concatenate([tier_positions(lengths, s, t.budget)
                           for t, s in zip(self.tiers, self.starts)], axis=1)
    return keys, values, pos

  # ---- protocol -------------------------------------------------------------------------------
  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, T, N, H], k/v [B, T, K, H] un-rotated. Returns (out [B, T, N, H], cache).

    Token by token (a scan when T > 1): push the token through the tiers, then let its query
    attend over everything held, itself included, each token at its tier's precision.
    """
    t = q.shape[1]
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.prepare_queries(attn.apply_rope(rope, q, positions), self.kv_heads, scale)
    k = attn.apply_rope(rope, k, positions)  # [B, T, K, H]
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]  # [B, T]
    final = self.lengths + n_valid

    def step(stores, xs):
      q_t, k_t, v_t, pos_t, valid_t = xs
      stores = self._push(stores, k_t, v_t, pos_t, valid_t)
      now = jnp.where(valid_t, pos_t + 1, final)  # tokens held after this step
      keys, values, pos = self._held(stores, now, q.dtype)
      mask = (pos >= 0)[:, None, None, :]  # [B, 1, 1, S]
      out = attn.dense_attention(q_t[:, None], keys, values, mask)  # [B, 1, N, H]
      return stores, out[:, 0]

    xs = (q, k, v, positions, valid)
    stores = self._layer(layer)
    if t == 1:
      stores, out = step(stores, jax.tree_util.tree_map(lambda a: a[:, 0], xs))
      out = out[:, None]
    else:
      time_major = jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), xs)
      stores, out = jax.lax.scan(step, stores, time_major)
      out = out.swapaxes(0, 1)
    return out, self._with_layer(layer, stores)

  def write(self, layer: int, k, v, n_valid=None) -> "TieredCache":
    """Stores k, v [B, T, K, H] (as given) of one layer token by token; lengths unchanged."""
    t = k.shape[1]
    n_valid = base.normalize_n_valid(n_valid, self.batch, t, what="write")
    positions = base.row_slots(self.lengths, t)
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]

    def step(stores, xs):
      k_t, v_t, pos_t, valid_t = xs
      return self._push(stores, k_t, v_t, pos_t, valid_t), None

    xs = jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), (k, v, positions, valid))
    stores, _ = jax.lax.scan(step, self._layer(layer), xs)
    return self._with_layer(layer, stores)

  def advance(self, n_valid) -> "TieredCache":
    return self.replace(lengths=self.lengths + jnp.asarray(n_valid, jnp.int32))

  def view(self) -> base.CacheView:
    """Decoded keys/values [L, B, K, S, H] with tiers in order (tier i at slots
    [start_i, start_i + b_i)), mask and positions [L, B, K, S]."""
    keys = jnp.concatenate([t.k.decode() for t in self.tiers], axis=3)
    values = jnp.concatenate([t.v.decode() for t in self.tiers], axis=3)
    pos = jnp.concatenate([tier_positions(self.lengths, s, t.budget)
                           for t, s in zip(self.tiers, self.starts)], axis=1)  # [B, S]
    shape = (self.n_layers, self.batch, self.kv_heads, self.capacity)
    positions = jnp.broadcast_to(pos[None, :, None, :], shape)
    return base.CacheView(keys=keys, values=values, mask=positions >= 0, positions=positions)

  def reset(self) -> "TieredCache":
    """Empty cache of the same shapes (stale slots hidden: positions derive from lengths = 0)."""
    return self.replace(lengths=jnp.zeros_like(self.lengths))

  def tier_nbytes(self) -> tuple[int, ...]:
    """Bytes of each tier (codes, scales and zero points of keys and values)."""
    return tuple(sum(base.tree_nbytes(t).values()) for t in self.tiers)

  def reorder(self, indices) -> "TieredCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    take = lambda a: jnp.take(a, indices, axis=1)
    tiers = tuple(t.replace(k=t.k.map(take), v=t.v.map(take)) for t in self.tiers)
    return self.replace(tiers=tiers, lengths=jnp.take(self.lengths, indices, axis=0))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32, **options) -> TieredCache:
  """`tier:B0:F0,B1:F1,...` specs. `capacity` is not used: the tier budgets size the cache."""
  registry.no_options("tiered", options)
  if spec.tiers is None:
    raise SpecError(f"cache spec {str(spec)!r} has no tier:... term; the tiered kind needs one")
  return TieredCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                          head_dim=config.head_dim, tiers=spec.tiers, group=spec.group, dtype=dtype)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Each tier's codes (or floats) and scales, plus lengths; the context does not matter."""
  streams = registry.streams(config, batch)
  total = 4 * batch
  for budget, fmt in spec.tiers:
    codec = parse_format(fmt, dtype, spec.group)
    if codec.kind == "int" and config.head_dim % codec.group:
      raise SpecError(f"tier {fmt}: group:{codec.group} does not divide head_dim {config.head_dim}")
    total += streams * 2 * budget * codec.token_bytes(config.head_dim)
  return total


TIER_DTYPES = codec_lib.FORMATS


def _read_tiers(word, text):
  tiers = []
  for part in (text or "").split(","):
    budget, _, fmt = part.partition(":")
    if not fmt:
      raise SpecError(f"term '{word}:{text}': each tier is BUDGET:DTYPE, e.g. tier:64:fp32,512:int8")
    tiers.append((terms.integer(word, budget), fmt))
  return {"tiers": tuple(tiers)}


def _check_tiers(spec):
  if any(getattr(spec, f) is not None for f in ("window", "bits", "h2o", "snapkv")):
    raise SpecError("tier:... sets its own budgets and precisions; drop window/intN/h2o/snapkv terms")
  for budget, fmt in spec.tiers:
    if fmt not in TIER_DTYPES:
      raise SpecError(f"tier dtype {fmt!r} is unknown; expected one of {', '.join(TIER_DTYPES)}")
    terms.positive("tier budget", budget)


TIER = terms.Term(
    name="tier", usage="tier:64:fp32,512:int8,...", fields=(("tiers", None),),
    doc="budgets per precision tier, newest first (older tokens move down, the oldest drop)",
    parse=_read_tiers, show=lambda spec: "tier:" + ",".join(f"{b}:{d}" for b, d in spec.tiers),
    kind="tiered", rank=60, check=_check_tiers, order=10)

registry.register_kind("tiered", from_spec, estimate_bytes=estimate_bytes, terms=(TIER,), options=(),
                       budget=lambda spec: sum(b for b, _ in spec.tiers),
                       capacity=registry.budget_capacity, builtin=True,
                       description="recent tokens at high precision, older ones lower, oldest dropped")
