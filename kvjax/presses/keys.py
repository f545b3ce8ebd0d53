"""Presses that score from the keys and values alone: knorm, streaming_llm, keydiff, lagkv, cur,
random, leverage, and think (which reads the window's queries too, but only to weigh key channels).

Each is a few lines over `LayerInputs` (k [B, K, T, H] rotated, k_raw before RoPE, v [B, K, T, H]);
selection is the shared per-head top-k. Every statistic over positions is taken over a row's real
tokens only, so a ragged row scores exactly as it would alone. Their kvpress counterparts are
documented in docs/kvpress_oracle.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.caches.terms import SpecError
from kvjax.presses.base import LayerInputs, Press, register_press, row_zscore


@register_press
@dataclasses.dataclass(frozen=True)
class KnormPress(Press):
  """Keeps the keys of smallest L2 norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based
  Strategy for KV Cache Compression")."""

  name: ClassVar[str] = "knorm"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "smallest key L2 norm (Devoto et al. 2024)"

  def score(self, x: LayerInputs, n_kept):
    return -jnp.linalg.norm(x.k.astype(jnp.float32), axis=-1)


@register_press
@dataclasses.dataclass(frozen=True)
class StreamingLLMPress(Press):
  """Keeps the first `n_sink` tokens and the most recent ones (Xiao et al. 2023, "Efficient
  Streaming Language Models with Attention Sinks")."""

  name: ClassVar[str] = "streaming_llm"
  doc: ClassVar[str] = "attention sinks + most recent tokens (Xiao et al. 2023)"
  n_sink: int = 4

  def score(self, x: LayerInputs, n_kept):
    pos = jnp.arange(x.tokens)[None, :]
    pruned = x.n_valid[:, None] - n_kept[:, None]  # tokens dropped per row
    drop = (pos >= self.n_sink) & (pos < self.n_sink + pruned)
    s = jnp.where(drop, 0.0, 1.0)
    return jnp.broadcast_to(s[:, None, :], (x.batch, x.kv_heads, x.tokens))


def _real(x: LayerInputs):
  """bool [B, 1, T, 1]: real (not padding) positions, broadcastable over [B, K, T, H]."""
  return x.valid[:, None, :, None]


def _mean_over_tokens(values, x: LayerInputs):
  """values [B, K, T, ...] averaged over each row's real tokens: [B, K, ...]."""
  real = x.valid.reshape(x.valid.shape + (1,) * (values.ndim - 3))[:, None]
  count = jnp.maximum(x.n_valid, 1).reshape((-1,) + (1,) * (values.ndim - 2))
  return jnp.sum(jnp.where(real, values, 0.0), axis=2) / count


@register_press
@dataclasses.dataclass(frozen=True)
class KeyDiffPress(Press):
  """Keeps the keys least similar to the head's mean key direction: score = -cos(k_t, anchor) with
  anchor the mean of the row's L2-normalised (rotated) keys (Park et al. 2025, "KeyDiff: Key
  Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
  Environments"). The paper's block-wise variant is block(keydiff)."""

  name: ClassVar[str] = "keydiff"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "keys least like the mean key direction (Park et al. 2025)"

  def score(self, x: LayerInputs, n_kept):
    k = x.k.astype(jnp.float32)  # [B, K, T, H]
    norm = jnp.linalg.norm(k, axis=-1, keepdims=True)
    anchor = _mean_over_tokens(k / jnp.maximum(norm, 1e-12), x)[:, :, None, :]  # [B, K, 1, H]
    anchor_norm = jnp.linalg.norm(anchor, axis=-1, keepdims=True)
    cosine = jnp.sum((k / jnp.maximum(norm, 1e-8)) * (anchor / jnp.maximum(anchor_norm, 1e-8)),
                     axis=-1)
    return jnp.where(x.valid[:, None, :], -cosine, 0.0)


