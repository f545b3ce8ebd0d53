"""Rotary embeddings and grouped-query attention kernels.

Shapes use the axis letters of `kvjax.models.config`: B batch, T queries of this call, S key slots,
K kv heads, G query heads per kv head (N = K * G), H head dim.

Two kernels live here:

* `dense_attention` scores every query against every key it is given. It is the kernel for small,
  bounded caches (windows, heavy-hitter budgets) and for the uncached full forward.
* `blockwise_attention` walks a preallocated `[B, K, S, H]` buffer block by block with an online
  softmax and stops after the last block that any row has filled, so its cost follows the tokens
  held, not the buffer's capacity.

Neither ever repeats K/V heads: queries are reshaped to `[B, T, K, G, H]` and each kv head serves
its G query heads inside one einsum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

# A large negative score instead of -inf keeps the online softmax free of inf - inf = nan.
MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class RoPE:
  """Rotary position embedding in the "rotate half" convention of HF Llama.

  Static and hashable: it is part of the model config, not of the traced state.
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


def group_queries(q: jax.Array, n_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, K, G, H]: query head n = k * G + g reads kv head k (HF's convention)."""
  b, t, n, h = q.shape
  return q.reshape(b, t, n_kv_heads, n // n_kv_heads, h)


def ungroup(out: jax.Array) -> jax.Array:
  """[B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def dense_attention(q, k, v, mask, *, return_probs: bool = False):
  """Softmax attention of grouped queries over an explicit set of keys.

  Args:
    q: [B, T, K, G, H] queries, already rotated and scaled by 1/sqrt(H).
    k: [B, K, S, H] keys (rotated).
    v: [B, K, S, H] values.
    mask: bool, broadcastable to [B, K, T, S]: which keys each query may see.
    return_probs: also return the attention probabilities [B, K, G, T, S] (fp32).

  Returns:
    out [B, T, N, H] in q's dtype (and probs when asked). A query that sees no key gets zeros.
  """
  scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  mask = mask[:, :, None]  # [B, K, 1, T, S]
  scores = jnp.where(mask, scores, MASKED)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.maximum(total, 1e-30)
  out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = ungroup(out).astype(q.dtype)
  return (out, probs) if return_probs else out


def causal_attention(q, k, v, positions, n_valid=None):
  """Uncached causal attention over the T tokens of this call.

  Args:
    q: [B, T, N, H] rotated queries (unscaled); k, v: [B, T, K, H] rotated keys and values.
    positions: [B, T] token positions; key j is visible to query i iff pos_j <= pos_i.
    n_valid: optional [B]: only the first n_valid[b] tokens of row b are real.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = group_queries(q * (h**-0.5), kv_heads)
  mask = positions[:, :, None] >= positions[:, None, :]  # [B, T, S=T]
  if n_valid is not None:
    mask &= (jnp.arange(t)[None, None, :] < n_valid[:, None, None])
  mask = mask[:, None]  # [B, 1, T, S]
  return dense_attention(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


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
  b, t, kh, g, h = q.shape
  if load_block is None:
    def load_block(kb, vb, start):
      return (lax.dynamic_slice_in_dim(kb, start, block_size, axis=2),
              lax.dynamic_slice_in_dim(vb, start, block_size, axis=2))

  def body(j, carry):
    peak, total, acc = carry
    start = j * block_size
    k_blk, v_blk = load_block(k_buf, v_buf, start)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_blk.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    slots = start + jnp.arange(block_size, dtype=jnp.int32)
    visible = ((slots[None, None, :] <= q_positions[:, :, None])
               & (slots[None, None, :] < kv_lengths[:, None, None]))  # [B, T, bs]
    visible = visible[:, None, None]  # [B, 1, 1, T, bs]
    scores = jnp.where(visible, scores, MASKED)
    new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1))
    weights = jnp.where(visible, jnp.exp(scores - new_peak[..., None]), 0.0)
    rescale = jnp.exp(peak - new_peak)
    total = total * rescale + jnp.sum(weights, axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        "bkgts,bksh->bkgth", weights.astype(v_blk.dtype), v_blk.astype(q.dtype),
        preferred_element_type=jnp.float32)
    return new_peak, total, acc

  init = (jnp.full((b, kh, g, t), MASKED, jnp.float32),
          jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, h), jnp.float32))
  n_blocks = (jnp.max(kv_lengths) + block_size - 1) // block_size
  _, total, acc = lax.fori_loop(0, n_blocks, body, init)
  out = acc / jnp.maximum(total, 1e-30)[..., None]
  return ungroup(out).astype(q.dtype)
