"""Plain-NumPy references: attention, RoPE, a whole Llama forward, and the full cache's contents.

Written from the definitions, independent of kvjax's JAX code, in float64.
"""

from __future__ import annotations

import numpy as np


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """x [..., T, heads, H] rotated by positions [..., T] (rotate-half convention)."""
  h = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
  angles = positions.astype(np.float64)[..., None] * inv_freq  # [..., T, H/2]
  cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """q [T, N, H], k/v [S, K, H], mask bool [T, S] -> [T, N, H]; query head n reads kv head n // G.

  Rows of the mask with no visible key give zeros.
  """
  t, n, h = q.shape
  g = n // k.shape[1]
  out = np.zeros((t, n, h))
  for head in range(n):
    kh = k[:, head // g].astype(np.float64)
    vh = v[:, head // g].astype(np.float64)
    scores = q[:, head].astype(np.float64) @ kh.T / np.sqrt(h)  # [T, S]
    scores = np.where(mask, scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    w = np.where(mask, np.exp(scores - peak), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    out[:, head] = w @ vh
  return out


def rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def silu(x):
  return x / (1.0 + np.exp(-x))


def llama_forward(config, params, tokens: np.ndarray) -> np.ndarray:
  """Full causal forward of one row: tokens [T] -> logits [T, V] (float64)."""
  p = _to_numpy(params)
  c = config
  x = p["embed"]["embedding"][tokens].astype(np.float64)
  t = len(tokens)
  pos = np.arange(t)
  mask = pos[:, None] >= pos[None, :]
  for i in range(c.n_layers):
    lp = p[f"layers_{i}"]
    hn = rmsnorm(x, lp["attn_norm"]["scale"], c.norm_eps)
    q = (hn @ lp["attn"]["wq"]).reshape(t, c.n_heads, c.head_dim)
    k = (hn @ lp["attn"]["wk"]).reshape(t, c.n_kv_heads, c.head_dim)
    v = (hn @ lp["attn"]["wv"]).reshape(t, c.n_kv_heads, c.head_dim)
    q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
    att = attention(q, k, v, mask).reshape(t, -1)
    x = x + att @ lp["attn"]["wo"]
    hn = rmsnorm(x, lp["mlp_norm"]["scale"], c.norm_eps)
    x = x + (silu(hn @ lp["mlp"]["w_gate"]) * (hn @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]
  x = rmsnorm(x, p["final_norm"]["scale"], c.norm_eps)
  head = p["embed"]["embedding"] if c.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head.T


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


class FullCacheOracle:
  """What a full cache must hold: per row, the list of (k [L, K, H], v) appended, in order."""

  def __init__(self, batch: int, capacity: int):
    self.rows = [[] for _ in range(batch)]
    self.capacity = capacity

  def append(self, k: np.ndarray, v: np.ndarray, n_valid=None):
    """k, v [L, B, K, T, H]."""
    t = k.shape[3]
    for b in range(k.shape[1]):
      n = t if n_valid is None else int(n_valid[b])
      for j in range(n):
        self.rows[b].append((k[:, b, :, j], v[:, b, :, j]))

  def lengths(self):
    return np.array([len(r) for r in self.rows])

  def stored(self, b: int):
    """(keys [L, K, n, H], values) of the first min(len, capacity) tokens of row b."""
    kept = self.rows[b][: self.capacity]
    if not kept:
      return None, None
    return (np.stack([k for k, _ in kept], axis=2), np.stack([v for _, v in kept], axis=2))
