"""Presses that wrap another press: they change how its scores become a selection (adakv).

A wrapper is a Press whose first field is the inner press; `score` delegates to it (so a wrapper
of any press, built-in or registered, works) and `select` / `layer_kept` carry the wrapper's rule.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.presses.base import LayerInputs, Press, register_press


@dataclasses.dataclass(frozen=True)
class Wrapper(Press):
  """A press around `press`: scores and budgets are the inner press's unless overridden."""

  press: Press = None

  def __post_init__(self):
    if not isinstance(self.press, Press):
      raise ValueError(f"{self.name} wraps a press, e.g. {self.name}(snapkv); got {self.press!r}")

  @property
  def needs_wo(self) -> bool:  # a wrapper needs what its press needs
    return self.press.needs_wo

  @property
  def rerotates(self) -> bool:  # ... and re-rotates, sizes and extends the prompt as it does
    return self.press.rerotates

  @property
  def takes_budget(self) -> bool:
    return self.press.takes_budget

  def extend(self, rows, tokenizer):
    return self.press.extend(rows, tokenizer)

  def score(self, x: LayerInputs, n_kept):
    return self.press.score(x, n_kept)

  def layer_kept(self, n_kept, tokens, layer, n_layers, ratio=None):
    return self.press.layer_kept(n_kept, tokens, layer, n_layers, ratio)


@register_press
@dataclasses.dataclass(frozen=True)
class AdaKVPress(Wrapper):
  """Heads of a layer share its budget (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by
  Adaptive Budget Allocation"): each head keeps its `alpha_safeguard` share of n_kept best, then
  one top-k over every (head, token) pair of the layer fills K x n_kept. The cache is a pool shared
  by the kv heads, so a head that needs more tokens gets them."""

  name: ClassVar[str] = "adakv"
  doc: ClassVar[str] = "a layer's heads compete for one budget (Feng et al. 2024)"
  shared_heads: ClassVar[bool] = True
  alpha_safeguard: float = 0.2

  def select(self, x: LayerInputs, scores, n_kept):
    b, kh, t = scores.shape
    valid = x.valid[:, None, :]
    n_safe = jnp.maximum(1, jnp.floor(n_kept * self.alpha_safeguard + 1e-6)).astype(jnp.int32)
    safe = self.press.select(x, scores, n_safe)  # each head's own best
    ranked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    ranked = jnp.where(safe, jnp.finfo(jnp.float32).max, ranked).reshape(b, kh * t)
    order = jnp.argsort(-ranked, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).reshape(b, kh, t)
    return (rank < (kh * n_kept)[:, None, None]) & valid
