"""How tokens enter one layer of a `ScoredCache`: admission, eviction, attention, compression.

Pure functions over one layer's state (`Layer`, arrays [B, K, ...]); the cache passed alongside is
read for its static facts only (pool, residual, heavy, window, sink, shared heads, scorer) and its
lengths. The policy itself (what is kept) is `evict_topk`; where the scores come from is the
cache's `Scorer`.

Layout (see cache.py): slots [0, P) are the pool (at the pool's precision), [P, P + R) the
full-precision ring of the R newest tokens, whose slot is `position mod R`. With a pool shared by
the kv heads (`adakv`) the head axis has size 1, there is no ring, and `heads` names each slot's
kv head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax import attention as attn
from kvjax.caches.codec import TokenStore, stores_map
from kvjax.caches.scored.policy import append_encoded, evict_topk


class Layer(NamedTuple):
  """One layer's state: k, v TokenStore [B, K, P, H]; ring_k, ring_v [B, K, R, H];
  positions int32 / scores float32 [B, K, P + R]; heads int32 [B, 1, P] or None."""

  k: TokenStore
  v: TokenStore
  ring_k: jax.Array
  ring_v: jax.Array
  positions: jax.Array
  scores: jax.Array
  heads: jax.Array | None


def take_layer(cache, layer: int) -> Layer:
  """Layer `layer` of the cache's [L, ...] arrays."""
  pick = lambda a: a[layer]
  return Layer(cache.k.map(pick), cache.v.map(pick), cache.ring_k[layer], cache.ring_v[layer],
               cache.positions[layer], cache.scores[layer],
               None if cache.heads is None else cache.heads[layer])


def put_layer(cache, layer: int, st: Layer):
  """The cache with layer `layer` replaced by `st`."""
  put = lambda a, p: a.at[layer].set(p)
  return cache.replace(k=stores_map(put, cache.k, st.k), v=stores_map(put, cache.v, st.v),
                       ring_k=put(cache.ring_k, st.ring_k), ring_v=put(cache.ring_v, st.ring_v),
                       positions=put(cache.positions, st.positions),
                       scores=put(cache.scores, st.scores),
                       heads=None if st.heads is None else put(cache.heads, st.heads))


def held(cache, st: Layer, dtype):
  """What one layer's queries read: keys, values [B, K, S, H] (a shared pool broadcast to every
  head) and the mask [B, K, 1, S] of live slots (of the query's own head)."""
  keys, values = _stored(st, dtype)
  if st.heads is None:
    return keys, values, (st.positions >= 0)[:, :, None, :]
  shape = (keys.shape[0], cache.n_kv) + keys.shape[2:]
  return (jnp.broadcast_to(keys, shape), jnp.broadcast_to(values, shape),
          _pool_mask(cache.n_kv, st.positions, st.heads)[:, :, None, :])


def _stored(st: Layer, dtype):
  """The layer's keys and values [B, K or 1, S, H]: the store's slots, then the ring's."""
  return (jnp.concatenate([st.k.decode(dtype), st.ring_k.astype(dtype)], axis=2),
          jnp.concatenate([st.v.decode(dtype), st.ring_v.astype(dtype)], axis=2))


def _pool_mask(n_kv: int, positions, heads):
  """bool [B, K, S]: the live slots of a shared pool (positions, heads [B, 1, S]) that belong to
  each of the n_kv kv heads."""
  return (positions >= 0) & (heads == jnp.arange(n_kv)[None, :, None])


def fold(cache, mass):
  """Attention mass [B, K, S] over the held slots -> per slot of the layer's storage (a shared
  pool has one row for every head: each slot only got mass from its own head)."""
  return jnp.sum(mass, axis=1, keepdims=True) if cache.shared_heads else mass


