"""kvjax.testing: property-test any cache kind, kvjax's or your own.

  from kvjax.testing import check_cache_kind

  def test_builtin_window():
    check_cache_kind("sink:2+window:6")           # any spec string, built by kvjax.make_cache

  def test_my_kind():
    check_cache_kind(make_my_kind)                # factory(spec, config, *, batch, capacity, dtype)

What is here:
  check_cache_kind(kind, ...)      the conformance suite (`conformance.INVARIANTS`) on a spec string
                                   or a `kvjax.register_kind`-style factory; raises an
                                   AssertionError naming each violated invariant with a minimal
                                   failing example
  oracle                           plain-NumPy references: attention (MHA/GQA/MQA, masks,
                                   positions), RoPE, a Llama forward, quantization
  strategies                       hypothesis strategies: cache shapes, ragged append sequences
                                   and streams (garbage in the padding), chunk schedules, specs of
                                   every kind
  pytest plugin                    `pytest_plugins = ["kvjax.testing.plugin"]` gives the
                                   `check_kind` fixture and the `--kvjax-examples` option
  spec_factory(spec, ...)          deprecated: pass the spec string to `check_cache_kind`

Needs hypothesis (the `test` extra: pip install 'kvjax[test]').
"""

from __future__ import annotations

import warnings

from kvjax.testing import oracle, strategies
from kvjax.testing.conformance import (INVARIANTS, CacheKindError, TokenLog, applicable,
                                       check_cache_kind)


def spec_factory(spec, **options):
  """Deprecated (goes away in the next release): `check_cache_kind(spec, options=...)` builds a
  spec string itself.

  Returns the old six-argument factory(n_layers, batch, kv_heads, head_dim, capacity, dtype)
  building `spec` with `kvjax.make_cache` (a bounded kind gets at least its budget). `options` are
  make_cache's extras, or `options=callable(n_layers, kv_heads, head_dim) -> extras`."""
  from kvjax import spec as spec_lib

  warnings.warn(f"kvjax.testing.spec_factory is deprecated and goes away in the next release: "
                f"pass the spec to the kit, check_cache_kind({str(spec)!r}, options=...), where "
                f"options is a dict or a callable config -> dict", DeprecationWarning, stacklevel=2)
  parsed = spec_lib.parse_spec(spec)
  shaped = options.get("options") if callable(options.get("options")) else None

  def extra(config):
    return shaped(config.n_layers, config.n_kv_heads, config.head_dim) if shaped else dict(options)

  def factory(n_layers, batch, kv_heads, head_dim, capacity, dtype):
    config = strategies.CacheShape(n_layers, batch, kv_heads, head_dim, capacity).config()
    return spec_lib.make_cache(parsed, config, batch, max(capacity, parsed.budget or 0), dtype,
                               **extra(config))

  factory.__name__ = str(parsed)
  factory._kvjax_spec = (parsed, extra)  # the kit builds the spec directly, without a 2nd warning
  return factory


__all__ = ["INVARIANTS", "CacheKindError", "TokenLog", "applicable", "check_cache_kind", "oracle",
           "spec_factory", "strategies"]
