"""Paged cache (kvjax.caches.paged): page pool, block table, reference counts, copy-on-write.

Invariants: after any sequence of appends (ragged n_valid), forks, reorders, crops and releases the
block table, reference counts, failure flags and every referenced page equal a NumPy oracle that
allocates the same way (free pages in page order, rows in row order, a copied shared page last);
each row's view equals the tokens it was given (forks inherit their source's tokens, and writing
to one never changes another); reference counts are table references plus pins; an exhausted pool
drops a row's tokens and flags it, never touching another row's page; memory in use follows the
tokens held; the generic kit holds; decoding equals the full cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.caches.paged import PagedCache
from tests.helpers import SETTINGS, lively

L, K, H = 2, 2, 4


class PageOracle:
  """NumPy model of the paged cache's bookkeeping and contents (fp32 pages)."""

  def __init__(self, batch, page_size, max_pages, n_pages):
    self.p, self.m, self.n = page_size, max_pages, n_pages
    self.table = np.full((batch, max_pages), n_pages)
    self.lengths = np.zeros(batch, int)
    self.pins = np.zeros(n_pages, int)
    self.failed = np.zeros(batch, bool)
    self.k = np.zeros((L, K, n_pages, page_size, H), np.float32)
    self.v = np.zeros_like(self.k)
    self.logs = [[] for _ in range(batch)]  # per row: list of (k [L, K, H], v) tokens

  @property
  def refcount(self):
    held = np.bincount(self.table.reshape(-1), minlength=self.n + 1)[:self.n]
    return held + self.pins

  def append(self, k, v, n_valid):
    p, cap = self.p, self.m * self.p
    start_refs = self.refcount  # copy decisions read the counts before this call
    free = [i for i in range(self.n) if start_refs[i] == 0]
    nxt = 0
    for b in range(len(self.lengths)):
      end = min(self.lengths[b] + n_valid[b], cap)
      missing = [j for j in range(-(-end // p)) if self.table[b, j] == self.n]
      col = min(self.lengths[b] // p, self.m - 1)
      page = self.table[b, col]
      copy = (self.lengths[b] % p != 0 and n_valid[b] > 0 and page < self.n
              and start_refs[page] > 1 and self.lengths[b] < cap)
      demand = len(missing) + copy
      if demand and nxt + demand > len(free):
        self.failed[b] = True
        nxt += demand  # later rows queue behind, as the jitted reservation does
        continue
      for j in missing:
        self.table[b, j] = free[nxt]
        nxt += 1
      if copy:
        dst = free[nxt]
        nxt += 1
        self.k[:, :, dst], self.v[:, :, dst] = self.k[:, :, page], self.v[:, :, page]
        self.table[b, col] = dst
    for b in range(len(self.lengths)):
      for t in range(n_valid[b]):
        pos = self.lengths[b] + t
        if self.failed[b] or pos >= cap:
          continue
        page = self.table[b, pos // p]
        self.k[:, :, page, pos % p] = k[:, b, :, t]
        self.v[:, :, page, pos % p] = v[:, b, :, t]
        self.logs[b].append((k[:, b, :, t], v[:, b, :, t]))
      self.lengths[b] += n_valid[b]

  def _keep(self, b, length):
    used = -(-length // self.p)
    self.table[b, used:] = self.n

  def crop(self, length):
    for b in range(len(self.lengths)):
      self.lengths[b] = min(self.lengths[b], length)
      self.logs[b] = self.logs[b][:length]
      self._keep(b, self.lengths[b])

  def reorder(self, idx):
    self.table, self.lengths, self.failed = self.table[idx], self.lengths[idx], self.failed[idx]
    self.logs = [list(self.logs[i]) for i in idx]

  def release(self, rows):
    for b in np.flatnonzero(rows):
      self.table[b] = self.n
      self.lengths[b], self.failed[b], self.logs[b] = 0, False, []


def make(batch=3, page_size=4, capacity=16, pages=None, bits=None):
  return PagedCache.init(n_layers=L, batch=batch, kv_heads=K, head_dim=H, capacity=capacity,
                         page_size=page_size, pages=pages, bits=bits, group=4)


def check_against(cache, oracle):
  np.testing.assert_array_equal(np.asarray(cache.table), oracle.table)
  np.testing.assert_array_equal(np.asarray(cache.lengths), oracle.lengths)
  np.testing.assert_array_equal(np.asarray(cache.failed), oracle.failed)
  np.testing.assert_array_equal(np.asarray(cache.refcount), oracle.refcount)
  live = np.flatnonzero(oracle.refcount)
  np.testing.assert_array_equal(np.asarray(cache.pool[0])[:, :, live], oracle.k[:, :, live])
  np.testing.assert_array_equal(np.asarray(cache.pool[1])[:, :, live], oracle.v[:, :, live])
  view = cache.view()
  for b, log in enumerate(oracle.logs):
    if oracle.failed[b]:
      continue
    n = len(log)
    assert int(cache.filled()[b]) == n
    if n:
      np.testing.assert_array_equal(np.asarray(view.keys)[:, b, :, :n],
                                    np.stack([kk for kk, _ in log], axis=2))
      np.testing.assert_array_equal(np.asarray(view.values)[:, b, :, :n],
                                    np.stack([vv for _, vv in log], axis=2))


ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 6), st.lists(st.integers(0, 6), min_size=3, max_size=3)),
    st.tuples(st.just("reorder"), st.lists(st.integers(0, 2), min_size=3, max_size=3)),
    st.tuples(st.just("crop"), st.integers(0, 16)),
    st.tuples(st.just("release"), st.lists(st.booleans(), min_size=3, max_size=3))),
    min_size=1, max_size=8)


@SETTINGS
@given(ops=ops, pages=st.sampled_from([4, 6, 12]), seed=st.integers(0, 2**16))
def test_matches_numpy_oracle(ops, pages, seed):
  """Random appends, forks (reorder), crops and releases: the cache equals the oracle after every
  operation, including when the pool runs dry."""
  rng = np.random.default_rng(seed)
  cache, oracle = make(pages=pages), PageOracle(3, 4, 4, pages)
  jit_append = jax.jit(kvjax.append)
  for op in ops:
    if op[0] == "append":
      t, n_valid = op[1], np.minimum(op[2], op[1])
      k = rng.standard_normal((L, 3, K, t, H)).astype(np.float32)
      v = rng.standard_normal((L, 3, K, t, H)).astype(np.float32)
      cache = jit_append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid, jnp.int32))
      oracle.append(k, v, n_valid)
    elif op[0] == "reorder":
      cache = cache.reorder(jnp.asarray(op[1]))
      oracle.reorder(np.asarray(op[1]))
    elif op[0] == "crop":
      cache = cache.crop(op[1])
      oracle.crop(op[1])
    else:
      cache = cache.release(jnp.asarray(op[1]))
      oracle.release(np.asarray(op[1]))
    check_against(cache, oracle)
    assert int(cache.free_pages()) + int(cache.pages_in_use()) == pages