# ---- one token at a time ----------------------------------------------------------------------
def admit(cache, st: Layer, k_t, v_t, pos_t, valid_t, now) -> Layer:
  """Adds one token per row to one layer's state and evicts down to the budget.

  k_t, v_t: [B, K, H] (key rotated); pos_t: int32 [B]; valid_t: bool [B];
  now: int32 [B] tokens the row has seen once this token is in. The token's score starts at
  `cache.scoring.admit(k_t)`.
  """
  if cache.shared_heads:
    return _admit_shared(cache, st, k_t, v_t, pos_t, valid_t, now)
  ks, vs, rk, rv, pos, score, hd = st
  b, kh = pos.shape[:2]
  p, r = cache.pool, cache.residual
  rows = jnp.arange(b)
  keep = valid_t[:, None]  # [B, 1]
  new_pos = jnp.broadcast_to(jnp.where(valid_t, pos_t, -1)[:, None], (b, kh))
  new_score = cache.scoring.admit(k_t)  # [B, K]
  if r:
    # The new token takes its ring slot; the one it displaces becomes the pool's candidate.
    rslot = attn.ring_slot(pos_t, r)
    cand_k, cand_v = rk[rows, :, rslot], rv[rows, :, rslot]  # [B, K, H]
    cand_pos = jnp.where(keep, pos[rows, :, p + rslot], -1)
    cand_score = score[rows, :, p + rslot]
    rk = rk.at[rows, :, rslot].set(jnp.where(keep[..., None], k_t.astype(rk.dtype), cand_k))
    rv = rv.at[rows, :, rslot].set(jnp.where(keep[..., None], v_t.astype(rv.dtype), cand_v))
    pos = pos.at[rows, :, p + rslot].set(jnp.where(keep, new_pos, pos[rows, :, p + rslot]))
    score = score.at[rows, :, p + rslot].set(jnp.where(keep, new_score, cand_score))
  else:
    cand_k, cand_v, cand_pos, cand_score = k_t, v_t, new_pos, new_score

  # The pool's "recent" part is the window minus the ring's newest R tokens.
  ks, vs, pool_pos, pool_score, _ = replace_weakest(
      ks, vs, pos[..., :p], score[..., :p], cand_k, cand_v, cand_pos, cand_score, now - r,
      window=cache.window - r, sink=cache.sink)
  pos = jnp.concatenate([pool_pos, pos[..., p:]], axis=-1)
  score = jnp.concatenate([pool_score, score[..., p:]], axis=-1)
  return Layer(ks, vs, rk, rv, pos, score, hd)


def replace_weakest(ks, vs, pos, score, k, v, c_pos, c_score, lengths, *, window: int, sink: int,
                    heads=None, head=None, n_heads: int = 1):
  """One candidate per (row, head) against a full or partly empty pool: `evict_topk` of the pool
  plus the candidate, written as a scatter. Keeping the best P of P + 1 means dropping the weakest
  one, so the candidate takes the weakest pool slot's place when it outranks it, and nothing else
  moves: no copy of the pool per token (the slot order differs from `evict_topk`'s, the held set
  and scores do not). Measured on CPU (SmolLM2, 8 rows, 768 slots, 2026-12-07): this alone did
  not change a decode step (0.22 vs 0.21 s); slicing each layer's state out of the [L, ...]
  buffers and writing it back did cost, which `decode_step` avoids (0.105 vs 0.126 s).

  ks, vs: TokenStore [B, K, P, H]; pos int32 / score float32 [B, K, P]; k, v [B, K, H]; c_pos
  int32 / c_score float32 [B, K]; lengths int32 [B]. Rank: protected (sink or the recent window)
  above every score, empty below everything, equal ranks to the lower position (as `evict_topk`
  puts the lower candidate first). heads int32 [B, 1, P] / head / n_heads: a pool shared by the
  n_heads kv heads, the candidate of kv head `head` (positions repeat across heads; equal
  positions rank the lower head first).
  Returns (ks, vs, pos, score, heads) (heads None without a shared pool)."""
  slot, wins = weakest_slot(pos, score, c_pos, c_score, lengths, window=window, sink=sink,
                            heads=heads, head=head, n_heads=n_heads)
  at = (jnp.arange(pos.shape[0])[:, None], jnp.arange(pos.shape[1])[None, :], slot)
  put = lambda old, new: _put_where(old, at, wins, new)
  return (stores_map(put, ks, _squeeze_slot(ks.codec.encode(k[:, :, None]))),
          stores_map(put, vs, _squeeze_slot(vs.codec.encode(v[:, :, None]))),
          put(pos, c_pos), put(score, jnp.where(c_pos >= 0, c_score, 0.0)),
          put(heads, jnp.full(c_pos.shape, head, jnp.int32)) if heads is not None else None)


