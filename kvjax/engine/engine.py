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

Sliding-window layers (Gemma 3): the engine still owns ONE `PagedCache`, over every layer: the
spec is placed on all layers (`paged:P@all`), and `kvjax.caches.hybrid.merge_windows` builds a
single cache whose `sliding` gives each layer its window (None on global layers), so sliding
layers page every token too and attention masks them to their window. One page table serves all
layers, so a prefix-cache hit restores the sliding layers' keys from the shared pages as well.
Not done yet: freeing a sliding layer's pages once they leave its window (they stay held, as on a
global layer, until the row is freed).

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

from kvjax import decode, layouts, runtime
from kvjax import prompts as prompts_lib
from kvjax import spec as spec_lib
from kvjax.caches import page_table
from kvjax.caches.paged import PagedCache
from kvjax.engine import admission, page_index, requests, steps
from kvjax.engine.page_index import PageIndex
from kvjax.engine.requests import Event, Request, Row
from kvjax.models.protocol import check_model, static_step
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
  """

  def __init__(self, model, *, rows: int = 8, capacity: int = 2048, cache: str = "paged:16",
               pages: int | None = None, sampler: Sampler = GREEDY, seed: int = 0,
               eos_id: int | None = None, stop_at_eos: bool = True, prefix_cache: bool = True):
    check_model(model, "Engine")
    spec = _paged_spec(cache, capacity)
    self.tokenizer = getattr(model, "tokenizer", None)
    if eos_id is None and stop_at_eos and self.tokenizer is not None:
      eos_id = getattr(self.tokenizer, "eos_id", None)
    self.model, self.sampler = model, sampler
    self.eos_id = None if eos_id is None else int(eos_id)
    # No row lengths yet: pages=None keeps the kind's default pool (every row full). On a model
    # with sliding layers the spec covers them too: one paged cache, per-layer windows.
    layout = (spec if layouts.plan_for(spec, model.config) is None
              else layouts.Layout(placements=((layouts.ALL, spec),)))
    cache, self.cache_plan = runtime.resolve(model, layout, batch=rows, capacity=capacity,
                                             options={"pages": pages}, what="Engine")
    self.cache: PagedCache = cache
    self.page_size = self.cache.page_size
    self.index = (PageIndex(page_index.seed(model, spec), self.page_size) if prefix_cache
                  else None)
    self._step_fn = static_step(model)
    self._key = jax.random.PRNGKey(seed)
    self._rows: dict[int, Row] = {}
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
      spare = admission.spare(self.cache.pages, self.cache.lengths, self._ends(), self.page_size)
      if spare >= need:
        return True
      if self.index is None or not self.index.evictable(keep):
        return False
      self.cache = steps.pin(self.cache, self.index.evict(max(need - spare, 1), keep), -1)

  def _admit(self, ids: np.ndarray, end: int, n: int,
             hit: list[int]) -> tuple[list[int], int] | None:
    """The index pages to adopt and the tokens they hold, once room is made for the request
    (None: the pool cannot hold it now)."""
    for pages, reused in admission.adoptions(hit, ids.size, self.page_size):
      need = admission.need(ids.size, end, n, len(pages), reused, self.page_size)
      if self._make_room(need, keep=pages):
        return pages, reused
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
    n, n_pages = request.n, self.cache.pages.n_pages
    end = ids.size + request.max_new_tokens - 1  # the last token drawn is never fed back
    most = admission.need(ids.size, end, n, 0, 0, self.page_size)
    if most > n_pages:
      raise decode.CapacityError(f"Engine.insert: request {request.id!r} needs up to {most} pages, "
                                 f"more than the pool's {n_pages}")
    free = self.free_rows()
    if len(free) < n:
      return None
    keys = self.index.chain(ids) if self.index is not None else []
    admitted = self._admit(ids, end, n, self.index.match(keys) if self.index is not None else [])
    if admitted is None:
      return None
    hit, reused = admitted
    rows = free[:n]
    self._adopt(rows[0], hit, reused)
    logits, self.cache = steps.prefill(self.model.params, ids[reused:], self.cache, rows[0],
                                       model=self._step_fn)
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

  def _adopt(self, row: int, hit: list[int], reused: int) -> None:
    """Points row `row` at the adopted index pages `hit` (`reused` tokens); counts the lookup."""
    if self.index is None:
      return
    if hit:
      table = admission.block_table_row(hit, self.cache.pages.max_pages, self.cache.pages.n_pages)
      self.cache = steps.adopt(self.cache, row, jnp.asarray(table), reused)
      self.index.hits += reused
    self.index.lookups += 1

  def _index_prompt(self, row: int, ids: np.ndarray, keys: list[bytes]) -> None:
    """Records the full prompt pages of row `row` in the page index and pins the new ones."""
    if self.index is not None and keys:
      held = page_table.row_pages(self.cache.pages, row, ids.size)
      self.cache = steps.pin(self.cache, self.index.add(keys, held[:len(keys)]), 1)

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
    return admission.audit(self.cache, self._ends(), index_pages, self.page_size)

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
