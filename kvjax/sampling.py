"""Token samplers: greedy, temperature, top-k and top-p, from an explicit PRNG key.

A `Sampler` is a frozen dataclass (static under jit): `sampler(logits [B, V], key) -> ids [B]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean no truncation."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"Sampler: temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"Sampler: top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"Sampler: top_p must lie in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
    if self.greedy:
      return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, self.transform(logits), axis=-1).astype(jnp.int32)

  def transform(self, logits: jax.Array) -> jax.Array:
    """The logits this sampler draws from (fp32 [..., V]): divided by the temperature, -inf
    outside the top-k and the top-p nucleus. Greedy: the logits unchanged."""
    logits = logits.astype(jnp.float32)
    if self.greedy:
      return logits
    logits = logits / self.temperature
    if self.top_k:
      kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if self.top_p < 1.0:
      sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
      cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
      # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
      keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < self.top_p
      cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
      logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits

  def probs(self, logits: jax.Array) -> jax.Array:
    """The distribution this sampler draws from, fp32 [..., V] (one-hot of the argmax if greedy)."""
    if self.greedy:
      return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(self.transform(logits), axis=-1)


GREEDY = Sampler()
