"""kvjax.runtime: the one resolver from a cache request to a placed cache.

Checked on its own: the kind's default capacity (a window sizes itself, full takes the bucket of
the need, dynamic room for the prompt), a paged pool sized from the rows' needs (a caller's
`pages=` wins), a given cache passed through untouched and refused with the numbers when too
small, the fits checks, and batch padding on a two-device mesh (an abstract mesh: placement is
stubbed, the resolver's own decisions are what is checked). Through the entry points: perplexity
and beam search now size paged pools from their rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import kvjax
from kvjax import runtime, sharding
from tests.helpers import lively


def pages(lengths, extra, p):
  return sum(-(-(n + extra) // p) for n in lengths)


def test_default_capacity_is_the_kinds_own(tiny):
  window, plan = runtime.resolve(tiny, "window:512", lengths=[20], extra=10)
  assert window.capacity == plan.capacity == 512 and plan.label == "window:512"
  full, plan = runtime.resolve(tiny, "full", lengths=[20, 5], extra=10)
  assert full.capacity == runtime.bucket(30) == 32
  assert (plan.batch, plan.padded_batch, plan.prompt, plan.needed) == (2, 2, 20, 30)
  assert plan.pages is None and plan.sharding is None and not plan.given
  assert runtime.resolve(tiny, "full", lengths=[20], extra=300)[1].capacity == 512
  assert runtime.resolve(tiny, "full", lengths=[20], capacity=24)[1].capacity == 24


def test_dynamic_gets_room_for_the_prompt_and_check_says_who_grows_it(tiny):
  """A growable cache holds the prompt; "fixed" leaves the rest to the caller (generate grows
  it), "all" refuses it (nothing would grow it)."""
  cache, plan = runtime.resolve(tiny, "dynamic", lengths=[70], extra=100, check="fixed")
  assert plan.growable and cache.capacity == 128
  with pytest.raises(kvjax.CapacityError, match="needs 170 cache slots.*capacity is 128"):
    runtime.resolve(tiny, "dynamic", lengths=[70], extra=100, check="all")


def test_paged_pool_is_sized_from_the_rows(tiny):
  cache, plan = runtime.resolve(tiny, "paged:8", lengths=[23, 7, 40], extra=11)
  assert cache.n_pages == plan.pages == pages([23, 7, 40], 11, 8) == 15
  assert cache.n_pages < 3 * cache.capacity // 8
  assert runtime.resolve(tiny, "paged:8", lengths=[23, 7, 40], extra=11,
                         options={"pages": 40})[1].pages == 40
  assert runtime.resolve(tiny, "paged:8", lengths=[9], spare_pages=2)[1].pages == 2 + 2
  # Without row lengths (the engine) the kind's default pool: every row full.
  assert runtime.resolve(tiny, "paged:8", batch=2, capacity=64)[1].pages == 2 * 64 // 8


def test_a_given_cache_passes_through(tiny):
  given = kvjax.make_cache("full", tiny.config, 2, 64)
  cache, plan = runtime.resolve(tiny, given, lengths=[10, 3], extra=5)
  assert cache is given and plan.given and plan.spec is None and plan.label == "FullCache"
  assert plan.needed == 15 and plan.capacity == 64


def test_a_given_cache_too_small_is_refused_with_the_numbers(tiny):
  given = kvjax.make_cache("full", tiny.config, 1, 16)
  k = jnp.ones((tiny.config.n_layers, 1, tiny.config.n_kv_heads, 4, tiny.config.head_dim))
  given = kvjax.append(given, k, k, jnp.array([4]))  # it already holds 4 tokens
  assert runtime.resolve(tiny, given, lengths=[10], extra=2)[1].needed == 16
  with pytest.raises(kvjax.CapacityError, match="needs 17 cache slots, but the cache capacity is 16"):
    runtime.resolve(tiny, given, lengths=[10], extra=3)
  with pytest.raises(ValueError, match="the given cache has 1 rows but there are 2 documents"):
    runtime.resolve(tiny, given, lengths=[10, 3], row="document")


def test_requests_that_cannot_fit_are_refused(tiny):
  with pytest.raises(kvjax.CapacityError, match="a 40-token prompt does not fit a cache of capacity 16"):
    runtime.resolve(tiny, "full", lengths=[40], capacity=16)
  with pytest.raises(kvjax.CapacityError, match="max_new_tokens=9 needs 48 cache slots"):
    runtime.resolve(tiny, "full", lengths=[40], extra=8, capacity=40, demand="max_new_tokens=9")
  with pytest.raises(kvjax.SpecError, match="perplexity needs a cache"):
    runtime.resolve(tiny, "none", lengths=[4], what="perplexity")
  with pytest.raises(ValueError, match="capacity must be a positive int"):
    runtime.resolve(tiny, "full", lengths=[4], capacity=0)


def test_batch_is_padded_to_the_mesh(tiny, monkeypatch):
  """Three rows on data=2 become four: the padding row holds one token (and its pages), the plan
  says so. The mesh is abstract, so placing is stubbed out."""
  monkeypatch.setattr(sharding, "shard_cache", lambda cache, plan: cache)
  mesh = AbstractMesh((2,), ("data",))
  cache, plan = runtime.resolve(tiny, "paged:8", lengths=[23, 7, 40], extra=11, mesh=mesh)
  assert (plan.batch, plan.padded_batch, cache.batch) == (3, 4, 4)
  assert plan.pages == pages([23, 7, 40, 1], 11, 8)
  assert plan.sharding.rules.batch == ("data",)
  assert "batch 3 padded to 4 rows" in plan.describe()
  np.testing.assert_array_equal(plan.pad_rows(np.array([5, 6, 7]), 1), [5, 6, 7, 1])


def test_perplexity_sizes_a_paged_pool_from_its_documents(tiny):
  docs = [np.arange(40) % 250, np.arange(9) + 3]
  paged, full = (kvjax.perplexity(tiny, docs, cache=spec) for spec in ("paged:8", "full"))
  want = kvjax.make_cache("paged:8", tiny.config, 2, 64, pages=pages([40, 9], 0, 8)).nbytes()
  assert paged[0].cache_bytes == want  # 7 pages, not 2 x 64 / 8 = 16
  for a, b in zip(paged, full):
    np.testing.assert_allclose(a.token_nll, b.token_nll, atol=2e-5)


def test_beam_search_sizes_a_paged_pool_from_its_beams(tiny):
  model = lively(tiny)
  ids = np.random.default_rng(4).integers(0, 250, 40)
  paged = kvjax.beam_search(model, ids, beams=3, max_new_tokens=5, cache="paged:8")
  # 18 + 1 spare per beam (a step may copy every beam's shared last page at once), not 3 x 8
  assert paged.cache.n_pages == pages([40] * 3, 5, 8) + 3
  full = kvjax.beam_search(model, ids, beams=3, max_new_tokens=5, cache="full")
  np.testing.assert_array_equal(paged.tokens, full.tokens)
