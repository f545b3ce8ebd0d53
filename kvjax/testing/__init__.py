"""kvjax.testing: property-test any cache kind, kvjax's or your own.

  from kvjax.testing import check_cache_kind, spec_factory

  def test_my_kind():
    check_cache_kind(my_factory)                  # every invariant that applies to the kind

  def test_builtin_window():
    check_cache_kind(spec_factory("sink:2+window:6"))

What is here:
  check_cache_kind(factory, ...)   the conformance suite (`conformance.INVARIANTS`); raises an
                                   AssertionError naming each violated invariant with a minimal
                                   failing example
  spec_factory(spec, ...)          a factory for any registered spec string
  oracle                           plain-NumPy references: attention (MHA/GQA/MQA, masks,
                                   positions), RoPE, a Llama forward, quantization
  strategies                       hypothesis strategies: cache shapes, ragged append sequences
                                   (garbage in the padding), chunk schedules, specs of every kind
  pytest plugin                    `pytest_plugins = ["kvjax.testing.plugin"]` gives the
                                   `check_kind` fixture and the `--kvjax-examples` option

Needs hypothesis (the `test` extra: pip install 'kvjax[test]').
"""

from __future__ import annotations

import dataclasses

from kvjax.testing import oracle, strategies
from kvjax.testing.conformance import INVARIANTS, CacheKindError, TokenLog, applicable, check_cache_kind


@dataclasses.dataclass(frozen=True)
class _Config:
  n_layers: int
  n_kv_heads: int
  head_dim: int
  vocab_size: int = 0
  rope_theta: float = 10000.0


def spec_factory(spec, **options):
  """factory(n_layers, batch, kv_heads, head_dim, capacity, dtype) building `spec` with
  `kvjax.make_cache` (a bounded kind gets at least its budget). `options` are make_cache's extras,
  or a callable (n_layers, kv_heads, head_dim) -> options for ones that depend on the shape."""
  from kvjax import spec as spec_lib

  parsed = spec_lib.parse_spec(spec)

  def factory(n_layers, batch, kv_heads, head_dim, capacity, dtype):
    extra = options["options"](n_layers, kv_heads, head_dim) if callable(options.get("options")) \
        else options
    capacity = max(capacity, parsed.budget or 0)
    return spec_lib.make_cache(parsed, _Config(n_layers, kv_heads, head_dim), batch, capacity, dtype,
                               **extra)

  factory.__name__ = str(parsed)
  return factory


__all__ = ["INVARIANTS", "CacheKindError", "TokenLog", "applicable", "check_cache_kind", "oracle",
           "spec_factory", "strategies"]
