"""Hypothesis strategies for cache tests: shapes, ragged append sequences, chunk schedules, specs.

  from kvjax.testing import strategies as kst

  @given(shape=kst.cache_shapes(), steps=kst.append_steps(batch=3))
  def test_mine(shape, steps): ...

  @given(steps=kst.append_stream(batch=3, min_tokens=24))   # every row wraps a ring of 8 slots 3x
  def test_my_ring(steps): ...

Values are kept to a few fixed choices where they set array shapes (T per append, head dims), so
a property test compiles a handful of executables, not one per example: a longer stream is more
steps of the same few T, never a new shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np

try:
  from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised only without the test extra
  raise ImportError("kvjax.testing needs hypothesis: pip install 'kvjax[test]' "
                    "(or pip install hypothesis)") from e

# Large, signed garbage for padding slots: a kind that stores or attends to padding shows it.
PADDING_KEY = 1e4
PADDING_VALUE = -1e4


@dataclasses.dataclass(frozen=True)
class CacheShape:
  """The sizes a cache is built with: L layers, B rows, K kv heads, H head dim, S slots per row.

  A kind's factory gets them as `factory(spec, config, *, batch, capacity, dtype)` with
  `config = shape.config()` (see `kvjax.register_kind`)."""

  n_layers: int
  batch: int
  kv_heads: int
  head_dim: int
  capacity: int

  def config(self, group: int = 2):
    """A `LlamaConfig` with these n_layers, n_kv_heads, head_dim and `group` query heads per kv
    head: what `kvjax.make_cache` and kind factories read (n_layers, n_kv_heads, head_dim), with
    every other field a real model config has (n_heads, dim, ...), small."""
    from kvjax.models.config import LlamaConfig

    n_heads = self.kv_heads * group
    return LlamaConfig(vocab_size=48, dim=n_heads * self.head_dim, n_layers=self.n_layers,
                       n_heads=n_heads, n_kv_heads=self.kv_heads, head_dim=self.head_dim,
                       ffn_dim=48, name="kvjax-testing")

  def args(self, dtype):
    """(n_layers, batch, kv_heads, head_dim, capacity, dtype): the arguments of the deprecated
    six-argument kind factory."""
    return (self.n_layers, self.batch, self.kv_heads, self.head_dim, self.capacity, dtype)


def cache_shapes(n_layers=(1, 2), batch=(1, 3), kv_heads=(1, 2), head_dims=(16,),
                 capacities=(8, 12)) -> st.SearchStrategy:
  """Shapes drawn from small fixed sets (each combination compiles once)."""
  return st.builds(CacheShape, n_layers=st.sampled_from(n_layers), batch=st.sampled_from(batch),
                   kv_heads=st.sampled_from(kv_heads), head_dim=st.sampled_from(head_dims),
                   capacity=st.sampled_from(capacities))


@dataclasses.dataclass(frozen=True)
class AppendStep:
  """T new tokens, of which n_valid[b] are real in row b (the rest is padding)."""

  tokens: int
  n_valid: tuple


def append_step(batch: int, token_counts=(1, 2, 3, 5)) -> st.SearchStrategy:
  """One ragged append: T from `token_counts`, n_valid[b] in [0, T] per row."""
  return st.sampled_from(token_counts).flatmap(lambda t: st.builds(
      AppendStep, st.just(t), st.tuples(*[st.integers(0, t)] * batch)))


def append_steps(batch: int, min_size: int = 1, max_size: int = 6,
                 token_counts=(1, 2, 3, 5)) -> st.SearchStrategy:
  """A sequence of ragged appends (rows with n_valid 0 in some steps, others full)."""
  return st.lists(append_step(batch, token_counts), min_size=min_size, max_size=max_size)


def append_stream(batch: int, min_tokens: int, token_counts=(1, 2, 5)) -> st.SearchStrategy:
  """Ragged appends until every row was given at least `min_tokens` real tokens (one step at
  least): a stream as long as a test needs, e.g. 3 x a ring's slots so that it wraps 3 times.

  T of each step comes from `token_counts` (so the stream compiles no new shape); about half the
  steps are full (every row real, as in decoding), the others ragged (n_valid[b] in [0, T]).
  Examples shrink toward the largest T and full steps, so a minimal one has few steps. After
  `min_tokens` drawn steps the rest are full steps of the largest T, so a stream always ends.
  """
  if min_tokens < 0:
    raise ValueError(f"append_stream: min_tokens must be >= 0, got {min_tokens}")
  counts = sorted(set(token_counts), reverse=True)  # hypothesis shrinks toward the first
  pick = st.sampled_from(counts)
  # built once, not per draw: a stream draws dozens of steps
  steps_of = {t: st.builds(AppendStep, st.just(t), st.one_of(
      st.just((t,) * batch), st.tuples(*[st.integers(0, t)] * batch))) for t in counts}

  @st.composite
  def stream(draw):
    steps, given = [], np.zeros(batch, np.int64)
    while not steps or given.min() < min_tokens:
      if len(steps) < max(min_tokens, 1):
        steps.append(draw(steps_of[draw(pick)]))
      else:
        steps.append(AppendStep(counts[0], (counts[0],) * batch))
      given += steps[-1].n_valid
    return steps

  return stream()


def chunk_schedules(total: int, sizes=(1, 2, 3, 5)) -> st.SearchStrategy:
  """Chunk sizes (from `sizes`) that add up to `total`: how a prompt is fed in pieces."""
  def build(draws):
    out, left = [], total
    for size in draws:
      if left <= 0:
        break
      out.append(min(size, left))
      left -= out[-1]
    while left > 0:
      out.append(min(sizes[0], left))
      left -= out[-1]
    return out
  return st.lists(st.sampled_from(sizes), min_size=1, max_size=total).map(build)


def random_tokens(rng: np.random.Generator, shape: CacheShape, step: AppendStep):
  """k, v float32 [L, B, K, T, H], standard normal, padding (t >= n_valid[b]) set to garbage."""
  size = (shape.n_layers, shape.batch, shape.kv_heads, step.tokens, shape.head_dim)
  k = rng.standard_normal(size).astype(np.float32)
  v = rng.standard_normal(size).astype(np.float32)
  for b, n in enumerate(step.n_valid):
    k[:, b, :, n:] = PADDING_KEY
    v[:, b, :, n:] = PADDING_VALUE
  return k, v


# Spec strings of the built-in kinds, with budgets small enough for the kit's shapes.
BUILTIN_SPECS = (
    "full", "dynamic", "offload", "window:6", "sink:2+window:6", "int8+group:16",
    "int4+residual:16+group:16", "int2+group:16", "h2o:2+window:4", "h2o:2+window:4+sink:1",
    "snapkv:2+window:4", "knorm:2+window:4", "int4+residual:4+h2o:2+window:4+group:4",
    "tier:4:fp32,4:int8+group:16", "share:2", "share:2+window:6", "share:2+int8+group:16")


def builtin_specs() -> st.SearchStrategy:
  """Spec strings of the built-in kinds (`BUILTIN_SPECS`), with budgets small enough for the
  kit's shapes."""
  return st.sampled_from(list(BUILTIN_SPECS))


def specs() -> st.SearchStrategy:
  """Specs of every registered kind: the built-in ones and each registered kind's examples."""
  from kvjax.caches import registry

  custom = [example for name in registry.custom_kinds()
            for example in registry.lookup(name).examples]
  return st.one_of(builtin_specs(), *([st.sampled_from(custom)] if custom else []))
