"""Scorers: where the scores of a scored cache come from, as small static strategy objects.

A `ScoredCache` keeps the sinks, the recent window and the best-scored rest (`evict_topk`); which
tokens are "best" is all a scorer decides. A scorer is a frozen, hashable dataclass (a static field
of the cache, so a jitted function compiles once per scorer) with four hooks the cache calls:

  admit(k) -> float32 [...]
      The score a token starts with when it enters the cache one at a time (decode steps, chunks
      fed token by token, `write`). k [..., H]: its key, rotated, at the caller's precision
      (before any quantization of the pool). H2O: 0.
  gain(probs, valid) -> float32 [B, K, S] | None
      What each held token's score grows by after one query step attended over the held slots.
      probs [B, K, G, 1, S] (fp32) the step's attention; valid bool [B] rows whose token is real.
      None: scores do not change (the cache skips the update).
  prompt_scores(q, held_k, held_mask, chunk_k, n_valid) -> (held_gain [B, K, S], chunk [B, K, T])
      Only for scorers with `compresses_prompt = True`: a chunk of T > 1 tokens is then attended
      in full and compressed once (SnapKV), instead of being fed token by token. q [B, T, K, G, H]
      rotated and scaled; held_k [B, K, S, H], held_mask [B, K, 1, S] what the cache holds;
      chunk_k [B, K, T, H] the chunk's rotated keys; n_valid [B]. Returns what the held tokens'
      scores grow by and the scores the chunk's tokens start with.
  fit(window) -> Scorer
      The scorer as the cache of recent window `window` uses it (SnapKV observes at most that
      many queries); default: itself.

Invariants: every hook is a pure function of its arguments and of the scorer's static fields;
scores are finite float32; `gain` is zero for invalid rows.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax import attention as attn
from kvjax.caches.terms import SpecError


# SnapKV's defaults: the last 32 prompt queries score the prompt, max-pooled over 7 positions.
SNAP_OBSERVE = 32
SNAP_KERNEL = 7
SNAP_POOLING = "max"


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The scorer protocol (see the module docstring); subclasses override what they need.

  name: the scorer's spec word ("h2o"). compresses_prompt: whether a chunk of T > 1 tokens goes
  through `prompt_scores` (attended in full, then compressed) rather than token by token.
  """

  name: ClassVar[str] = ""
  compresses_prompt: ClassVar[bool] = False

  def admit(self, k) -> jax.Array:
    """float32 [...]: the starting score of each key k [..., H] (default 0)."""
    return jnp.zeros(k.shape[:-1], jnp.float32)

  def gain(self, probs, valid) -> jax.Array | None:
    """float32 [B, K, S] added to the held scores after one query step, or None (default)."""
    return None

  def prompt_scores(self, q, held_k, held_mask, chunk_k, n_valid):
    raise NotImplementedError(f"{type(self).__name__} does not compress prompts")

  def fit(self, window: int) -> "Scorer":
    return self


@dataclasses.dataclass(frozen=True)
class H2O(Scorer):
  """Accumulated attention (H2O, Zhang et al. 2023): a token starts at 0 and gains the attention
  probability it gets, summed over the G query heads of its kv head, at every query step."""

  name: ClassVar[str] = "h2o"

  def gain(self, probs, valid) -> jax.Array:
    return jnp.sum(probs, axis=(2, 3)) * valid[:, None, None]  # [B, K, S]


@dataclasses.dataclass(frozen=True)
class SnapKV(H2O):
  """SnapKV (Li et al. 2024): a prompt chunk is scored by the attention its last `observe` real
  queries give each candidate (summed over them and their query heads), the chunk's scores
  smoothed along positions by a `pooling` ('max' or 'avg') of `kernel` tokens (SnapKV keeps the
  neighbours of a hit). Held tokens add that attention to what they had. Decoding is H2O's."""

  name: ClassVar[str] = "snapkv"
  compresses_prompt: ClassVar[bool] = True
  observe: int = SNAP_OBSERVE
  kernel: int = SNAP_KERNEL
  pooling: str = SNAP_POOLING

  def __post_init__(self):
    if self.pooling not in ("max", "avg"):
      raise SpecError(f"SnapKV: pooling must be 'max' or 'avg', got {self.pooling!r}")
    if not isinstance(self.observe, int) or self.observe < 1 or not isinstance(self.kernel, int) \
        or self.kernel < 1 or self.kernel % 2 == 0:
      raise SpecError(f"SnapKV: observe must be an int >= 1 and kernel an odd int >= 1, got "
                      f"observe={self.observe!r}, kernel={self.kernel!r}")

  def fit(self, window: int) -> "SnapKV":
    return dataclasses.replace(self, observe=min(self.observe, window))

  def prompt_scores(self, q, held_k, held_mask, chunk_k, n_valid):
    b, t = q.shape[:2]
    kh, s = held_k.shape[1], held_k.shape[2]
    o = self.observe
    index = jnp.arange(t, dtype=jnp.int32)
    at = n_valid[:, None] - o + jnp.arange(o, dtype=jnp.int32)  # [B, O] the observing queries
    seen = at >= 0
    q_obs = jnp.take_along_axis(q, jnp.clip(at, 0, t - 1)[:, :, None, None, None], axis=1)
    keys = jnp.concatenate([held_k, chunk_k.astype(q.dtype)], axis=2)  # [B, K, S + T, H]
    chunk_mask = (index[None, None, :] <= at[:, :, None])[:, None]  # [B, 1, O, T]
    mask = jnp.concatenate([jnp.broadcast_to(held_mask, (b, kh, o, s)),
                            jnp.broadcast_to(chunk_mask, (b, kh, o, t))], axis=-1)
    probs = attn.masked_softmax(attn.scores_of(q_obs, keys), mask[:, :, None])  # [B,K,G,O,S+T]
    mass = jnp.einsum("bkgos,bo->bks", probs, seen.astype(probs.dtype))  # [B, K, S + T]
    return mass[..., :s], self._pool(mass[..., s:])

  def _pool(self, mass):
    """[B, K, T] scores smoothed along T (`pool`)."""
    return pool(mass, self.kernel, self.pooling)


def pool(x, kernel: int, how: str):
  """[..., T] smoothed along T by a centred window of `kernel` with zero padding ('avg' divides
  by kernel everywhere, as torch's avg_pool1d counting the padding; scores are >= 0, so zeros pad
  'max' neutrally). SnapKV's scorer and the presses (kvjax.presses) share it."""
  if kernel <= 1:
    return x
  dims, strides = (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim
  pad = [(0, 0)] * (x.ndim - 1) + [(kernel // 2, kernel // 2)]
  if how == "max":
    return jax.lax.reduce_window(x, 0.0, jax.lax.max, dims, strides, pad)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad) / kernel


def named(name: str, **options) -> Scorer:
  """The built-in scorer called `name` ('h2o' takes no options; 'snapkv' observe, kernel,
  pooling)."""
  if name == "h2o":
    return H2O()
  if name == "snapkv":
    return SnapKV(**options)
  raise SpecError(f"unknown scorer {name!r}; expected 'h2o' or 'snapkv' (or a Scorer instance)")
