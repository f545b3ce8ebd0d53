"""Presses that score from the keys and values alone (no query is needed): knorm, streaming_llm.

Each is a few lines over `LayerInputs` (k [B, K, T, H] rotated, v [B, K, T, H]); selection is the
shared per-head top-k. Their kvpress counterparts are documented in docs/kvpress_oracle.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.presses.base import LayerInputs, Press, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class KnormPress(Press):
  """Keeps the keys of smallest L2 norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based
  Strategy for KV Cache Compression")."""

  name: ClassVar[str] = "knorm"
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
