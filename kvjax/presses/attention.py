"""Presses that score by attention: the prompt's own queries (snapkv, pyramidkv, tova,
observed_attention) or a model of future ones (expected_attention).

Attention is recomputed from `LayerInputs` (rotated queries and keys, the model's softmax scale),
per query head, then averaged over each kv head's query heads (GQA), as kvpress does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.presses.base import LayerInputs, Press, protect, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class SnapKVPress(Press):
  """Keeps the tokens the last `window_size` queries attend to most, smoothed over `kernel_size`
  neighbours, plus that window (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
  Before Generation"). kvjax's defaults are the paper's (32, 7, max pooling); kvpress uses 64, 5
  and average pooling (compat="kvpress")."""

  name: ClassVar[str] = "snapkv"
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


def pool(x, kernel: int, how: str):
  """[..., T] smoothed along T by a centred window of `kernel` with zero padding ('avg' divides
  by kernel everywhere, as torch's avg_pool1d counting the padding; scores are >= 0, so zeros pad
  'max' neutrally)."""
  if kernel <= 1:
    return x
  dims, strides = (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim
  pad = [(0, 0)] * (x.ndim - 1) + [(kernel // 2, kernel // 2)]
  if how == "max":
    return jax.lax.reduce_window(x, 0.0, jax.lax.max, dims, strides, pad)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad) / kernel


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
    w = self.window
    keep = tokens * (1.0 - ratio) if ratio is not None else float(n_kept)
    low = keep / self.beta
    high = 2 * keep - low
    if high >= tokens - w:
      high = tokens - w
      low = 2 * keep - high
    if not tokens >= high >= low >= w:
      return max(1, round(keep))
    if n_layers == 1:
      return max(1, round(high))
    return max(1, round(high - layer * (high - low) / (n_layers - 1)))
