"""The page allocator of `paged:P`: a `PageTable` pytree and pure functions over it.

A pool of N pages of P tokens is shared by B rows; each row may hold up to M pages (capacity
M x P tokens). The table knows which page holds which row's positions and who references each
page; it knows nothing of what the pages contain (the cache owns the pool and attention):

  table    int32 [B, M]: table[b, j] is the page holding row b's positions [jP, (j+1)P), or N
           ("no page") where none is assigned
  refcount int32 [N]: table entries plus pins pointing at each page; a page is free iff 0
  pins     int32 [N]: references held from outside the rows (e.g. an engine's prefix index)

Every function here is pure and traceable under `jit` (shapes never change), except `compact`,
`widen`, `row_pages` and `audit`, which read concrete arrays. Functions that need to know how far
each row has written take its token counts `lengths` int32 [B] from the caller: the table is not
the owner of lengths (the cache is).

Invariants (after any sequence of these functions; `audit` lists the ones broken):
  * refcount == (entries of the table pointing at the page) + pins, recomputed from the table on
    every change, so the counts cannot drift;
  * no page is leaked (referenced by nothing yet counted), none is owned by more table entries
    than its count says, pins are never negative, and free + used == N;
  * a row that holds L tokens holds exactly its first ceil(min(L, MP) / P) pages and nothing past
    them (when the caller passes lengths), and never the same page twice.

Allocation (`reserve`): rows take free pages in row order, each in page order; a row about to write
into a partially filled page that another row or a pin also references gets a fresh copy of it
first (copy-on-write), decided on the counts before the call, so when every holder of a shared page
writes into it at once each takes a copy and the original goes free. A row whose demand exceeds
what is left gets nothing (`ok` false) and later rows still queue behind its demand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class PageTable:
  """Block table and reference counts of a page pool (see the module docstring).

  table: int32 [B, M]; refcount, pins: int32 [N]; page_size: P (static).
  """

  table: jax.Array
  refcount: jax.Array
  pins: jax.Array
  page_size: int = struct.field(pytree_node=False)

  @property
  def n_pages(self) -> int:
    """Pages in the pool (N); also the table's "no page" marker."""
    return self.refcount.shape[0]

  @property
  def batch(self) -> int:
    return self.table.shape[0]

  @property
  def max_pages(self) -> int:
    return self.table.shape[1]

  @property
  def capacity(self) -> int:
    """Tokens one row may hold (M x P)."""
    return self.max_pages * self.page_size


def empty(batch: int, max_pages: int, n_pages: int, page_size: int) -> PageTable:
  """A table of `batch` rows of at most `max_pages` pages over `n_pages` free pages."""
  return PageTable(table=jnp.full((batch, max_pages), n_pages, jnp.int32),
                   refcount=jnp.zeros((n_pages,), jnp.int32), pins=jnp.zeros((n_pages,), jnp.int32),
                   page_size=page_size)


def _recounted(pages: PageTable, table=None, pins=None) -> PageTable:
  """`pages` with a new table and/or pins, and the counts recomputed from them."""
  table = pages.table if table is None else table
  pins = pages.pins if pins is None else pins
  held = jnp.zeros((pages.n_pages + 1,), jnp.int32).at[table.reshape(-1)].add(1)
  return pages.replace(table=table, pins=pins, refcount=held[:-1] + pins)


# ---- counts ------------------------------------------------------------------------------------
def free_count(pages: PageTable) -> jax.Array:
  """int32 []: pages nobody references."""
  return jnp.sum(pages.refcount == 0).astype(jnp.int32)


def used_count(pages: PageTable) -> jax.Array:
  """int32 []: pages some row or pin references."""
  return pages.n_pages - free_count(pages)


