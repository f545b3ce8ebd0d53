"""Architecture hyper-parameters of Llama-style decoders.

Axis letters used across kvjax (declared once, used in docstrings and einsums):

  B batch            T new tokens of a call      S cache slots (capacity)
  L layers           K kv heads                  G query heads per kv head
  N query heads      H head dim                  D model dim
  F ffn hidden dim   V vocabulary
"""

from __future__ import annotations

import dataclasses


class DecoderShape:
  """What every kvjax decoder config shares (the fields' checks, G, `replace`, KV bytes); a
  frozen dataclass with the fields below mixes it in."""

  SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")

  def _check_shape(self, extra=()) -> None:
    """Raises ValueError for a shape field that is not a positive int, or heads that do not group."""
    name = type(self).__name__
    for field in self.SHAPE_FIELDS + tuple(extra):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"{name}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

  @property
  def group_size(self) -> int:
    """G: query heads that share one kv head."""
    return self.n_heads // self.n_kv_heads

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
    """Bytes a full-precision cache of every layer spends per token: 2 (K and V) * L * K * H."""
    return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderShape):
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
    self._check_shape()
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")


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


@dataclasses.dataclass(frozen=True)
class Gemma3Config(DecoderShape):
  """Static description of a Gemma 3 decoder (text part).

  Differences from Llama that the fields carry: every layer has a type, `"sliding"` (attends to the
  `sliding_window` most recent positions, itself included, with RoPE base `rope_local_theta`) or
  `"global"` (the whole context, RoPE base `rope_theta`); queries and keys are RMS-normalized per
  head before RoPE; attention and FFN outputs are normalized again before the residual add; the
  FFN is GeGLU (tanh GELU); embeddings are multiplied by sqrt(dim); queries are scaled by
  `query_scale ** -0.5`.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  layer_types: tuple = ()
  sliding_window: int = 512
  rope_theta: float = 1_000_000.0
  rope_local_theta: float = 10_000.0
  query_scale: float = 256.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_position: int = 32768
  name: str = "gemma3"

  def __post_init__(self):
    self._check_shape(extra=("sliding_window",))
    if not self.layer_types:
      object.__setattr__(self, "layer_types", gemma3_layer_types(self.n_layers))
    types = tuple(self.layer_types)
    object.__setattr__(self, "layer_types", types)
    if len(types) != self.n_layers or not set(types) <= {"sliding", "global"}:
      raise ValueError(f"Gemma3Config.layer_types must name 'sliding' or 'global' for each of the "
                       f"{self.n_layers} layers, got {types!r}")


def gemma3_layer_types(n_layers: int, every: int = 6) -> tuple:
  """Gemma 3's pattern: five sliding layers, then one global (layers 5, 11, 17, ... are global)."""
  return tuple("global" if (i + 1) % every == 0 else "sliding" for i in range(n_layers))


GEMMA3_270M = Gemma3Config(
    vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=2048,
    sliding_window=512, rope_theta=1_000_000.0, rope_local_theta=10_000.0, query_scale=256.0,
    norm_eps=1e-6, max_position=32768, name="gemma3-270m")

# A random-weight Gemma-3-shaped model for the fast tests: byte vocabulary, 6 layers (5 sliding,
# 1 global), MQA, and a 16-token window so short prompts already slide.
TINY_GEMMA3 = Gemma3Config(
    vocab_size=260, dim=128, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=32, ffn_dim=256,
    sliding_window=16, query_scale=32.0, max_position=4096, name="tiny-gemma3")

CONFIGS = {c.name: c for c in (SMOLLM2_135M, TINY, GPT2_SMALL_SHAPE, GEMMA3_270M, TINY_GEMMA3)}


def layer_types(config) -> tuple:
  """The type of each layer of a model config: its `layer_types`, or "global" for every layer of a
  config that declares none (a plain Llama)."""
  types = tuple(getattr(config, "layer_types", None) or ())
  return types or ("global",) * int(config.n_layers)


def layer_window(config, layer_type: str):
  """Tokens a layer of `layer_type` attends to (itself included), or None for the whole context."""
  return int(config.sliding_window) if layer_type == "sliding" else None


def layer_windows(config) -> tuple:
  """The window of each layer of a model config (`layer_window` of its type; None: global)."""
  return tuple(layer_window(config, t) for t in layer_types(config))
