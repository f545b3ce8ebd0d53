"""A soak of the engine's page accounting (kvjax.engine on kvjax.caches.page_table).

A seeded stream of random operations on one engine of the tiny model: inserts with random prompt
and output lengths, n > 1 samples, prompts that start with shared page-aligned prefixes (so the
page index adopts pages and copy-on-write runs), EOS, requests freed mid-stream, and a pool small
enough to run dry (inserts are refused and wait in a queue, in order).

Invariants: after every operation `Engine.audit()` is empty: no page leaked, none owned more times
than its count, no pin without a page index entry, every row holding exactly its tokens' pages, no
row refused a page, free pages covering what running rows may still take; every finished sample's
tokens equal running its request alone (greedy) in an engine of the same shape, and a sample freed
mid-stream produced a prefix of them. One engine shape for the whole soak, so it compiles once;
experiments/engine_soak.py runs the same `soak` for thousands of operations.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import pytest

from kvjax.engine import Engine, Request

ROWS, CAPACITY, CACHE, PAGES = 4, 64, "paged:8", 18  # the pool holds 18 of the 32 pages rows could
EOS = 141  # a token the lively tiny model draws now and then (about 1 in 40 greedy tokens)
PREFIXES = (16, 24)  # shared page-aligned prompt starts (tokens)
QUEUE = 8  # requests waiting at most: past it an insert turns into a step (the queue stays short)


def engines(model, *, eos_id=EOS):
  """(engine under test, reference engine of the same shape without a page index)."""
  shape = dict(rows=ROWS, capacity=CAPACITY, cache=CACHE, pages=PAGES, eos_id=eos_id)
  return Engine(model, **shape), Engine(model, prefix_cache=False, **shape)


@dataclasses.dataclass
class Soak:
  """What a soak did; `problems` lists (operation number, operation, audit sentences)."""

  ops: int = 0
  steps: int = 0
  tokens: int = 0
  inserted: int = 0
  refused: int = 0  # inserts that had to wait (rows or pages short)
  freed: int = 0  # samples stopped mid-stream
  eos: int = 0  # samples that ended on EOS before max_new_tokens
  peak_pages: int = 0
  index_hits: int = 0  # prompt tokens served from the page index
  ops_s: float = 0.0  # wall seconds of the operations and their audits
  check_s: float = 0.0  # wall seconds of the reference runs and comparisons
  mismatches: list = dataclasses.field(default_factory=list)
  problems: list = dataclasses.field(default_factory=list)


def _request(rng, systems, i):
  if rng.random() < 0.6:  # a shared prefix, then a short tail of its own (maybe none)
    ids = systems[rng.integers(len(systems))] + list(rng.integers(0, 250, rng.integers(0, 12)))
  else:
    ids = list(rng.integers(0, 250, rng.integers(1, 40)))
  n = int(rng.choice([1, 1, 1, 2, 3]))
  k = int(rng.integers(1, min(17, CAPACITY - len(ids) + 1)))
  return Request(ids=[int(t) for t in ids], max_new_tokens=k, id=i, n=n)


def alone(reference: Engine, ids, k) -> list[int]:
  """Greedy tokens of one request run by itself in `reference`."""
  return [e.token for e in reference.run([Request(ids=ids, max_new_tokens=k, id="alone")])]


def soak(engine: Engine, reference: Engine, *, ops: int, seed: int) -> Soak:
  """Runs `ops` random operations (then drains), auditing after each; compares every sample with
  its request run alone at the end. Raises nothing: failures are in the returned `Soak`."""
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  systems = [[int(t) for t in rng.integers(0, 250, n)] for n in PREFIXES]
  stats, queue = Soak(), collections.deque()
  requests, got, ended = {}, collections.defaultdict(list), {}  # ended: (id, sample) -> how
  rows = {}  # row -> (request id, sample) last placed there

  def take(events):
    for e in events:
      got[(e.request, e.sample)].append(e.token)
      if e.done:
        short = len(got[(e.request, e.sample)]) < requests[e.request].max_new_tokens
        ended[(e.request, e.sample)] = "eos" if short else "done"
        for r in [r for r, key in rows.items() if key == (e.request, e.sample)]:
          del rows[r]
    stats.tokens += len(events)

  def audit(what):
    stats.peak_pages = max(stats.peak_pages, int(engine.paged.pages_in_use()))
    problems = engine.audit()
    running = set(range(engine.rows)) - set(engine.free_rows())
    if running - set(rows):  # (a sample done at its insert has left its row already)
      problems.append(f"rows {sorted(running - set(rows))} run, but no request was placed there")
    if problems:
      stats.problems.append((stats.ops, what, problems))

  def admit():
    while queue:
      placed = engine.insert(queue[0])
      if placed is None:
        stats.refused += 1
        return
      req = queue.popleft()
      rows.update({r: (req.id, s) for s, r in enumerate(placed)})
      stats.inserted += 1
      audit("insert")

  while stats.ops < ops or queue or engine.running():
    roll = rng.random() if stats.ops < ops else 1.0  # past `ops`: only steps, to drain
    if roll < 0.3 and len(queue) < QUEUE:
      req = _request(rng, systems, len(requests))
      requests[req.id] = req
      queue.append(req)
      admit()
      what = "insert"
    elif roll < 0.37 and engine.running():
      row = int(rng.choice(sorted(set(range(engine.rows)) - set(engine.free_rows()))))
      ended[rows[row]] = "freed"
      engine.free(row)
      stats.freed += 1
      what = "free"
    else:
      take(engine.step())
      stats.steps += 1
      admit()
      what = "step"
      if queue and not engine.running():
        stats.problems.append((stats.ops, what, ["an idle engine refused the queue's head"]))
        break
    stats.ops += 1
    audit(what)
  take(engine.step())  # events of the last inserts, if any
  stats.eos = sum(how == "eos" for how in ended.values())
  stats.index_hits = engine.index.hits
  stats.ops_s = time.perf_counter() - start

  longest = {}  # one reference run per distinct prompt, as long as any request of it asked
  for req in requests.values():
    key = tuple(req.ids)
    longest[key] = max(longest.get(key, 0), req.max_new_tokens)
  want = {key: alone(reference, list(key), k) for key, k in longest.items()}
  for (rid, sample), tokens in got.items():
    req = requests[rid]
    ref = want[tuple(req.ids)][:req.max_new_tokens]
    ok = tokens == ref if ended.get((rid, sample)) != "freed" else tokens == ref[:len(tokens)]
    if not ok:
      stats.mismatches.append((rid, sample, ended.get((rid, sample)), tokens, ref))
  stats.check_s = time.perf_counter() - start - stats.ops_s
  return stats


def test_soak_audits_clean_and_equals_alone(tiny):
  from tests.helpers import lively

  engine, reference = engines(lively(tiny))
  stats = soak(engine, reference, ops=120, seed=0)
  assert stats.problems == []
  assert stats.mismatches == []
  # the soak reached what it is for: refusals, hits, frees, EOS, a pool near dry
  assert stats.refused and stats.index_hits and stats.freed and stats.eos, stats
  assert stats.peak_pages >= PAGES - 2, stats
  assert engine.audit() == [] and int(engine.cache.pages_in_use()) == len(engine.index.pages)


@pytest.mark.slow  # ~60 s: two engines' pieces compile, then the references run
def test_soak_on_window_pools(tiny_gemma3):
  """The same soak on tiny-gemma3, whose sliding layers run on a window pool (16-token window,
  8-token pages): the window pool's invariants and pins audit clean after every operation (rows
  hold their window unbroken, one pin per `WindowPages` entry), and outputs equal alone, with
  prefix hits restoring the sliding layers from pins."""
  engine, reference = engines(tiny_gemma3, eos_id=None)
  assert engine.window_index  # the sliding layers have their own pool
  stats = soak(engine, reference, ops=80, seed=1)
  assert stats.problems == []
  assert stats.mismatches == []
  assert stats.refused and stats.index_hits and stats.freed, stats
  assert engine.audit() == []
