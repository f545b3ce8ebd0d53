"""Per-layer caches (kvjax.caches.layered) and PyramidKV budgets (`+pyramid` on h2o / snapkv).

Invariants: the budgets shrink with depth and add up to about L x K; the generic kit holds for
pyramid specs (each layer never holds more than its own budget, every layer holds a stream up to
`lossless_tokens` whole); a LayeredCache of equal one-layer caches decodes exactly as the stacked
cache of the same kind; bytes follow the per-layer budgets and match the planner's formula; spec
errors.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.caches import h2o, registry
from kvjax.caches.layered import LayeredCache
from tests.helpers import SETTINGS, lively


@SETTINGS
@given(heavy=st.integers(1, 512), n_layers=st.integers(1, 40), beta=st.integers(1, 40))
def test_pyramid_budgets(heavy, n_layers, beta):
  budgets = registry.pyramid_budgets(heavy, n_layers, beta)
  assert len(budgets) == n_layers and min(budgets) >= 1
  assert all(a >= b for a, b in zip(budgets, budgets[1:])), "budgets shrink with depth"
  if n_layers > 1:
    low = max(1, round(heavy / beta))
    assert budgets[-1] == low and budgets[0] == max(low, 2 * heavy - low)
    assert abs(sum(budgets) - n_layers * heavy) <= n_layers  # L x K, up to rounding
  else:
    assert budgets == [heavy]


@pytest.mark.parametrize("spec", [
    "snapkv:4+window:4+pyramid",
    pytest.param("int4+residual:4+h2o:4+window:4+group:4+pyramid:2", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  check_kind(spec)


@pytest.mark.parametrize("spec", ["h2o:6+window:6+sink:2", "snapkv:6+window:6"])
def test_equal_layers_decode_as_the_stacked_cache(tiny, spec):
  """LayeredCache of L one-layer caches == one L-layer cache: same tokens, same held tokens."""
  model = lively(tiny)
  prompts = [list(np.random.default_rng(3).integers(0, 250, n)) for n in (30, 9)]
  stacked = kvjax.make_cache(spec, model, 2)
  scorer = "snapkv" if "snapkv" in spec else "h2o"
  one = lambda: h2o.H2OCache.init(n_layers=1, batch=2, kv_heads=tiny.config.n_kv_heads,
                                  head_dim=tiny.config.head_dim, heavy=6, window=6,
                                  sink=2 if "sink" in spec else 0, scorer=scorer)
  layered = LayeredCache.of(one() for _ in range(tiny.config.n_layers))
  a = kvjax.generate(model, prompts, max_new_tokens=20, cache=stacked, stop_at_eos=False)
  b = kvjax.generate(model, prompts, max_new_tokens=20, cache=layered, stop_at_eos=False)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  va, vb = a.cache.view(), b.cache.view()
  np.testing.assert_array_equal(np.sort(np.asarray(va.positions), -1), np.sort(np.asarray(vb.positions), -1))


def test_pyramid_bytes_and_budgets(tiny):
  spec = "snapkv:8+window:8+pyramid"
  cache = kvjax.make_cache(spec, tiny, 3)
  budgets = registry.pyramid_budgets(8, tiny.config.n_layers)
  assert cache.layer_capacities == tuple(8 + b for b in budgets)
  assert (cache.capacity, cache.lossless_tokens) == (8 + budgets[0], 8 + budgets[-1])
  assert kvjax.parse_spec(spec).budget == cache.capacity
  measured = sum(cache.nbytes().values())
  assert measured == h2o.estimate_bytes(kvjax.parse_spec(spec), tiny.config, 0, 3, jnp.float32)
  uniform = sum(kvjax.make_cache("snapkv:8+window:8", tiny, 3).nbytes().values())
  # Same scored tokens in all (L x K): only the per-layer lengths are extra.
  assert measured - uniform == 4 * 3 * (tiny.config.n_layers - 1)
  ids = np.random.default_rng(0).integers(0, 250, 60)
  res = kvjax.generate(tiny, [list(ids)] * 3, max_new_tokens=5, cache=spec, stop_at_eos=False)
  held = np.asarray(res.cache.held())  # [L, B, K]
  for layer, cap in enumerate(cache.layer_capacities):
    assert held[layer].max() == cap  # a 64-token stream fills every layer to its own budget


@pytest.mark.parametrize("spec, message", [
    ("window:8+pyramid", "needs h2o:K or snapkv:K"),
    ("full+pyramid", "needs h2o:K or snapkv:K"),
    ("snapkv:8+window:8+pyramid:0", "positive"),
    ("snapkv:8+window:8+pyramid+pyramid", "repeats"),
])
def test_spec_errors(spec, message):
  with pytest.raises(kvjax.SpecError, match=message):
    kvjax.parse_spec(spec)


def test_spec_round_trip():
  for text in ("snapkv:8+window:8+pyramid", "h2o:16+window:8+pyramid:4", "int8+snapkv:8+sink:4+window:8+pyramid"):
    spec = kvjax.parse_spec(text)
    assert kvjax.parse_spec(str(spec)) == spec
  assert kvjax.parse_spec("snapkv:8+window:8+pyramid").pyramid == registry.PYRAMID_BETA
