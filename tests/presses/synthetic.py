"""Random one-layer `LayerInputs` and a NumPy attention reference, for testing a press's hooks
without a model (cheap: no prefill to compile)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.attention import RoPE
from kvjax.presses import LayerInputs
from kvjax.testing import oracle

THETA = 10000.0


def layer_inputs(n_valid, *, tokens=None, heads=4, kv_heads=2, head_dim=8, seed=0, n_context=None):
  """LayerInputs of B = len(n_valid) right-padded rows of `tokens` (default: the longest row)
  with random queries, keys, values (float32), rotated at positions 0..T-1."""
  rng = np.random.default_rng(seed)
  b, t = len(n_valid), tokens or max(n_valid)
  q_raw = rng.normal(size=(b, t, heads, head_dim)).astype(np.float32)
  k_raw = rng.normal(size=(b, kv_heads, t, head_dim)).astype(np.float32)
  v = rng.normal(size=(b, kv_heads, t, head_dim)).astype(np.float32)
  pos = np.broadcast_to(np.arange(t), (b, t))
  q = oracle.rope(q_raw, pos, THETA).astype(np.float32)
  k = oracle.rope(k_raw.swapaxes(1, 2), pos, THETA).swapaxes(1, 2).astype(np.float32)
  return LayerInputs(q=jnp.asarray(q), q_raw=jnp.asarray(q_raw), k=jnp.asarray(k),
                     k_raw=jnp.asarray(k_raw), v=jnp.asarray(v),
                     n_valid=jnp.asarray(n_valid, jnp.int32),
                     n_context=None if n_context is None else jnp.asarray(n_context, jnp.int32),
                     scale=head_dim**-0.5, rope=RoPE(head_dim, THETA))


def probs(x: LayerInputs, b: int, queries) -> np.ndarray:
  """float64 [N, len(queries), n_valid[b]]: causal softmax attention of row b's queries at the
  given positions over its real keys (query head n reads kv head n // G)."""
  n = int(x.n_valid[b])
  q = np.asarray(x.q[b], np.float64)  # [T, N, H]
  k = np.asarray(x.k[b], np.float64)[:, :n]  # [K, n, H]
  g = x.groups
  out = np.zeros((x.heads, len(queries), n))
  for head in range(x.heads):
    for i, p in enumerate(queries):
      s = k[head // g, : p + 1] @ q[p, head] * x.scale
      w = np.exp(s - s.max())
      out[head, i, : p + 1] = w / w.sum()
  return out


def group_mean(x: LayerInputs, a: np.ndarray) -> np.ndarray:
  """[N, ...] -> [K, ...]: mean over each kv head's query heads."""
  return a.reshape((x.kv_heads, x.groups) + a.shape[1:]).mean(axis=1)
