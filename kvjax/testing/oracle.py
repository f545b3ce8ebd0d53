"""Plain-NumPy references: attention, RoPE, a whole Llama forward, and the full cache's contents.

Written from the definitions, independent of kvjax's JAX code, in float64: what a cache kind's
tests compare against. `attention` covers MHA, GQA and MQA (query head n reads kv head n // G),
masks and positions; `llama_forward` is the whole decoder of `kvjax.models.llama` for one row.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.caches import packing


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
    q = (hn @ lp["attn"]["wq"]).reshape(t, c.n_heads, c.head_dim)  # projections are [in, out]
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


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gemma3_forward(config, params, tokens: np.ndarray) -> np.ndarray:
  """Full causal forward of one row of a Gemma 3 decoder: tokens [T] -> logits [T, V] (float64).
  Sliding layers see the `sliding_window` most recent positions (themselves included)."""
  p = _to_numpy(params)
  c = config
  x = p["embed"]["embedding"][tokens].astype(np.float64) * np.sqrt(c.dim)
  t = len(tokens)
  pos = np.arange(t)
  causal = pos[:, None] >= pos[None, :]
  for i, kind in enumerate(c.layer_types):
    lp = p[f"layers_{i}"]
    sliding = kind == "sliding"
    mask = causal & (pos[None, :] > pos[:, None] - c.sliding_window) if sliding else causal
    theta = c.rope_local_theta if sliding else c.rope_theta
    hn = rmsnorm(x, lp["attn_norm"]["scale"], c.norm_eps)
    q = (hn @ lp["attn"]["wq"]).reshape(t, c.n_heads, c.head_dim)
    k = (hn @ lp["attn"]["wk"]).reshape(t, c.n_kv_heads, c.head_dim)
    v = (hn @ lp["attn"]["wv"]).reshape(t, c.n_kv_heads, c.head_dim)
    q = rmsnorm(q, lp["attn"]["q_norm"]["scale"], c.norm_eps)
    k = rmsnorm(k, lp["attn"]["k_norm"]["scale"], c.norm_eps)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    q = q * (c.query_scale ** -0.5) * np.sqrt(c.head_dim)  # `attention` scales by head_dim**-0.5
    att = attention(q, k, v, mask).reshape(t, -1)
    x = x + rmsnorm(att @ lp["attn"]["wo"], lp["post_attn_norm"]["scale"], c.norm_eps)
    hn = rmsnorm(x, lp["mlp_norm"]["scale"], c.norm_eps)
    h = (gelu_tanh(hn @ lp["mlp"]["w_gate"]) * (hn @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]
    x = x + rmsnorm(h, lp["post_mlp_norm"]["scale"], c.norm_eps)
  x = rmsnorm(x, p["final_norm"]["scale"], c.norm_eps)
  return x @ p["embed"]["embedding"].T


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


# ---- KV quantization (the scheme of kvjax.caches.packing, written from its definition) ------------
def f16_round(x):
  finite = np.finfo(np.float16).max
  return np.clip(x, -finite, finite).astype(np.float16).astype(np.float32)


def np_quantize(x: np.ndarray, bits: int, group: int):
  """Per-token quantize-dequantize of x [..., H] in groups along H.

  Returns (dequantized float32, step float32 [..., H]: the group's scale, for tolerances).
  """
  x = np.asarray(x, np.float32)
  g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
  if bits == 8:  # symmetric
    top = 127
    s = f16_round(np.abs(g).max(-1, keepdims=True) / np.float32(top))
    code = np.where(s > 0, np.clip(np.round(g / np.where(s > 0, s, 1)), -top, top), 0)
    deq = code * s
  else:
    top = (1 << bits) - 1
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s, z = f16_round((hi - lo) / np.float32(top)), f16_round(lo)
    code = np.where(s > 0, np.clip(np.round((g - z) / np.where(s > 0, s, 1)), 0, top), 0)
    deq = code * s + z
  step = np.broadcast_to(s, g.shape)
  return deq.reshape(x.shape).astype(np.float32), step.reshape(x.shape).astype(np.float32)


def packing_quantize(x: np.ndarray, bits: int, group: int):
  """Like np_quantize, through kvjax.caches.packing (tested on its own): bit-identical to the
  caches. XLA's float32 division may differ from NumPy's by an ulp, which flips a code when
  (x - zero) / scale lands exactly on .5, so comparisons of attention outputs use this one."""
  x = np.asarray(x, np.float32)
  deq = np.asarray(packing.dequantize(packing.quantize(jnp.asarray(x), bits, group=group)))
  return deq, np_quantize(x, bits, group)[1]


def np_fp8(x: np.ndarray, fmt: str = "fp8_e4m3", scale_dtype=np.float16):
  """NumPy mirror of kvjax.caches.codec's fp8: (codes [..., H] fp8, scale [..., 1], decoded f32).

  Per token: s = max|x| * float32(1 / F) rounded up to scale_dtype, codes = x / s to the nearest
  fp8 value, decoded = codes * s."""
  import ml_dtypes

  dt = {"fp8": ml_dtypes.float8_e4m3fn, "fp8_e4m3": ml_dtypes.float8_e4m3fn,
        "fp8_e5m2": ml_dtypes.float8_e5m2}[fmt]
  top = float(ml_dtypes.finfo(dt).max)
  x = np.asarray(x, np.float32)
  s = np.max(np.abs(x), axis=-1, keepdims=True) * np.float32(1.0 / top)
  if np.dtype(scale_dtype) == np.float16:
    big = np.float32(np.finfo(np.float16).max)
    s = np.minimum(s, big)
    r = s.astype(np.float16)
    s = np.where(r.astype(np.float32) < s, np.nextafter(r, np.float16(big)), r)
  sf = s.astype(np.float32)
  y = np.where(sf > 0, x / np.where(sf > 0, sf, 1), 0).astype(np.float32)
  codes = np.clip(y, -top, top).astype(dt)
  return codes, s.astype(scale_dtype), codes.astype(np.float32) * sf


def np_encode(x: np.ndarray, fmt: str, group: int, exact: bool = False):
  """(value as stored in a tier of format fmt, step) for float32 x [..., H]."""
  if fmt.startswith("fp8"):  # step: the codec's bound, 2^-(m+1) + 2^-12 of the token's max|x|
    rel = (2.0**-4 if fmt in ("fp8", "fp8_e4m3") else 2.0**-3) + 2.0**-12
    amax = np.max(np.abs(np.asarray(x, np.float32)), axis=-1, keepdims=True)
    return np_fp8(x, fmt)[2], np.broadcast_to(rel * amax, x.shape).astype(np.float32)
  if fmt == "fp32":
    return x.astype(np.float32), np.zeros(x.shape, np.float32)
  if fmt in ("bf16", "fp16"):
    dt = jnp.bfloat16 if fmt == "bf16" else np.float16
    y = np.asarray(jnp.asarray(x, jnp.float32).astype(dt).astype(jnp.float32))
    return y, np.abs(x) * (2.0**-7 if fmt == "bf16" else 2.0**-10)
  return (packing_quantize if exact else np_quantize)(x, int(fmt[3:]), group)


def quantize_groups(x: np.ndarray, bits: int, group: int, axis: int, symmetric: bool):
  """float32 mirror of packing.quantize: (codes uint8, scale f16, zero f16 | None), deq f32."""
  x = np.asarray(x, np.float32)
  axis = axis % x.ndim
  shp = x.shape[:axis] + (x.shape[axis] // group, group) + x.shape[axis + 1:]
  xg = x.reshape(shp)
  if symmetric:
    top = (1 << (bits - 1)) - 1
    scale = (np.max(np.abs(xg), axis=axis + 1, keepdims=True) * np.float32(1 / top)).astype(np.float16)
    s = scale.astype(np.float32)
    steps = np.where(s > 0, xg / np.where(s > 0, s, 1), 0).astype(np.float32)
    codes = np.clip(np.round(steps), -top, top) + top + 1
    deq = (codes - (top + 1)) * s
    zero = None
  else:
    top = (1 << bits) - 1
    lo = np.min(xg, axis=axis + 1, keepdims=True)
    hi = np.max(xg, axis=axis + 1, keepdims=True)
    scale = ((hi - lo) * np.float32(1 / top)).astype(np.float16)
    zero = lo.astype(np.float16)
    s, z = scale.astype(np.float32), zero.astype(np.float32)
    steps = np.where(s > 0, (xg - z) / np.where(s > 0, s, 1), 0).astype(np.float32)
    codes = np.clip(np.round(steps), 0, top)
    deq = codes * s + z
  return codes.astype(np.uint8).reshape(x.shape), scale, zero, deq.astype(np.float32).reshape(x.shape)