@register_press
@dataclasses.dataclass(frozen=True)
class LagKVPress(Press):
  """Scores each lag-sized partition of the prompt against the next one (Liang et al. 2025,
  "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important").

  After `n_sink` sinks the row is cut into partitions of `lag_size` tokens. A token of partition p
  is min-max normalised per channel by partition p + 1's range (keys and values separately); its
  spread is the std over channels, softmaxed within the partition; key and value parts are
  averaged and, unless `cross_scoring`, replaced by their rank in the partition / lag_size (so
  every partition keeps the same share). Sinks, the last full partition and the remainder score 1.
  A row shorter than n_sink + 2 lag_size scores a ramp instead (sinks + most recent, like
  StreamingLLM). Options and defaults are kvpress's."""

  name: ClassVar[str] = "lagkv"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "spread relative to the next partition's range (Liang et al. 2025)"
  n_sink: int = 4
  lag_size: int = 128
  cross_scoring: bool = False

  def __post_init__(self):
    if self.n_sink < 0 or self.lag_size < 1:
      raise ValueError(f"lagkv: n_sink must be >= 0 and lag_size >= 1, got n_sink={self.n_sink}, "
                       f"lag_size={self.lag_size}")

  def score(self, x: LayerInputs, n_kept):
    sink, lag, t = self.n_sink, self.lag_size, x.tokens
    parts = max(1, -(-(t - sink) // lag))  # partitions covering the longest row
    both = (self._spread(x.k, parts) + self._spread(x.v, parts)) / 2  # [B, K, M, lag]
    if not self.cross_scoring:
      rank = jnp.argsort(jnp.argsort(both, axis=-1, stable=True), axis=-1, stable=True)
      both = rank.astype(jnp.float32) / lag
    lagged = both.reshape(x.batch, x.kv_heads, parts * lag)
    lagged = jnp.pad(lagged, ((0, 0), (0, 0), (sink, 0)))[:, :, :t]  # back to positions

    pos = jnp.arange(t)[None, :]  # [1, T]
    n = x.n_valid[:, None]  # [B, 1]
    full_parts = (n - sink) // lag  # [B, 1] partitions that fit in the row
    scored = (pos >= sink) & ((pos - sink) // lag < full_parts - 1)  # those with a reference
    ramp = (pos - sink).astype(jnp.float32) / jnp.maximum(n - sink, 1).astype(jnp.float32)
    short = n < sink + 2 * lag
    fallback = jnp.where(pos < sink, 1.0, ramp)  # [B, T]
    s = jnp.where(scored[:, None, :], lagged, 1.0)
    s = jnp.where(short[:, :, None], fallback[:, None, :], s)
    return jnp.where(x.valid[:, None, :], s, 0.0)

  def _spread(self, states, parts: int):
    """states [B, K, T, H] -> float32 [B, K, M, lag]: per partition, the softmax over its tokens of
    the channel std of the tokens normalised by the next partition's per-channel min and max
    (the last partition, and any holding padding, come out as garbage the caller masks)."""
    b, kh, t, h = states.shape
    sink, lag = self.n_sink, self.lag_size
    s = states.astype(jnp.float32)
    s = jnp.pad(s, ((0, 0), (0, 0), (0, max(0, sink + parts * lag - t)), (0, 0)))
    s = s[:, :, sink:sink + parts * lag].reshape(b, kh, parts, lag, h)
    low, high = s.min(axis=3), s.max(axis=3)  # [B, K, M, H]
    next_low = jnp.concatenate([low[:, :, 1:], low[:, :, -1:]], axis=2)[:, :, :, None]
    next_high = jnp.concatenate([high[:, :, 1:], high[:, :, -1:]], axis=2)[:, :, :, None]
    normed = (s - next_low) / (next_high - next_low)
    return jax.nn.softmax(jnp.std(normed, axis=-1, ddof=1), axis=-1)


@register_press
@dataclasses.dataclass(frozen=True)
class CURPress(Press):
  """Keeps tokens of high approximate CUR leverage: ||k_t||^2 and ||v_t||^2 (rotated keys), each
  normalised within consecutive windows of `local_window_size` tokens, combined per
  `leverage_type` ("kv_product", "kv_avg", "key", "value"), normalised over the row; the first
  `num_sinks` tokens score 1 (Sengupta et al. 2025, "Value-Guided KV Compression for LLMs via
  Approximated CUR Decomposition"). Options and defaults are kvpress's; kvpress's
  use_random_leverage (a torch.randn projection first) is not reproduced and is refused."""

  name: ClassVar[str] = "cur"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "approximate CUR leverage of keys x values (Sengupta et al. 2025)"
  num_sinks: int = 4
  leverage_type: str = "kv_product"
  use_random_leverage: bool = False
  use_local_approximation: bool = True
  local_window_size: int = 16

  def __post_init__(self):
    if self.leverage_type not in ("kv_product", "kv_avg", "key", "value"):
      raise ValueError("cur: leverage_type must be 'kv_product', 'kv_avg', 'key' or 'value', got "
                       f"{self.leverage_type!r}")
    if self.use_random_leverage:
      raise ValueError("cur: use_random_leverage=True (kvpress projects keys and values with a "
                       "fresh torch.randn matrix) is not supported; use use_random_leverage=False")
    if self.local_window_size < 1:
      raise ValueError(f"cur: local_window_size must be >= 1, got {self.local_window_size}")

  def score(self, x: LayerInputs, n_kept):
    valid = x.valid[:, None, :]  # [B, 1, T]
    k2 = jnp.where(valid, jnp.sum(jnp.square(x.k.astype(jnp.float32)), axis=-1), 0.0)
    v2 = jnp.where(valid, jnp.sum(jnp.square(x.v.astype(jnp.float32)), axis=-1), 0.0)
    if self.use_local_approximation:
      k2, v2 = self._local(k2), self._local(v2)
    s = {"kv_product": lambda: k2 * v2, "kv_avg": lambda: (k2 + v2) / 2, "key": lambda: k2,
         "value": lambda: v2}[self.leverage_type]()
    s = jnp.where(valid, s, 0.0)
    s = s / jnp.sum(s, axis=-1, keepdims=True)
    s = jnp.where(jnp.arange(x.tokens) < self.num_sinks, 1.0, s)
    return jnp.where(valid, s, 0.0)

  def _local(self, x2):
    """x2 [B, K, T] (0 at padding) divided by its sum over each window of local_window_size."""
    b, kh, t = x2.shape
    w = self.local_window_size
    windows = jnp.pad(x2, ((0, 0), (0, 0), (0, -t % w))).reshape(b, kh, -1, w)
    return (windows / jnp.sum(windows, axis=-1, keepdims=True)).reshape(b, kh, -1)[:, :, :t]


@register_press
@dataclasses.dataclass(frozen=True)
class RandomPress(Press):
  """Keeps random tokens: a baseline. Scores are uniform in [0, 1) from jax.random, keyed by
  `seed`, the layer, the kv head and the position, so a row scores the same whatever it is
  batched with (and every row of a batch gets the same draws). kvpress's RandomPress draws with
  torch.rand: the two are not comparable token for token, only in distribution."""

  name: ClassVar[str] = "random"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "uniformly random tokens, seeded (baseline)"
  seed: int = 0

  def score(self, x: LayerInputs, n_kept):
    key = jax.random.fold_in(jax.random.key(self.seed), x.layer)
    draw = lambda h, t: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, h), t))
    heads, tokens = jnp.arange(x.kv_heads), jnp.arange(x.tokens)
    s = jax.vmap(lambda h: jax.vmap(lambda t: draw(h, t))(tokens))(heads)  # [K, T]
    return jnp.broadcast_to(s[None], (x.batch, x.kv_heads, x.tokens))