def test_fork_shares_pages_and_copies_on_write():
  """Forking a row mid-page shares every page; the first write copies only the shared last page,
  and the source row's tokens stay as they were."""
  rng = np.random.default_rng(0)
  cache, oracle = make(batch=2, pages=8), PageOracle(2, 4, 4, 8)
  k = rng.standard_normal((L, 2, K, 6, H)).astype(np.float32)
  cache = kvjax.append(cache, jnp.asarray(k), jnp.asarray(k), jnp.asarray([6, 0]))
  oracle.append(k, k, [6, 0])
  cache = cache.fork(jnp.asarray([0]), jnp.asarray([1]))
  oracle.reorder(np.asarray([0, 0]))
  assert int(cache.pages_in_use()) == 2 and np.asarray(cache.refcount)[:2].tolist() == [2, 2]
  k2 = rng.standard_normal((L, 2, K, 1, H)).astype(np.float32)
  cache = kvjax.append(cache, jnp.asarray(k2), jnp.asarray(k2))
  oracle.append(k2, k2, [1, 1])
  check_against(cache, oracle)
  table = np.asarray(cache.table)
  assert table[0, 0] == table[1, 0], "the full first page stays shared"
  assert table[0, 1] != table[1, 1], "the shared partial page was copied before the write"
  # both rows wrote into the shared page in one call, so both took a copy and it went free
  assert int(cache.pages_in_use()) == 3


