"""Continuous batching over a paged cache: `Engine` (insert / step / free / run) and `serve`.

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
  audit()          the page invariants that do not hold (empty: all hold).

The pieces live beside this module: `requests` (Request, Event, collect, the request checks),
`page_index` (PageIndex, the prefix cache's keys), `admission` (the page accounting, pure
functions of the engine's state) and `steps` (the jitted prefill, step and page surgery).

Prefix caching: after a prefill the engine pins the new full pages of the prompt in its
`PageIndex`; a later prompt that starts with the same blocks points its table at them. A prompt
wholly covered still recomputes its last token (writing into the shared page copies it first), so
its first token comes from fresh logits. The paged kind keeps every token (window kinds cannot be
paged), so no page a window dropped is ever reused. When the pool runs short the least recently
used index entries are unpinned first (never the pages a request is about to adopt).

Sliding-window layers (Gemma 3): the engine owns one pool per window (`kvjax.engine.pools`): the
global layers' pool keeps every token, as above; a sliding layers' pool (`PagedCache.window_only`)
gives a row's pages back once they fall behind the window, so a row holds ~W / P pages there
however long it runs. Each pool has its own page table; rows and lengths move together. Prefix
hits restore the sliding layers too: while a prompt is prefilled, the window pool's pages of its
full blocks are pinned under the same keys (`page_index.WindowPages`, LRU within a budget of
pins) before the next chunk would give them back, and a hit of m blocks is taken only as far as
the window pages its next query sees are all still pinned (else a shorter hit, or none).

Admission: a request is admitted only if the pages it may still take fit in the free pages beside
what the running rows may still take (`admission.promised`), so no row ever finds the pool empty
mid-decode. A request that fits the pool is admitted as soon as a row is free and its pages are
(unpinning least recently used index pages if that frees enough).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import decode, kernels, runtime
from kvjax import prompts as prompts_lib
from kvjax import spec as spec_lib
from kvjax.caches import page_table
from kvjax.caches.hybrid import HybridCache
from kvjax.caches.paged import PagedCache
from kvjax.engine import admission, page_index, pools, requests, steps
from kvjax.engine.page_index import PageIndex, WindowPages
from kvjax.engine.requests import Event, Request, Row
from kvjax.models.protocol import check_model, model_dtype, static_step
from kvjax.sampling import GREEDY, Sampler


def _paged_spec(cache: str, capacity) -> spec_lib.CacheSpec:
  """The parsed `paged:P` spec; raises for another kind or a capacity that is not a positive
  multiple of P (naming the nearest multiples)."""
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
  return spec


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
    window_pins: on a model with sliding layers, pages of each sliding pool kept for the prefix
      cache beyond what the rows hold (default `pools.window_budget`: a window's pages per row).
    kernel: the pages' decode attention kernel, "auto" | "jnp" | "pallas" (`kvjax.kernels`).
  """

  def __init__(self, model, *, rows: int = 8, capacity: int = 2048, cache: str = "paged:16",
               pages: int | None = None, sampler: Sampler = GREEDY, seed: int = 0,
               eos_id: int | None = None, stop_at_eos: bool = True, prefix_cache: bool = True,
               window_pins: int | None = None, kernel: str = "auto"):
    check_model(model, "Engine")
    kernels.check_kernel(kernel)
    spec = _paged_spec(cache, capacity)
    self.tokenizer = getattr(model, "tokenizer", None)
    if eos_id is None and stop_at_eos and self.tokenizer is not None:
      eos_id = getattr(self.tokenizer, "eos_id", None)
    self.model, self.sampler = model, sampler
    self.eos_id = None if eos_id is None else int(eos_id)
    # No row lengths yet: pages=None keeps the kind's default pool (every row full).
    self._windows: dict[int, tuple[int, int]] = {}  # window pool group -> (window, pin budget)
    parts = pools.split(model.config)
    self._chunks = pools.prefill_chunks(parts, steps.CHUNKS)
    if parts is None:
      cache, self.cache_plan = runtime.resolve(model, pools.one_pool_layout(spec, model.config),
                                               batch=rows, capacity=capacity,
                                               options={"pages": pages, "kernel": kernel},
                                               what="Engine")
    else:
      cache, self._windows = pools.build(parts, spec, model.config, rows=rows, capacity=capacity,
                                         dtype=model_dtype(model), pages=pages,
                                         window_pins=window_pins, chunk=max(self._chunks))
      cache = kernels.with_kernel(cache, kernel)
      self.cache_plan = None
    self.cache: PagedCache | HybridCache = cache
    self._global = next(g for g, c in enumerate(steps.groups(cache)) if not c.window_only)
    self.page_size = self.paged.page_size
    self.index = (PageIndex(page_index.seed(model, spec), self.page_size) if prefix_cache
                  else None)
    self.window_index = {g: WindowPages(pins) for g, (_, pins) in self._windows.items()}
    self._step_fn = static_step(model)
    self._key = jax.random.PRNGKey(seed)
    self._rows: dict[int, Row] = {}
    self._last = np.zeros(rows, np.int32)
    self._inserted = 0
    self._pending: list[Event] = []  # events of inserts, returned by the next step

  # ---- facts ----------------------------------------------------------------------------------
  @property
  def paged(self) -> PagedCache:
    """The pool that keeps every token (the whole cache on a model without sliding layers, the
    global layers' pool otherwise): what admission counts and the page index points into."""
    return steps.groups(self.cache)[self._global]

  @property
  def rows(self) -> int:
    return self.cache.batch

  @property
  def capacity(self) -> int:
    return self.paged.capacity

  def used_bytes(self) -> int:
    """Bytes of the pages in use in every pool, bookkeeping included (`PagedCache.used_bytes`)."""
    return sum(c.used_bytes() for c in steps.groups(self.cache))

  def pool_bytes(self) -> int:
    """Bytes of every pool as built (fixed for the engine's life)."""
    return sum(self.cache.nbytes().values())

  def free_rows(self) -> list[int]:
    return [r for r in range(self.rows) if r not in self._rows]

  def running(self) -> int:
    return len(self._rows)

  def _ends(self) -> dict[int, int]:
    """{running row: tokens it holds when it finishes} (-1: finished, not yet retired)."""
    return {r: row.end for r, row in self._rows.items()}

  def _next_key(self):
    self._key, sub = jax.random.split(self._key)
    return sub

  # ---- insert ---------------------------------------------------------------------------------
  def _make_room(self, need: int, keep: Sequence[int] = ()) -> bool:
    """Unpins LRU index pages (never those in `keep`, which the request adopts) until `need`
    pages are free beyond what running rows may take."""
    while True:
      spare = admission.spare(self.paged.pages, self.paged.lengths, self._ends(), self.page_size)
      if spare >= need:
        return True
      if self.index is None or not self.index.evictable(keep):
        return False
      evicted = self.index.evict(max(need - spare, 1), keep)
      self.cache = steps.pin(self.cache, [page for _, page in evicted], -1, self._global)
      for g, pins in self.window_index.items():  # a window page without its block's key is dead
        self.cache = steps.pin(self.cache, pins.forget(key for key, _ in evicted), -1, g)

  def _window_spans(self, keys: list[bytes], pages: list[int], reused: int) -> dict | None:
    """{window pool: (first block, its pinned pages up to the hit's last block)}: what the hit's
    next query sees on the sliding layers; None if a window pool no longer pins all of it."""
    spans = {}
    for g, (window, _) in self._windows.items():
      first = max(reused - window + 1, 0) // self.page_size
      held = self.window_index[g].span(keys, first, len(pages))
      if held is None:
        return None
      spans[g] = (first, held)
    return spans

  def _admit(self, ids: np.ndarray, end: int, n: int, hit: list[int],
             keys: list[bytes]) -> tuple[list[int], int, dict] | None:
    """The index pages to adopt, the tokens they hold and the window pools' spans (see
    `_window_spans`), once room is made for the request (None: the pool cannot hold it now).
    A hit whose window pages are gone is shortened until they are there (or no hit)."""
    tries = []
    for m in range(len(hit), -1, -1):
      tries = [(pages, reused, spans) for pages, reused in
               admission.adoptions(hit[:m], ids.size, self.page_size)
               if (spans := self._window_spans(keys, pages, reused)) is not None]
      if tries:
        break
    for pages, reused, spans in tries:
      need = admission.need(ids.size, end, n, len(pages), reused, self.page_size)
      if self._make_room(need, keep=pages):
        return pages, reused, spans
    return None

  def insert(self, request: Request) -> list[int] | None:
    """Admits `request` (rows it runs in) or returns None when rows or pages are short now.

    A request without an id gets the order of insertion (0 for the first one) before anything is
    checked, so errors name it. Raises TypeError / ValueError for a prompt that is not token ids
    or text (see `kvjax.prompts.token_row`), and ValueError / CapacityError for a request that
    could never run (see `requests.check`; more pages than the pool holds).
    """
    if request.id is None:
      request = dataclasses.replace(request, id=self._inserted)
    ids = requests.check(request, self.tokenizer, self.model.config.vocab_size, rows=self.rows,
                         capacity=self.capacity)
    n, n_pages = request.n, self.paged.pages.n_pages
    end = ids.size + request.max_new_tokens - 1  # the last token drawn is never fed back
    most = admission.need(ids.size, end, n, 0, 0, self.page_size)
    if most > n_pages:
      raise decode.CapacityError(f"Engine.insert: request {request.id!r} needs up to {most} pages, "
                                 f"more than the pool's {n_pages}")
    free = self.free_rows()
    if len(free) < n:
      return None
    keys = self.index.chain(ids) if self.index is not None else []
    hit = self.index.match(keys) if self.index is not None else []
    admitted = self._admit(ids, end, n, hit, keys)
    if admitted is None:
      return None
    hit, reused, spans = admitted
    rows = free[:n]
    self._adopt(rows[0], hit, reused, spans)
    pin_windows = None
    if self.index is not None and self._windows:
      pin_windows = lambda cache, fed: self._pin_windows(cache, rows[0], keys, reused + fed)
    logits, self.cache = steps.prefill(self.model.params, ids[reused:], self.cache, rows[0],
                                       model=self._step_fn, after_chunk=pin_windows,
                                       chunks=self._chunks)
    self._index_prompt(rows[0], ids, keys)
    if n > 1:
      self.cache = steps.fork(self.cache, jnp.full((n - 1,), rows[0], jnp.int32),
                              jnp.asarray(rows[1:], jnp.int32))
    first = np.asarray(steps.draw(logits, self._next_key(), sampler=self.sampler, n=n))
    self._inserted += 1
    for sample, (r, token) in enumerate(zip(rows, first)):
      self._rows[r] = Row(request=request, sample=sample, end=end)
      self._pending.append(self._emit(r, int(token)))
    self._retire()
    return rows

  def _adopt(self, row: int, hit: list[int], reused: int, spans: dict) -> None:
    """Points row `row` at the adopted index pages `hit` (`reused` tokens) and, in each window
    pool, at the pinned pages of its span; counts the lookup."""
    if self.index is None:
      return
    if hit:
      tables = []
      for g, c in enumerate(steps.groups(self.cache)):
        first, held = spans[g] if g in spans else (0, hit)
        tables.append(jnp.asarray(admission.block_table_row(held, c.pages.max_pages,
                                                            c.pages.n_pages, first)))
      self.cache = steps.adopt(self.cache, row, tuple(tables), reused)
      self.index.hits += reused
    self.index.lookups += 1

  def _pin_windows(self, cache, row: int, keys: list[bytes], fed: int):
    """Pins, in each window pool, the pages of row `row`'s full prompt blocks among the first
    `fed` tokens under their keys (before a later chunk gives them back); unpins what the pools'
    budgets forget."""
    done = min(fed // self.page_size, len(keys))
    for g in self._windows:
      table = np.asarray(steps.groups(cache)[g].pages.table)[row]
      n_pages = steps.groups(cache)[g].n_pages
      blocks = [j for j in range(done) if table[j] < n_pages]
      pin, unpin = self.window_index[g].add([keys[j] for j in blocks], table[blocks].tolist())
      cache = steps.pin(steps.pin(cache, pin, 1, g), unpin, -1, g)
    return cache

  def _index_prompt(self, row: int, ids: np.ndarray, keys: list[bytes]) -> None:
    """Records the full prompt pages of row `row` in the page index and pins the new ones."""
    if self.index is not None and keys:
      held = page_table.row_pages(self.paged.pages, row, ids.size)
      self.cache = steps.pin(self.cache, self.index.add(keys, held[:len(keys)]), 1, self._global)

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
      self.cache = steps.release(self.cache, jnp.asarray(mask))
      for r in finished:
        del self._rows[r]

  def step(self) -> list[Event]:
    """One token for every running row; returns the events (with those of the inserts since the
    last step first). Finished rows are freed."""
    events, self._pending = self._pending, []
    if self._rows:
      active = np.zeros(self.rows, bool)
      active[list(self._rows)] = True
      tokens, self.cache = steps.step(self.model.params, jnp.asarray(self._last),
                                      jnp.asarray(active), self.cache, self._next_key(),
                                      model=self._step_fn, sampler=self.sampler)
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
    See `admission.audit`: the allocator's own invariants, no row refused a page, idle rows
    empty, one pin per page index entry, and free pages covering what running rows may take."""
    index_pages = self.index.pages.values() if self.index is not None else ()
    problems = admission.audit(self.paged, self._ends(), index_pages, self.page_size)
    for g, pins in self.window_index.items():
      problems += [f"window pool {g}: {p}" for p in admission.audit_window(
          steps.groups(self.cache)[g], self._ends(), pins.pages.values())]
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