@register_press
@dataclasses.dataclass(frozen=True)
class LeverageScorePress(Press):
  """Keeps the pre-RoPE keys of highest approximate statistical leverage (Chari & Van Durme 2025,
  "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores").

  Per (row, kv head): X = (k_raw - its mean over the row's tokens) @ Phi with Phi a Gaussian
  sketch [H, sketch_dimension] / sqrt(sketch_dimension); the leverage of token t is
  x_t^T (X^T X + jitter I)^-1 x_t (jitter 1e-2, raised tenfold while the Cholesky fails, up to 4
  times), clamped at 0, then z-scored over the row's layer (all kv heads). kvpress draws Phi
  from torch.randn on every call, so its scores cannot be reproduced outside torch's RNG; here Phi
  comes from jax.random keyed by `seed` and the layer (`sketch`), one per kv head, the same for
  every row."""

  name: ClassVar[str] = "leverage"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "approximate leverage of pre-RoPE keys, sketched (Chari & Van Durme 2025)"
  sketch_dimension: int = 48
  seed: int = 0

  JITTERS: ClassVar[tuple] = (1e-2, 1e-1, 1.0, 10.0, 100.0)

  def __post_init__(self):
    if self.sketch_dimension < 1:
      raise ValueError(f"leverage: sketch_dimension must be >= 1, got {self.sketch_dimension}")

  def sketch(self, layer: int, kv_heads: int, head_dim: int):
    """float32 [K, H, sketch_dimension]: the Gaussian sketch of `layer`'s kv heads."""
    key = jax.random.fold_in(jax.random.key(self.seed), layer)
    shape = (kv_heads, head_dim, self.sketch_dimension)
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(self.sketch_dimension)

  def score(self, x: LayerInputs, n_kept):
    k = x.k_raw.astype(jnp.float32)  # [B, K, T, H]
    centred = k - _mean_over_tokens(k, x)[:, :, None, :]
    sketched = jnp.einsum("bkth,khs->bkts", centred, self.sketch(x.layer, x.kv_heads, x.head_dim))
    sketched = jnp.where(_real(x), sketched, 0.0)  # [B, K, T, S]
    gram = jnp.einsum("bkts,bktr->bksr", sketched, sketched)
    gram = (gram + gram.swapaxes(-1, -2)) / 2
    eye = jnp.eye(self.sketch_dimension, dtype=jnp.float32)
    factors = jnp.stack([cholesky(gram + j * eye) for j in self.JITTERS])
    ok = jnp.all(jnp.isfinite(factors), axis=(2, 3, 4))  # [J, B]: every head of the row
    first_ok = jnp.argmax(ok, axis=0)  # the smallest jitter that worked, per row
    factor = factors[first_ok, jnp.arange(x.batch)]  # [B, K, S, S]
    # x^T (L L^T)^-1 x = |L^-1 x|^2
    lev = jnp.sum(forward_substitute(factor, sketched) ** 2, axis=-1)  # [B, K, T]
    return row_zscore(lev, jnp.broadcast_to(x.valid[:, None, :], lev.shape))


