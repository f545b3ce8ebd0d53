"""Row surgery on a `PagedCache`, beyond the cache protocol: what the engine and the prefix store
do to whole rows. Each function takes a cache and returns a new one (the allocator's side is a
pure function of `kvjax.caches.page_table`; these keep lengths, failure flags and the pool in step
with it). `PagedCache.fork` / `release` / `compact` / `widen` call the functions of those names.

  fork / release         rows share another row's pages; rows give theirs back (jit-safe)
  row_view / merge_row   prefill one row through a batch-1 cache over the shared pool (jit-safe)
  adopt                  a row points at pages it did not write: a prefix-cache hit (jit-safe)
  pin / unpin            references from outside the rows (the engine's page index) (jit-safe)
  compact / widen        the prefix store's shapes: keep a prefix's pages only, then share them
                         among B rows (outside jit: shapes change)
  row_pages              the pages one row holds, in order (outside jit)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.caches import page_table

if TYPE_CHECKING:
  from kvjax.caches.paged import PagedCache


def row_view(cache: PagedCache, row) -> PagedCache:
  """A batch-1 cache of row `row` (int, may be traced) over the same pool: prefill one request
  without computing the other rows. The other rows' references travel as pins, so the view never
  takes their pages; `merge_row` puts the result back."""
  return cache.replace(pages=page_table.row_view(cache.pages, row),
                       lengths=jax.lax.dynamic_slice_in_dim(cache.lengths, row, 1),
                       failed=jax.lax.dynamic_slice_in_dim(cache.failed, row, 1))


def merge_row(cache: PagedCache, row, view: PagedCache) -> PagedCache:
  """`cache` with row `row` (and the pool) taken from `view`, a `row_view` of it."""
  put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, row, 0)
  return cache.replace(pages=page_table.merge_row(cache.pages, row, view.pages), pool=view.pool,
                       lengths=put(cache.lengths, view.lengths),
                       failed=put(cache.failed, view.failed))


def fork(cache: PagedCache, src, dst) -> PagedCache:
  """Rows dst[i] become copies of rows src[i] (int [n] each) sharing their pages; the other rows
  are unchanged. What dst rows held is given back."""
  src, dst = jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32)
  return cache.replace(pages=page_table.fork(cache.pages, src, dst),
                       lengths=cache.lengths.at[dst].set(cache.lengths[src]),
                       failed=cache.failed.at[dst].set(cache.failed[src]))


def release(cache: PagedCache, rows) -> PagedCache:
  """Empties the rows where rows (bool [B]) is true and gives their pages back (a page another
  row or a pin still references stays)."""
  rows = jnp.asarray(rows, bool)
  return cache.replace(pages=page_table.release(cache.pages, rows),
                       lengths=jnp.where(rows, 0, cache.lengths), failed=cache.failed & ~rows)


def adopt(cache: PagedCache, row, pages, length) -> PagedCache:
  """Row `row` (int) becomes a row of `length` tokens held by `pages` (int32 [M], the "no page"
  marker N past the ones used): a prefix-cache hit. What the row held is given back."""
  return cache.replace(pages=page_table.adopt(cache.pages, row, pages),
                       lengths=cache.lengths.at[row].set(jnp.asarray(length, jnp.int32)),
                       failed=cache.failed.at[row].set(False))


def pin(cache: PagedCache, pages, count=1) -> PagedCache:
  """Adds `count` outside references to pages (int32 [n]; N entries ignored): they stay allocated
  when no row holds them (the engine's page index does this)."""
  return cache.replace(pages=page_table.pin(cache.pages, pages, count))


def unpin(cache: PagedCache, pages) -> PagedCache:
  """Takes one outside reference from each of pages (int32 [n]; N entries ignored)."""
  return cache.replace(pages=page_table.unpin(cache.pages, pages))


def compact(cache: PagedCache) -> PagedCache:
  """The same rows in a pool of only the pages they reference (renumbered in order of first
  use): what `PrefixStore` keeps of a prefilled prefix."""
  pages, kept = page_table.compact(cache.pages)
  idx = jnp.asarray(kept)
  return cache.replace(pool=tuple(a[:, :, idx] for a in cache.pool), pages=pages)


def widen(cache: PagedCache, batch: int, room: int) -> PagedCache:
  """`batch` rows that all point at the pages of a batch-1 cache (no page is copied), in a pool
  with `room` more tokens' worth of pages per row (plus one for a copied shared last page)."""
  if cache.batch != 1:
    raise ValueError(f"widen: expected a batch-1 cache, got batch {cache.batch}")
  extra = batch * (-(-room // cache.page_size) + 1)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 3))
  return cache.replace(pool=tuple(pad(a) for a in cache.pool),
                       pages=page_table.widen(cache.pages, batch, extra),
                       lengths=jnp.tile(cache.lengths, batch), failed=jnp.tile(cache.failed, batch))


def row_pages(cache: PagedCache, row: int) -> np.ndarray:
  """The pages row `row` holds, in order (outside jit)."""
  return page_table.row_pages(cache.pages, row, int(cache.lengths[row]))
