"""The eviction rule of every scored kind, as pure functions over fixed shapes.

`evict_topk` keeps, per leading index, the protected candidates (the sinks and the recent window)
and then the best-scored rest; `append_encoded` adds candidates to a `TokenStore` at its precision.
Neither knows where scores come from (that is the `Scorer`'s business, see scorers.py).

Invariant (tests/caches/test_h2o.py::test_evict_topk_matches_numpy): the output holds exactly
`slots` candidates, protected ones first, then the live rest by decreasing score (ties to the lower
candidate index), then empty ones (position -1, score 0); the payload follows its candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.caches.codec import TokenStore, stores_map


def evict_topk(positions, scores, payload, lengths, *, heavy: int, window: int, sink: int = 0,
               slots: int | None = None):
  """Keeps `sink + window + heavy` of C candidates per leading index: H2O's eviction.

  Args:
    positions: int32 [B, ..., C] candidate token positions, -1 for an empty candidate.
    scores: float32 [B, ..., C] accumulated attention scores.
    payload: pytree whose array leaves are [B, ..., C, ...] (keys, values, ...), gathered along.
    lengths: int32 [B] tokens seen per row: positions >= lengths - window are "recent".
    heavy, window, sink: static sizes; C >= sink + window + heavy.
    slots: how many to keep (default sink + window + heavy). A pool shared by several kv heads
      (`adakv`) keeps heads x (sink + window + heavy): the protection rule is per position, so
      every head's sinks and window are kept and the heads compete for the rest.

  Returns:
    (positions, scores, payload) with C replaced by S = sink + window + heavy: the live
    candidates with position < sink or >= lengths - window, then the live rest by decreasing
    score, then empty ones (position -1, score 0), in that order of priority.
  """
  slots = heavy + window + sink if slots is None else slots
  c = positions.shape[-1]
  if c < slots:
    raise ValueError(f"evict_topk: {c} candidates cannot fill {slots} slots")
  lengths = jnp.asarray(lengths, jnp.int32).reshape((-1,) + (1,) * (positions.ndim - 1))
  live = positions >= 0
  protected = live & ((positions < sink) | (positions >= lengths - window))
  priority = jnp.where(protected, jnp.inf, jnp.where(live, scores.astype(jnp.float32), -jnp.inf))
  _, index = jax.lax.top_k(priority, slots)  # [B, ..., S]
  axis = positions.ndim - 1

  def take(x):
    idx = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, idx, axis=axis)

  positions = take(positions)
  scores = jnp.where(positions >= 0, take(scores), 0.0)
  return positions, scores, jax.tree_util.tree_map(take, payload)


def append_encoded(store: TokenStore, x) -> TokenStore:
  """`store` [B, K, S, ...] with x [B, K, C, H] encoded at its precision appended as C more
  slots (the candidates `evict_topk` chooses from)."""
  enc = store.codec.encode(x)
  return stores_map(lambda s, e: jnp.concatenate([s, e], axis=2), store, enc)
