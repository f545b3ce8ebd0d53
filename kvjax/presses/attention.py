"""Presses that score by attention: the prompt's own queries (snapkv, pyramidkv, tova,
observed_attention) or a model of future ones (expected_attention).

Attention is recomputed from `LayerInputs` (rotated queries and keys, the model's softmax scale),
per query head, then averaged over each kv head's query heads (GQA), as kvpress does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax import attention as attn
from kvjax.caches.scored.scorers import pool
from kvjax.presses.base import LayerInputs, Press, protect, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class SnapKVPress(Press):
  """Keeps the tokens the last `window_size` queries attend to most, smoothed over `kernel_size`
  neighbours, plus that window (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
  Before Generation"). kvjax's defaults are the paper's (32, 7, max pooling); kvpress uses 64, 5
  and average pooling (compat="kvpress")."""

  name: ClassVar[str] = "snapkv"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "attention of the last prompt queries, pooled (Li et al. 2024)"
  kvpress: ClassVar[dict] = {"window_size": 64, "kernel_size": 5, "pooling": "avg"}
  window_size: int | None = None
  kernel_size: int | None = None
  pooling: str | None = None

  def __post_init__(self):
    if self.pooling not in (None, "max", "avg"):
      raise ValueError(f"snapkv: pooling must be 'max' or 'avg', got {self.pooling!r}")

  @property
  def window(self) -> int:
    return self.option("window_size", 32)

  def score(self, x: LayerInputs, n_kept):
    w = self.window
    probs, seen = x.window_attention(w)  # [B, N, w, T], [B, w]
    mass = jnp.einsum("bnwt,bw->bnt", probs, seen.astype(probs.dtype))
    mass = mass / jnp.maximum(jnp.sum(seen, axis=1), 1)[:, None, None]
    in_window = jnp.arange(x.tokens)[None, :] >= (x.n_valid - w)[:, None]  # [B, T]
    mass = jnp.where(in_window[:, None, :], 0.0, mass)
    scores = x.group_mean(pool(mass, self.option("kernel_size", 7), self.option("pooling", "max")))
    return protect(scores, in_window[:, None, :])


@register_press
@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
  """SnapKV's scores with budgets shrinking with depth (Cai et al. 2024, "PyramidKV: Dynamic KV
  Cache Compression based on Pyramidal Information Funneling"): layer l of L keeps
  round(max - l (max - min) / (L - 1)) tokens with min = n/beta, max = 2n - min for a budget of n
  per layer (clipped to the prompt; kvpress's formula, which falls back to n where it breaks)."""

  name: ClassVar[str] = "pyramidkv"
  doc: ClassVar[str] = "SnapKV scores, budgets tapering with depth (Cai et al. 2024)"
  kvpress: ClassVar[dict] = {**SnapKVPress.kvpress}
  beta: int = 20

  def layer_kept(self, n_kept: int, tokens: int, layer: int, n_layers: int,
                 ratio: float | None = None) -> int:
    return pyramid_budget(n_kept, tokens, layer, n_layers, ratio, window=self.window,
                          beta=self.beta)


def pyramid_budget(n_kept: int, tokens: int, layer: int, n_layers: int, ratio: float | None, *,
                   window: int, beta: float) -> int:
  """PyramidKV's budget of `layer` (kvpress's formula): a budget of n per layer (tokens (1 - ratio)
  when a ratio is given, else n_kept) becomes round(max - layer (max - min) / (L - 1)) with
  min = n / beta, max = 2n - min, clipped to the prompt after the `window`; where the taper
  does not fit, every layer keeps max(1, round(n))."""
  keep = tokens * (1.0 - ratio) if ratio is not None else float(n_kept)
  low = keep / beta
  high = 2 * keep - low
  if high >= tokens - window:
    high = tokens - window
    low = 2 * keep - high
  if not tokens >= high >= low >= window:
    return max(1, round(keep))
  if n_layers == 1:
    return max(1, round(high))
  return max(1, round(high - layer * (high - low) / (n_layers - 1)))


@register_press
@dataclasses.dataclass(frozen=True)
class TOVAPress(Press):
  """Keeps the tokens the last prompt query attends to most, averaged over every query head, so
  all kv heads keep the same tokens; the last token is always kept (Oren et al. 2024,
  "Transformers are Multi-State RNNs"). As kvpress's TOVAPress."""

  name: ClassVar[str] = "tova"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "attention of the last prompt query, all heads alike (Oren et al. 2024)"

  def score(self, x: LayerInputs, n_kept):
    probs, _ = x.window_attention(1)  # [B, N, 1, T]
    last = jnp.arange(x.tokens)[None, :] == (x.n_valid - 1)[:, None]  # [B, T]
    mass = jnp.where(last, 0.0, jnp.mean(probs[:, :, 0], axis=1))  # [B, T]
    scores = jnp.broadcast_to(mass[:, None, :], (x.batch, x.kv_heads, x.tokens))
    return protect(scores, last[:, None, :])


@register_press
@dataclasses.dataclass(frozen=True)
class ObservedAttentionPress(Press):
  """Keeps the tokens the prompt's own queries attend to most: the attention each key gets, summed
  over every query that sees it and divided by how many do (n - t for position t of a row of n),
  averaged over each kv head's query heads. H2O's heavy hitters (Zhang et al. 2023, "H2O:
  Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"), as kvpress's
  ObservedAttentionPress. Costs a causal attention pass over the prompt (in blocks of queries,
  most of the masked triangle skipped: `LayerInputs.attention_column_sums`)."""

  name: ClassVar[str] = "observed_attention"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "mean attention each key receives from the prompt (H2O, Zhang et al. 2023)"

  def score(self, x: LayerInputs, n_kept):
    sums = x.attention_column_sums()  # [B, N, T]
    seen_by = jnp.maximum(x.n_valid[:, None] - jnp.arange(x.tokens)[None, :], 1)  # [B, T]
    return x.group_mean(sums / seen_by[:, None, :].astype(sums.dtype))


@register_press
@dataclasses.dataclass(frozen=True)
class ExpectedAttentionPress(Press):
  """Keeps the tokens future queries are expected to attend to (Devoto et al. 2025, "Expected
  Attention: KV cache compression by estimating attention from future queries distribution").

  The pre-RoPE queries after the first `n_sink` are fitted by a Gaussian per query head (mean mu,
  biased covariance Sigma), moved to the next `n_future_positions` positions by the mean RoPE
  rotation R over them (mu' = R mu, Sigma' = R Sigma R^T; R is built with the layer's own `rope`,
  so its theta and scaling apply). A key k then gets the expected logit of such a query,
  s mu'.k + s^2 k^T Sigma' k / 2 (s the softmax scale; the covariance term only with
  `use_covariance`), softmaxed over the row's non-sink keys, averaged over the kv head's query
  heads and, with `use_vnorm`, turned into (p + epsilon) ||v||. The first n_sink tokens are always
  kept. kvjax's defaults are kvpress's (512, 4, True, True, 0.0), where s = 1/sqrt(H).
  """

  name: ClassVar[str] = "expected_attention"
  budget_free: ClassVar[bool] = True
  doc: ClassVar[str] = "attention expected from a Gaussian model of future queries (Devoto 2025)"
  n_future_positions: int = 512
  n_sink: int = 4
  use_covariance: bool = True
  use_vnorm: bool = True
  epsilon: float = 0.0

  def __post_init__(self):
    if self.n_future_positions < 1 or self.n_sink < 0:
      raise ValueError("expected_attention: n_future_positions must be >= 1 and n_sink >= 0, got "
                       f"{self.n_future_positions} and {self.n_sink}")

  def score(self, x: LayerInputs, n_kept):
    pos = jnp.arange(x.tokens)[None, :]
    sink = pos < self.n_sink  # [1, T]
    live = x.valid & ~sink  # [B, T]: the queries fitted and the keys scored
    mean, cov = self.query_statistics(x, live)  # [B, N, H], [B, N, H, H] or None
    k = x.k.astype(jnp.float32)  # [B, K, T, H]: query head n = k G + g reads kv head k
    b, kh, g, h, t = x.batch, x.kv_heads, x.groups, x.head_dim, x.tokens
    logits = x.scale * jnp.einsum("bkgh,bkth->bkgt", mean.reshape(b, kh, g, h), k)
    if cov is not None:
      logits += 0.5 * x.scale**2 * jnp.einsum("bkth,bkghi,bkti->bkgt", k,
                                              cov.reshape(b, kh, g, h, h), k)
    logits = logits.reshape(b, kh * g, t)
    probs = x.group_mean(attn.masked_softmax(logits, live[:, None, :]))  # [B, K, T]
    if self.use_vnorm:
      probs = (probs + self.epsilon) * jnp.linalg.norm(x.v.astype(jnp.float32), axis=-1)
    probs = jnp.where(live[:, None, :], probs, 0.0)
    return protect(probs, sink[:, None, :])

  def query_statistics(self, x: LayerInputs, live):
    """(mean [B, N, H], covariance [B, N, H, H] or None) of each row's pre-RoPE queries at the
    `live` positions, rotated by the mean RoPE of the n_future_positions after the row."""
    q = x.q_raw.astype(jnp.float32)  # [B, T, N, H]
    w = live.astype(jnp.float32)[:, :, None, None]
    count = jnp.maximum(jnp.sum(live, axis=1), 1).astype(jnp.float32)[:, None, None]  # [B, 1, 1]
    mean = jnp.sum(q * w, axis=1) / count  # [B, N, H]
    cov = None
    if self.use_covariance:
      centred = (q - mean[:, None]) * w
      cov = jnp.einsum("btni,btnj->bnij", centred, centred) / count[..., None]
    rot = self.mean_rotation(x)  # [B, H, H], rot[b, i] = R e_i, i.e. R^T
    if rot is None:
      return mean, cov
    mean = jnp.einsum("bji,bnj->bni", rot, mean)  # R mu
    if cov is not None:
      cov = jnp.einsum("bji,bnjk,bkl->bnil", rot, cov, rot)  # R Sigma R^T
    return mean, cov

  def mean_rotation(self, x: LayerInputs):
    """float32 [B, H, H]: the transpose of the mean RoPE matrix over positions n .. n + P - 1 of a
    row of n tokens (P = n_future_positions), got by rotating the identity; None without RoPE."""
    if x.rope is None:
      return None
    p, h = self.n_future_positions, x.head_dim
    positions = x.n_valid[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]  # [B, P]
    eye = jnp.broadcast_to(jnp.eye(h, dtype=jnp.float32), (x.batch, p, h, h))  # [B, P, H, H]
    return jnp.mean(x.rope.apply(eye, positions).astype(jnp.float32), axis=1)