def _missing(pages: PageTable, lengths, n, first=None) -> jax.Array:
  """bool [B, M]: pages a row lacks to hold its next n [B] tokens (capped at the capacity); with
  first int32 [B], only pages from first on (those before it were given back: `drop_before`)."""
  p = pages.page_size
  end = jnp.minimum(lengths + n, pages.capacity)
  j = jnp.arange(pages.max_pages, dtype=jnp.int32)[None, :]
  missing = (j < (end[:, None] + p - 1) // p) & (pages.table == pages.n_pages)
  return missing if first is None else missing & (j >= first[:, None])


def must_copy(pages: PageTable, lengths, n) -> jax.Array:
  """int32 [B]: 1 where a row's next token (n [B] > 0 of them) goes into a partially filled page
  that another row or a pin also references: the row needs a private copy first."""
  p, n_pages = pages.page_size, pages.n_pages
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), lengths.shape)
  col = jnp.minimum(lengths // p, pages.max_pages - 1)
  page = jnp.take_along_axis(pages.table, col[:, None], axis=1)[:, 0]
  shared = pages.refcount[jnp.minimum(page, n_pages - 1)] > 1
  return ((lengths % p != 0) & (n > 0) & (page < n_pages) & shared
          & (lengths < pages.capacity)).astype(jnp.int32)


def pages_needed(pages: PageTable, lengths, n, first=None) -> jax.Array:
  """int32 [B]: new pages each row takes to hold n (int or [B]) more tokens, a copy-on-write copy
  of a shared last page included (first: see `_missing`)."""
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), lengths.shape)
  return (jnp.sum(_missing(pages, lengths, n, first), axis=1).astype(jnp.int32)
          + must_copy(pages, lengths, n))


def pages_short(pages: PageTable, lengths, n, first=None) -> jax.Array:
  """int32 []: pages the pool lacks for n (int or [B]) more tokens per row (0: they fit)."""
  return jnp.maximum(jnp.sum(pages_needed(pages, lengths, n, first)) - free_count(pages), 0)


# ---- allocation --------------------------------------------------------------------------------
def reserve(pages: PageTable, lengths, n, first=None):
  """Takes the pages the rows need for n [B] more tokens (see the module docstring); with first
  int32 [B], none before page first (a window's rows: see `drop_before`).

  Returns (pages, ok, src, dst): ok bool [B] false for rows refused for want of free pages (they
  took nothing); src, dst int32 [B] the copy-on-write copies the caller must make in its pool
  (page src into page dst), dst == N where a row copies nothing.
  """
  p, n_pages, batch = pages.page_size, pages.n_pages, pages.batch
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), lengths.shape)
  missing = _missing(pages, lengths, n, first)  # [B, M]
  copy = must_copy(pages, lengths, n)  # [B]
  demand = jnp.sum(missing, axis=1).astype(jnp.int32) + copy
  free = pages.refcount == 0
  free_ids = jnp.nonzero(free, size=n_pages, fill_value=n_pages)[0].astype(jnp.int32)
  start = jnp.cumsum(demand) - demand  # where each row's pages start in the free list
  ok = (demand == 0) | (start + demand <= jnp.sum(free))
  rank = jnp.cumsum(missing, axis=1) - 1
  taken = free_ids[jnp.clip(start[:, None] + rank, 0, n_pages - 1)]
  table = jnp.where(missing & ok[:, None], taken, pages.table)
  # copy-on-write: the row's private copy of its shared last page is the last page it took
  rows = jnp.arange(batch)
  col = jnp.minimum(lengths // p, pages.max_pages - 1)
  src = pages.table[rows, col]
  dst = free_ids[jnp.clip(start + demand - 1, 0, n_pages - 1)]
  do_copy = (copy > 0) & ok
  table = table.at[rows, col].set(jnp.where(do_copy, dst, table[rows, col]))
  dst = jnp.where(do_copy, dst, n_pages)
  return _recounted(pages, table), ok, jnp.minimum(src, n_pages - 1), dst


# ---- rows --------------------------------------------------------------------------------------
def reset(pages: PageTable) -> PageTable:
  """No page referenced, no pin."""
  return empty(pages.batch, pages.max_pages, pages.n_pages, pages.page_size)


def release(pages: PageTable, rows) -> PageTable:
  """Rows where rows (bool [B]) is true hold nothing; pages nobody else references go free."""
  rows = jnp.asarray(rows, bool)
  return _recounted(pages, jnp.where(rows[:, None], pages.n_pages, pages.table))


def drop_before(pages: PageTable, first) -> PageTable:
  """Each row gives back its pages before page first[b] (int32 [B]): a sliding window's rows,
  whose later queries never look that far back. A page another row or a pin references stays."""
  j = jnp.arange(pages.max_pages, dtype=jnp.int32)[None, :]
  return _recounted(pages, jnp.where(j < first[:, None], pages.n_pages, pages.table))


def crop(pages: PageTable, lengths) -> PageTable:
  """Each row keeps only the pages that hold its first lengths [B] (or int) tokens."""
  p = pages.page_size
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (pages.batch,))
  keep = jnp.arange(pages.max_pages)[None, :] < ((lengths + p - 1) // p)[:, None]
  return _recounted(pages, jnp.where(keep, pages.table, pages.n_pages))


def reorder(pages: PageTable, indices) -> PageTable:
  """Row b becomes row indices[b] (int [B]): rows share pages, nothing is copied."""
  return _recounted(pages, jnp.take(pages.table, jnp.asarray(indices, jnp.int32), axis=0))


def fork(pages: PageTable, src, dst) -> PageTable:
  """Rows dst[i] point at the pages of rows src[i] (int [n] each); what dst rows held is given
  back. The first write into a shared partially filled page copies it (see `reserve`)."""
  src, dst = jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32)
  return _recounted(pages, pages.table.at[dst].set(pages.table[src]))