# Small dense linear algebra in plain jnp. On CPU, jnp.linalg.cholesky and triangular solves call
# LAPACK/BLAS (through SciPy's OpenBLAS), and several such calls running at once from XLA's
# threads were seen to hang a process for good (2026-12-07: every XLA thread idle, the caller
# waiting on the result). The sketches here are 48 x 48: a column loop costs nothing.
def cholesky(a):
  """Lower Cholesky factor of a [..., n, n] (symmetric); NaN where a is not positive definite."""
  n = a.shape[-1]
  index = jnp.arange(n)

  def column(j, low):
    row = low[..., j, :]  # [..., n]: the factor's row j (columns < j filled)
    pivot = jnp.sqrt(a[..., j, j] - jnp.sum(row * row, axis=-1))
    col = (a[..., :, j] - jnp.einsum("...ik,...k->...i", low, row)) / pivot[..., None]
    col = jnp.where(index > j, col, jnp.where(index == j, pivot[..., None], 0.0))
    return low.at[..., :, j].set(col)

  return jax.lax.fori_loop(0, n, column, jnp.zeros_like(a))


def forward_substitute(low, x):
  """y with low y_t = x_t for every row x_t of x [..., T, n] (low [..., n, n] lower triangular)."""
  n = low.shape[-1]

  def step(i, y):
    done = jnp.einsum("...tk,...k->...t", y, low[..., i, :])  # sum_k<i L_ik y_k (y_k = 0, k >= i)
    return y.at[..., i].set((x[..., i] - done) / low[..., i, i][..., None])

  return jax.lax.fori_loop(0, n, step, jnp.zeros_like(x))


