"""The engine's jitted pieces: prefill a row in chunks, one decode step, and the page surgery.

Each is a module-level `jax.jit` with the model's step function and the sampler static and the
cache donated, so JAX keys the executables and a warm engine compiles nothing new. Shapes never
depend on a request: prefill chunks are padded to one of `CHUNKS` tokens and pin lists to a fixed
batch of M pages, so every request reuses the same few executables.

The cache is a `PagedCache`, or a `HybridCache` whose groups are all paged (a model with sliding
layers: see `kvjax.engine.pools`); row surgery applies to every group, and what names pages
(`adopt`'s tables, `pin`) names them per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.caches import paged_rows
from kvjax.caches.hybrid import HybridCache

CHUNKS = (16, 64, 256)  # prefill chunk sizes: one executable each


def groups(cache) -> tuple:
  """The paged caches of `cache`: its groups, or (cache,) for a plain PagedCache."""
  return cache.groups if isinstance(cache, HybridCache) else (cache,)


def _rebuilt(cache, parts):
  """`cache` with its paged caches replaced by `parts` (a tuple like `groups(cache)`)."""
  return cache.replace(groups=tuple(parts)) if isinstance(cache, HybridCache) else parts[0]


def _each(fn, cache, *others):
  """fn applied to each paged cache of `cache` (with the matching ones of `others`)."""
  return _rebuilt(cache, tuple(fn(*parts) for parts in zip(groups(cache), *map(groups, others))))


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _prefill_chunk(params, tokens, n_valid, cache, row, *, model):
  """Feeds tokens [1, C] (n_valid [1] real) to row `row`; returns (last logits [V], cache)."""
  view = _each(lambda c: paged_rows.row_view(c, row), cache)
  logits, view = model.step_last(params, tokens, view, n_valid)
  return logits[0], _each(lambda c, v: paged_rows.merge_row(c, row, v), cache, view)


def prefill(params, ids: np.ndarray, cache, row: int, *, model, after_chunk=None, chunks=CHUNKS):
  """Feeds the prompt ids int32 [n] (n > 0) to row `row` in chunks of the `chunks` sizes
  (ascending), through a batch-1 view of the row; returns (the last token's logits [V], cache).
  `after_chunk(cache, fed)` (fed: ids fed so far) may return a new cache between chunks (the
  engine pins window pages before the next chunk gives them back)."""
  logits = None
  start = 0
  while start < ids.size:
    left = ids.size - start
    size = next((c for c in chunks if c >= left), chunks[-1])
    n = min(size, left)
    chunk = np.zeros((1, size), np.int32)
    chunk[0, :n] = ids[start:start + n]
    logits, cache = _prefill_chunk(params, jnp.asarray(chunk), jnp.asarray([n], jnp.int32), cache,
                                   row, model=model)
    start += n
    if after_chunk is not None:
      cache = after_chunk(cache, start)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("sampler", "n"))
def draw(logits, key, *, sampler, n):
  """n independent draws from logits [V] -> int32 [n]."""
  return sampler(jnp.broadcast_to(logits, (n,) + logits.shape), key)


@functools.partial(jax.jit, static_argnames=("model", "sampler"), donate_argnames=("cache",))
def step(params, last, active, cache, key, *, model, sampler):
  """One token for every active row: last int32 [B], active bool [B] -> (tokens [B], cache)."""
  logits, cache = model.step(params, last[:, None], cache, active.astype(jnp.int32))
  return sampler(logits[:, 0], key), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def release(cache, rows):
  """Empties the rows where rows (bool [B]) is true and gives their pages back."""
  return _each(lambda c: paged_rows.release(c, rows), cache)


@functools.partial(jax.jit, donate_argnames=("cache",))
def fork(cache, src, dst):
  """Rows dst[i] share the pages of rows src[i] (int32 [n] each)."""
  return _each(lambda c: paged_rows.fork(c, src, dst), cache)


@functools.partial(jax.jit, donate_argnames=("cache",))
def adopt(cache, row, tables, length):
  """Row `row` becomes `length` tokens held, in each paged cache, by the pages of its table in
  `tables` (a tuple of int32 [M] like `groups(cache)`: that pool's N past the used ones)."""
  parts = tuple(paged_rows.adopt(c, row, t, length) for c, t in zip(groups(cache), tables))
  return _rebuilt(cache, parts)


@functools.partial(jax.jit, static_argnames=("group",), donate_argnames=("cache",))
def _pin(cache, pages, count, *, group):
  parts = list(groups(cache))
  parts[group] = paged_rows.pin(parts[group], pages, count)
  return _rebuilt(cache, tuple(parts))


def pin(cache, pages: list[int], count: int, group: int = 0):
  """Adds count (1 or -1) to the pins of pages of paged cache `group` (see `groups`), in batches
  of M (one executable for any number; the "no page" marker N pads the last batch and is
  ignored)."""
  target = groups(cache)[group]
  size, n_pages = target.pages.max_pages, target.pages.n_pages
  for i in range(0, len(pages), size):
    batch = np.full(size, n_pages, np.int32)
    batch[:len(pages[i:i + size])] = pages[i:i + size]
    cache = _pin(cache, jnp.asarray(batch), jnp.int32(count), group=group)
  return cache
