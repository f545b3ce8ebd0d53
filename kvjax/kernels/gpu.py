"""GPU attention: Pallas (Triton) decode kernels; `jax.nn.dot_product_attention` for prefill.

* `paged_decode`: `jax.experimental.pallas.ops.gpu.paged_attention` over kvjax's paged pool, which
  is already the kernel's layout ([K, pages, page_size, H] per layer and stream);
* `contiguous_decode`: `jax.experimental.pallas.ops.gpu.decode_attention.gqa` over a full cache's
  [B, K, S, H] buffer (a sliding window is its `start_idx`); `contiguous_decode_stats` returns
  the kernel's partial softmax statistics (`return_residuals`) in kvjax's (peak, total, acc) form,
  which `attention.combine_stats` merges (the statistics slot sharding combines).

`contiguous_prefill` is no Pallas kernel: several queries per row (a prefill chunk) over a full
cache's whole layer buffer through `jax.nn.dot_product_attention` with a boolean mask (the chunk is
written before attention, so the buffer holds the cached prefix and the chunk).

The decode kernels take one query per row, already scaled (kvjax's `prepare_queries`): the kernels
are called with a softmax scale of 1. Triton wants power-of-two blocks of at least 16 tokens;
`paged_blocks` and `decode_blocks` pick them or return None (the resolver then keeps the jnp path).
With `interpret=True` the kernel runs in Pallas interpret mode (any platform, CPU included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import decode_attention as _decode
from jax.experimental.pallas.ops.gpu import paged_attention as _paged

MIN_BLOCK = 16  # tokens: Triton's smallest dot


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _head_ok(head_dim: int) -> bool:
  return _pow2(head_dim) and head_dim >= MIN_BLOCK


def paged_blocks(pages_per_row, page_size, head_dim: int) -> tuple[int, int] | None:
  """(k_splits, pages_per_compute_block) for M = `pages_per_row` pages of P = `page_size`: a
  compute block of a power of two >= 16 tokens (the largest up to 128, else the smallest) whose
  pages divide M, and the most splits (<= 16) of M into whole compute blocks; None if none."""
  if not pages_per_row or not page_size or not _head_ok(head_dim):
    return None
  fits = [d for d in _divisors(pages_per_row) if _pow2(d * page_size) and d * page_size >= MIN_BLOCK]
  if not fits:
    return None
  small = [d for d in fits if d * page_size <= 128]
  per_block = max(small) if small else min(fits)
  splits = max(d for d in _divisors(pages_per_row // per_block) if d <= 16)
  return splits, per_block


def decode_blocks(slots, head_dim: int) -> tuple[int, int] | None:
  """(k_splits, block_k) for a buffer of S = `slots`: the most splits (<= 16) of S into parts of
  >= 16 slots that a power-of-two block_k in [16, 128] divides; None if none."""
  if not slots or not _head_ok(head_dim):
    return None
  for splits in sorted((d for d in _divisors(slots) if d <= 16), reverse=True):
    part = slots // splits
    blocks = [b for b in (128, 64, 32, 16) if b <= part and part % b == 0]
    if blocks:
      return splits, blocks[0]
  return None


def paged_decode(q, k_pages, v_pages, table, lengths, scales=None, *,
                 interpret: bool = False) -> jax.Array:
  """Attention of one query per row over its pages.

  q: [B, N, H] scaled queries. k_pages, v_pages: [K, pages, page_size, H]. table: int32 [B, M],
  every entry a page in range (kvjax's "no page" marker clamped: those pages lie at or past the
  row's length and are masked). lengths: int32 [B] keys each row sees (its first ones).
  scales: None (float pages), or (key, value) scales [K, pages, page_size] of fp8 code pages
  (a key or value is code x its token's scale, kvjax's fp8 codec); the kernel casts the codes to
  q's dtype and applies the scales to the logits and the probabilities.
  Returns [B, N, H] in q's dtype (zeros for a row of length 0).
  """
  splits, per_block = paged_blocks(table.shape[1], k_pages.shape[2], q.shape[-1])
  k_scales, v_scales = (None, None) if scales is None else scales
  q_in = q.astype(k_pages.dtype) if scales is None else q
  out = _paged.paged_attention(q_in, k_pages, v_pages, table, lengths, k_scales, v_scales,
                               k_splits=splits, pages_per_compute_block=per_block,
                               interpret=interpret)
  return out.astype(q.dtype)


def _gqa(q, k, v, lengths, start, *, interpret: bool, residuals: bool):
  splits, block_k = decode_blocks(k.shape[2], q.shape[-1])
  return _decode.gqa(q.astype(k.dtype), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                     start_idx=start, kv_seq_len=lengths, sm_scale=1.0, k_splits=splits,
                     block_k=block_k, interpret=interpret, return_residuals=residuals,
                     normalize_output=not residuals)


def contiguous_decode(q, k, v, lengths, start=None, *, interpret: bool = False) -> jax.Array:
  """Attention of one query per row over slots [start, lengths) of a contiguous buffer.

  q: [B, N, H] scaled queries. k, v: [B, K, S, H] (slot s holds position s). lengths: int32 [B].
  start: int32 [B] first visible slot (a sliding window), or None (0).
  Returns [B, N, H] in q's dtype (zeros for a row that sees no slot).
  """
  return _gqa(q, k, v, lengths, start, interpret=interpret, residuals=False).astype(q.dtype)


def contiguous_decode_stats(q, k, v, lengths, start=None, *, interpret: bool = False):
  """The kernel's unnormalized attention as kvjax's statistics (peak, total [B, K, G, 1],
  acc [B, K, G, 1, H], fp32) for `attention.combine_stats` / `finish_stats`. Arguments as
  `contiguous_decode`."""
  b, n, h = q.shape
  kh = k.shape[1]
  acc, (total, peak) = _gqa(q, k, v, lengths, start, interpret=interpret, residuals=True)
  shape = (b, kh, n // kh, 1)
  return (peak.reshape(shape), total.reshape(shape),
          acc.astype(jnp.float32).reshape(shape + (h,)))


def prefill_mask(positions, lengths, slots: int, window=None) -> jax.Array:
  """bool [B, T, S]: slot s (position s) is visible to query (b, t) iff s <= positions[b, t] and
  s < lengths[b] (and s > positions[b, t] - window with a sliding `window`): the jnp path's
  `attention.causal_visibility` over the whole buffer."""
  s = jnp.arange(slots, dtype=jnp.int32)[None, None, :]
  mask = (s <= positions[:, :, None]) & (s < lengths[:, None, None])
  if window is not None:
    mask &= s > positions[:, :, None] - window
  return mask


def contiguous_prefill(q, k, v, positions, lengths, window=None, *,
                       implementation=None) -> jax.Array:
  """Attention of several queries per row over a full cache's whole buffer (prefix and chunk).

  q: [B, T, N, H] scaled queries (query head n reads kv head n // (N // K)). k, v: [B, K, S, H]
  (slot s holds position s; the chunk already written). positions: int32 [B, T] of the queries.
  lengths: int32 [B] filled slots per row after the chunk. window: the layer's sliding window or
  None. implementation: `jax.nn.dot_product_attention`'s (None: JAX's default, "xla": XLA's
  einsum-softmax, the CPU check route). GQA / MQA go in as K < N heads (nothing repeated);
  softmax scale 1 (q is scaled). Returns [B, T, N, H] in q's dtype; a query that sees no slot
  (an empty row) gets zeros, as on the jnp path (the API would give it the mean of every value).
  """
  mask = prefill_mask(positions, lengths, k.shape[2], window)  # [B, T, S]
  out = jax.nn.dot_product_attention(
      q.astype(k.dtype), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask[:, None],
      scale=1.0, implementation=implementation)  # [B, T, N, H]; mask broadcast over heads
  seen = jnp.any(mask, axis=-1)[:, :, None, None]
  return jnp.where(seen, out, 0).astype(q.dtype)
