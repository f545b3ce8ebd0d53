"""The kernel layer: rotary embeddings, grouped-query attention, and the softmax pieces every cache
kind is built from.

Shapes use the axis letters of `kvjax.models.config`: B batch, T queries of this call, S key slots,
K kv heads, G query heads per kv head (N = K * G), H head dim.

Each piece exists once here and the cache kinds compose them:

* `prepare_queries`: the query prologue (softmax scale, GQA grouping to [B, T, K, G, H]). K/V heads
  are never repeated: each kv head serves its G query heads inside one einsum.
* `masked_softmax` / `attention_stats`: scores -> probabilities, or the (peak, total, acc) running
  statistics of an online softmax; `combine_stats` merges two sets over disjoint keys and
  `finish_stats` normalizes. Every masked softmax in kvjax goes through `_masked_exp`.
* `dense_attention`: queries against an explicit set of keys (small bounded caches, H2O, tiers).
* `blockwise_stats` / `blockwise_attention`: walk a preallocated buffer block by block and stop
  after the last block any row has filled, so a step's cost follows the tokens held, not the
  buffer's capacity.
* `prompt_attention`: a prompt over itself from nothing held, queries a chunk at a time so each
  chunk reads only the key blocks it can see (compression's prefill: ~2x fewer key blocks at long
  prompts, and no [T, T] array for a sliding window).
* `ring_slot` / `ring_position`: the index math of every ring buffer (window, tiers, H2O's
  residual ring, offload's device ring).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# A large negative score instead of -inf keeps the online softmax free of inf - inf = nan.
MASKED = -1e30


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoPE:
  """Rotary position embedding in the "rotate half" convention of HF Llama.

  Static and hashable: it is part of the model config, not of the traced state. Caches accept any
  object with `apply(x [..., T, heads, H], positions [..., T]) -> x rotated` in its place (or
  `rope=None` for a model without rotary positions).
  """

  head_dim: int
  theta: float = 10000.0

  def inv_freq(self) -> jax.Array:
    exponent = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    return 1.0 / (self.theta**exponent)  # [H/2]

  def apply(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotates `x` [..., T, heads, H] by `positions` [..., T] (int or float)."""
    cos, sin = self.tables(positions)  # [..., T, H/2]
    return self.rotate(x, cos[..., None, :], sin[..., None, :])

  def tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., H/2] (float32) of `positions` [...]."""
    angles = positions.astype(jnp.float32)[..., None] * self.inv_freq()
    return jnp.cos(angles), jnp.sin(angles)

  @staticmethod
  def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` [..., H] with tables that broadcast against [..., H/2]; keeps x's dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def apply_rope(rope, x: jax.Array, positions: jax.Array) -> jax.Array:
  """`rope.apply(x, positions)`, or x unchanged when `rope` is None (no rotary positions)."""
  return x if rope is None else rope.apply(x, positions)


def apply_rope_bounded(rope, x: jax.Array, positions: jax.Array, bound: int,
                       heads_first: bool = False) -> jax.Array:
  """Like `apply_rope` for positions [B, T] known to lie in [0, bound).

  x: [B, T, heads, H], or [B, heads, T, H] with `heads_first` (a cache buffer's layout).
  With kvjax's `RoPE` the angles come from one [bound, H/2] table by gather (constant-folded under
  jit) instead of cos/sin per element, which cost ~0.7 ms per layer in the window decode step.
  """
  if rope is None:
    return x
  if not isinstance(rope, RoPE):
    if heads_first:
      return rope.apply(x.swapaxes(1, 2), positions).swapaxes(1, 2)
    return rope.apply(x, positions)
  cos_t, sin_t = rope.tables(jnp.arange(bound, dtype=jnp.int32))  # [bound, H/2]
  cos, sin = cos_t[positions], sin_t[positions]  # [B, T, H/2]
  axis = 1 if heads_first else 2
  return rope.rotate(x, jnp.expand_dims(cos, axis), jnp.expand_dims(sin, axis))


# ---------------------------------------------------------------------------------------------
# Query prologue
# ---------------------------------------------------------------------------------------------
def group_queries(q: jax.Array, n_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, K, G, H]: query head n = k * G + g reads kv head k (HF's convention)."""
  b, t, n, h = q.shape
  if n % n_kv_heads:
    raise ValueError(f"{n} query heads cannot be grouped over {n_kv_heads} kv heads")
  return q.reshape(b, t, n_kv_heads, n // n_kv_heads, h)


def ungroup(out: jax.Array) -> jax.Array:
  """[B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def prepare_queries(q: jax.Array, n_kv_heads: int, scale: float | None = None) -> jax.Array:
  """The query prologue of every kind: q [B, T, N, H] -> scaled, grouped [B, T, K, G, H].

  scale: the softmax scale (default 1/sqrt(H)).
  """
  h = q.shape[-1]
  return group_queries(q * (h**-0.5 if scale is None else scale), n_kv_heads)


def check_attend_args(q, k, v, *, kv_heads: int, head_dim: int, what: str):
  """Clear errors for `cache.attend` arguments: q [B, T, N, H], k/v [B, T, K, H]."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{what}: q must be [batch, tokens, heads, head_dim] and k, v [batch, tokens, "
                     f"kv_heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
  if k.shape != v.shape:
    raise ValueError(f"{what}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
  if q.shape[:2] != k.shape[:2]:
    raise ValueError(f"{what}: q and k disagree on [batch, tokens]: {tuple(q.shape[:2])} vs "
                     f"{tuple(k.shape[:2])}")
  if k.shape[2] != kv_heads or k.shape[3] != head_dim or q.shape[3] != head_dim:
    raise ValueError(f"{what}: the cache has {kv_heads} kv heads of dim {head_dim}; got k "
                     f"{tuple(k.shape)} and q {tuple(q.shape)}")
  if q.shape[2] % kv_heads:
    raise ValueError(f"{what}: {q.shape[2]} query heads are not a multiple of {kv_heads} kv heads")


# ---------------------------------------------------------------------------------------------
# Softmax: one masked exponent, two finishes (probabilities, or online statistics)
# ---------------------------------------------------------------------------------------------
def scores_of(q: jax.Array, k: jax.Array) -> jax.Array:
  """q [B, T, K, G, H] (scaled) against k [B, K, S, H] -> fp32 scores [B, K, G, T, S]."""
  return jnp.einsum("btkgh,bksh->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)


def weighted_values(weights: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """weights [B, K, G, T, S] times v [B, K, S, H] -> fp32 [B, K, G, T, H]."""
  return jnp.einsum("bkgts,bksh->bkgth", weights.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32)


def _masked_exp(scores: jax.Array, mask: jax.Array):
  """(peak [..., 1], exp(scores - peak) where mask else 0): the one masked exponent of kvjax."""
  scores = jnp.where(mask, scores, MASKED)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  return peak, jnp.where(mask, jnp.exp(scores - peak), 0.0)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `mask`; a row that sees nothing gets zeros."""
  _, weights = _masked_exp(scores, mask)
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


def _expand_mask(mask: jax.Array) -> jax.Array:
  """A mask broadcastable to [B, K, T, S] -> broadcastable to [B, K, G, T, S]."""
  return mask[:, :, None]


def attention_stats(q, k, v, mask):
  """Unnormalized attention of q [B, T, K, G, H] over k, v [B, K, S, H] where mask (broadcastable
  to [B, K, T, S]) is true.

  Returns (peak, total [B, K, G, T], acc [B, K, G, T, H]): the running max, the sum of
  exp(score - peak), and the exp-weighted sum of values. Merge with `combine_stats`.
  """
  peak, weights = _masked_exp(scores_of(q, k), _expand_mask(mask))
  return peak[..., 0], jnp.sum(weights, axis=-1), weighted_values(weights, v, q.dtype)


def empty_stats(q: jax.Array):
  """Statistics of attention over no key, for q [B, T, K, G, H]."""
  b, t, kh, g, h = q.shape
  return (jnp.full((b, kh, g, t), MASKED, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, h), jnp.float32))


def combine_stats(a, b):
  """Merges two sets of softmax statistics over disjoint key sets."""
  pa, ta, aa = a
  pb, tb, ab = b
  peak = jnp.maximum(pa, pb)
  sa, sb = jnp.exp(pa - peak), jnp.exp(pb - peak)
  return peak, ta * sa + tb * sb, aa * sa[..., None] + ab * sb[..., None]


def finish_stats(stats, dtype) -> jax.Array:
  """Normalized output [B, T, N, H] in `dtype` (zeros for a query that saw no key)."""
  _, total, acc = stats
  return ungroup(acc / jnp.maximum(total, 1e-30)[..., None]).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
def dense_attention(q, k, v, mask, *, return_probs: bool = False):
  """Softmax attention of grouped queries over an explicit set of keys.

  Args:
    q: [B, T, K, G, H] queries, already rotated and scaled (`prepare_queries`).
    k: [B, K, S, H] keys (rotated).
    v: [B, K, S, H] values.
    mask: bool, broadcastable to [B, K, T, S]: which keys each query may see.
    return_probs: also return the attention probabilities [B, K, G, T, S] (fp32).

  Returns:
    out [B, T, N, H] in q's dtype (and probs when asked). A query that sees no key gets zeros.
  """
  probs = masked_softmax(scores_of(q, k), _expand_mask(mask))
  out = ungroup(weighted_values(probs, v, v.dtype)).astype(q.dtype)
  return (out, probs) if return_probs else out


def causal_attention(q, k, v, positions, n_valid=None, *, scale: float | None = None,
                     window: int | None = None):
  """Uncached causal attention over the T tokens of this call.

  Args:
    q: [B, T, N, H] rotated queries (unscaled); k, v: [B, T, K, H] rotated keys and values.
    positions: [B, T] token positions; key j is visible to query i iff pos_j <= pos_i (and, with
      a sliding `window` W, pos_i - W < pos_j: the W most recent positions, itself included).
    n_valid: optional [B]: only the first n_valid[b] tokens of row b are real.
  """
  t = q.shape[1]
  qg = prepare_queries(q, k.shape[2], scale)
  mask = positions[:, :, None] >= positions[:, None, :]  # [B, T, S=T]
  if window is not None:
    mask &= positions[:, None, :] > positions[:, :, None] - window
  if n_valid is not None:
    mask &= (jnp.arange(t)[None, None, :] < n_valid[:, None, None])
  return dense_attention(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask[:, None])


def blockwise_stats(q, load_block: Callable, visible: Callable, n_blocks, block_size: int,
                    first=0):
  """Online-softmax statistics over blocks [first, n_blocks) (run-time bounds) of `block_size`
  slots; `first` (default 0) skips blocks that hold no visible key (below a sliding window).

  load_block(start) -> (k, v [B, K, block_size, H]) of slots [start, start + block_size);
  visible(slots [block_size]) -> bool mask broadcastable to [B, K, T, block_size].
  Returns the statistics of `attention_stats` over every block read. Block 0 is always read, so
  load_block(0) must be valid even when n_blocks is 0 (its keys are then all invisible). Block
  `first` is read likewise: it must be 0 or a block below n_blocks (`window_first_block`).
  """

  def block_stats(j):
    start = j * block_size
    kb, vb = load_block(start)
    slots = start + jnp.arange(block_size, dtype=jnp.int32)
    return attention_stats(q, kb, vb, visible(slots))

  # Block 0 is read outside the loop: a decode step that holds at most one block (the common
  # case at batch 1) then runs no loop iteration. Measured on the 2-core CPU with SmolLM2: 3-7%
  # faster per step (medians of 5 runs, 3 process pairs). Block 0 over no visible key gives the
  # same statistics as empty_stats.
  return lax.fori_loop(first + 1, n_blocks, lambda j, s: combine_stats(s, block_stats(j)),
                       block_stats(first))


def causal_visibility(q_positions: jax.Array, kv_lengths: jax.Array,
                      window: int | None = None) -> Callable:
  """visible(slots) for a buffer where slot s holds position s: s < kv_lengths[b] and
  s <= q_positions[b, t], and with a sliding `window` W also s > q_positions[b, t] - W (the
  query sees its W most recent positions, itself included). Returns a [B, 1, T, bs] mask."""

  def visible(slots):
    mask = ((slots[None, None, :] <= q_positions[:, :, None])
            & (slots[None, None, :] < kv_lengths[:, None, None]))
    if window is not None:
      mask &= slots[None, None, :] > q_positions[:, :, None] - window
    return mask[:, None]

  return visible


def window_first_block(q_positions: jax.Array, window: int | None, n_blocks, block_size: int):
  """The first block a sliding `window` lets any query see: the block of the oldest visible
  position min(q_positions) - window + 1, kept in [0, max(n_blocks - 1, 0)]; 0 without a window."""
  if window is None:
    return 0
  oldest = jnp.min(q_positions) - window + 1
  return jnp.clip(oldest // block_size, 0, jnp.maximum(n_blocks - 1, 0)).astype(jnp.int32)


def n_filled_blocks(kv_lengths: jax.Array, block_size: int) -> jax.Array:
  """ceil(max(kv_lengths) / block_size): the blocks any row has filled."""
  return (jnp.max(kv_lengths) + block_size - 1) // block_size


def attend_prefix_blocks(q, load_block: Callable, q_positions, kv_lengths, block_size: int,
                         window: int | None = None):
  """Attention of q [B, T, K, G, H] (rotated, scaled) over a buffer whose slot s holds position s,
  read block by block with `load_block(start) -> (k, v [B, K, block_size, H])`: key s is visible to
  query (b, t) iff s < kv_lengths[b] and s <= q_positions[b, t] (and s > q_positions[b, t] - window
  with a sliding `window`); only the filled blocks at or above the window's oldest block are read.
  Returns [B, T, N, H] in q's dtype. The full, offloaded and shared kinds are this with their own
  `load_block`."""
  n_blocks = n_filled_blocks(kv_lengths, block_size)
  stats = blockwise_stats(q, load_block, causal_visibility(q_positions, kv_lengths, window),
                          n_blocks, block_size,
                          window_first_block(q_positions, window, n_blocks, block_size))
  return finish_stats(stats, q.dtype)


def blockwise_attention(q, k_buf, v_buf, q_positions, kv_lengths, *, block_size: int,
                        load_block=None):
  """Online-softmax attention over the filled blocks of a preallocated buffer.

  Slot s holds the token at position s. Key s is visible to query (b, t) iff
  s < kv_lengths[b] and s <= q_positions[b, t]. Only blocks below max(kv_lengths) are read: the
  loop runs ceil(max(kv_lengths) / block_size) iterations, a number known only at run time.

  Args:
    q: [B, T, K, G, H] grouped queries, rotated and scaled.
    k_buf, v_buf: [B, K, S, H] buffers (or whatever `load_block` understands).
    q_positions: [B, T] int32.
    kv_lengths: [B] int32 filled slots per row.
    block_size: static; must divide S.
    load_block: optional `fn(k_buf, v_buf, start) -> (k [B, K, bs, H], v [B, K, bs, H])`, for
      storages that keep blocks in another form (quantized, offloaded). Defaults to a slice.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  if load_block is None:
    def load_block(kb, vb, start):
      return (lax.dynamic_slice_in_dim(kb, start, block_size, axis=2),
              lax.dynamic_slice_in_dim(vb, start, block_size, axis=2))

  return attend_prefix_blocks(q, lambda start: load_block(k_buf, v_buf, start), q_positions,
                              kv_lengths, block_size)


def prompt_attention(q, k, v, n_valid, *, scale: float | None = None, window: int | None = None,
                     block_size: int = 256, chunk: int = 1024):
  """Causal attention of a prompt over itself, from nothing held: q [B, T, N, H], k, v [B, T, K, H]
  rotated at positions 0..T-1, the first n_valid[b] tokens of row b real. Returns [B, T, N, H].

  Queries go `chunk` at a time and each chunk reads only the key blocks it can see: those below
  its last query, and with a sliding `window` none older than its first query's window. Without a
  window that is (n + 1) / 2n of the [T, T] work for n chunks (a single blockwise pass reads the
  masked upper triangle too: 2x at long prompts); with one, a band of width ~window + chunk. No
  [T, T] array is ever held (`causal_attention` builds one: fine for short prompts only)."""
  b, t, _, _ = q.shape
  block = min(block_size, t)
  kb, vb = (jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, -t % block), (0, 0))) for x in (k, v))
  qg = prepare_queries(q, k.shape[2], scale)  # [B, T, K, G, H]

  def load_block(start):
    return (lax.dynamic_slice_in_dim(kb, start, block, axis=2),
            lax.dynamic_slice_in_dim(vb, start, block, axis=2))

  def run(qc, first):  # queries first..first + len(qc) - 1
    positions = jnp.broadcast_to(first + jnp.arange(qc.shape[1], dtype=jnp.int32), (b, qc.shape[1]))
    seen = jnp.minimum(n_valid, first + qc.shape[1])  # no key past the chunk's last query
    return attend_prefix_blocks(qc, load_block, positions, seen, block, window)

  chunk = min(chunk, t)
  n_chunks = -(-t // chunk)
  if n_chunks == 1:
    return run(qg, 0)
  qg = jnp.pad(qg, ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0), (0, 0)))
  out = lax.map(lambda i: run(lax.dynamic_slice_in_dim(qg, i * chunk, chunk, axis=1), i * chunk),
                jnp.arange(n_chunks, dtype=jnp.int32))  # [n_chunks, B, chunk, N, H]
  return out.swapaxes(0, 1).reshape(b, n_chunks * chunk, *out.shape[3:])[:, :t]


# ---------------------------------------------------------------------------------------------
# Ring buffers
# ---------------------------------------------------------------------------------------------
def ring_slot(position, size: int, offset: int = 0):
  """Slot of `position` in a ring of `size` slots whose slot 0 holds positions offset,
  offset + size, ...: (position - offset) mod size (int32, any shape)."""
  return jnp.mod(position - offset, size).astype(jnp.int32)


def ring_position(slot, end, size: int, offset: int = 0):
  """The newest position p < end that ring slot `slot` holds: p = slot + offset (mod size) with
  end - size <= p < end. It may be negative or below `offset` (the slot was never written);
  callers mask those. Broadcasts over `slot` and `end`."""
  low = end - size
  return (low + jnp.mod(slot + offset - low, size)).astype(jnp.int32)
