"""Prefix caching (kvjax.prefix) against plain generate, and the LRU store against a list model.

Invariants checked:
  * for hypothesis-generated prefixes and ragged suffixes, `generate_with_prefix` gives exactly the
    tokens of `kvjax.generate` on prefix + suffix, and its cache holds the same keys/values;
  * a store hit gives the same tokens as a miss, and using a stored cache leaves it unchanged;
  * other kinds work the same way (share:2);
  * `PrefixStore` keeps the most recently used entries within its byte budget (compared with a
    plain-list LRU model over hypothesis-generated get/put sequences);
  * `extend` and `broadcast` do not modify their inputs; errors name the problem.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax import prefix
from kvjax.prefix import PrefixStore, generate_with_prefix
from tests.helpers import examples


def leaves(tree):
  return [np.array(x, copy=True) for x in jax.tree_util.tree_leaves(tree)]


def assert_same_leaves(before, tree):
  for x, y in zip(before, jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(x, np.asarray(y))


@given(data=st.data())
@examples(6)
def test_equals_plain_generate(tiny, data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  prefix_ids = rng.integers(0, 260, data.draw(st.integers(1, 20))).tolist()
  suffixes = [rng.integers(0, 260, n).tolist() for n in data.draw(st.lists(st.integers(1, 6), min_size=3, max_size=3))]
  got = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=5, capacity=64)
  want = kvjax.generate(tiny, [prefix_ids + s for s in suffixes], max_new_tokens=5, capacity=64)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(np.asarray(got.cache.lengths), np.asarray(want.cache.lengths))
  view, want_view = kvjax.view(got.cache), kvjax.view(want.cache)
  np.testing.assert_array_equal(np.asarray(view.mask), np.asarray(want_view.mask))
  held = np.asarray(view.mask)
  np.testing.assert_allclose(np.asarray(view.keys)[held], np.asarray(want_view.keys)[held], atol=1e-5)
  np.testing.assert_allclose(np.asarray(view.values)[held], np.asarray(want_view.values)[held], atol=1e-5)


def test_store_hit_equals_miss_and_leaves_stored_cache_alone(tiny):
  store = PrefixStore(1 << 24)
  prefix_ids, suffixes = list(range(50, 80)), [[1, 2, 3], [9]]
  miss = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=6, store=store)
  assert not miss.prefix_hit and len(store) == 1 and store.misses == 1
  stored = store.get(PrefixStore.key(tiny, "full", prefix_ids))
  before = leaves(stored)
  hit = generate_with_prefix(tiny, prefix_ids, [[4, 5], [6, 7, 8, 9]], max_new_tokens=6, store=store)
  again = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=6, store=store)
  assert hit.prefix_hit and again.prefix_hit and again.prefix_s < miss.prefix_s
  np.testing.assert_array_equal(again.tokens, miss.tokens)
  assert_same_leaves(before, stored)
  np.testing.assert_array_equal(np.asarray(stored.lengths), [30])
  want = kvjax.generate(tiny, [prefix_ids + [4, 5], prefix_ids + [6, 7, 8, 9]], max_new_tokens=6)
  np.testing.assert_array_equal(hit.tokens, want.tokens)
  # Another spec or another prefix is another entry.
  generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=6, store=store, cache="share:2")
  generate_with_prefix(tiny, prefix_ids[1:], suffixes, max_new_tokens=6, store=store)
  assert len(store) == 3


def test_store_keys_on_weights_and_dtype_not_on_config(tiny):
  """Two models of one config but other weights, or other dtypes, never share a prefilled prefix
  (the store used to key on name and config: a silently wrong hit). The same weights loaded twice
  do share one."""
  import jax.numpy as jnp

  store = PrefixStore(1 << 26)
  prefix_ids, suffixes = list(range(40, 60)), [[1, 2, 3]]
  other = kvjax.load("tiny", seed=1)  # same config, other weights
  half = kvjax.load("tiny", dtype=jnp.bfloat16)  # same weights, other dtype
  first = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=4, store=store)
  for model in (other, half):
    got = generate_with_prefix(model, prefix_ids, suffixes, max_new_tokens=4, store=store)
    want = kvjax.generate(model, [prefix_ids + suffixes[0]], max_new_tokens=4)
    assert not got.prefix_hit
    np.testing.assert_array_equal(got.tokens, want.tokens)
  assert len(store) == 3 and not first.prefix_hit
  again = generate_with_prefix(kvjax.load("tiny"), prefix_ids, suffixes, max_new_tokens=4, store=store)
  assert again.prefix_hit
  np.testing.assert_array_equal(again.tokens, first.tokens)


def test_stored_cache_grows_when_a_request_needs_more(tiny):
  store = PrefixStore(1 << 24)
  prefix_ids = list(range(20))
  generate_with_prefix(tiny, prefix_ids, [[1]], max_new_tokens=4, store=store)  # capacity 32
  long = generate_with_prefix(tiny, prefix_ids, [[1]], max_new_tokens=20, store=store)
  assert long.prefix_hit and long.cache.capacity >= 40
  want = kvjax.generate(tiny, [prefix_ids + [1]], max_new_tokens=20)
  np.testing.assert_array_equal(long.tokens, want.tokens)


def test_paged_prefix_is_stored_once_and_shared(tiny):
  """On pages the store keeps the prefix's pages only and the rows point at them."""
  prefix_ids, suffixes = list(range(100, 137)), [[3, 4], [5, 6, 7], [8]]
  store = PrefixStore(max_bytes=1 << 30)
  got = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=4, cache="paged:8",
                             store=store)
  want = kvjax.generate(tiny, [prefix_ids + s for s in suffixes], max_new_tokens=4)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  (stored, size), = store._entries.values()
  assert stored.n_pages == 5 and size < 5 * stored.page_bytes() + 512  # 37 tokens: 5 pages
  table = np.asarray(got.cache.table)
  assert (table[:, :4] == table[0, :4]).all(), "the 4 full prefix pages are shared by every row"
  again = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=4, cache="paged:8",
                               store=store)
  assert again.prefix_hit
  np.testing.assert_array_equal(again.tokens, want.tokens)


