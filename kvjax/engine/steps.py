"""The engine's jitted pieces: prefill a row in chunks, one decode step, and the page surgery.

Each is a module-level `jax.jit` with the model's step function and the sampler static and the
cache donated, so JAX keys the executables and a warm engine compiles nothing new. Shapes never
depend on a request: prefill chunks are padded to one of `CHUNKS` tokens and pin lists to a fixed
batch of M pages, so every request reuses the same few executables.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.caches import paged_rows

CHUNKS = (16, 64, 256)  # prefill chunk sizes: one executable each


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _prefill_chunk(params, tokens, n_valid, cache, row, *, model):
  """Feeds tokens [1, C] (n_valid [1] real) to row `row`; returns (last logits [V], cache)."""
  view = paged_rows.row_view(cache, row)
  logits, view = model.step_last(params, tokens, view, n_valid)
  return logits[0], paged_rows.merge_row(cache, row, view)


def prefill(params, ids: np.ndarray, cache, row: int, *, model):
  """Feeds the prompt ids int32 [n] (n > 0) to row `row` in chunks of `CHUNKS` sizes, through a
  batch-1 view of the row; returns (the last token's logits [V], cache)."""
  logits = None
  start = 0
  while start < ids.size:
    left = ids.size - start
    size = next((c for c in CHUNKS if c >= left), CHUNKS[-1])
    n = min(size, left)
    chunk = np.zeros((1, size), np.int32)
    chunk[0, :n] = ids[start:start + n]
    logits, cache = _prefill_chunk(params, jnp.asarray(chunk), jnp.asarray([n], jnp.int32), cache,
                                   row, model=model)
    start += n
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
  return paged_rows.release(cache, rows)


@functools.partial(jax.jit, donate_argnames=("cache",))
def fork(cache, src, dst):
  """Rows dst[i] share the pages of rows src[i] (int32 [n] each)."""
  return paged_rows.fork(cache, src, dst)


@functools.partial(jax.jit, donate_argnames=("cache",))
def adopt(cache, row, pages, length):
  """Row `row` becomes `length` tokens held by pages (int32 [M], N past the used ones)."""
  return paged_rows.adopt(cache, row, pages, length)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _pin(cache, pages, count):
  return paged_rows.pin(cache, pages, count)


def pin(cache, pages: list[int], count: int):
  """Adds count (1 or -1) to the pins of pages, in batches of M (one executable for any number;
  the "no page" marker N pads the last batch and is ignored)."""
  size, n_pages = cache.pages.max_pages, cache.pages.n_pages
  for i in range(0, len(pages), size):
    batch = np.full(size, n_pages, np.int32)
    batch[:len(pages[i:i + size])] = pages[i:i + size]
    cache = _pin(cache, jnp.asarray(batch), jnp.int32(count))
  return cache
