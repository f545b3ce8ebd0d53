"""The page allocator (kvjax.caches.page_table) against a plain-Python model of it.

Invariants: after any sequence of reservations (ragged, with the pool run dry), releases, forks,
reorders, crops, adoptions, pins and unpins, and one-row reservations through `row_view` /
`merge_row`, the jitted functions give the same block table, counts and pins as `Allocator` (free
pages in page order, rows in row order, a shared partially filled page copied before a write), the
same refusals and copy-on-write copies; `pages_needed` / `free_count` predict what `reserve`
takes; `audit` finds nothing in any of these states and names every kind of damage it is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvjax.caches import page_table
from tests.helpers import examples

B, M, P = 3, 4, 4  # rows, pages per row, tokens per page: a row holds 16 tokens at most


class Allocator:
  """Plain-Python allocator: one list of page ids per row, pins in a list."""

  def __init__(self, n_pages):
    self.n = n_pages
    self.rows = [[] for _ in range(B)]
    self.pins = [0] * n_pages

  def refcount(self):
    counts = list(self.pins)
    for row in self.rows:
      for q in row:
        counts[q] += 1
    return counts

  def table(self):
    return np.array([row + [self.n] * (M - len(row)) for row in self.rows])

  def reserve(self, lengths, n):
    """Returns (ok per row, {row: (src, dst)} copies)."""
    refs = self.refcount()  # copies are decided on the counts before the call
    free = [q for q in range(self.n) if refs[q] == 0]
    used, ok, copies = 0, [], {}
    for b, row in enumerate(self.rows):
      end = min(lengths[b] + n[b], M * P)
      new = max(-(-end // P) - len(row), 0)
      last = lengths[b] // P
      copy = (n[b] > 0 and lengths[b] % P != 0 and lengths[b] < M * P and last < len(row)
              and refs[row[last]] > 1)
      demand = new + copy
      if demand and used + demand > len(free):
        ok.append(False)
        used += demand  # rows after it still queue behind its demand
        continue
      ok.append(True)
      row.extend(free[used:used + new])
      used += new
      if copy:
        copies[b] = (row[last], free[used])
        row[last] = free[used]
        used += 1
    return ok, copies

  def needed(self, lengths, n):
    refs = self.refcount()
    out = []
    for b, row in enumerate(self.rows):
      end = min(lengths[b] + n[b], M * P)
      last = lengths[b] // P
      copy = (n[b] > 0 and lengths[b] % P != 0 and lengths[b] < M * P and last < len(row)
              and refs[row[last]] > 1)
      out.append(max(-(-end // P) - len(row), 0) + copy)
    return out


jitted = {name: jax.jit(getattr(page_table, name))
          for name in ("reserve", "release", "fork", "reorder", "crop", "adopt", "pin", "pages_needed")}


@jax.jit
def _one_row(pages, lengths, row, n):
  """Reserves n tokens for row `row` alone through a one-row view."""
  view = page_table.row_view(pages, row)
  view, ok, src, dst = page_table.reserve(view, jax.lax.dynamic_slice_in_dim(lengths, row, 1), n)
  return page_table.merge_row(pages, row, view), ok[0], src[0], dst[0]


def copy_made(src, dst, copies, b, n_pages):
  """Whether row b's copy-on-write (src, dst) is the model's: (old page, new page), or dst N."""
  return (int(src), int(dst)) == copies[b] if b in copies else int(dst) == n_pages


def check(pages, model, lengths):
  np.testing.assert_array_equal(np.asarray(pages.table), model.table())
  np.testing.assert_array_equal(np.asarray(pages.refcount), model.refcount())
  np.testing.assert_array_equal(np.asarray(pages.pins), model.pins)
  assert page_table.audit(pages, lengths) == []
  assert int(page_table.free_count(pages)) == sum(c == 0 for c in model.refcount())


tokens = st.lists(st.integers(0, 6), min_size=B, max_size=B)
rows = st.integers(0, B - 1)
op = st.one_of(
    st.tuples(st.just("reserve"), tokens),
    st.tuples(st.just("one_row"), rows, st.integers(1, 6)),
    st.tuples(st.just("release"), st.lists(st.booleans(), min_size=B, max_size=B)),
    st.tuples(st.just("fork"), rows, rows),
    st.tuples(st.just("reorder"), st.lists(rows, min_size=B, max_size=B)),
    st.tuples(st.just("crop"), st.integers(0, M * P)),
    st.tuples(st.just("adopt"), rows, st.integers(0, 2**16)),
    st.tuples(st.just("pin"), st.integers(0, 2**16)),
    st.tuples(st.just("unpin"), st.integers(0, 2**16)))


@examples(20)
@given(ops=st.lists(op, min_size=1, max_size=12), n_pages=st.sampled_from([4, 6, 12]))
def test_matches_the_python_allocator(ops, n_pages):
  """Random operations (the pool running dry included): same table, counts, pins, refusals and
  copies as the model after every one; nothing for `audit` to find."""
  pages, model = page_table.empty(B, M, n_pages, P), Allocator(n_pages)
  lengths = np.zeros(B, int)
  for kind, *args in ops:
    if kind == "reserve":
      n = np.asarray(args[0])
      want = model.needed(lengths, n)
      assert np.asarray(jitted["pages_needed"](pages, jnp.asarray(lengths), jnp.asarray(n))).tolist() == want
      pages, ok, src, dst = jitted["reserve"](pages, jnp.asarray(lengths), jnp.asarray(n))
      want_ok, copies = model.reserve(lengths, n)
      assert np.asarray(ok).tolist() == want_ok
      assert all(copy_made(src[b], dst[b], copies, b, n_pages) for b in range(B))
      lengths = np.where(want_ok, np.minimum(lengths + n, M * P), lengths)
    elif kind == "one_row":
      row, k = args
      n = np.zeros(B, int)
      n[row] = k
      pages, ok, src, dst = _one_row(pages, jnp.asarray(lengths), row, k)
      want_ok, copies = model.reserve(lengths, n)
      assert bool(ok) == want_ok[row]
      assert copy_made(src, dst, copies, row, n_pages)
      lengths = np.where(want_ok, np.minimum(lengths + n, M * P), lengths)
    elif kind == "release":
      mask = np.asarray(args[0])
      pages = jitted["release"](pages, jnp.asarray(mask))
      for b in np.flatnonzero(mask):
        model.rows[b] = []
      lengths = np.where(mask, 0, lengths)
    elif kind == "fork":
      src, dst = args
      pages = jitted["fork"](pages, jnp.asarray([src]), jnp.asarray([dst]))
      model.rows[dst] = list(model.rows[src])
      lengths[dst] = lengths[src]
    elif kind == "reorder":
      idx = np.asarray(args[0])
      pages = jitted["reorder"](pages, jnp.asarray(idx))
      model.rows = [list(model.rows[i]) for i in idx]
      lengths = lengths[idx]
    elif kind == "crop":
      lengths = np.minimum(lengths, args[0])
      pages = jitted["crop"](pages, jnp.asarray(lengths))
      model.rows = [row[:-(-int(t) // P)] for row, t in zip(model.rows, lengths)]
    elif kind == "adopt":  # a prefix hit: k distinct pages, the last one possibly partial
      row, seed = args
      rng = np.random.default_rng(seed)
      k = int(rng.integers(0, min(M, n_pages) + 1))
      held = [int(q) for q in rng.choice(n_pages, k, replace=False)]
      length = 0 if k == 0 else int(rng.integers((k - 1) * P + 1, k * P + 1))
      pages = jitted["adopt"](pages, row, jnp.asarray(held + [n_pages] * (M - k)))
      model.rows[row] = held
      lengths[row] = length
    else:  # pin any page, or unpin a pinned one (unpinning an unpinned page is a caller's bug)
      rng = np.random.default_rng(args[0])
      choices = range(n_pages) if kind == "pin" else np.flatnonzero(model.pins)
      if len(choices):
        q = int(rng.choice(choices))
        count = 1 if kind == "pin" else -1
        pages = jitted["pin"](pages, jnp.asarray([q, n_pages]), count)  # N entries are ignored
        model.pins[q] += count
    check(pages, model, lengths)


def test_forks_writing_at_once_each_copy_and_free_the_original():
  """Three rows sharing a half-filled page all write in one call: each takes a copy, the shared
  original goes free, and the full page before it stays shared."""
  pages = page_table.empty(B, M, 6, P)
  pages, *_ = page_table.reserve(pages, jnp.zeros(B, jnp.int32), jnp.asarray([6, 0, 0]))
  pages = page_table.fork(pages, jnp.asarray([0, 0]), jnp.asarray([1, 2]))
  lengths = jnp.full((B,), 6, jnp.int32)
  assert np.asarray(page_table.pages_needed(pages, lengths, 1)).tolist() == [1, 1, 1]
  pages, ok, src, dst = page_table.reserve(pages, lengths, 1)
  table = np.asarray(pages.table)
  assert np.asarray(ok).all() and np.asarray(src).tolist() == [1, 1, 1]
  assert table[:, 0].tolist() == [0, 0, 0] and sorted(table[:, 1].tolist()) == [2, 3, 4]
  assert int(page_table.free_count(pages)) == 2 and np.asarray(pages.refcount)[1] == 0
  assert page_table.audit(pages, lengths + 1) == []


def test_pinned_pages_outlive_their_rows():
  pages = page_table.empty(B, M, 4, P)
  pages, *_ = page_table.reserve(pages, jnp.zeros(B, jnp.int32), jnp.asarray([8, 0, 0]))
  pages = page_table.release(page_table.pin(pages, jnp.asarray([0, 1])), jnp.asarray([True, False, False]))
  assert int(page_table.used_count(pages)) == 2 and page_table.audit(pages) == []
  pages = page_table.unpin(pages, jnp.asarray([0, 1]))
  assert int(page_table.free_count(pages)) == 4


def test_audit_names_each_kind_of_damage():
  pages = page_table.empty(B, M, 4, P)
  pages, *_ = page_table.reserve(pages, jnp.zeros(B, jnp.int32), jnp.asarray([5, 0, 0]))
  assert page_table.audit(pages, jnp.asarray([5, 0, 0])) == []
  drift = pages.replace(refcount=pages.refcount.at[2].set(1))  # counted, held by no row
  assert any("page 2 leaked" in s for s in page_table.audit(drift))
  double = pages.replace(table=pages.table.at[1, 0].set(0))  # a second owner, not counted
  assert any("page 0 owned 2 times" in s for s in page_table.audit(double))
  twice = page_table._recounted(pages, pages.table.at[0, 1].set(0))
  assert any("holds a page twice" in s for s in page_table.audit(twice))
  pinned = pages.replace(pins=pages.pins.at[3].set(1))  # a pin the count never saw
  assert any("pinned 1 times with refcount 0" in s for s in page_table.audit(pinned))
  negative = page_table.unpin(pages, jnp.asarray([3]))
  assert any("negative pin" in s for s in page_table.audit(negative))
  assert any("row 0 of 9 tokens" in s for s in page_table.audit(pages, jnp.asarray([9, 0, 0])))