def weakest_slot(pos, score, c_pos, c_score, lengths, *, window: int, sink: int, heads=None,
                 head=None, n_heads: int = 1):
  """(slot int [B, K], wins bool [B, K]): the weakest held slot of each (row, head) and whether
  the candidate outranks it (`replace_weakest`'s decision; same arguments)."""
  lengths = jnp.asarray(lengths, jnp.int32)[:, None, None]
  rank = lambda p, s: jnp.where((p >= 0) & ((p < sink) | (p >= lengths - window)), jnp.inf,
                                jnp.where(p >= 0, s.astype(jnp.float32), -jnp.inf))
  held = rank(pos, score)  # [B, K, P]
  order = pos if heads is None else pos * n_heads + heads  # the tie-break: higher goes first
  order = jnp.where(pos >= 0, order, -1 - jnp.arange(pos.shape[-1]))  # empty: the first one
  weakest = jnp.min(held, axis=-1)
  slot = jnp.argmax(jnp.where(held == weakest[..., None], order, jnp.iinfo(jnp.int32).min),
                    axis=-1)
  c_rank = rank(c_pos[..., None], c_score[..., None])[..., 0]
  c_order = c_pos if heads is None else c_pos * n_heads + head
  held_order = jnp.take_along_axis(order, slot[..., None], axis=-1)[..., 0]
  wins = (c_rank > weakest) | ((c_rank == weakest) & (c_order < held_order))
  return slot, wins & (c_pos >= 0)


def decode_step(cache, layer: int, q_t, k_t, v_t, pos_t, valid_t, now):
  """`step` for a cache without a ring, on its [L, B, K, P, ...] buffers in place: the new token
  is scattered into layer `layer`'s weakest slot (`weakest_slot`; a shared pool lets each kv
  head's candidate in in turn, as `_admit_shared`) and the query reads that layer's slice, so no
  layer state is copied out and back. Returns (cache, out [B, N, H])."""
  b, kh = q_t.shape[:2]
  pos, score = cache.positions[layer], cache.scores[layer]  # [B, K or 1, P]
  hd = None if cache.heads is None else cache.heads[layer]  # [B, 1, P]
  admitted = cache.scoring.admit(k_t)  # [B, K]
  if cache.shared_heads:
    c_pos = jnp.where(valid_t, pos_t, -1)[:, None]  # [B, 1]
    candidates = [(h, k_t[:, h:h + 1], v_t[:, h:h + 1], admitted[:, h:h + 1]) for h in range(kh)]
  else:
    c_pos = jnp.broadcast_to(jnp.where(valid_t, pos_t, -1)[:, None], (b, kh))
    candidates = [(None, k_t, v_t, admitted)]
  rows, heads = jnp.arange(b)[:, None], jnp.arange(pos.shape[1])[None, :]
  ks, vs = cache.k, cache.v
  for head, k, v, c_score in candidates:
    c_score = jnp.where(c_pos >= 0, c_score, 0.0)
    slot, wins = weakest_slot(pos, score, c_pos, c_score, now, window=cache.window,
                              sink=cache.sink, heads=hd, head=head, n_heads=kh)
    put = lambda store, x: _put_where(store, (layer, rows, heads, slot), wins, x)  # [L, B, K, P..]
    ks = stores_map(put, ks, _squeeze_slot(ks.codec.encode(k[:, :, None])))
    vs = stores_map(put, vs, _squeeze_slot(vs.codec.encode(v[:, :, None])))
    pos = _put_where(pos, (rows, heads, slot), wins, c_pos)
    score = _put_where(score, (rows, heads, slot), wins, c_score)
    if hd is not None:
      hd = _put_where(hd, (rows, heads, slot), wins, jnp.full(c_pos.shape, head, jnp.int32))
  keys = ks.map(lambda a: a[layer]).decode(q_t.dtype)
  values = vs.map(lambda a: a[layer]).decode(q_t.dtype)
  if hd is None:
    out, probs = attn.dense_attention(q_t[:, None], keys, values, (pos >= 0)[:, :, None, :],
                                      return_probs=True)
  else:
    out, probs = _attend_pool(q_t, keys, values, _pool_mask(kh, pos, hd))
  gain = cache.scoring.gain(probs, valid_t)
  if gain is not None:
    score = score + fold(cache, gain)
  return cache.replace(
      k=ks, v=vs, positions=cache.positions.at[layer].set(pos),
      scores=cache.scores.at[layer].set(score),
      heads=None if hd is None else cache.heads.at[layer].set(hd)), out[:, 0]


def _put_where(old, at, wins, new):
  """old with old[at] = new where wins (bool [B, K]; new [B, K, ...] per (row, head))."""
  keep = wins.reshape(wins.shape + (1,) * (new.ndim - wins.ndim))
  return old.at[at].set(jnp.where(keep, new, old[at]))


def _squeeze_slot(store):
  """A TokenStore of one slot [B, K, 1, ...] as [B, K, ...]."""
  return jax.tree_util.tree_map(lambda a: a[:, :, 0], store)


