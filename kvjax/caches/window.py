"""Sliding-window cache with optional attention sinks (StreamingLLM): fixed memory, endless streams.

Spec terms: `window:N` (keep the N most recent tokens) and `sink:S+window:N` (also keep the first S
tokens of the row forever). Memory is S + N slots per row, layer and kv head, allocated once; a
row can be decoded for any number of tokens.

Layout (per layer):

  slots   | 0 .. S-1           | S .. S+N-1                                   |
  holds   | positions 0 .. S-1 | ring: position p >= S lives in S + (p-S) % N |

  k, v: [L, B, K, S+N, H] UN-rotated keys and values.
  pos: int32 [B, S+N], the original position each slot holds (-1 where empty).
  lengths: int32 [B], tokens each row has seen (= position of its next token).

RoPE decision: positions inside the cache, not original positions. Keys are stored un-rotated and
rotated on every read. A query at original position p attends over the sinks i < S and the window
(p - N, p] (itself included), at the relative distances it would have if the cache's contents were
a contiguous sequence, as StreamingLLM does:

  window key j:  distance p - j                (the true distance; always < N)
  sink key i:    distance min(p, S+N-1) - i    (sinks sit just before the window once it is full)

Why: with original positions, a query at position 20,000 would be 20,000 away from the sinks, far
beyond the context the model was trained on (8192 for SmolLM2), and attention to sinks (the whole
point of keeping them) degrades. With cache positions every distance stays below S + N, however
long the stream. Queries and keys are rotated at small absolute angles too (each chunk is rotated
relative to `d = max(0, lengths - (S+N-1))`), so fp32 RoPE stays exact to the last bit for 20k+
streams instead of losing precision in `position * inv_freq`. Before the window fills (p < S+N-1)
both distances equal the original ones, so a window larger than the sequence is the full cache.

Invariants (tests/caches/test_window.py checks them against a NumPy oracle):
  * after any sequence of appends (ragged `n_valid` included), row b holds exactly its first S
    tokens and its last N tokens (the two sets may overlap early on: then each token is held once),
    each in the slot given by the layout above; `view().positions` names them and `view().mask`
    is true exactly on the occupied slots;
  * padding tokens (t >= n_valid[b]) are never written and never evict anything;
  * `attend` over a chunk of T tokens gives every query exactly what token-by-token decoding would:
    it scores [held slots] + [the chunk's own tokens] with masks by position, and only then writes
    the tokens that survive the chunk into the ring (long chunks go through in sub-blocks of
    `block` tokens, so prefill memory is O(block * (S + N + block)), not O(T^2));
  * every array has a fixed shape: nothing is O(tokens). `has_room`/`fits` are always true and the
    mixin `base.Evicting` (`limited = False`) tells `kvjax.append` there is no capacity to overflow.

`crop(length)` marks slots at positions >= length empty; tokens the cropped ones had already
evicted do not come back, so after a crop the window may hold fewer than N tokens.

Slack (static `slack`, default 0): the ring holds N + slack tokens while attention still sees only
the N most recent positions (every mask is `kp > qp - N`). The extra slots keep tokens a later
`crop` of up to `slack` tokens brings back into the window: speculative decoding writes
draft_tokens + 1 tokens, then crops the rejected ones, so its main cache is built with
slack = draft_tokens + 1 and stays exact. Slot, eviction and rotation-origin math use the ring
size R = N + slack (position p >= S lives in slot S + (p-S) % R); with slack 0 nothing changes.
`view()` lists every held slot, slack ones included (attention hides those past the window).

Absolute (static `absolute`, sink 0 only): a model's own sliding-window layers (Gemma 3) were
trained with true positions, so there is no reason to re-index them. `attend` then rotates each
new key once, at its true position, before storing it, and each query at its own, like the full
cache; the ring's keys are stored rotated and never rotated again. Same distances as above (no
sinks: the window's distances are the true ones), so the same attention up to rounding, but the
decode step no longer rotates the whole ring: measured on Gemma 3 270M (2-core CPU, 80 tokens)
this was 12% of the step at batch 1 and 22% at batch 8. The hybrid layouts build the window
groups of a model's sliding layers this way; `window:N` specs elsewhere keep cache positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches import base, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches.registry import SpecError


class UnsupportedWindowSpec(SpecError, NotImplementedError):
  """A window/sink spec combined with a storage option this kind does not implement yet."""


# ---------------------------------------------------------------------------------------------
# Pure helpers on one layer's storage
# ---------------------------------------------------------------------------------------------
def slot_of(positions: jax.Array, sink: int, window: int) -> jax.Array:
  """Slot that holds the token at each position (int32, any shape). `window` here and in the
  helpers below is the ring size (the cache's window + slack)."""
  ring = sink + attn.ring_slot(positions, window, offset=sink)
  return jnp.where(positions < sink, positions, ring).astype(jnp.int32)


def target_slots(lengths, n_valid, tokens: int, sink: int, window: int) -> jax.Array:
  """int32 [B, T]: where each new token goes, or S+N (out of bounds: dropped) when it is padding
  or when a later token of the same chunk evicts it before the chunk ends."""
  positions = base.row_slots(lengths, tokens)  # [B, T]
  final = (lengths + n_valid)[:, None]
  real = jnp.arange(tokens, dtype=jnp.int32)[None, :] < n_valid[:, None]
  survives = real & ((positions < sink) | (positions >= final - window))
  return jnp.where(survives, slot_of(positions, sink, window), sink + window)


def next_positions(pos, lengths, n_valid, sink: int, window: int) -> jax.Array:
  """pos [B, S+N] after n_valid [B] tokens are appended at `lengths` (computed slot by slot)."""
  slots = jnp.arange(sink + window, dtype=jnp.int32)[None, :]  # [1, S+N]
  start, final = lengths[:, None], (lengths + n_valid)[:, None]
  # Sink slot i receives position i; ring slot S + r the newest position p < final with
  # p >= S and p = S + r (mod N).
  latest = jnp.where(slots < sink, slots, attn.ring_position(slots - sink, final, window, sink))
  written = (latest >= start) & (latest < final) & ((slots < sink) | (latest >= sink))
  return jnp.where(written, latest, pos).astype(jnp.int32)


def scatter_tokens(buf, x, slots):
  """buf [B, K, S+N, H] with x [B, T, K, H] stored at slots [B, T] (out-of-range slots dropped)."""
  rows = jnp.arange(buf.shape[0])[:, None]
  return buf.at[rows, :, slots, :].set(x.astype(buf.dtype), mode="drop")


def window_attention(k_held, v_held, pos_held, lengths, q, k, v, n_valid, rope, *,
                     sink: int, window: int, scale: float | None = None):
  """Attention of T new queries over the held slots plus the chunk's own tokens.

  Args:
    k_held, v_held: [B, K, S+N, H] one layer's stored (un-rotated) keys and values.
    pos_held: int32 [B, S+N(+slack)] positions of the held slots (-1 empty); slack slots hold
      older tokens, masked like any key outside the window.
    lengths: int32 [B] position of each row's first new token.
    q: [B, T, N, H]; k, v: [B, T, K, H] new tokens, un-rotated (k, v already in storage dtype).
    n_valid: int32 [B]; only the first n_valid[b] new tokens of row b are real keys.
    rope: position encoding with `apply`, or None; scale: softmax scale (default 1/sqrt(H)).

  Returns:
    [B, T, N, H]: query (b, t) at p = lengths[b] + t attends to keys at positions < S and in
    (p - N, p], at the cache-position distances of the module docstring.
  """
  t = q.shape[1]
  kv_heads = k_held.shape[1]
  last = sink + window - 1
  q_pos = base.row_slots(lengths, t)  # [B, T]
  shift = jnp.maximum(lengths - last, 0)[:, None]  # [B, 1]: rotation origin of this chunk

  key_pos = jnp.concatenate([pos_held, q_pos], axis=1)  # [B, S+N+T]
  is_sink = key_pos < sink
  rot_pos = jnp.maximum(jnp.where(is_sink, key_pos, key_pos - shift), 0)
  keys = jnp.concatenate([k_held.transpose(0, 2, 1, 3), k.astype(k_held.dtype)], axis=1)
  keys = attn.apply_rope(rope, keys, rot_pos).transpose(0, 2, 1, 3)  # [B, K, S+N+T, H]
  values = jnp.concatenate([v_held, v.astype(v_held.dtype).transpose(0, 2, 1, 3)], axis=2)

  # Window distances p - j: rotate both sides shifted by the same amount.
  q_win = attn.prepare_queries(attn.apply_rope(rope, q, q_pos - shift), kv_heads, scale)
  scores = attn.scores_of(q_win, keys)  # [B, K, G, T, S+N+T]
  if sink and rope is not None:
    # Sink distances min(p, S+N-1) - i: the query sits at the last cache position.
    q_snk = attn.prepare_queries(attn.apply_rope(rope, q, jnp.minimum(q_pos, last)), kv_heads, scale)
    scores = jnp.where(is_sink[:, None, None, None, :], attn.scores_of(q_snk, keys), scores)

  live = jnp.concatenate([pos_held >= 0,
                          jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]], axis=1)
  qp, kp = q_pos[:, :, None], key_pos[:, None, :]
  mask = live[:, None, :] & (kp <= qp) & ((kp < sink) | (kp > qp - window))  # [B, T, S+N+T]
  probs = attn.masked_softmax(scores, mask[:, None, None])
  return attn.ungroup(attn.weighted_values(probs, values, values.dtype)).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class WindowCache(base.Evicting):
  """S sink slots + an (N + slack)-slot ring per row. k, v [L, B, K, S+N+slack, H] (un-rotated);
  pos int32 [B, S+N+slack] (-1 empty); lengths int32 [B]. sink, window, block, slack are static
  (attention sees the N most recent tokens; slack only keeps more for `crop`)."""

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  lengths: jax.Array
  sink: int = struct.field(pytree_node=False, default=0)
  window: int = struct.field(pytree_node=False, default=1)
  block: int = struct.field(pytree_node=False, default=256)
  slack: int = struct.field(pytree_node=False, default=0)
  absolute: bool = struct.field(pytree_node=False, default=False)  # keys stored rotated

  # A ring buffer never overflows: kvjax.append must not raise capacity errors.

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, window: int,
           sink: int = 0, dtype=jnp.float32, block: int = 256, slack: int = 0,
           absolute: bool = False) -> "WindowCache":
    if not isinstance(window, int) or window <= 0:
      raise ValueError(f"WindowCache: window must be a positive int, got {window!r}")
    if not isinstance(sink, int) or sink < 0:
      raise ValueError(f"WindowCache: sink must be a non-negative int, got {sink!r}")
    if not isinstance(block, int) or block <= 0:
      raise ValueError(f"WindowCache: block must be a positive int, got {block!r}")
    if not isinstance(slack, int) or slack < 0:
      raise ValueError(f"WindowCache: slack must be a non-negative int, got {slack!r}")
    if absolute and sink:
      raise ValueError(f"WindowCache: absolute positions need sink 0 (sinks are re-indexed), got "
                       f"sink={sink}")
    slots = sink + window + slack
    shape = (n_layers, batch, kv_heads, slots, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               pos=jnp.full((batch, slots), -1, jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
               sink=sink, window=window, block=block, slack=slack, absolute=bool(absolute))

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def _layout(self):
    return self.k

  @property
  def ring(self) -> int:
    """Ring slots: the window plus the slack."""
    return self.window + self.slack

  def filled(self) -> jax.Array:
    """int32 [B]: slots that hold a token."""
    return jnp.sum(self.pos >= 0, axis=1).astype(jnp.int32)

  # ---- protocol -------------------------------------------------------------------------------
  def write(self, layer: int, k, v, n_valid=None) -> "WindowCache":
    """Stores k, v [B, T, K, H] (as given, un-rotated) of one layer; lengths and pos unchanged
    (`advance` updates both). Padding and tokens evicted within the chunk are not written."""
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1], what="write")
    slots = target_slots(self.lengths, n_valid, k.shape[1], self.sink, self.ring)
    rows = jnp.arange(self.batch)[:, None]  # [B, 1]; self.k[layer, rows, :, slots] is [B, T, K, H]
    return self.replace(
        k=self.k.at[layer, rows, :, slots, :].set(k.astype(self.k.dtype), mode="drop"),
        v=self.v.at[layer, rows, :, slots, :].set(v.astype(self.v.dtype), mode="drop"))

  def advance(self, n_valid) -> "WindowCache":
    n_valid = jnp.asarray(n_valid, jnp.int32)
    pos = next_positions(self.pos, self.lengths, n_valid, self.sink, self.ring)
    return self.replace(pos=pos, lengths=self.lengths + n_valid)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Attention of q [B, T, N, H] over what the cache holds at each new token; stores the
    survivors of k, v [B, T, K, H]. Returns (out [B, T, N, H], cache)."""
    t = q.shape[1]
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    if self.absolute:  # rotate once, at the true positions; the ring stores rotated keys
      q, k = attn.apply_rope(rope, q, positions), attn.apply_rope(rope, k, positions)
      rope = None
    k = k.astype(self.k.dtype)
    v = v.astype(self.v.dtype)
    opts = dict(rope=rope, sink=self.sink, window=self.window, scale=scale)
    if t == 1:
      return self._attend_one(layer, q, k, v, n_valid, rope, scale)
    if t <= self.block:
      out = window_attention(self.k[layer], self.v[layer], self.pos, self.lengths, q, k, v,
                             n_valid, **opts)
      return out, self.write(layer, k, v, n_valid)

    # Long chunk: sub-blocks of `block` tokens, each attending over the ring as the previous
    # sub-blocks left it (same result as one big chunk, without the T x T score matrix).
    blk = self.block
    n_sub = -(-t // blk)
    pad = n_sub * blk - t

    def split(x):  # [B, T, ...] -> [n_sub, B, blk, ...]
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
      return x.reshape(x.shape[0], n_sub, blk, *x.shape[2:]).swapaxes(0, 1)

    def body(carry, xs):
      k_l, v_l, pos, lengths, remaining = carry
      q_i, k_i, v_i = xs
      nv = jnp.clip(remaining, 0, blk)
      out = window_attention(k_l, v_l, pos, lengths, q_i, k_i, v_i, nv, **opts)
      slots = target_slots(lengths, nv, blk, self.sink, self.ring)
      k_l, v_l = scatter_tokens(k_l, k_i, slots), scatter_tokens(v_l, v_i, slots)
      pos = next_positions(pos, lengths, nv, self.sink, self.ring)
      return (k_l, v_l, pos, lengths + nv, remaining - nv), out

    init = (self.k[layer], self.v[layer], self.pos, self.lengths, n_valid)
    (k_l, v_l, _, _, _), out = jax.lax.scan(body, init, (split(q), split(k), split(v)))
    out = out.swapaxes(0, 1).reshape(q.shape[0], n_sub * blk, *q.shape[2:])[:, :t]
    return out, self.replace(k=self.k.at[layer].set(k_l), v=self.v.at[layer].set(v_l))

  def _attend_one(self, layer: int, q, k, v, n_valid, rope, scale):
    """The decode step (T = 1): write first, then attend over the layer's slots in place.

    After the write the slots hold exactly what the new query may see (the sinks and the last N
    tokens, itself included), so, unlike a chunk, nothing has to be scored before it is stored
    and the held keys are never concatenated with the new one. The layer's buffer is read after
    the scatter, as in the full cache, so XLA updates it in place instead of copying the cache.
    Same distances as `window_attention`; every rotation is by a cache position < S+N, so the
    angles come from one table (`attention.apply_rope_bounded`).
    """
    sink, window = self.sink, self.window
    last = sink + window - 1
    bound = sink + window
    cache = self.write(layer, k, v, n_valid)
    pos = next_positions(self.pos, self.lengths, n_valid, sink, self.ring)  # [B, S+N+slack]
    q_pos = self.lengths[:, None]  # [B, 1]
    if self.absolute:
      return self._attend_filled(layer, cache, q, pos, q_pos, scale), cache
    shift = jnp.maximum(self.lengths - last, 0)[:, None]  # [B, 1]
    is_sink = jnp.arange(self.capacity, dtype=jnp.int32)[None, :] < sink  # sink slots hold sinks
    rot_pos = jnp.maximum(jnp.where(is_sink, pos, pos - shift), 0)  # in [0, S+N) (slack: < 0
    # before the clip, and masked below)
    keys = attn.apply_rope_bounded(rope, cache.k[layer], rot_pos, bound, heads_first=True)

    def queries(at):  # at [B, 1] in [0, S+N) -> [B, 1, K, G, H], rotated and scaled
      return attn.prepare_queries(attn.apply_rope_bounded(rope, q, at, bound), self.kv_heads, scale)

    scores = attn.scores_of(queries(q_pos - shift), keys)  # [B, K, G, 1, S+N]
    if sink and rope is not None:
      s_snk = attn.scores_of(queries(jnp.minimum(q_pos, last)), keys[:, :, :sink])
      scores = jnp.concatenate([s_snk, scores[..., sink:]], axis=-1)
    visible = (pos >= 0) & (pos <= q_pos) & ((pos < sink) | (pos > q_pos - window))
    visible = visible[:, None, None, None, :]  # [B, 1, 1, 1, S+N+slack]
    probs = attn.masked_softmax(scores, visible)
    out = attn.weighted_values(probs, cache.v[layer], cache.v.dtype)  # [B, K, G, 1, H]
    return attn.ungroup(out).astype(q.dtype), cache

  def _attend_filled(self, layer: int, cache, q, pos, q_pos, scale):
    """The absolute ring's decode attention (q [B, 1, N, H] and the stored keys rotated at true
    positions): only the blocks of slots filled so far are read. Slots fill in order until the
    ring wraps, so every held slot lies below min(length + 1, capacity): a short stream reads a
    fraction of the ring, a long one all of it (then every slot is live)."""
    size = next((b for b in (128, 64, 32) if self.capacity % b == 0), self.capacity)
    filled = jnp.minimum(self.lengths + 1, self.capacity)
    k_l, v_l = cache.k[layer], cache.v[layer]

    def load_block(start):
      return (jax.lax.dynamic_slice_in_dim(k_l, start, size, axis=2),
              jax.lax.dynamic_slice_in_dim(v_l, start, size, axis=2))

    def visible(slots):  # [B, 1, 1, size]
      p = jax.lax.dynamic_slice_in_dim(pos, slots[0], size, axis=1)  # [B, size]
      return ((p >= 0) & (p <= q_pos) & (p > q_pos - self.window))[:, None, None, :]

    qg = attn.prepare_queries(q, self.kv_heads, scale)
    stats = attn.blockwise_stats(qg, load_block, visible, attn.n_filled_blocks(filled, size), size)
    return attn.finish_stats(stats, q.dtype)

  def view(self) -> base.CacheView:
    """Stored (un-rotated) keys/values [L, B, K, S+N, H], mask and positions [L, B, K, S+N]."""
    shape = (self.n_layers, self.batch, self.kv_heads, self.capacity)
    positions = jnp.broadcast_to(self.pos[None, :, None, :], shape)
    return base.CacheView(keys=self.k, values=self.v, mask=positions >= 0, positions=positions)

  def reset(self) -> "WindowCache":
    """Empty cache of the same shapes (stale buffers hidden by pos = -1)."""
    return self.replace(pos=jnp.full_like(self.pos, -1), lengths=jnp.zeros_like(self.lengths))

  def crop(self, length) -> "WindowCache":
    """Forgets every token at position >= length (scalar or per row [B]). Tokens that those had
    already evicted are gone for good, so the window may then hold fewer than N tokens."""
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), self.lengths.shape)
    return self.replace(pos=jnp.where(self.pos >= length[:, None], -1, self.pos),
                        lengths=jnp.minimum(self.lengths, length))

  def reorder(self, indices) -> "WindowCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    return self.replace(k=jnp.take(self.k, indices, axis=1), v=jnp.take(self.v, indices, axis=1),
                        pos=jnp.take(self.pos, indices, axis=0),
                        lengths=jnp.take(self.lengths, indices, axis=0))


def slide(cache: WindowCache, k, v, n_valid=None) -> WindowCache:
  """Appends k, v [L, B, K, T, H] to every layer of a window cache, evicting the oldest non-sink
  tokens of each row; only the first n_valid[b] tokens of row b are real. Pure and jittable.

  Same result as `kvjax.append` on a window cache, with one scatter for all layers.
  """
  if not isinstance(cache, WindowCache):
    raise TypeError(f"slide needs a WindowCache (spec window:N or sink:S+window:N), "
                    f"got {type(cache).__name__}; use kvjax.append for other kinds")
  base.check_new_kv(k, v, n_layers=cache.n_layers, batch=cache.batch, kv_heads=cache.kv_heads,
                    head_dim=cache.head_dim, what="slide")
  tokens = k.shape[3]
  n_valid = base.normalize_n_valid(n_valid, cache.batch, tokens, what="slide")
  slots = target_slots(cache.lengths, n_valid, tokens, cache.sink, cache.ring)  # [B, T]
  rows = jnp.arange(cache.batch)[:, None]
  # cache.k[:, rows, :, slots, :] has shape [B, T, L, K, H].
  new_k = cache.k.at[:, rows, :, slots, :].set(k.transpose(1, 3, 0, 2, 4).astype(cache.k.dtype),
                                               mode="drop")
  new_v = cache.v.at[:, rows, :, slots, :].set(v.transpose(1, 3, 0, 2, 4).astype(cache.v.dtype),
                                               mode="drop")
  return cache.replace(k=new_k, v=new_v).advance(n_valid)


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32,
              block: int = 256, slack: int = 0, absolute: bool = False) -> WindowCache:
  """`window:N` and `sink:S+window:N` specs. `capacity` is not used: the budget sizes the cache.

  block: prefill sub-block length (chunks longer than this are attended in sub-blocks).
  slack: extra ring slots that a `crop` of up to `slack` tokens can fall back on (speculative
  decoding's main cache); attention still sees `window` tokens.
  absolute: store keys rotated at their true positions (sink 0; a model's own sliding layers).
  """
  if spec.window is None:
    raise SpecError(f"cache spec {str(spec)!r} has no window:N term; the window kind needs one")
  if spec.bits is not None:
    raise UnsupportedWindowSpec(
        f"cache spec {str(spec)!r}: quantized (int{spec.bits}) storage is not supported by the "
        "window/sink cache yet; drop the intN term or use a tier:... spec")
  if spec.h2o is not None or spec.tiers is not None or spec.offload or spec.share > 1:
    raise UnsupportedWindowSpec(f"cache spec {str(spec)!r} is not a plain window/sink spec")
  return WindowCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                          head_dim=config.head_dim, window=spec.window, sink=spec.sink, dtype=dtype,
                          block=block, slack=slack, absolute=absolute and spec.sink == 0)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """k, v [L, B, K, S+N, H], pos [B, S+N] and lengths [B]; the context does not matter."""
  slots = spec.sink + spec.window
  per_token = codec_lib.of_dtype(dtype).token_bytes(config.head_dim)  # a cast: H x itemsize
  return 2 * registry.streams(config, batch) * slots * per_token + 4 * batch * (slots + 1)


def _check_sink(spec):
  if not isinstance(spec.sink, int) or spec.sink < 0:
    raise SpecError(f"sink:{spec.sink} must be a non-negative integer")
  terms.needs(spec, f"sink:{spec.sink}", "window",
              hint="a window:N term (sinks are kept beside a recent window)")


WINDOW = terms.int_term("window", "keep the N most recent tokens (ring buffer)", kind="window",
                        rank=30, order=41)
SINK = terms.Term(
    name="sink", usage="sink:S", doc="also keep the first S tokens forever (StreamingLLM; needs "
    "window)", fields=(("sink", 0),), parse=lambda word, text: {"sink": terms.integer(word, text)},
    show=lambda spec: f"sink:{spec.sink}", check=_check_sink, order=40)

registry.register_kind("window", from_spec, estimate_bytes=estimate_bytes, terms=(WINDOW, SINK),
                       budget=lambda spec: spec.window + spec.sink,
                       capacity=registry.budget_capacity, builtin=True,
                       description="the N most recent tokens (with sink:S, also the first S)")