@register_press
@dataclasses.dataclass(frozen=True)
class ThinKPress(Press):
  """Prunes key channels, keeps every token (Xu et al. 2024, "ThinK: Thinner Key Cache by
  Query-Driven Pruning").

  Channel c of a kv head scores mean_w(q_c^2) (the last `window_size` rotated queries, averaged
  over the head's query heads) x mean_t(k_c^2) (the row's rotated keys); the
  int(head_dim x key_channel_compression_ratio) lowest channels are zeroed in every stored key
  (`prune_keys`). The prefill itself attends with the full keys; the channels stay in the cache
  as zeros (no memory saved, as in kvpress).

  Ratio: `key_channel_compression_ratio` is the share of key channels pruned (kvjax's default
  0.5, kvpress's 0.0, a no-op). The token budget is the whole prompt — compress and score_prompt
  need ratio=0 (or a budget >= the prompt) and refuse a budget that would drop tokens. In
  kvpress's accounting the KV memory pruned is key_channel_compression_ratio / 2 (its
  ThinKPress.compression_ratio)."""

  name: ClassVar[str] = "think"
  doc: ClassVar[str] = "zeroes the key channels the window's queries use least (Xu et al. 2024)"
  kvpress: ClassVar[dict] = {"key_channel_compression_ratio": 0.0}
  keeps_every_token: ClassVar[bool] = True
  changes_keys: ClassVar[bool] = True
  key_channel_compression_ratio: float | None = None
  window_size: int = 32

  def __post_init__(self):
    r = self.key_channel_compression_ratio
    if r is not None and not 0.0 <= r <= 1.0:
      raise ValueError(f"think: key_channel_compression_ratio must be in [0, 1], got {r!r}")
    if self.window_size < 1:
      raise ValueError(f"think: window_size must be >= 1, got {self.window_size}")

  def channel_scores(self, x: LayerInputs):
    """float32 [B, K, H]: how much each key channel matters to the window's queries."""
    q, _, seen = x.last_queries(self.window_size)  # [B, w, N, H], [B, w]
    q2 = jnp.where(seen[:, :, None, None], jnp.square(q.astype(jnp.float32)), 0.0)
    q2 = jnp.sum(q2, axis=1) / jnp.maximum(jnp.sum(seen, axis=1), 1)[:, None, None]  # [B, N, H]
    k2 = _mean_over_tokens(jnp.square(x.k.astype(jnp.float32)), x)  # [B, K, H]
    return x.group_mean(q2) * k2

  def pruned_channels(self, x: LayerInputs):
    """bool [B, K, H]: the key channels zeroed (the lowest scores; ties to the lower channel)."""
    n_pruned = int(x.head_dim * self.option("key_channel_compression_ratio", 0.5))
    order = jnp.argsort(self.channel_scores(x), axis=-1, stable=True)  # lowest first
    return jnp.argsort(order, axis=-1) < n_pruned

  def prune_keys(self, x: LayerInputs):
    return jnp.where(self.pruned_channels(x)[:, :, None, :], jnp.zeros((), x.k.dtype), x.k)

  def score(self, x: LayerInputs, n_kept):
    return jnp.zeros((x.batch, x.kv_heads, x.tokens), jnp.float32)  # every token is kept

  def select(self, x: LayerInputs, scores, n_kept):
    return jnp.broadcast_to(x.valid[:, None, :], scores.shape)

  def layer_kept(self, n_kept: int, tokens: int, layer: int, n_layers: int,
                 ratio: float | None = None) -> int:
    if n_kept < tokens:
      raise SpecError(f"think prunes key channels and keeps every token, but the budget keeps "
                      f"{n_kept} of {tokens}: pass ratio=0 (or a budget >= the prompt) and set "
                      "key_channel_compression_ratio for the share of key channels zeroed")
    return tokens
