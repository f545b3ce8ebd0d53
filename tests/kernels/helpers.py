"""Shared inputs and the jnp reference of the kernel tests: one decode query per row."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn


def queries(rng, batch: int, kv_heads: int, group: int, head_dim: int, dtype=jnp.float32):
  """Scaled queries [B, N, H] (N = K * G) and the same grouped [B, 1, K, G, H]."""
  q = rng.standard_normal((batch, 1, kv_heads * group, head_dim)).astype(np.float32)
  qg = attn.prepare_queries(jnp.asarray(q, dtype), kv_heads)
  return qg.reshape(batch, kv_heads * group, head_dim), qg


def pool(rng, kv_heads: int, pages: int, page_size: int, head_dim: int, dtype=jnp.float32):
  """Random keys and values [K, pages, page_size, H]."""
  shape = (kv_heads, pages, page_size, head_dim)
  return (jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype))


def table_of(rng, batch: int, per_row: int, pages: int) -> jnp.ndarray:
  """A block table int32 [B, M] of distinct pages in shuffled order."""
  return jnp.asarray(rng.permutation(pages)[: batch * per_row].reshape(batch, per_row), jnp.int32)


def dense_of_pages(k_pages, table):
  """[K, pages, P, H] read through table [B, M] -> [B, K, M * P, H] (slot s: position s)."""
  kh, _, p, h = k_pages.shape
  b, m = table.shape
  return jnp.swapaxes(k_pages[:, table], 0, 1).reshape(b, kh, m * p, h)


def reference(qg, k, v, lengths, start=None):
  """kvjax's jnp attention (`attention.dense_attention`) of qg [B, 1, K, G, H] over slots
  [start, lengths) of k, v [B, K, S, H] -> [B, N, H] (zeros for a row that sees nothing)."""
  slots = jnp.arange(k.shape[2])
  mask = slots[None, :] < lengths[:, None]
  if start is not None:
    mask &= slots[None, :] >= start[:, None]
  out = attn.dense_attention(qg, k, v, mask[:, None, None, :])  # [B, 1, N, H]
  return out[:, 0]