def adopt(pages: PageTable, row, held) -> PageTable:
  """Row `row` (int) points at `held` (int32 [M], N past the pages used): a prefix-cache hit.
  What the row held is given back."""
  return _recounted(pages, pages.table.at[row].set(jnp.asarray(held, jnp.int32)))


def pin(pages: PageTable, ids, count=1) -> PageTable:
  """Adds `count` outside references to pages ids (int32 [n]; N entries ignored): they stay
  allocated while pinned, whether a row holds them or not."""
  pins = pages.pins.at[jnp.asarray(ids, jnp.int32)].add(count, mode="drop")
  return _recounted(pages, pins=pins)


def unpin(pages: PageTable, ids) -> PageTable:
  """Drops one outside reference to each of the pages ids (see `pin`)."""
  return pin(pages, ids, -1)


def row_view(pages: PageTable, row) -> PageTable:
  """A one-row table of row `row` (int, may be traced) over the same pool: the other rows'
  references travel as pins, so allocating for the view never takes their pages."""
  table = jax.lax.dynamic_slice_in_dim(pages.table, row, 1, axis=0)
  own = _recounted(pages, table, jnp.zeros_like(pages.pins)).refcount
  return pages.replace(table=table, pins=pages.refcount - own)


def merge_row(pages: PageTable, row, view: PageTable) -> PageTable:
  """`pages` with row `row` taken from `view`, a `row_view` of it (its pins are dropped)."""
  return _recounted(pages, jax.lax.dynamic_update_slice_in_dim(pages.table, view.table, row, axis=0))


