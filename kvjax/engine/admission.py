"""The engine's page accounting: what a request may take, what running rows are promised.

Pure functions of the engine's state (the cache's `page_table.PageTable`, its lengths, and
`ends`: {running row: tokens it holds when it finishes}), outside jit.

The invariant: `Engine.insert` admits a request only if the pages it may still take fit in the
free pages beside what the running rows may still take (`promised`), so no row ever finds the
pool empty mid-decode. The count is exact, not padded: a request takes the prompt pages the page
index does not supply (plus a copy of a partially filled hit page, which the prefill writes into),
then each sample takes the pages its output starts (its last token is drawn, never stored); n > 1
samples that share a partially filled last prompt page each copy it at their first token, and the
original goes free in that same step. `audit` lists any broken page invariant
(tests/test_engine_soak.py checks it after every operation of a random soak).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from kvjax.caches import page_table


def pages_for(tokens: int, page_size: int) -> int:
  """Pages that hold `tokens` tokens from position 0."""
  return -(-tokens // page_size)


def need(prompt: int, end: int, n: int, hit: int, reused: int, page_size: int) -> int:
  """Pages a request may take, at the worst moment: the prompt's pages past the `hit` adopted
  ones (plus a copy of the last adopted page when it is partially filled: `reused` tokens
  adopted, and the prefill writes into it), then for each of its n samples the pages its output
  starts (a row ends holding `end` tokens). When n > 1 samples share a partially filled last
  prompt page, each copies it at its first token and the original goes free in that step (less
  one page if they take any later page)."""
  p = page_size
  prompt_pages = pages_for(prompt, p) - hit + int(reused % p != 0)
  later = pages_for(end, p) - pages_for(prompt, p)
  if n > 1 and prompt % p and end > prompt:
    return prompt_pages + n * (1 + later) - int(later > 0)
  return prompt_pages + n * later


def promised(pages: page_table.PageTable, lengths, ends: Mapping[int, int], page_size: int) -> int:
  """Pages the running rows may still take before they finish, at the worst moment: the pages
  their remaining tokens start, plus a copy of a partially filled last page they share (forked
  samples before their first write, see `page_table.must_copy`), less one for each such page
  that all its holders copy in the same step: it goes free then, before any of them takes a
  later page. lengths: int [B]; ends: {row: end} (end -1: finished)."""
  if not ends:
    return 0
  p = page_size
  lengths, table, refcount = (np.asarray(a) for a in (lengths, pages.table, pages.refcount))
  total = 0
  shared: dict[int, list[int]] = {}  # shared partial page -> [running holders, their later pages]
  for r, end in ends.items():
    held = int(lengths[r])
    if end <= held:  # finished (end -1) or writes nothing more
      continue
    later = pages_for(end, p) - pages_for(held, p)
    total += later
    page = int(table[r, held // p]) if held % p else pages.n_pages
    if page < pages.n_pages and refcount[page] > 1:
      total += 1  # its private copy
      group = shared.setdefault(page, [0, 0])
      group[0] += 1
      group[1] += later
  return total - sum(holders == refcount[page] and later > 0
                     for page, (holders, later) in shared.items())


def spare(pages: page_table.PageTable, lengths, ends: Mapping[int, int], page_size: int) -> int:
  """Free pages beyond what the running rows may still take (negative: the invariant broke)."""
  return int(page_table.free_count(pages)) - promised(pages, lengths, ends, page_size)


def adoptions(hit: list[int], prompt: int, page_size: int) -> list[tuple[list[int], int]]:
  """The (pages, tokens) to adopt from the page index, best first, for a prompt of `prompt`
  tokens whose leading full pages `hit` are indexed. The last prompt token is always recomputed
  (so its logits are fresh), which may leave the last adopted page partially filled; that page
  costs a copy, so the second choice, if any, adopts one page less."""
  p = page_size
  reused = min(len(hit) * p, prompt - 1)
  hit = hit[:pages_for(reused, p)]
  tries = [(hit, reused)]
  if reused % p:
    tries.append((hit[:-1], (len(hit) - 1) * p))
  return tries


def block_table_row(pages: list[int], max_pages: int, n_pages: int, first: int = 0) -> np.ndarray:
  """int32 [M]: `pages` at blocks first.., the "no page" marker N everywhere else (before them:
  a window pool's blocks behind the window)."""
  row = np.full(max_pages, n_pages, np.int32)
  row[first:first + len(pages)] = pages
  return row


def audit(cache, ends: Mapping[int, int], index_pages: Iterable[int], page_size: int) -> list[str]:
  """The page accounting's broken invariants, as sentences (empty: all hold). Beyond
  `page_table.audit` (nothing leaked or double-owned, each row holds exactly the pages of its
  tokens): no row was refused a page, rows not in `ends` (idle) hold nothing, each page's pins
  equal the page index entries (`index_pages`, one page per entry) that point at it, and the
  free pages cover what the running rows may still take."""
  pages = cache.pages
  problems = page_table.audit(pages, cache.lengths)
  failed = np.flatnonzero(np.asarray(cache.failed))
  if failed.size:
    problems.append(f"rows {failed.tolist()} were refused a page")
  lengths = np.asarray(cache.lengths)
  for r in range(lengths.size):
    if r not in ends and lengths[r]:
      problems.append(f"idle row {r} still holds {int(lengths[r])} tokens")
  indexed = np.zeros(pages.n_pages, np.int64)  # index entries per page
  for q in index_pages:
    if 0 <= q < pages.n_pages:
      indexed[q] += 1
    else:
      problems.append(f"a page index entry points at page {q}, not a page of the pool")
  pins = np.asarray(pages.pins)
  for q in np.flatnonzero(pins != indexed):
    problems.append(f"page {q}: {int(pins[q])} pins but {int(indexed[q])} page index entries")
  free, owed = int(page_table.free_count(pages)), promised(pages, cache.lengths, ends, page_size)
  if free < owed:
    problems.append(f"{free} free pages but running rows may still take {owed}")
  return problems


def audit_window(cache, ends: Mapping[int, int], pinned: Iterable[int]) -> list[str]:
  """`audit` for a window pool (`PagedCache.window_only`), which nothing is admitted against:
  the allocator's invariants with rows holding their window (`page_table.audit`), no row refused
  a page, idle rows empty, and one pin per `WindowPages` entry (`pinned`: their pages)."""
  problems = cache.audit()
  failed = np.flatnonzero(np.asarray(cache.failed))
  if failed.size:
    problems.append(f"rows {failed.tolist()} were refused a page")
  table = np.asarray(cache.pages.table)
  for r in range(table.shape[0]):
    if r not in ends and (table[r] < cache.n_pages).any():
      problems.append(f"idle row {r} still holds pages {table[r][table[r] < cache.n_pages].tolist()}")
  indexed = np.bincount(np.asarray(list(pinned), np.int64), minlength=cache.n_pages)[:cache.n_pages]
  pins = np.asarray(cache.pages.pins)
  for q in np.flatnonzero(pins != indexed):
    problems.append(f"page {q}: {int(pins[q])} pins but {int(indexed[q])} window index entries")
  return problems
