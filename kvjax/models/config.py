"""Architecture hyper-parameters of Llama-style decoders.

Axis letters used across kvjax (declared once, used in docstrings and einsums):

  B batch            T new tokens of a call      S cache slots (capacity)
  L layers           K kv heads                  G query heads per kv head
  N query heads      H head dim                  D model dim
  F ffn hidden dim   V vocabulary
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static description of a Llama-architecture decoder.

  Frozen and hashable so it can be a static argument of jitted functions.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position: int = 8192
  name: str = "llama"

  def __post_init__(self):
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{field} must be a positive int, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"LlamaConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def group_size(self) -> int:
    """G: query heads that share one kv head."""
    return self.n_heads // self.n_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
    """Bytes a full-precision cache spends per token: 2 (K and V) * L * K * H values."""
    return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value


SMOLLM2_135M = LlamaConfig(
    vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
    ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
    max_position=8192, name="smollm2-135m")

# The 4-layer, 4-head, d_model 256 model of seed 003 (random weights, byte-level vocabulary).
TINY = LlamaConfig(
    vocab_size=260, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=688,
    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_position=4096, name="tiny")

# GPT-2-small shaped Llama (12 layers, 12 heads, d 768) with random weights, for the speed experiments.
GPT2_SMALL_SHAPE = LlamaConfig(
    vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, ffn_dim=3072,
    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_position=4096, name="gpt2-small-shape")

CONFIGS = {c.name: c for c in (SMOLLM2_135M, TINY, GPT2_SMALL_SHAPE)}