# ---- outside jit -------------------------------------------------------------------------------
def row_pages(pages: PageTable, row: int, length: int) -> np.ndarray:
  """The pages row `row` holds for its first `length` tokens, in order (read on the host: no
  device slice, so no compile per length)."""
  used = -(-int(length) // pages.page_size)
  return np.asarray(pages.table)[row, :used]


def compact(pages: PageTable) -> tuple[PageTable, np.ndarray]:
  """The same rows over a pool of only the pages they reference, renumbered in order of first
  use. Returns (pages, kept): kept int32 [N'] the old number of each new page (one page if none
  is used, so the pool never becomes empty)."""
  table = np.asarray(pages.table)
  used = list(dict.fromkeys(int(q) for q in table.reshape(-1) if q < pages.n_pages)) or [0]
  remap = np.full(pages.n_pages + 1, len(used), np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  kept = np.asarray(used, np.int32)
  return pages.replace(table=jnp.asarray(remap[table]), pins=pages.pins[kept],
                       refcount=pages.refcount[kept]), kept


def widen(pages: PageTable, batch: int, extra: int) -> PageTable:
  """`batch` rows that all point at this one-row table's pages, over a pool of `extra` more
  (free) pages at the end."""
  if pages.batch != 1:
    raise ValueError(f"widen: expected a one-row page table, got {pages.batch} rows")
  n = pages.n_pages + extra
  table = jnp.where(pages.table == pages.n_pages, n, pages.table)
  wide = pages.replace(pins=jnp.pad(pages.pins, (0, extra)), refcount=jnp.zeros((n,), jnp.int32))
  return _recounted(wide, jnp.tile(table, (batch, 1)))


def audit(pages: PageTable, lengths=None, *, rows=None, window: int | None = None) -> list[str]:
  """The invariants of the module docstring that `pages` breaks, as readable sentences (empty:
  none). With lengths int32 [B], also checks that each row (of `rows`, default all) holds exactly
  the pages its tokens need; pass rows to skip rows whose tokens were refused (`failed`). With
  `window` (rows that give back pages behind a sliding window: `drop_before`), a row holds one
  unbroken run of pages that ends with its last token's and reaches back at least to the page of
  position length - window + 1 (what its next query sees)."""
  table = np.asarray(pages.table)
  refcount, pins = np.asarray(pages.refcount), np.asarray(pages.pins)
  n, p = pages.n_pages, pages.page_size
  problems = []
  bad = (table < 0) | (table > n)
  if bad.any():
    problems.append(f"table entries outside [0, {n}]: {sorted(set(table[bad].tolist()))}")
  owners = np.bincount(table[~bad].reshape(-1), minlength=n + 1)[:n]
  for q in np.flatnonzero(refcount != owners + pins):
    problems.append(f"page {q}: refcount {refcount[q]} != {owners[q]} table entries + {pins[q]} pins")
  for q in np.flatnonzero((refcount > 0) & (owners == 0) & (pins == 0)):
    problems.append(f"page {q} leaked: refcount {refcount[q]} but no row holds it and no pin")
  for q in np.flatnonzero(owners > refcount):
    problems.append(f"page {q} owned {owners[q]} times but its refcount is {refcount[q]}")
  for q in np.flatnonzero(pins < 0):
    problems.append(f"page {q} has a negative pin count {pins[q]}")
  for q in np.flatnonzero((pins > 0) & (refcount == 0)):
    problems.append(f"page {q} pinned {pins[q]} times with refcount 0")
  free = int(np.sum(refcount == 0))
  used = int(np.sum((owners > 0) | (pins > 0)))
  if free + used != n:
    problems.append(f"free {free} + used {used} != {n} pages")
  for b, row in enumerate(table):
    real = row[row < n]
    if len(set(real.tolist())) != len(real):
      problems.append(f"row {b} holds a page twice: {real.tolist()}")
  if lengths is not None:
    lengths = np.asarray(lengths)
    check = range(len(table)) if rows is None else np.flatnonzero(np.asarray(rows))
    for b in check:
      want = -(-min(int(lengths[b]), pages.capacity) // p)
      held = table[b] < n
      if window is not None:
        first = max(int(lengths[b]) - window + 1, 0) // p
        start = int(np.argmax(held)) if held.any() else want
        if not held[min(start, first):want].all() or held[want:].any():
          problems.append(f"row {b} of {int(lengths[b])} tokens (window {window}) should hold "
                          f"pages {first}..{want - 1} unbroken and none after, holds "
                          f"{table[b].tolist()} ({n}: no page)")
        continue
      if not held[:want].all() or held[want:].any():
        problems.append(f"row {b} of {int(lengths[b])} tokens should hold its first {want} pages, "
                        f"holds {table[b].tolist()} ({n}: no page)")
  return problems