def _admit_shared(cache, st: Layer, k_t, v_t, pos_t, valid_t, now) -> Layer:
  """`admit` for a pool shared by the kv heads (`adakv`): the new token brings one candidate per
  head; every head keeps its sinks and window, and all heads compete for the kv_heads x heavy
  scored slots."""
  kh = cache.n_kv
  c_pos = jnp.where(valid_t, pos_t, -1)[:, None]  # [B, 1]
  c_score = cache.scoring.admit(k_t)  # [B, K]
  ks, vs, pos, score, hd = st.k, st.v, st.positions, st.scores, st.heads
  # Keeping the best P of P + K candidates = letting them in one at a time, each replacing the
  # weakest (the order of a strict ranking does not change the winners).
  for h in range(kh):
    ks, vs, pos, score, hd = replace_weakest(
        ks, vs, pos, score, k_t[:, h:h + 1], v_t[:, h:h + 1], c_pos, c_score[:, h:h + 1], now,
        window=cache.window, sink=cache.sink, heads=hd, head=h, n_heads=kh)
  return Layer(ks, vs, st.ring_k, st.ring_v, pos, score, hd)


def step(cache, st: Layer, q_t, k_t, v_t, pos_t, valid_t, now):
  """One token per row: admit it (evicting), let its query q_t [B, K, G, H] attend over what is
  held, and grow the held scores by the scorer's `gain`. Returns (state, out [B, N, H])."""
  st = admit(cache, st, k_t, v_t, pos_t, valid_t, now)
  if cache.shared_heads:
    out, probs = _attend_pool(q_t, *_stored(st, q_t.dtype), _pool_mask(cache.n_kv, st.positions,
                                                                          st.heads))
  else:
    keys, values, mask = held(cache, st, q_t.dtype)  # [B, K, S, H], [B, K, 1, S]
    out, probs = attn.dense_attention(q_t[:, None], keys, values, mask, return_probs=True)
  gain = cache.scoring.gain(probs, valid_t)
  if gain is not None:
    st = st._replace(scores=st.scores + fold(cache, gain))
  return st, out[:, 0]


def _attend_pool(q_t, keys, values, mine):
  """One query step over a shared pool without copying it per kv head: the N = K*G query heads
  stand on the query axis of a single-kv-head attention, each masked to its own kv head's slots.
  q_t [B, K, G, H]; keys, values [B, 1, S, H]; mine bool [B, K, S] -> (out [B, 1, N, H], probs
  [B, K, G, 1, S]) as `dense_attention` gives them over the pool broadcast to every kv head."""
  b, kh, g, h = q_t.shape
  mask = jnp.repeat(mine, g, axis=1)[:, None]  # [B, 1, N, S]
  out, probs = attn.dense_attention(q_t.reshape(b, kh * g, 1, 1, h), keys, values, mask,
                                    return_probs=True)  # [B, N, 1, H], [B, 1, 1, N, S]
  return out.reshape(b, 1, kh * g, h), probs.reshape(b, kh, g, 1, probs.shape[-1])


# ---- a whole prompt at once (scorers with compresses_prompt) ---------------------------------
def prompt_outputs(q, ck, cv, held_k, held_v, held_mask, n_valid):
  """Exact attention of a chunk: q [B, T, K, G, H] over the held slots (dense) and the chunk's
  ck, cv [B, K, T, H] (blockwise causal), merged online. Returns out [B, T, N, H]."""
  b, t = q.shape[:2]
  index = jnp.arange(t, dtype=jnp.int32)
  block = math.gcd(t, 256)
  chunk_stats = attn.blockwise_stats(
      q, lambda start: (jax.lax.dynamic_slice_in_dim(ck, start, block, axis=2),
                        jax.lax.dynamic_slice_in_dim(cv, start, block, axis=2)),
      attn.causal_visibility(jnp.broadcast_to(index, (b, t)), n_valid),
      attn.n_filled_blocks(n_valid, block), block)
  stats = attn.combine_stats(attn.attention_stats(q, held_k, held_v, held_mask), chunk_stats)
  return attn.finish_stats(stats, q.dtype)