@pytest.mark.parametrize("spec", ["share:2"])
def test_other_kinds(tiny, spec):
  prefix_ids, suffixes = list(range(100, 118)), [[3, 4], [5, 6, 7]]
  got = generate_with_prefix(tiny, prefix_ids, suffixes, max_new_tokens=4, cache=spec)
  want = kvjax.generate(tiny, [prefix_ids + s for s in suffixes], max_new_tokens=4, cache=spec)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_extend_and_broadcast_leave_inputs_alone(tiny):
  cache = kvjax.make_cache("full", tiny.config, 1, 32)
  before = leaves(cache)
  grown = prefix.extend(tiny, cache, np.arange(5)[None])
  assert_same_leaves(before, cache)
  np.testing.assert_array_equal(np.asarray(grown.lengths), [5])
  before = leaves(grown)
  rows = prefix.broadcast(grown, 3)
  assert_same_leaves(before, grown)
  assert rows.batch == 3
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(rows.k[:, b]), np.asarray(grown.k[:, 0]))
  with pytest.raises(ValueError, match="batch-1 cache"):
    prefix.broadcast(rows, 2)


def test_errors(tiny):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate_with_prefix(tiny, [1, 2], [[3], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="prefix is empty"):
    generate_with_prefix(tiny, [], [[3]], max_new_tokens=2)
  with pytest.raises(kvjax.CapacityError, match="need 12 slots"):
    generate_with_prefix(tiny, list(range(8)), [[3]], max_new_tokens=4, capacity=10)
  with pytest.raises(kvjax.SpecError, match="needs a cache"):
    generate_with_prefix(tiny, [1], [[2]], max_new_tokens=2, cache="none")
  with pytest.raises(ValueError, match="max_bytes"):
    PrefixStore(0)


# ---- the store on its own --------------------------------------------------------------------------
class FakeCache:
  def __init__(self, size):
    self.size = size

  def nbytes(self):
    return {"device": self.size}


ops = st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 5), st.integers(1, 40)), max_size=40)


@given(ops=ops, budget=st.integers(1, 100))
@examples(25)
def test_store_is_lru_within_budget(ops, budget):
  store = PrefixStore(budget)
  model: list[tuple[int, int]] = []  # (key, size), least recently used first
  for op, key, size in ops:
    if op == "get":
      got = store.get(key)
      found = [e for e in model if e[0] == key]
      assert (got is None) == (not found)
      if found:
        assert got.size == found[0][1]
        model.remove(found[0])
        model.append(found[0])
    else:
      stored = store.put(key, FakeCache(size))
      model = [e for e in model if e[0] != key]
      assert stored == (size <= budget)
      if stored:
        while model and sum(s for _, s in model) + size > budget:
          model.pop(0)
        model.append((key, size))
    assert store.nbytes == sum(s for _, s in model) <= budget
    assert [k for k in store._entries] == [k for k, _ in model]


@pytest.mark.slow
def test_smollm2_prefix_equals_plain(smollm2):
  model = smollm2
  system = model.tokenizer.encode("You are a helpful assistant. Answer briefly.\n")
  questions = [model.tokenizer.encode(q) for q in ("What is 2+2?", "Name a color.")]
  got = generate_with_prefix(model, system, questions, max_new_tokens=6)
  want = kvjax.generate(model, [system + q for q in questions], max_new_tokens=6)
  np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.slow  # ~12 s each: two generate compiles
@pytest.mark.parametrize("spec", ["full", "paged:8", "int8@global"])
def test_sliding_layers(tiny_gemma3, spec):
  """tiny-gemma3 (16-token windows on layers 0-4) with a 23-token prefix: the layout's cache (a
  window ring beside full or paged) is prefilled once, broadcast group by group (paged groups
  widen) and stored; every row equals plain `generate` of prefix + suffix."""
  prefix_ids, suffixes = list(range(100, 123)), [[3, 4], [5, 6, 7]]
  store = PrefixStore(max_bytes=1 << 30)
  want = kvjax.generate(tiny_gemma3, [prefix_ids + s for s in suffixes], max_new_tokens=6)
  for hit in (False, True):
    got = generate_with_prefix(tiny_gemma3, prefix_ids, suffixes, max_new_tokens=6, cache=spec,
                               store=store)
    assert got.prefix_hit == hit
    np.testing.assert_array_equal(got.tokens, want.tokens)

