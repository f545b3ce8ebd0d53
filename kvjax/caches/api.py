"""Pure functions over any cache kind: `append`, `attend`, `advance`, `view`, `reset`, `crop`,
`reorder`, `grow`, `nbytes`.

Each returns a new cache (or a view); none touches its input. All are traceable under `jit`.
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.caches import base


def append(cache, k, v, n_valid=None):
  """Writes new tokens to every layer at each row's own position and advances `lengths`.

  Args:
    cache: any kvjax cache.
    k, v: [L, B, K, T, H] new keys/values (stored as given: rotate keys yourself if you want them
      rotated; the decoder's `attend` does that for you).
    n_valid: optional int [B]: only the first n_valid[b] of the T tokens of row b are real.

  Raises:
    CapacityError: outside jit, when a row would go past a capacity-limited cache's capacity. Inside jit the
      extra tokens are dropped and `cache.overflowed()` marks the row (see the kind's docstring).
  """
  base.check_new_kv(k, v, n_layers=cache.n_layers, batch=cache.batch, kv_heads=cache.kv_heads,
                    head_dim=cache.head_dim)
  tokens = k.shape[3]
  n_valid = base.normalize_n_valid(n_valid, cache.batch, tokens)
  if cache.limited and base.is_concrete(cache.lengths) and base.is_concrete(n_valid):
    after = cache.lengths + n_valid
    row = int(jnp.argmax(after))
    # fits(), not the capacity: a hybrid's capacity is its largest group's, and a smaller limited
    # group (a full global layer beside a wider window ring) overflows first
    if not cache.fits(int(after[row])):
      where = ("" if int(after[row]) > cache.capacity else
               f" (a limited group of its layers holds fewer; fits({int(after[row])}) is False)")
      raise base.CapacityError(
          f"append: row {row} would hold {int(after[row])} tokens but the cache capacity is "
          f"{cache.capacity}{where}")
  paged = isinstance(cache, base.PagedStorage)  # kinds that draw pages from a shared pool
  if paged and base.is_concrete(cache.lengths) and base.is_concrete(n_valid):
    missing = int(cache.pages_short(n_valid))
    if missing > 0:
      raise base.CapacityError(f"append: the page pool is {missing} page(s) short for these tokens "
                               f"({int(cache.free_pages())} free of {cache.n_pages})")
  for layer in range(cache.n_layers):
    cache = cache.write(layer, k[layer].transpose(0, 2, 1, 3), v[layer].transpose(0, 2, 1, 3), n_valid)
  return cache.advance(n_valid)


def view(cache) -> base.CacheView:
  """Keys, values [L, B, K, S, H], validity mask and positions [L, B, K, S] of what attention reads."""
  return cache.view()


def reset(cache):
  """An empty cache of the same kind and shapes."""
  return cache.reset()


def crop(cache, length):
  """Forgets every token at position >= length (scalar or per row [B]); for speculative decoding."""
  return cache.crop(length)


def reorder(cache, indices):
  """Row b of the result is row indices[b] of `cache` (beam search)."""
  return cache.reorder(indices)


def grow(cache, capacity: int | None = None):
  """The same tokens in a buffer of `capacity` slots (default: double). Outside jit only."""
  return cache.grow(capacity or 2 * cache.capacity)


def advance(cache, n_valid):
  """After the last layer of a forward: `lengths += n_valid` (and the kind's bookkeeping)."""
  return cache.advance(n_valid)


def attend(cache, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
  """`cache.attend(...)`: store the new tokens of one layer and attend over what it holds.

  q [B, T, N, H], k/v [B, T, K, H] un-rotated; returns (out [B, T, N, H], cache). See
  `kvjax.caches.base.KVCache` for the contract.
  """
  return cache.attend(layer, q, k, v, n_valid, rope=rope, scale=scale)


def nbytes(cache) -> dict[str, int]:
  """Bytes held by the cache's arrays, split by memory kind."""
  return cache.nbytes()


def total_bytes(cache) -> int:
  return sum(cache.nbytes().values())