def test_exhausted_pool_flags_the_row_and_touches_no_other_page():
  rng = np.random.default_rng(1)
  cache = make(batch=2, pages=3)
  k = rng.standard_normal((L, 2, K, 8, H)).astype(np.float32)
  before = cache
  cache = jax.jit(kvjax.append)(cache, jnp.asarray(k), jnp.asarray(k), jnp.asarray([8, 8]))
  # row 0 takes pages 0, 1; row 1 needs 2 more but only page 2 is free: it gets nothing
  assert np.asarray(cache.overflowed()).tolist() == [False, True]
  assert np.asarray(cache.table)[1].tolist() == [3, 3, 3, 3]
  np.testing.assert_array_equal(np.asarray(cache.view().keys)[:, 0, :, :8], k[:, 0])
  assert int(cache.pages_in_use()) == 2 and not bool(cache.has_room(1))
  with pytest.raises(kvjax.CapacityError, match="page pool is 1 page"):
    kvjax.append(before, jnp.asarray(k), jnp.asarray(k), jnp.asarray([8, 8]))


def test_memory_follows_tokens_held():
  """Rows of 16 and 2000 tokens take 1 + 125 pages of 16: the pool needs 126 pages, not
  batch x capacity; a full cache of the same capacity holds 2 x 2048 slots."""
  cache = PagedCache.init(n_layers=1, batch=2, kv_heads=1, head_dim=8, capacity=2048, page_size=16,
                          pages=128)
  k = jnp.ones((1, 2, 1, 2000, 8), jnp.float32)
  cache = kvjax.append(cache, k, k, jnp.asarray([16, 2000]))
  page_bytes = 2 * 16 * 8 * 4
  assert cache.page_bytes() == page_bytes
  assert int(cache.pages_in_use()) == 126
  book = sum(int(a.size) * a.dtype.itemsize
             for a in (cache.table, cache.lengths, cache.refcount, cache.pins, cache.failed))
  assert cache.used_bytes() == 126 * page_bytes + book
  full = kvjax.make_cache("full", kvjax.TINY.__class__(n_layers=1, n_kv_heads=1, head_dim=8,
                                                        **_rest()), 2, 2048)
  assert kvjax.total_bytes(cache) < 0.55 * kvjax.total_bytes(full)


def test_window_only_gives_back_pages_behind_the_window_and_attends_the_same():
  """window_only (window 6, pages of 4): ragged chunks of 1-7 tokens attend exactly as the cache
  that keeps every page and masks the window; a row holds at most `window_pages` pages, its view
  shows only what it holds, the allocator's invariants hold (rows hold their window unbroken),
  and a pool of exactly rows x window_pages never refuses a page."""
  from kvjax.caches.paged import window_pages

  rng = np.random.default_rng(4)
  most = window_pages(6, 4, 7)
  kw = dict(n_layers=1, batch=2, kv_heads=1, head_dim=H, capacity=48, page_size=4, sliding=6)
  cache = PagedCache.init(pages=2 * most, window_only=True, **kw)
  masked = PagedCache.init(**kw)
  attend = jax.jit(lambda c, q, k, v, n: c.attend(0, q, k, v, n))
  for n in [5, 1, 1, 7, 1, 3, 1, 6, 1, 1, 2, 1]:  # chunks padded to 7 tokens: one compile
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, h, H)), jnp.float32) for h in (2, 1, 1))
    n_valid = jnp.asarray([n, max(n - 1, 1)], jnp.int32)
    out, cache = attend(cache, q, k, v, n_valid)
    want, masked = attend(masked, q, k, v, n_valid)
    cache, masked = cache.advance(n_valid), masked.advance(n_valid)
    real = np.arange(7)[None, :] < np.asarray(n_valid)[:, None]
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-6)
    assert cache.audit() == [] and not np.asarray(cache.failed).any()
    assert int((np.asarray(cache.table) < cache.n_pages).sum(axis=1).max()) <= most
  lengths = np.asarray(cache.lengths)
  view, full = cache.view(), masked.view()
  positions = np.asarray(view.positions)[0, :, 0]
  for b in range(2):
    shown = positions[b][positions[b] >= 0]
    assert shown[0] <= lengths[b] - 6 + 1 and shown[-1] == lengths[b] - 1  # the window, unbroken
    assert shown.tolist() == list(range(shown[0], lengths[b]))
    np.testing.assert_array_equal(np.asarray(view.keys)[0, b, :, shown],
                                  np.asarray(full.keys)[0, b, :, shown])
  with pytest.raises(ValueError, match="window_only needs one sliding window"):
    PagedCache.init(**{**kw, "sliding": None}, window_only=True)


