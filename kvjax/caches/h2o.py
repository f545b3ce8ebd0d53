"""Heavy-hitter eviction (H2O): keep the recent window plus the most-attended older tokens.

Spec: `h2o:K+window:W` (optionally `sink:S`, and quantized storage `intN[+residual:R][+group:G]`,
e.g. `int4+residual:64+h2o:256+window:512`). Memory is fixed: S + W + K slots per row, layer and
kv head, allocated once; a row can be decoded for any number of tokens.

Policy. Every held token carries its accumulated attention score: the attention probability it
received, summed over the G query heads of its kv head and over every query since it arrived.
When a token arrives, the candidates are the held tokens plus the new one; the cache keeps, per
(row, layer, kv head):

  * the S first tokens of the row (attention sinks; none unless `sink:S`),
  * the W most recent tokens (the new one included),
  * among the other candidates, the K with the largest accumulated score,

and forgets the rest for good (`evict_topk`, a `lax.top_k` over fixed shapes; ties go to the
lower candidate index). Then the new token's query attends over exactly what is held (S + W + K
keys at most, itself included), and every held token's score grows by the attention it got.
Different kv heads and layers keep different tokens.

Chunks. `attend` with T > 1 new tokens runs this single-token step T times in a `lax.scan`, so
every query sees exactly what the cache holds when its token arrives: chunked prefill ==
token-by-token decode (tested). Padding tokens (t >= n_valid[b]) change nothing in row b: they
are never stored, never evict anything and add no score.

RoPE. Keys are stored rotated at their original positions and never re-indexed: a held token
keeps its true distance to later queries, even after the tokens between them were evicted. (So a
stream longer than the model's trained context reaches distances it never saw; the window kind's
re-indexing is the remedy there.)

Quantized storage (`intN`, or fp8 through a `kvjax.caches.codec.Codec`). Held tokens are stored
per token: bit-packed with one float16 scale (and zero point) per `group` channels (int8 symmetric,
narrower widths asymmetric), or fp8 codes with one scale per token; decoded inside attention.
Per-token storage suits slots that are evicted one by one.
With `residual:R` (R <= W) the R newest tokens live in a full-precision ring beside the quantized
pool and are quantized when they leave it; the pool then keeps the sinks, the W - R next most
recent tokens and the K heaviest. Without `residual`, a token is quantized on arrival (its own
query already sees the quantized key).

Invariants (tests/caches/test_h2o.py, against NumPy oracles):
  * after any sequence of chunks (ragged n_valid included), each (row, layer, kv head) holds
    exactly the tokens the policy above keeps when tokens are fed one by one, with their scores;
  * at most S + W + K tokens are held, positions are unique, the sinks and the W most recent
    tokens are always held; every array has a fixed shape; `limited = False` (nothing can
    overflow) and `has_room`/`fits` are always true;
  * a budget larger than the sequence gives the full cache's logits.

`write` (used by `kvjax.append`, which has no queries) admits tokens one by one with zero score.
`crop` marks tokens at positions >= length empty; tokens they had already evicted do not come
back, and the scores keep the attention of the cropped queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches.codec import TokenStore, stores_map
from kvjax.caches.layered import LayeredCache
from kvjax.caches.registry import PYRAMID_BETA, SpecError, pyramid_budgets


# SnapKV's defaults: the last 32 prompt queries score the prompt, max-pooled over 7 positions.
SNAP_OBSERVE = 32
SNAP_KERNEL = 7
SNAP_POOLING = "max"


# ---------------------------------------------------------------------------------------------
# The policy, as a pure function
# ---------------------------------------------------------------------------------------------
def evict_topk(positions, scores, payload, lengths, *, heavy: int, window: int, sink: int = 0,
               slots: int | None = None):
  """Keeps `sink + window + heavy` of C candidates per leading index: H2O's eviction.

  Args:
    positions: int32 [B, ..., C] candidate token positions, -1 for an empty candidate.
    scores: float32 [B, ..., C] accumulated attention scores.
    payload: pytree whose array leaves are [B, ..., C, ...] (keys, values, ...), gathered along.
    lengths: int32 [B] tokens seen per row: positions >= lengths - window are "recent".
    heavy, window, sink: static sizes; C >= sink + window + heavy.
    slots: how many to keep (default sink + window + heavy). A pool shared by several kv heads
      (`adakv`) keeps heads x (sink + window + heavy): the protection rule is per position, so
      every head's sinks and window are kept and the heads compete for the rest.

  Returns:
    (positions, scores, payload) with C replaced by S = sink + window + heavy: the live
    candidates with position < sink or >= lengths - window, then the live rest by decreasing
    score, then empty ones (position -1, score 0), in that order of priority.
  """
  slots = heavy + window + sink if slots is None else slots
  c = positions.shape[-1]
  if c < slots:
    raise ValueError(f"evict_topk: {c} candidates cannot fill {slots} slots")
  lengths = jnp.asarray(lengths, jnp.int32).reshape((-1,) + (1,) * (positions.ndim - 1))
  live = positions >= 0
  protected = live & ((positions < sink) | (positions >= lengths - window))
  priority = jnp.where(protected, jnp.inf, jnp.where(live, scores.astype(jnp.float32), -jnp.inf))
  _, index = jax.lax.top_k(priority, slots)  # [B, ..., S]
  axis = positions.ndim - 1

  def take(x):
    idx = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, idx, axis=axis)

  positions = take(positions)
  scores = jnp.where(positions >= 0, take(scores), 0.0)
  return positions, scores, jax.tree_util.tree_map(take, payload)


def append_encoded(store: TokenStore, x) -> TokenStore:
  """`store` [B, K, S, ...] with x [B, K, C, H] encoded at its precision appended as C more
  slots (the candidates `evict_topk` chooses from)."""
  enc = store.codec.encode(x)
  return stores_map(lambda s, e: jnp.concatenate([s, e], axis=2), store, enc)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class H2OCache(base.Evicting):
  """Heavy-hitter cache; see the module docstring.

  k, v: TokenStore, logical [L, B, K, P, H]: the pool (P = sink + window - residual + heavy slots),
    keys rotated, at the pool's precision (the cache dtype, or intN).
  ring_k, ring_v: [L, B, K, R, H] full-precision ring of the R = residual newest tokens
    (R may be 0).
  positions: int32 [L, B, K, P + R]: pool slots then ring slots, -1 where empty.
  scores: float32 [L, B, K, P + R]: accumulated attention of each held token.
  lengths: int32 [B] tokens seen per row.
  heads: None, or with a pool shared by the kv heads of a layer (`adakv`): int32 [L, B, 1, P]
    the kv head each slot belongs to; the arrays above then have one "head" axis of size 1 and
    P = kv_heads x (sink + window + heavy) slots (no residual ring).
  """

  k: TokenStore
  v: TokenStore
  ring_k: jax.Array
  ring_v: jax.Array
  positions: jax.Array
  scores: jax.Array
  lengths: jax.Array
  heads: jax.Array | None = None
  heavy: int = struct.field(pytree_node=False, default=1)
  window: int = struct.field(pytree_node=False, default=1)
  sink: int = struct.field(pytree_node=False, default=0)
  scorer: str = struct.field(pytree_node=False, default="h2o")
  observe: int = struct.field(pytree_node=False, default=SNAP_OBSERVE)
  kernel: int = struct.field(pytree_node=False, default=SNAP_KERNEL)
  pooling: str = struct.field(pytree_node=False, default=SNAP_POOLING)
  n_kv: int = struct.field(pytree_node=False, default=0)

  # Eviction makes room: kvjax.append must not raise capacity errors. With the h2o scorer, chunks
  # are fed token by token inside `attend`, so chunked feeding is exact (chunk_exact below).

  @property
  def chunk_exact(self) -> bool:
    """h2o: yes. snapkv: no, a chunk is one prompt, attended in full and then compressed."""
    return self.scorer == "h2o"

  @property
  def exact(self) -> bool:
    """Held tokens are stored exactly unless the pool is quantized (intN or fp8)."""
    return self.k.codec.is_float

  @property
  def error_bound(self) -> float:
    return 0.0 if self.exact else self.k.codec.error_bound

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, heavy: int,
           window: int, sink: int = 0, bits: int | None = None, residual: int = 0,
           group: int = 32, dtype=jnp.float32, scorer: str = "h2o",
           observe: int = SNAP_OBSERVE, kernel: int = SNAP_KERNEL,
           pooling: str = SNAP_POOLING, shared_heads: bool = False,
           codec: codec_lib.Codec | None = None) -> "H2OCache":
    """The pool is stored through `codec` (default: intN from `bits` and `group`, or the cache
    dtype when bits is None); the residual ring is always at the cache dtype."""
    if codec is None:
      codec = codec_lib.of_dtype(dtype) if bits is None else codec_lib.of_bits(bits, group)
    if shared_heads and residual:
      raise SpecError("adakv (a pool shared by the kv heads) does not take a residual ring yet; "
                      "drop residual:R")
    if pooling not in ("max", "avg"):
      raise SpecError(f"H2OCache: pooling must be 'max' or 'avg', got {pooling!r}")
    if scorer not in ("h2o", "snapkv"):
      raise SpecError(f"H2OCache: unknown scorer {scorer!r}; expected 'h2o' or 'snapkv'")
    if not isinstance(observe, int) or observe < 1 or not isinstance(kernel, int) or kernel < 1 \
        or kernel % 2 == 0:
      raise SpecError(f"H2OCache: observe must be an int >= 1 and kernel an odd int >= 1, got "
                      f"observe={observe!r}, kernel={kernel!r}")
    for name, value, low in (("heavy", heavy, 1), ("window", window, 1), ("sink", sink, 0),
                             ("residual", residual, 0)):
      if not isinstance(value, int) or value < low:
        raise SpecError(f"H2OCache: {name} must be an int >= {low}, got {value!r}")
    if residual > window:
      raise SpecError(f"residual:{residual} must not exceed window:{window} (the full-precision "
                      "tokens are the newest of the window)")
    if residual and codec.is_float:
      raise SpecError(f"residual:{residual} needs quantized storage (intN or fp8)")
    if codec.kind == "int" and head_dim % codec.group:
      raise SpecError(f"{codec.format} storage: head_dim {head_dim} is not a multiple of "
                      f"group:{codec.group}")
    pool = sink + window - residual + heavy
    lead = (n_layers, batch, kv_heads)
    if shared_heads:
      pool, lead = kv_heads * pool, (n_layers, batch, 1)
    # Separate buffers everywhere: a donated cache must not hold one buffer twice.
    ring = lambda: jnp.zeros(lead + (residual, head_dim), dtype)
    slots = pool + residual
    return cls(k=codec.empty(lead + (pool, head_dim)), v=codec.empty(lead + (pool, head_dim)), ring_k=ring(), ring_v=ring(),
               positions=jnp.full(lead + (slots,), -1, jnp.int32),
               scores=jnp.zeros(lead + (slots,), jnp.float32),
               lengths=jnp.zeros((batch,), jnp.int32),
               heads=jnp.zeros(lead + (slots,), jnp.int32) if shared_heads else None,
               heavy=heavy, window=window, sink=sink, scorer=scorer,
               observe=min(observe, window), kernel=kernel, pooling=pooling,
               n_kv=kv_heads if shared_heads else 0)

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.positions

  @property
  def shared_heads(self) -> bool:
    return self.heads is not None

  @property
  def kv_heads(self) -> int:
    return self.n_kv if self.shared_heads else self.positions.shape[2]

  @property
  def capacity(self) -> int:
    """Slots per row, layer and kv head (sink + window + heavy): what the cache holds at most,
    not a stream limit. With a shared pool (`adakv`) one head may hold up to the sinks, the
    window and every head's scored share: sink + window + kv_heads x heavy."""
    if self.shared_heads:
      return self.sink + self.window + self.n_kv * self.heavy
    return self.positions.shape[3]

  @property
  def lossless_tokens(self) -> int:
    """The longest stream every (layer, kv head) holds whole."""
    return self.sink + self.window + self.heavy

  @property
  def pool(self) -> int:
    return self.k.data.shape[3]

  @property
  def residual(self) -> int:
    return self.ring_k.shape[3]

  @property
  def bits(self) -> int | None:
    return self.k.bits

  @property
  def head_dim(self) -> int:
    return self.ring_k.shape[4]

  def filled(self) -> jax.Array:
    """int32 [B]: tokens each row holds (the most over its layers and kv heads, which may
    differ after a crop); `held()` gives the per-(layer, head) counts."""
    return jnp.max(self.held(), axis=(0, 2))

  def held(self) -> jax.Array:
    """int32 [L, B, K]: tokens held per layer, row and kv head."""
    if self.shared_heads:
      mine = (self.positions >= 0) & (self.heads == jnp.arange(self.n_kv)[:, None])  # [L,B,K,P]
      return jnp.sum(mine, axis=-1).astype(jnp.int32)
    return jnp.sum(self.positions >= 0, axis=-1).astype(jnp.int32)

  # ---- one token through one layer ------------------------------------------------------------
  def _layer(self, layer: int):
    pick = lambda a: a[layer]
    return (self.k.map(pick), self.v.map(pick), self.ring_k[layer], self.ring_v[layer],
            self.positions[layer], self.scores[layer],
            None if self.heads is None else self.heads[layer])

  def _with_layer(self, layer: int, st) -> "H2OCache":
    ks, vs, rk, rv, pos, score, hd = st
    put = lambda a, p: a.at[layer].set(p)
    return self.replace(k=stores_map(put, self.k, ks), v=stores_map(put, self.v, vs),
                        ring_k=put(self.ring_k, rk), ring_v=put(self.ring_v, rv),
                        positions=put(self.positions, pos), scores=put(self.scores, score),
                        heads=None if hd is None else put(self.heads, hd))

  def _held(self, st, dtype):
    """What one layer's queries read: keys, values [B, K, S, H] (a shared pool broadcast to
    every head) and the mask [B, K, 1, S] of live slots (of the query's own head)."""
    ks, vs, rk, rv, pos, _, hd = st
    keys = jnp.concatenate([ks.decode(dtype), rk.astype(dtype)], axis=2)
    values = jnp.concatenate([vs.decode(dtype), rv.astype(dtype)], axis=2)
    live = pos >= 0
    if hd is None:
      return keys, values, live[:, :, None, :]
    shape = (keys.shape[0], self.n_kv) + keys.shape[2:]
    mine = live & (hd == jnp.arange(self.n_kv)[None, :, None])  # [B, K, S]
    return jnp.broadcast_to(keys, shape), jnp.broadcast_to(values, shape), mine[:, :, None, :]

  def _fold(self, mass):
    """Attention mass [B, K, S] over the held slots -> per slot of the layer's storage (a shared
    pool has one row for every head: each slot only got mass from its own head)."""
    return jnp.sum(mass, axis=1, keepdims=True) if self.shared_heads else mass

  def _admit(self, st, k_t, v_t, pos_t, valid_t, now):
    """Adds one token per row to one layer's state and evicts down to the budget.

    st: one layer's (k store, v store, ring_k, ring_v, positions, scores), [B, K, ...].
    k_t, v_t: [B, K, H] (key rotated); pos_t: int32 [B]; valid_t: bool [B];
    now: int32 [B] tokens the row has seen once this token is in.
    """
    if self.shared_heads:
      return self._admit_shared(st, k_t, v_t, pos_t, valid_t, now)
    ks, vs, rk, rv, pos, score, hd = st
    b, kh = pos.shape[:2]
    p, r = self.pool, self.residual
    rows = jnp.arange(b)
    keep = valid_t[:, None]  # [B, 1]
    new_pos = jnp.broadcast_to(jnp.where(valid_t, pos_t, -1)[:, None], (b, kh))
    if r:
      # The new token takes its ring slot; the one it displaces becomes the pool's candidate.
      rslot = attn.ring_slot(pos_t, r)
      cand_k, cand_v = rk[rows, :, rslot], rv[rows, :, rslot]  # [B, K, H]
      cand_pos = jnp.where(keep, pos[rows, :, p + rslot], -1)
      cand_score = score[rows, :, p + rslot]
      rk = rk.at[rows, :, rslot].set(jnp.where(keep[..., None], k_t.astype(rk.dtype), cand_k))
      rv = rv.at[rows, :, rslot].set(jnp.where(keep[..., None], v_t.astype(rv.dtype), cand_v))
      pos = pos.at[rows, :, p + rslot].set(jnp.where(keep, new_pos, pos[rows, :, p + rslot]))
      score = score.at[rows, :, p + rslot].set(jnp.where(keep, 0.0, cand_score))
    else:
      cand_k, cand_v, cand_pos = k_t, v_t, new_pos
      cand_score = jnp.zeros((b, kh), jnp.float32)

    cand = (append_encoded(ks, cand_k[:, :, None]), append_encoded(vs, cand_v[:, :, None]))
    c_pos = jnp.concatenate([pos[..., :p], cand_pos[..., None]], axis=-1)
    c_score = jnp.concatenate([score[..., :p], cand_score[..., None]], axis=-1)
    # The pool's "recent" part is the window minus the ring's newest R tokens.
    c_pos, c_score, (ks, vs) = evict_topk(c_pos, c_score, cand, now - r, heavy=self.heavy,
                                          window=self.window - r, sink=self.sink)
    pos = jnp.concatenate([c_pos, pos[..., p:]], axis=-1)
    score = jnp.concatenate([c_score, score[..., p:]], axis=-1)
    return ks, vs, rk, rv, pos, score, hd

  def _admit_shared(self, st, k_t, v_t, pos_t, valid_t, now):
    """`_admit` for a pool shared by the kv heads (`adakv`): the new token brings one candidate
    per head; every head keeps its sinks and window, and all heads compete for the
    kv_heads x heavy scored slots."""
    ks, vs, rk, rv, pos, score, hd = st
    b, kh = pos.shape[0], self.n_kv

    new_pos = jnp.broadcast_to(jnp.where(valid_t, pos_t, -1)[:, None, None], (b, 1, kh))
    c_pos = jnp.concatenate([pos, new_pos], axis=-1)
    c_score = jnp.concatenate([score, jnp.zeros((b, 1, kh), jnp.float32)], axis=-1)
    c_heads = jnp.concatenate([hd, jnp.broadcast_to(jnp.arange(kh, dtype=jnp.int32), (b, 1, kh))],
                              axis=-1)
    pos, score, (ks, vs, hd) = evict_topk(
        c_pos, c_score, (append_encoded(ks, k_t[:, None]), append_encoded(vs, v_t[:, None]), c_heads), now, heavy=self.heavy,
        window=self.window, sink=self.sink, slots=self.pool)
    return ks, vs, rk, rv, pos, score, hd

  # ---- protocol -------------------------------------------------------------------------------
  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, T, N, H], k/v [B, T, K, H] un-rotated. Returns (out [B, T, N, H], cache).

    Token by token (a scan when T > 1): admit the token (evicting), then let its query attend
    over what is held and add the attention each held token got to its score.
    """
    t = q.shape[1]
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.prepare_queries(attn.apply_rope(rope, q, positions), self.kv_heads, scale)
    k = attn.apply_rope(rope, k, positions)
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]  # [B, T]
    final = self.lengths + n_valid

    def step(st, xs):
      q_t, k_t, v_t, pos_t, valid_t = xs
      st = self._admit(st, k_t, v_t, pos_t, valid_t, jnp.where(valid_t, pos_t + 1, final))
      keys, values, mask = self._held(st, q.dtype)  # [B, K, S, H], [B, K, 1, S]
      out, probs = attn.dense_attention(q_t[:, None], keys, values, mask, return_probs=True)
      mass = jnp.sum(probs, axis=(2, 3)) * valid_t[:, None, None]  # [B, K, S]
      ks, vs, rk, rv, pos, score, hd = st
      return (ks, vs, rk, rv, pos, score + self._fold(mass), hd), out[:, 0]

    if self.scorer == "snapkv" and t > 1:
      return self._snap_chunk(layer, q, k, v, n_valid, positions)
    xs = (q, k, v, positions, valid)
    st = self._layer(layer)
    if t == 1:
      st, out = step(st, jax.tree_util.tree_map(lambda a: a[:, 0], xs))
      out = out[:, None]
    else:
      st, out = jax.lax.scan(step, st, jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), xs))
      out = out.swapaxes(0, 1)
    return out, self._with_layer(layer, st)

  def _snap_chunk(self, layer: int, q, k, v, n_valid, positions):
    """SnapKV over one chunk of T > 1 tokens (a prompt): exact attention, then compression.

    q [B, T, K, G, H] rotated and scaled; k [B, T, K, H] rotated; v [B, T, K, H];
    n_valid [B]; positions int32 [B, T]. Returns (out [B, T, N, H], cache).

    Every query of the chunk attends over what the cache holds plus the chunk's tokens up to its
    own (causal), so a prompt fed in one chunk gets the full cache's outputs. Then each candidate
    (held or new) is scored by the attention the row's last `observe` real queries give it, summed
    over their query heads; the chunk's scores are smoothed along positions by a max (or average)
    pool of `kernel` tokens (SnapKV keeps the neighbours of a hit), held tokens add the score to what they
    had. The cache keeps the sinks, the window's most recent tokens and the `heavy` best scored.
    """
    st = self._layer(layer)
    ks, vs, rk, rv, pos, score, hd = st
    b, t, kh, _ = k.shape
    p, r = self.pool, self.residual
    ck, cv = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, H]
    held_k, held_v, held_mask = self._held(st, q.dtype)  # [B, K, P + R, H], [B, K, 1, P + R]
    index = jnp.arange(t, dtype=jnp.int32)

    # Outputs: dense over the held slots, blockwise-causal over the chunk, merged online.
    block = math.gcd(t, 256)
    chunk_stats = attn.blockwise_stats(
        q, lambda start: (jax.lax.dynamic_slice_in_dim(ck, start, block, axis=2),
                          jax.lax.dynamic_slice_in_dim(cv, start, block, axis=2)),
        attn.causal_visibility(jnp.broadcast_to(index, (b, t)), n_valid),
        attn.n_filled_blocks(n_valid, block), block)
    stats = attn.combine_stats(attn.attention_stats(q, held_k, held_v, held_mask), chunk_stats)
    out = attn.finish_stats(stats, q.dtype)

    # Scores from the observation window: the last `observe` real queries of each row.
    at = n_valid[:, None] - self.observe + jnp.arange(self.observe, dtype=jnp.int32)  # [B, O]
    seen = at >= 0
    q_obs = jnp.take_along_axis(q, jnp.clip(at, 0, t - 1)[:, :, None, None, None], axis=1)
    keys = jnp.concatenate([held_k, ck.astype(q.dtype)], axis=2)  # [B, K, P + R + T, H]
    chunk_mask = (index[None, None, :] <= at[:, :, None])[:, None]  # [B, 1, O, T]
    mask = jnp.concatenate([jnp.broadcast_to(held_mask, (b, kh, self.observe, p + r)),
                            jnp.broadcast_to(chunk_mask, (b, kh, self.observe, t))], axis=-1)
    probs = attn.masked_softmax(attn.scores_of(q_obs, keys), mask[:, :, None])  # [B,K,G,O,S]
    mass = jnp.einsum("bkgos,bo->bks", probs, seen.astype(probs.dtype))  # [B, K, P + R + T]
    # Scores are >= 0, so 0 is a neutral padding for both pools.
    reduce = jax.lax.max if self.pooling == "max" else jax.lax.add
    chunk_mass = jax.lax.reduce_window(mass[..., p + r:], 0.0, reduce, (1, 1, self.kernel),
                                       (1, 1, 1), "SAME")
    if self.pooling == "avg":
      chunk_mass = chunk_mass / self.kernel

    # Candidates: the pool, the ring, the chunk. The ring keeps the R newest; the pool the rest.
    final = (self.lengths + n_valid)[:, None, None]  # [B, 1, 1]
    chunk_pos = jnp.broadcast_to(jnp.where(index[None, :] < n_valid[:, None], positions, -1)[:, None],
                                 (b, kh, t))
    if self.shared_heads:  # one pool row for all heads: the chunk's K x T tokens join it
      fold = lambda x: x.reshape((b, 1, kh * t) + x.shape[3:])
      c_pos = jnp.concatenate([pos, fold(chunk_pos)], axis=-1)
      c_score = jnp.concatenate([score + self._fold(mass[..., :p]), fold(chunk_mass)], axis=-1)
      c_heads = jnp.concatenate(
          [hd, jnp.broadcast_to(jnp.repeat(jnp.arange(kh, dtype=jnp.int32), t), (b, 1, kh * t))],
          axis=-1)
      live = (chunk_pos >= 0)[..., None]

      keep = lambda x: fold(jnp.where(live, x, 0))  # padding may hold anything

      pos, score, (ks, vs, hd) = evict_topk(
          c_pos, c_score, (append_encoded(ks, keep(ck)), append_encoded(vs, keep(cv)), c_heads), final[:, 0, 0],
          heavy=self.heavy, window=self.window, sink=self.sink, slots=p)
      return out, self._with_layer(layer, (ks, vs, rk, rv, pos, score, hd))
    fresh_pos = jnp.concatenate([pos[..., p:], chunk_pos], axis=-1)
    live = (fresh_pos >= 0)[..., None]  # padding may hold anything: keep it out of the sums below
    fresh_k = jnp.where(live, jnp.concatenate([rk.astype(ck.dtype), ck], axis=2), 0)  # [B,K,R+T,H]
    fresh_v = jnp.where(live, jnp.concatenate([rv.astype(cv.dtype), cv], axis=2), 0)
    fresh_score = jnp.concatenate([score[..., p:] + mass[..., p:p + r], chunk_mass], axis=-1)
    in_ring = (fresh_pos >= 0) & (fresh_pos >= final - r)
    onehot = in_ring[..., None] & (attn.ring_slot(fresh_pos, max(r, 1))[..., None]
                                   == jnp.arange(r, dtype=jnp.int32))  # [B, K, R + T, R]
    hot = onehot.astype(jnp.float32)
    rk = jnp.einsum("bkcr,bkch->bkrh", hot, fresh_k.astype(jnp.float32)).astype(rk.dtype)
    rv = jnp.einsum("bkcr,bkch->bkrh", hot, fresh_v.astype(jnp.float32)).astype(rv.dtype)
    ring_pos = jnp.where(jnp.any(onehot, axis=2),
                         jnp.sum(jnp.where(onehot, fresh_pos[..., None], 0), axis=2), -1)
    ring_score = jnp.sum(jnp.where(onehot, fresh_score[..., None], 0.0), axis=2)

    c_pos = jnp.concatenate([pos[..., :p], jnp.where(in_ring, -1, fresh_pos)], axis=-1)
    c_score = jnp.concatenate([score[..., :p] + mass[..., :p], fresh_score], axis=-1)
    c_pos, c_score, (ks, vs) = evict_topk(
        c_pos, c_score, (append_encoded(ks, fresh_k), append_encoded(vs, fresh_v)), final[:, 0, 0] - r,
        heavy=self.heavy, window=self.window - r, sink=self.sink)
    st = (ks, vs, rk, rv, jnp.concatenate([c_pos, ring_pos], axis=-1),
          jnp.concatenate([c_score, ring_score], axis=-1), hd)
    return out, self._with_layer(layer, st)

  def write(self, layer: int, k, v, n_valid=None) -> "H2OCache":
    """Admits k, v [B, T, K, H] (stored as given) of one layer token by token with zero score,
    evicting as it goes; lengths unchanged (`advance` moves them)."""
    t = k.shape[1]
    n_valid = base.normalize_n_valid(n_valid, self.batch, t, what="write")
    positions = base.row_slots(self.lengths, t)
    valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]
    final = self.lengths + n_valid

    def step(st, xs):
      k_t, v_t, pos_t, valid_t = xs
      return self._admit(st, k_t, v_t, pos_t, valid_t, jnp.where(valid_t, pos_t + 1, final)), None

    xs = jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), (k, v, positions, valid))
    st, _ = jax.lax.scan(step, self._layer(layer), xs)
    return self._with_layer(layer, st)

  def advance(self, n_valid) -> "H2OCache":
    return self.replace(lengths=self.lengths + jnp.asarray(n_valid, jnp.int32))

  def view(self) -> base.CacheView:
    """Keys (rotated, dequantized), values [L, B, K, P + R, H]: pool slots then ring slots."""
    keys = jnp.concatenate([self.k.decode(), self.ring_k.astype(jnp.float32)], axis=3)
    values = jnp.concatenate([self.v.decode(), self.ring_v.astype(jnp.float32)], axis=3)
    if self.shared_heads:  # the shared row, shown once per head with that head's slots live
      mask = (self.positions >= 0) & (self.heads == jnp.arange(self.n_kv)[:, None])
      shape = mask.shape + keys.shape[-1:]
      return base.CacheView(keys=jnp.broadcast_to(keys, shape),
                            values=jnp.broadcast_to(values, shape), mask=mask,
                            positions=jnp.where(mask, self.positions, -1))
    return base.CacheView(keys=keys, values=values, mask=self.positions >= 0,
                          positions=self.positions)

  def reset(self) -> "H2OCache":
    """Empty cache of the same shapes (stale buffers hidden by positions = -1)."""
    return self.replace(positions=jnp.full_like(self.positions, -1),
                        scores=jnp.zeros_like(self.scores), lengths=jnp.zeros_like(self.lengths))

  def crop(self, length) -> "H2OCache":
    """Forgets every token at position >= length (scalar or per row [B]). Evicted tokens do not
    come back and scores keep the attention of the forgotten queries (see module docstring)."""
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), self.lengths.shape)
    gone = self.positions >= length[None, :, None, None]
    return self.replace(positions=jnp.where(gone, -1, self.positions),
                        scores=jnp.where(gone, 0.0, self.scores),
                        lengths=jnp.minimum(self.lengths, length))

  def reorder(self, indices) -> "H2OCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    take = lambda a: jnp.take(a, indices, axis=1)
    return self.replace(k=self.k.map(take), v=self.v.map(take), ring_k=take(self.ring_k),
                        ring_v=take(self.ring_v), positions=take(self.positions),
                        scores=take(self.scores), lengths=jnp.take(self.lengths, indices, axis=0),
                        heads=None if self.heads is None else take(self.heads))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32, **options) -> H2OCache:
  """`h2o:K+window:W` or `snapkv:K+window:W`, each `[+sink:S][+intN[+residual:R][+group:G]]`.
  `capacity` is not used. snapkv options: observe (queries that score the prompt), kernel and
  pooling ('max' or 'avg': how scores are smoothed along positions); defaults above."""
  scorer = "snapkv" if spec.snapkv is not None else "h2o"
  extra = {k: options.pop(k) for k in ("observe", "kernel", "pooling")
           if k in options and scorer == "snapkv"}
  registry.no_options(scorer, options)
  heavy = spec.snapkv if scorer == "snapkv" else spec.h2o
  make = lambda n_layers, k: H2OCache.init(
      n_layers=n_layers, batch=batch, kv_heads=config.n_kv_heads, head_dim=config.head_dim,
      heavy=k, window=spec.window, sink=spec.sink, residual=spec.residual or 0, dtype=dtype,
      scorer=scorer, shared_heads=spec.adakv, codec=codec_lib.for_spec(spec, dtype), **extra)
  if spec.pyramid is not None:  # one cache per layer, each with its own budget
    return LayeredCache.of(make(1, k) for k in layer_budgets(spec, config.n_layers))
  return make(config.n_layers, heavy)


def layer_budgets(spec, n_layers: int) -> list[int]:
  """The scored-token budget of each layer: K everywhere, or PyramidKV's taper."""
  heavy = spec.snapkv if spec.snapkv is not None else spec.h2o
  if spec.pyramid is None:
    return [heavy] * n_layers
  return pyramid_budgets(heavy, n_layers, spec.pyramid)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Per layer: the pool (at its precision), the residual ring, positions and scores per slot;
  and the lengths (once per layer with pyramid budgets, whose layers are separate caches)."""
  residual = spec.residual or 0
  codec = codec_lib.for_spec(spec, dtype)
  if codec.kind == "int" and config.head_dim % codec.group:
    raise SpecError(f"{str(spec)!r}: group:{codec.group} does not divide head_dim {config.head_dim}")
  total = 0
  for heavy in layer_budgets(spec, config.n_layers):
    pool = spec.sink + spec.window - residual + heavy
    pool_bytes = 2 * pool * codec.token_bytes(config.head_dim)
    ring_bytes = 2 * residual * config.head_dim * jnp.dtype(dtype).itemsize
    per_slot = 12 if spec.adakv else 8  # position and score (and the slot's kv head)
    total += batch * config.n_kv_heads * (pool_bytes + ring_bytes + per_slot * (pool + residual))
  return total + 4 * batch * (config.n_layers if spec.pyramid is not None else 1)


def _scored(spec) -> tuple[str, int | None]:
  return ("snapkv", spec.snapkv) if spec.snapkv is not None else ("h2o", spec.h2o)


def _check_scorer(spec):
  if spec.h2o is not None and spec.snapkv is not None:
    raise SpecError(f"h2o:{spec.h2o} and snapkv:{spec.snapkv} are two scorers for one pool; pick one")
  name, heavy = _scored(spec)
  terms.needs(spec, f"{name}:{heavy}", "window", hint="a window:N term for the recent tokens it "
              "always keeps")
  if spec.residual is not None and spec.residual > spec.window:
    raise SpecError(f"residual:{spec.residual} must not exceed window:{spec.window} with {name} "
                    f"(the full-precision ring holds the newest tokens of the window)")


def _check_adakv(spec):
  terms.needs(spec, "adakv shares a scored pool across kv heads; it", "h2o", "snapkv",
              hint="h2o:K or snapkv:K")
  if spec.residual is not None:
    raise SpecError(f"adakv does not take residual:{spec.residual} yet; drop the residual ring")


def _check_pyramid(spec):
  terms.positive("pyramid", spec.pyramid)
  terms.needs(spec, f"pyramid:{spec.pyramid} shapes the budgets of a scored pool; it", "h2o",
              "snapkv", hint="h2o:K or snapkv:K")


def _budget(spec) -> int:
  heavy = _scored(spec)[1]
  if spec.pyramid is not None:  # the first layer holds the most
    heavy = max(pyramid_budgets(heavy, 2, spec.pyramid))
  return spec.window + spec.sink + heavy


H2O = terms.int_term("h2o", "keep the K heaviest-attended tokens (needs window for the recent "
                     "part)", usage="h2o:K", kind="h2o", rank=50, check=_check_scorer, order=30)
SNAPKV = terms.int_term("snapkv", "keep the K prompt tokens its last queries attend to most "
                        "(SnapKV; needs window), then decode as h2o does", usage="snapkv:K",
                        kind="snapkv", rank=45, check=_check_scorer, order=31)
PYRAMID = terms.Term(
    name="pyramid", usage="pyramid | pyramid:BETA", fields=(("pyramid", None),),
    doc=f"h2o/snapkv budgets shrinking with depth (PyramidKV): from 2K - K/BETA at the first layer "
        f"down to K/BETA (BETA default {PYRAMID_BETA}), L x K in all",
    parse=lambda word, text: {"pyramid": PYRAMID_BETA if text is None else terms.integer(word, text)},
    show=lambda spec: "pyramid" if spec.pyramid == PYRAMID_BETA else f"pyramid:{spec.pyramid}",
    check=_check_pyramid, order=32)
ADAKV = terms.flag_term("adakv", "one scored budget per layer shared by its kv heads (AdaKV): "
                        "heads compete for kv_heads x K slots", check=_check_adakv, order=33)

registry.register_kind("h2o", from_spec, estimate_bytes=estimate_bytes,
                       terms=(H2O, SNAPKV, PYRAMID, ADAKV), budget=_budget,
                       capacity=registry.budget_capacity, builtin=True,
                       description="the recent window plus the most-attended older tokens (H2O)")
registry.register_kind("snapkv", from_spec, estimate_bytes=estimate_bytes, budget=_budget,
                       capacity=registry.budget_capacity, builtin=True,
                       description="the prompt tokens its last queries attend to most (SnapKV), "
                                   "then h2o while decoding")
