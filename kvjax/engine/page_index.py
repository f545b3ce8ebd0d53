"""Prefix caching on pages: `PageIndex`, full prompt pages by the hash chain of their tokens, and
`WindowPages`, the same keys' pages in a sliding-window layers' pool.

vLLM-style "automatic prefix caching": every full page of a prompt is keyed by a hash chain over
the page-sized blocks of token ids before it (key_i = sha256(key_{i-1} || block_i)), seeded by
`seed(...)`: the weights' fingerprint, the cache spec and the dtype. So a hit never mixes weights
or dtypes. The index holds page numbers only; the engine pins each page it records (one pin per
entry: `Engine.audit` checks this) and unpins what `evict` returns. Entries are kept in LRU order:
`match` and `add` mark the keys they touch as recently used.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from kvjax.models.protocol import model_dtype
from kvjax.prefix import params_fingerprint


def seed(model, spec) -> bytes:
  """The first link of every chain: a digest of the weights, the cache spec and the dtype."""
  key = repr((params_fingerprint(model.params), str(spec), str(model_dtype(model)))).encode()
  return hashlib.sha256(key).digest()


def _record(entries: collections.OrderedDict, keys: Sequence[bytes], pages: Sequence[int]) -> list[int]:
  """Records key -> page in `entries` for keys not yet present and marks the others recently used;
  returns the pages newly recorded."""
  new = []
  for key, page in zip(keys, pages):
    if key in entries:
      entries.move_to_end(key)
    else:
      entries[key] = int(page)
      new.append(int(page))
  return new


class PageIndex:
  """Full prompt pages by the hash chain of the token blocks that lead to them, in LRU order."""

  def __init__(self, seed: bytes, page_size: int):
    self.seed = seed
    self.page_size = page_size
    self.pages: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    self.hits = 0  # tokens served from the index
    self.lookups = 0

  def chain(self, ids: np.ndarray) -> list[bytes]:
    """One key per full page of ids: key_i = sha256(key_{i-1} || block_i)."""
    keys, prev = [], self.seed
    for i in range(len(ids) // self.page_size):
      block = np.asarray(ids[i * self.page_size:(i + 1) * self.page_size], np.int32)
      prev = hashlib.sha256(prev + block.tobytes()).digest()
      keys.append(prev)
    return keys

  def match(self, keys: list[bytes]) -> list[int]:
    """Pages of the longest run of leading keys present (marked as recently used)."""
    pages = []
    for key in keys:
      page = self.pages.get(key)
      if page is None:
        break
      self.pages.move_to_end(key)
      pages.append(page)
    return pages

  def add(self, keys: list[bytes], pages: Sequence[int]) -> list[int]:
    """Records key -> page for keys not yet present; returns the pages newly recorded (to pin)."""
    return _record(self.pages, keys, pages)

  def evict(self, n: int, keep: Iterable[int] = ()) -> list[tuple[bytes, int]]:
    """Forgets the n least recently used entries whose page is not in `keep`; returns their
    (key, page)s (the pages to unpin, the keys to forget in the `WindowPages` too)."""
    keep = set(keep)
    victims = [key for key, page in self.pages.items() if page not in keep][:n]
    return [(key, self.pages.pop(key)) for key in victims]

  def evictable(self, keep: Iterable[int] = ()) -> int:
    """Entries `evict` may forget while sparing the pages in `keep`."""
    keep = set(keep)
    return sum(page not in keep for page in self.pages.values())


class WindowPages:
  """The pages of one sliding-window pool (`PagedCache.window_only`) by the `PageIndex` key of the
  prompt block they hold, in LRU order, at most `budget` of them (each entry pins its page).

  A row of a window pool gives back its pages behind the window as it goes, so only pinned pages
  survive for a later prompt; a prefix hit of m pages is usable on these layers only if the
  pages its next query sees (`span`) are all recorded. The budget bounds what the pins hold:
  recording past it forgets the least recently used entries.
  """

  def __init__(self, budget: int):
    self.budget = int(budget)
    self.pages: collections.OrderedDict[bytes, int] = collections.OrderedDict()

  def add(self, keys: Sequence[bytes], pages: Sequence[int]) -> tuple[list[int], list[int]]:
    """Records key -> page for keys not yet present (marks the others recently used); returns
    (pages to pin, pages to unpin: entries forgotten to keep within the budget)."""
    new = _record(self.pages, keys, pages)
    over = max(len(self.pages) - self.budget, 0)
    return new, [self.pages.pop(key) for key in list(self.pages)[:over]]

  def span(self, keys: Sequence[bytes], first: int, stop: int) -> list[int] | None:
    """The pages of blocks first..stop-1 (marked recently used), or None if one is missing."""
    pages = [self.pages.get(key) for key in keys[first:stop]]
    if None in pages:
      return None
    for key in keys[first:stop]:
      self.pages.move_to_end(key)
    return pages

  def forget(self, keys: Iterable[bytes]) -> list[int]:
    """Drops the entries of keys (those present); returns their pages (to unpin)."""
    return [self.pages.pop(key) for key in keys if key in self.pages]