def _rest():
  cfg = kvjax.TINY
  return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f not in ("n_layers", "n_kv_heads", "head_dim")}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pages_within_bound(bits):
  rng = np.random.default_rng(2)
  cache = make(bits=bits, pages=12)
  k = rng.standard_normal((L, 3, K, 7, H)).astype(np.float32)
  cache = kvjax.append(cache, jnp.asarray(k), jnp.asarray(2 * k), jnp.asarray([7, 3, 5]))
  view = cache.view()
  for b, n in enumerate([7, 3, 5]):
    for got, want in ((view.keys, k), (view.values, 2 * k)):
      err = np.abs(np.asarray(got)[:, b, :, :n] - want[:, b, :, :n])
      top = np.abs(want[:, b, :, :n]).max(axis=-1, keepdims=True)
      assert (err <= cache.error_bound * 2 * top + 1e-6).all()
  codes = {8: 4, 4: 2}[bits]  # bytes of 4 codes
  sides = 1 if bits == 8 else 2  # float16 scale (and zero point below 8 bits) per group of 4
  assert cache.page_bytes() == 2 * L * K * 4 * (codes + 2 * sides)


@pytest.mark.parametrize("spec", ["paged:4", pytest.param("paged:4+int8+group:4", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  check_kind(spec)


@pytest.mark.parametrize("spec", ["paged:8", "paged:4+int8"])
def test_generate_matches_full(tiny, spec):
  model = lively(tiny)
  prompts = [list(np.random.default_rng(5).integers(0, 250, n)) for n in (23, 7, 40)]
  full = kvjax.generate(model, prompts, max_new_tokens=12, cache="full", stop_at_eos=False)
  paged = kvjax.generate(model, prompts, max_new_tokens=12, cache=spec, stop_at_eos=False)
  if "int" in spec:
    assert (np.asarray(full.tokens) == np.asarray(paged.tokens)).mean() > 0.5
  else:
    np.testing.assert_array_equal(full.tokens, paged.tokens)
  # The pool holds the pages the rows fill (prompt + 11 fed tokens each), not batch x capacity.
  p = paged.cache.page_size
  assert paged.cache.n_pages == sum(-(-(n + 11) // p) for n in (23, 7, 40))
  assert paged.cache.n_pages < 3 * paged.cache.capacity // p
  assert kvjax.total_bytes(paged.cache) < 0.7 * kvjax.total_bytes(full.cache)
  sized = kvjax.generate(model, prompts, max_new_tokens=12, cache=spec, stop_at_eos=False,
                         cache_options={"pages": 40})  # a pool size of the caller's
  assert sized.cache.n_pages == 40
  np.testing.assert_array_equal(sized.tokens, paged.tokens)


def test_spec_errors():
  for bad, match in (("paged:16+window:8", "does not combine with window"),
                     ("paged:0", "positive"), ("paged:16+int4+residual:32", "residual"),
                     ("paged:16+share:2", "share")):
    with pytest.raises(kvjax.SpecError, match=match):
      kvjax.make_cache(bad, kvjax.TINY, 1, 64)
  with pytest.raises(ValueError, match="pages must be a positive int"):
    kvjax.make_cache("paged:16", kvjax.TINY, 1, 64, pages=0)
  with pytest.raises(TypeError, match="unknown options"):
    kvjax.make_cache("paged:16", kvjax.TINY, 1, 64, page=3)
  assert str(kvjax.parse_spec("int8+paged:16")) == "int8+paged:16"
  assert kvjax.make_cache("paged:16", kvjax.TINY, 1, 40).capacity == 48  # whole pages