def compress(cache, st: Layer, ck, cv, held_gain, chunk_score, n_valid, positions) -> Layer:
  """Admits a whole chunk ck, cv [B, K, T, H] at once: held scores grow by held_gain [B, K, S],
  the chunk's tokens start at chunk_score [B, K, T]; the cache keeps the sinks, the window's
  most recent tokens and the `heavy` best scored. positions int32 [B, T]; n_valid [B]."""
  b, kh, t = ck.shape[:3]
  index = jnp.arange(t, dtype=jnp.int32)
  final = cache.lengths + n_valid  # [B]
  chunk_pos = jnp.broadcast_to(
      jnp.where(index[None, :] < n_valid[:, None], positions, -1)[:, None], (b, kh, t))
  if cache.shared_heads:
    return _compress_shared(cache, st, ck, cv, held_gain, chunk_score, chunk_pos, final)
  return _compress_ring(cache, st, ck, cv, held_gain, chunk_score, chunk_pos, final)


def _compress_shared(cache, st, ck, cv, held_gain, chunk_score, chunk_pos, final) -> Layer:
  """`compress` for a shared pool: one pool row for all heads, the chunk's K x T tokens join it."""
  b, kh, t = ck.shape[:3]
  p = cache.pool
  fold_heads = lambda x: x.reshape((b, 1, kh * t) + x.shape[3:])
  c_pos = jnp.concatenate([st.positions, fold_heads(chunk_pos)], axis=-1)
  c_score = jnp.concatenate([st.scores + fold(cache, held_gain[..., :p]),
                             fold_heads(chunk_score)], axis=-1)
  c_heads = jnp.concatenate(
      [st.heads, jnp.broadcast_to(jnp.repeat(jnp.arange(kh, dtype=jnp.int32), t), (b, 1, kh * t))],
      axis=-1)
  live = (chunk_pos >= 0)[..., None]
  keep = lambda x: fold_heads(jnp.where(live, x, 0))  # padding may hold anything
  payload = (append_encoded(st.k, keep(ck)), append_encoded(st.v, keep(cv)), c_heads)
  pos, score, (ks, vs, hd) = evict_topk(c_pos, c_score, payload, final, heavy=cache.heavy,
                                        window=cache.window, sink=cache.sink, slots=p)
  return Layer(ks, vs, st.ring_k, st.ring_v, pos, score, hd)


def _compress_ring(cache, st, ck, cv, held_gain, chunk_score, chunk_pos, final) -> Layer:
  """`compress` per kv head: the ring keeps the R newest of ring + chunk, the pool the rest."""
  ks, vs, rk, rv, pos, score, hd = st
  p, r = cache.pool, cache.residual
  fresh_pos = jnp.concatenate([pos[..., p:], chunk_pos], axis=-1)
  live = (fresh_pos >= 0)[..., None]  # padding may hold anything: keep it out of the sums below
  fresh_k = jnp.where(live, jnp.concatenate([rk.astype(ck.dtype), ck], axis=2), 0)  # [B,K,R+T,H]
  fresh_v = jnp.where(live, jnp.concatenate([rv.astype(cv.dtype), cv], axis=2), 0)
  fresh_score = jnp.concatenate([score[..., p:] + held_gain[..., p:p + r], chunk_score], axis=-1)
  in_ring = (fresh_pos >= 0) & (fresh_pos >= final[:, None, None] - r)
  onehot = in_ring[..., None] & (attn.ring_slot(fresh_pos, max(r, 1))[..., None]
                                 == jnp.arange(r, dtype=jnp.int32))  # [B, K, R + T, R]
  hot = onehot.astype(jnp.float32)
  rk = jnp.einsum("bkcr,bkch->bkrh", hot, fresh_k.astype(jnp.float32)).astype(rk.dtype)
  rv = jnp.einsum("bkcr,bkch->bkrh", hot, fresh_v.astype(jnp.float32)).astype(rv.dtype)
  ring_pos = jnp.where(jnp.any(onehot, axis=2),
                       jnp.sum(jnp.where(onehot, fresh_pos[..., None], 0), axis=2), -1)
  ring_score = jnp.sum(jnp.where(onehot, fresh_score[..., None], 0.0), axis=2)

  c_pos = jnp.concatenate([pos[..., :p], jnp.where(in_ring, -1, fresh_pos)], axis=-1)
  c_score = jnp.concatenate([score[..., :p] + held_gain[..., :p], fresh_score], axis=-1)
  c_pos, c_score, (ks, vs) = evict_topk(
      c_pos, c_score, (append_encoded(ks, fresh_k), append_encoded(vs, fresh_v)), final - r,
      heavy=cache.heavy, window=cache.window - r, sink=cache.sink)
  return Layer(ks, vs, rk, rv, jnp.concatenate([c_pos, ring_pos], axis=-1),
               jnp.concatenate([c_score, ring_score], axis=-1), hd)
