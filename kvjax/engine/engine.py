"""Continuous batching over a paged cache: `Engine` (insert / step / free) and `serve`.

The engine owns one `PagedCache` of `rows` rows. Requests join free rows and leave when they finish,
between jitted steps whose shapes never change, so a running engine compiles nothing new:

  insert(request)  admits a request into a free row if the pool can hold all of it (prompt plus
                   max_new_tokens, for each of its `n` samples): prefix pages already in the page
                   index are adopted without a copy, the rest of the prompt is prefilled in chunks
                   through a batch-1 view of the row, and the first token of each sample is drawn.
                   n > 1 forks the row: the samples share the prompt's pages (copy-on-write).
  step()           one token for every running row (idle rows feed nothing and take no page);
                   returns the `Event`s of the tokens drawn (streaming).
  free(row)        gives a row's pages back (finished rows are freed by `step`).
  run(requests)    admits requests in order as rows and pages free up, steps, yields events.
  collect(events)  {(request id, sample): [tokens]} from a stream of events (also `kvjax.collect`).

Prefix caching (vLLM-style "automatic prefix caching"): every full page of a prompt is keyed by a
hash chain over the page-sized blocks of token ids before it, seeded by the weights' fingerprint,
the cache spec and the dtype. After a prefill the engine pins the new full pages in its
`PageIndex`; a later prompt that starts with the same blocks points its table at them. A prompt
wholly covered still recomputes its last token (writing into the shared page copies it first), so
its first token comes from fresh logits. The known pitfalls are closed by construction: a hit
never mixes weights or dtypes (they are part of the key), and the paged kind keeps every token
(window kinds cannot be paged), so no page a window dropped is ever reused. When the pool runs
short the least recently used index entries are unpinned first (never the pages a request is
about to adopt).

A request's prompt is text (encoded with `model.tokenizer`) or token ids, read by
`kvjax.prompts.token_row` as everywhere in kvjax. A sample ends after max_new_tokens tokens or on
the EOS id (by default the tokenizer's, as in `kvjax.generate`).

Page accounting: `insert` admits a request only if the pages it may still take fit in the free
pages beside what the running rows may still take, so no row ever finds the pool empty mid-decode.
The count is exact, not padded: a request takes the prompt pages the page index does not supply
(plus a copy of a partially filled hit page, which the prefill writes into), then each sample
takes the pages its output starts (its last token is drawn, never stored); n > 1 samples that
share a partially filled last prompt page each copy it at their first token, and the original
goes free in that same step. A request that fits the pool is admitted as soon as a row is free
and its pages are (unpinning least recently used index pages if that frees enough). The counts
read the cache's `page_table.PageTable` (`cache.pages`); `audit()` lists any broken page invariant
(tests/test_engine_soak.py checks it after every operation of a random soak).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import decode, runtime
from kvjax import prompts as prompts_lib
from kvjax import spec as spec_lib
from kvjax.caches import page_table
from kvjax.caches.paged import PagedCache
from kvjax.models.protocol import check_model, model_dtype, static_step
from kvjax.prefix import params_fingerprint
from kvjax.sampling import GREEDY, Sampler

CHUNKS = (16, 64, 256)  # prefill chunk sizes: one executable each


@dataclasses.dataclass
class Request:
  """ids: the prompt, a string (encoded with the model's tokenizer) or its token ids (a sequence
  of ints or a 1-D integer array); n: samples drawn from it (parallel sampling, sharing its pages);
  id: any label the events carry (default: the order of insertion, 0 for the first request)."""

  ids: str | Sequence[int]
  max_new_tokens: int
  id: Any = None
  n: int = 1


@dataclasses.dataclass(frozen=True)
class Event:
  """One token of one sample of a request; `done` on its last token."""

  request: Any
  sample: int
  token: int
  done: bool


@dataclasses.dataclass
class _Row:
  request: Request
  sample: int
  end: int  # tokens the row holds when it finishes (prompt + max_new_tokens - 1); -1: finished
  generated: int = 0


# ---------------------------------------------------------------------------------------------
# Jitted pieces (static: the model's step and the sampler)
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _prefill_chunk(params, tokens, n_valid, cache, row, *, model):
  """Feeds tokens [1, C] (n_valid [1] real) to row `row`; returns (last logits [V], cache)."""
  view = cache.row_view(row)
  logits, view = model.step_last(params, tokens, view, n_valid)
  return logits[0], cache.merge_row(row, view)


@functools.partial(jax.jit, static_argnames=("sampler", "n"))
def _draw(logits, key, *, sampler, n):
  """n independent draws from logits [V] -> int32 [n]."""
  return sampler(jnp.broadcast_to(logits, (n,) + logits.shape), key)


@functools.partial(jax.jit, static_argnames=("model", "sampler"), donate_argnames=("cache",))
def _step(params, last, active, cache, key, *, model, sampler):
  """One token for every active row: last int32 [B], active bool [B] -> (tokens [B], cache)."""
  logits, cache = model.step(params, last[:, None], cache, active.astype(jnp.int32))
  return sampler(logits[:, 0], key), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def _release(cache, rows):
  return cache.release(rows)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _fork(cache, src, dst):
  return cache.fork(src, dst)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _adopt(cache, row, pages, length):
  return cache.adopt(row, pages, length)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _pin(cache, pages, count):
  return cache.pin(pages, count)


# ---------------------------------------------------------------------------------------------
# The page index (prefix caching on pages)
# ---------------------------------------------------------------------------------------------
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
    new = []
    for key, page in zip(keys, pages):
      if key in self.pages:
        self.pages.move_to_end(key)
      else:
        self.pages[key] = int(page)
        new.append(int(page))
    return new

  def evict(self, n: int, keep: Iterable[int] = ()) -> list[int]:
    """Forgets the n least recently used entries whose page is not in `keep`; returns their pages
    (to unpin)."""
    keep = set(keep)
    victims = [key for key, page in self.pages.items() if page not in keep][:n]
    return [self.pages.pop(key) for key in victims]

  def evictable(self, keep: Iterable[int] = ()) -> int:
    """Entries `evict` may forget while sparing the pages in `keep`."""
    keep = set(keep)
    return sum(page not in keep for page in self.pages.values())


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class Engine:
  """Continuous batching on a paged cache (see the module docstring).

  Args:
    model: a kvjax model (`model.step`, `model.params`, `model.config`; `model.tokenizer` for text
      prompts and the default EOS).
    rows: rows decoded together (the batch of every step).
    capacity: tokens one row may hold (prompt + max_new_tokens); it must be a multiple of the page
      size P (anything else is refused, naming the nearest multiples).
    cache: a `paged:P` spec (with `+int8` / `+int4` for quantized pages).
    pages: pages in the pool (default: rows x capacity / P, room for every row to be full).
    sampler, seed: how tokens are drawn (one PRNG stream for the engine).
    eos_id: a sample ends when it draws this id (default: the tokenizer's EOS if `stop_at_eos`).
    stop_at_eos: whether eos_id None means `model.tokenizer.eos_id` (as in `kvjax.generate`);
      False, or a model without a tokenizer, ends samples only at max_new_tokens.
    prefix_cache: keep full prompt pages in a `PageIndex` for later prompts.
  """

  def __init__(self, model, *, rows: int = 8, capacity: int = 2048, cache: str = "paged:16",
               pages: int | None = None, sampler: Sampler = GREEDY, seed: int = 0,
               eos_id: int | None = None, stop_at_eos: bool = True, prefix_cache: bool = True):
    check_model(model, "Engine")
    spec = spec_lib.parse_spec(cache)
    if spec.kind != "paged":
      raise spec_lib.SpecError(f"Engine: cache {str(spec)!r} is not paged; use paged:P "
                               "(e.g. paged:16)")
    p = spec.paged
    if not prompts_lib.is_int(capacity) or capacity <= 0:
      raise ValueError(f"Engine: capacity must be a positive int, got {capacity!r}")
    if capacity % p:
      below, above = capacity // p * p, (capacity // p + 1) * p
      nearest = f"{below} or {above}" if below else str(above)
      raise ValueError(f"Engine: capacity {capacity} is not a multiple of the page size {p} of "
                       f"{str(spec)!r}; use {nearest}")
    self.tokenizer = getattr(model, "tokenizer", None)
    if eos_id is None and stop_at_eos and self.tokenizer is not None:
      eos_id = getattr(self.tokenizer, "eos_id", None)
    self.model, self.sampler = model, sampler
    self.eos_id = None if eos_id is None else int(eos_id)
    # No row lengths yet: pages=None keeps the kind's default pool (every row full).
    cache, self.cache_plan = runtime.resolve(model, spec, batch=rows, capacity=capacity,
                                             options={"pages": pages}, what="Engine")
    self.cache: PagedCache = cache
    self.page_size = self.cache.page_size
    key = repr((params_fingerprint(model.params), str(spec), str(model_dtype(model)))).encode()
    self.index = (PageIndex(hashlib.sha256(key).digest(), self.page_size) if prefix_cache
                  else None)
    self._step_fn = static_step(model)
    self._key = jax.random.PRNGKey(seed)
    self._rows: dict[int, _Row] = {}
    self._last = np.zeros(rows, np.int32)
    self._inserted = 0
    self._pending: list[Event] = []  # events of inserts, returned by the next step

  # ---- facts ----------------------------------------------------------------------------------
  @property
  def rows(self) -> int:
    return self.cache.batch

  @property
  def capacity(self) -> int:
    return self.cache.capacity

  def free_rows(self) -> list[int]:
    return [r for r in range(self.rows) if r not in self._rows]

  def running(self) -> int:
    return len(self._rows)

  def _pages(self, tokens: int) -> int:
    return -(-tokens // self.page_size)

  def _promised(self) -> int:
    """Pages the running rows may still take before they finish, at the worst moment: the pages
    their remaining tokens start, plus a copy of a partially filled last page they share (forked
    samples before their first write, see `page_table.must_copy`), less one for each such page
    that all its holders copy in the same step: it goes free then, before any of them takes a
    later page."""
    if not self._rows:
      return 0
    p, pages = self.page_size, self.cache.pages
    lengths, table, refcount = (np.asarray(a) for a in (self.cache.lengths, pages.table,
                                                        pages.refcount))
    total = 0
    shared: dict[int, list[int]] = {}  # shared partial page -> [running holders, their later pages]
    for r, row in self._rows.items():
      held = int(lengths[r])
      if row.end <= held:  # finished (end -1) or writes nothing more
        continue
      later = self._pages(row.end) - self._pages(held)
      total += later
      page = int(table[r, held // p]) if held % p else pages.n_pages
      if page < pages.n_pages and refcount[page] > 1:
        total += 1  # its private copy
        group = shared.setdefault(page, [0, 0])
        group[0] += 1
        group[1] += later
    return total - sum(holders == refcount[page] and later > 0
                       for page, (holders, later) in shared.items())

  def _need(self, prompt: int, end: int, n: int, hit: int, reused: int) -> int:
    """Pages a request may take, at the worst moment: the prompt's pages past the `hit` adopted
    ones (plus a copy of the last adopted page when it is partially filled: `reused` tokens
    adopted, and the prefill writes into it), then for each of its n samples the pages its output
    starts (a row ends holding `end` tokens). When n > 1 samples share a partially filled last
    prompt page, each copies it at its first token and the original goes free in that step (less
    one page if they take any later page)."""
    p = self.page_size
    prompt_pages = self._pages(prompt) - hit + int(reused % p != 0)
    later = self._pages(end) - self._pages(prompt)
    if n > 1 and prompt % p and end > prompt:
      return prompt_pages + n * (1 + later) - int(later > 0)
    return prompt_pages + n * later

  def _next_key(self):
    self._key, sub = jax.random.split(self._key)
    return sub

  # ---- insert ---------------------------------------------------------------------------------
  def _check(self, request: Request) -> np.ndarray:
    """The prompt's token ids (int32 [n]); raises for a request that no row could ever run."""
    what = f"Engine.insert: request {request.id!r}"
    ids = prompts_lib.token_row(request.ids, self.tokenizer, what=what)
    prompts_lib.check_vocab(ids, self.model.config.vocab_size, what)
    k, n = request.max_new_tokens, request.n
    if not prompts_lib.is_int(k) or k < 1:
      raise ValueError(f"{what}: max_new_tokens must be a positive int, got {k!r}")
    if not prompts_lib.is_int(n) or not 1 <= n <= self.rows:
      raise ValueError(f"{what}: n must lie in [1, rows={self.rows}], got {n!r}")
    if ids.size + k > self.capacity:
      raise decode.CapacityError(f"{what} needs {ids.size} + {k} tokens, more than a row's "
                                 f"capacity {self.capacity}")
    return ids

  def _make_room(self, need: int, keep: Sequence[int] = ()) -> bool:
    """Unpins LRU index pages (never those in `keep`, which the request adopts) until `need`
    pages are free beyond what running rows may take."""
    while True:
      spare = int(page_table.free_count(self.cache.pages)) - self._promised()
      if spare >= need:
        return True
      if self.index is None or not self.index.evictable(keep):
        return False
      self._pin(self.index.evict(max(need - spare, 1), keep), -1)

  def insert(self, request: Request) -> list[int] | None:
    """Admits `request` (rows it runs in) or returns None when rows or pages are short now.

    A request without an id gets the order of insertion (0 for the first one) before anything is
    checked, so errors name it. Raises TypeError / ValueError for a prompt that is not token ids
    or text (see `kvjax.prompts.token_row`), and ValueError / CapacityError for a request that
    could never run (see `_check`; more pages than the pool holds).
    """
    if request.id is None:
      request = dataclasses.replace(request, id=self._inserted)
    ids = self._check(request)
    n, p = request.n, self.page_size
    end = ids.size + request.max_new_tokens - 1  # the last token drawn is never fed back
    most = self._need(ids.size, end, n, hit=0, reused=0)
    n_pages = self.cache.pages.n_pages
    if most > n_pages:
      raise decode.CapacityError(f"Engine.insert: request {request.id!r} needs up to {most} pages, "
                                 f"more than the pool's {n_pages}")
    free = self.free_rows()
    if len(free) < n:
      return None
    keys = self.index.chain(ids) if self.index is not None else []
    hit = self.index.match(keys) if self.index is not None else []
    reused = min(len(hit) * p, ids.size - 1)  # the last token is always recomputed
    hit = hit[:self._pages(reused)]
    tries = [(hit, reused)]
    if reused % p:  # a partial hit page costs a copy; unless adopted, the index may give it up
      tries.append((hit[:-1], (len(hit) - 1) * p))
    for hit, reused in tries:
      if self._make_room(self._need(ids.size, end, n, len(hit), reused), keep=hit):
        break
    else:
      return None
    row = free[0]
    if hit:
      pages = np.full(self.cache.pages.max_pages, n_pages, np.int32)
      pages[:len(hit)] = hit
      self.cache = _adopt(self.cache, row, jnp.asarray(pages), reused)
      if self.index is not None:
        self.index.hits += reused
    if self.index is not None:
      self.index.lookups += 1
    logits = self._prefill(row, ids[reused:])
    if self.index is not None and keys:
      held = page_table.row_pages(self.cache.pages, row, ids.size)
      new = self.index.add(keys, held[:len(keys)])
      self._pin(new, 1)
    rows = free[:n]
    if n > 1:
      self.cache = _fork(self.cache, jnp.full((n - 1,), row, jnp.int32),
                         jnp.asarray(rows[1:], jnp.int32))
    first = np.asarray(_draw(logits, self._next_key(), sampler=self.sampler, n=n))
    self._inserted += 1
    for sample, (r, token) in enumerate(zip(rows, first)):
      self._rows[r] = _Row(request=request, sample=sample, end=end)
      self._pending.append(self._emit(r, int(token)))
    self._retire()
    return rows

  def _pin(self, pages: list[int], count: int) -> None:
    """Adds count to the pins of pages, in fixed-size batches (one executable for any number)."""
    size, n_pages = self.cache.pages.max_pages, self.cache.pages.n_pages
    for i in range(0, len(pages), size):
      batch = np.full(size, n_pages, np.int32)  # the "no page" marker is dropped
      batch[:len(pages[i:i + size])] = pages[i:i + size]
      self.cache = _pin(self.cache, jnp.asarray(batch), jnp.int32(count))

  def _prefill(self, row: int, ids: np.ndarray):
    logits = None
    start = 0
    while start < ids.size:
      left = ids.size - start
      size = next((c for c in CHUNKS if c >= left), CHUNKS[-1])
      n = min(size, left)
      chunk = np.zeros((1, size), np.int32)
      chunk[0, :n] = ids[start:start + n]
      logits, self.cache = _prefill_chunk(self.model.params, jnp.asarray(chunk),
                                          jnp.asarray([n], jnp.int32), self.cache, row,
                                          model=self._step_fn)
      start += n
    return logits

  # ---- step / free ----------------------------------------------------------------------------
  def _emit(self, r: int, token: int) -> Event:
    row = self._rows[r]
    row.generated += 1
    self._last[r] = token
    done = (row.generated >= row.request.max_new_tokens
            or (self.eos_id is not None and token == self.eos_id))
    if done:
      row.end = -1  # marks the row for `_retire`
    return Event(request=row.request.id, sample=row.sample, token=token, done=done)

  def _retire(self):
    finished = [r for r, row in self._rows.items() if row.end < 0]
    if finished:
      mask = np.zeros(self.rows, bool)
      mask[finished] = True
      self.cache = _release(self.cache, jnp.asarray(mask))
      for r in finished:
        del self._rows[r]

  def step(self) -> list[Event]:
    """One token for every running row; returns the events (with those of the inserts since the
    last step first). Finished rows are freed."""
    events, self._pending = self._pending, []
    if self._rows:
      active = np.zeros(self.rows, bool)
      active[list(self._rows)] = True
      tokens, self.cache = _step(self.model.params, jnp.asarray(self._last), jnp.asarray(active),
                                 self.cache, self._next_key(), model=self._step_fn,
                                 sampler=self.sampler)
      tokens = np.asarray(tokens)
      events += [self._emit(r, int(tokens[r])) for r in sorted(self._rows)]
      self._retire()
    return events

  def free(self, row: int) -> None:
    """Stops the request in `row` and gives its pages back."""
    if row not in self._rows:
      raise ValueError(f"Engine.free: row {row} is not running")
    self._rows[row].end = -1
    self._retire()

  def audit(self) -> list[str]:
    """The page accounting's broken invariants, as sentences (empty: all hold); outside jit.
    Beyond `page_table.audit` (nothing leaked or double-owned, each row holds exactly the pages
    of its tokens): no row was refused a page, idle rows hold nothing, each page's pins equal
    the page index entries that point at it, and the free pages cover what the running rows may
    still take."""
    pages = self.cache.pages
    problems = page_table.audit(pages, self.cache.lengths)
    failed = np.flatnonzero(np.asarray(self.cache.failed))
    if failed.size:
      problems.append(f"rows {failed.tolist()} were refused a page")
    lengths = np.asarray(self.cache.lengths)
    for r in self.free_rows():
      if lengths[r]:
        problems.append(f"idle row {r} still holds {int(lengths[r])} tokens")
    indexed = np.zeros(pages.n_pages, np.int64)  # index entries per page
    for q in self.index.pages.values() if self.index is not None else ():
      if 0 <= q < pages.n_pages:
        indexed[q] += 1
      else:
        problems.append(f"a page index entry points at page {q}, not a page of the pool")
    pins = np.asarray(pages.pins)
    for q in np.flatnonzero(pins != indexed):
      problems.append(f"page {q}: {int(pins[q])} pins but {int(indexed[q])} page index entries")
    free, promised = int(page_table.free_count(pages)), self._promised()
    if free < promised:
      problems.append(f"{free} free pages but running rows may still take {promised}")
    return problems

  def run(self, requests: Iterable[Request]) -> Iterator[Event]:
    """Admits requests in order as room frees up, steps until all are done, yields events."""
    queue = collections.deque(requests)
    while queue or self._rows or self._pending:
      while queue and self.insert(queue[0]) is not None:
        queue.popleft()
      if queue and not self._rows and not self._pending:
        name = self._inserted if queue[0].id is None else queue[0].id
        raise decode.CapacityError(f"Engine.run: request {name!r} cannot be admitted even into "
                                   "an idle engine (pool too small)")
      yield from self.step()


def serve(model, requests: Iterable[Request], **engine_options) -> Iterator[Event]:
  """Streams the events of `requests` run through a new `Engine(model, **engine_options)`."""
  return Engine(model, **engine_options).run(requests)


def collect(events: Iterable[Event]) -> dict:
  """{(request id, sample): [tokens]} from a stream of events."""
  out: dict = {}
  for event in events:
    out.setdefault((event.request, event.sample), []).append(event.token)
  return out
