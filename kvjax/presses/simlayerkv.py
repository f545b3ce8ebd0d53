"""SimLayerKV: "lazy" layers keep only their initial and recent tokens, the others keep everything.

A layer is lazy for a row when its last `n_last` queries put more than `lazy_threshold` of their
attention (averaged over the query heads and those queries) on the first `n_initial` tokens and
the `n_recent` tokens before them. A lazy layer keeps the first n_initial and the last
n_recent - n_last tokens of the row; any other layer keeps the whole row; rows of at most
n_initial + n_recent + n_last tokens are never compressed. No ratio or budget: the press decides
(`Press.takes_budget = False`).

Fixed shapes: laziness is data (it depends on the prompt), so every layer's cache is sized for the
worst case, the whole row, and a lazy layer's slots past its kept tokens stay empty (attention
skips them; the kept mask, `Compressed.kept` or `cache.held()`, shows what was dropped). The
memory saved is therefore in attention reads, not in allocation: size a cache by what you expect
with another press if allocation matters.

kvpress 0.5.5 (SimLayerKVPress) decides once per layer for its batch of one (mean over the
batch); kvjax decides per row, which is the same for one row. kvpress's default
lazy_threshold=1.0 turns the press off (kept as compat="kvpress"); kvjax's default is 0.9, the
paper's value for Llama 3.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.caches.terms import SpecError
from kvjax.presses.base import LayerInputs, Press, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class SimLayerKVPress(Press):
  """Lazy layers (whose last queries attend mostly to the initial and recent tokens) keep only
  those (Zhang et al. 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache
  Reduction"); see the module docstring. Scores are 1 for kept tokens, 0 for dropped ones."""

  name: ClassVar[str] = "simlayerkv"
  doc: ClassVar[str] = "lazy layers keep initial + recent tokens only (Zhang et al. 2024)"
  kvpress: ClassVar[dict] = {"lazy_threshold": 1.0}
  takes_budget: ClassVar[bool] = False
  lazy_threshold: float | None = None
  n_last: int = 1
  n_recent: int = 1024
  n_initial: int = 4

  def __post_init__(self):
    t = self.lazy_threshold
    if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
      raise SpecError(f"simlayerkv: lazy_threshold must be in [0, 1], got {t!r}")
    for name, low in (("n_last", 1), ("n_recent", self.n_last + 1), ("n_initial", 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < low:
        raise SpecError(f"simlayerkv: {name} must be an int >= {low}, got {value!r}")

  def lazy_mass(self, x: LayerInputs):
    """float32 [B]: the share of attention the last n_last queries give the first n_initial
    tokens and the n_recent before those queries (mean over query heads and queries)."""
    w = self.n_last
    q, at, seen = x.last_queries(w)
    probs = x.attention_of(q, at)  # [B, N, w, T]
    pos = jnp.arange(x.tokens)[None, :]
    end = (x.n_valid - w)[:, None]  # the window's own keys are not counted (kvpress)
    counted = (pos < self.n_initial) | ((pos >= end - self.n_recent) & (pos < end))  # [B, T]
    per_query = jnp.einsum("bnwt,bt->bw", probs, counted.astype(probs.dtype)) / x.heads
    return jnp.sum(per_query * seen, axis=1) / jnp.maximum(jnp.sum(seen, axis=1), 1)

  def lazy(self, x: LayerInputs):
    """bool [B]: rows for which this layer is lazy."""
    threshold = self.option("lazy_threshold", 0.9)
    long_enough = x.n_valid > self.n_initial + self.n_recent + self.n_last
    return long_enough & (threshold < 1.0) & (self.lazy_mass(x) > threshold)

  def score(self, x: LayerInputs, n_kept):
    pos = jnp.arange(x.tokens)[None, :]
    ends = (pos < self.n_initial) | (pos >= (x.n_valid - self.n_recent + self.n_last)[:, None])
    keep = ends | ~self.lazy(x)[:, None]  # [B, T]
    s = keep.astype(jnp.float32)
    return jnp.broadcast_to(s[:, None, :], (x.batch, x.kv_heads, x.tokens))

  def select(self, x: LayerInputs, scores, n_kept):
    return (scores > 0) & x.context[:, None, :]
