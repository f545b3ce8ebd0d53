"""Continuous batching (kvjax.engine) on paged caches.

Invariants: every request's output equals running it alone, whatever joins and leaves the batch
around it; a prompt that starts with indexed pages adopts them (no copy, fewer pages in use) and
still equals running alone; the page index is keyed by weights, spec and dtype; a warmed-up engine
compiles nothing new; forks (parallel samples, beams) share their prompt's pages; requests that
can never run are refused with a message; beams share pages and equal the full cache's beams.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import kvjax
from kvjax.engine import Engine, Event, Request, collect, serve, steps
from kvjax.sampling import Sampler
from tests.helpers import lively


@pytest.fixture(scope="module")
def model(tiny):
  return lively(tiny)


def alone(model, ids, n):
  out = kvjax.generate(model, [ids], max_new_tokens=n, cache="full", stop_at_eos=False)
  return [int(t) for t in np.asarray(out.tokens[0][:n])]


def run_checked(engine, events=None):
  """collect(events) (default: engine.run([])), asserting after every event that no row of the
  engine found the pool empty (a finished row's flag is cleared when it is freed, so the tests
  compare outputs too)."""
  out = []
  for event in engine.run([]) if events is None else events:
    failed = [np.asarray(c.failed).any() for c in steps.groups(engine.cache)]
    assert not any(failed), f"a row was refused a page at {event}"
    out.append(event)
  return collect(out)


def prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(0, 250, n)) for n in lengths]


def test_outputs_equal_running_each_request_alone(model):
  """Six requests of mixed lengths through three rows: rows are reused as requests finish."""
  shapes = [(5, 7), (40, 3), (17, 12), (90, 5), (3, 9), (33, 6)]
  reqs = [Request(ids=ids, max_new_tokens=k, id=i)
          for i, (ids, (_, k)) in enumerate(zip(prompts(0, [n for n, _ in shapes]), shapes))]
  events = list(serve(model, reqs, rows=3, capacity=128, cache="paged:8", pages=40))
  out = collect(events)
  for r in reqs:
    assert out[(r.id, 0)] == alone(model, r.ids, r.max_new_tokens), f"request {r.id}"
  last = {}
  for i, e in enumerate(events):
    last[e.request] = (i, e.done)
  assert all(done for _, done in last.values()), "each request's last event says done"


def test_shared_prefix_adopts_pages_and_equals_alone(model):
  system = prompts(1, [40])[0]
  tails = prompts(2, [3, 8, 1])
  reqs = [Request(ids=system + t, max_new_tokens=4, id=i) for i, t in enumerate(tails)]
  reqs.append(Request(ids=system, max_new_tokens=4, id="whole"))  # fully covered by the index
  engine = Engine(model, rows=1, capacity=128, cache="paged:8")
  out = collect(engine.run(reqs))
  for r in reqs:
    assert out[(r.id, 0)] == alone(model, r.ids, 4)
  # 5 pages each after the first; a wholly covered prompt recomputes its last token
  assert engine.index.hits == 40 + 40 + 39
  # one row at a time: in use are the 5 indexed pages of the system prompt plus the tails' pages
  assert int(engine.cache.pages_in_use()) == len(engine.index.pages)


def test_prefix_sharing_saves_pages(model):
  """Four requests on one 64-token prompt in four rows: the prompt's pages are stored once."""
  system = prompts(3, [64])[0]
  reqs = [Request(ids=system + t, max_new_tokens=2, id=i)
          for i, t in enumerate(prompts(4, [4] * 4))]
  used = {}
  for share in (True, False):
    engine = Engine(model, rows=4, capacity=96, cache="paged:8", prefix_cache=share)
    for r in reqs:
      engine.insert(r)
    used[share] = int(engine.cache.pages_in_use())
  assert used[False] == 4 * 9 and used[True] == 8 + 4


def test_index_key_separates_weights_and_dtypes(model, tiny):
  a = Engine(model, rows=1, capacity=32, cache="paged:8").index.seed
  assert a == Engine(model, rows=1, capacity=32, cache="paged:8").index.seed
  assert a != Engine(tiny, rows=1, capacity=32, cache="paged:8").index.seed
  assert a != Engine(model, rows=1, capacity=32, cache="paged:8+int8").index.seed
  import jax.numpy as jnp
  bf16 = kvjax.load("tiny", dtype=jnp.bfloat16)
  assert Engine(tiny, rows=1, capacity=32, cache="paged:8").index.seed != \
      Engine(bf16, rows=1, capacity=32, cache="paged:8").index.seed


def test_warm_engine_compiles_nothing(model):
  engine = Engine(model, rows=2, capacity=320, cache="paged:16")
  warm = [Request(ids=ids, max_new_tokens=3) for ids in prompts(5, [10, 50, 200, 300])]
  collect(engine.run(warm))
  before = kvjax.compile_stats()["n_compiles"]
  more = [Request(ids=ids, max_new_tokens=k) for ids, k in zip(prompts(6, [12, 63, 70, 260, 5]),
                                                                  [4, 9, 2, 5, 7])]
  collect(engine.run(more))
  assert kvjax.compile_stats()["n_compiles"] == before


def test_parallel_samples_share_the_prompt_pages(model):
  ids = prompts(7, [37])[0]
  engine = Engine(model, rows=4, capacity=64, cache="paged:8")
  rows = engine.insert(Request(ids=ids, max_new_tokens=5, n=3, id="p"))
  # 37 tokens fill 5 pages, held once by three rows (and, for the 4 full ones, the index)
  assert len(rows) == 3 and int(engine.cache.pages_in_use()) == 5
  assert len(engine.index.pages) == 4
  out = collect(engine.run([]))
  want = alone(model, ids, 5)
  assert [out[("p", s)] for s in range(3)] == [want] * 3
  sampled = Engine(model, rows=4, capacity=64, cache="paged:8", sampler=Sampler(temperature=2.0))
  out = collect(sampled.run([Request(ids=ids, max_new_tokens=8, n=4, id="s")]))
  assert len({tuple(out[("s", s)]) for s in range(4)}) > 1


def test_eos_stops_a_request(model):
  ids = prompts(8, [20])[0]
  first = alone(model, ids, 3)
  out = collect(serve(model, [Request(ids=ids, max_new_tokens=10, id=0)], rows=1, capacity=64,
                      cache="paged:8", eos_id=first[1]))
  assert out[(0, 0)] == first[:2]


def test_refused_requests(model):
  engine = Engine(model, rows=1, capacity=32, cache="paged:8", pages=3)
  with pytest.raises(kvjax.CapacityError, match=r"request 0 needs 30 \+ 5 tokens.*capacity 32"):
    engine.insert(Request(ids=[1] * 30, max_new_tokens=5))
  with pytest.raises(kvjax.CapacityError, match="request 0 needs up to 4 pages.*pool's 3"):
    engine.insert(Request(ids=[1] * 20, max_new_tokens=8))
  with pytest.raises(ValueError, match="request 0 is empty"):
    engine.insert(Request(ids=[], max_new_tokens=5))
  with pytest.raises(ValueError, match="n must lie"):
    engine.insert(Request(ids=[1], max_new_tokens=5, n=2))
  with pytest.raises(kvjax.SpecError, match="not paged"):
    Engine(model, cache="full")
  assert engine.insert(Request(ids=[1] * 3, max_new_tokens=2)) == [0]
  assert engine.insert(Request(ids=[1] * 3, max_new_tokens=2)) is None  # no free row now


def test_default_pool_runs_requests_that_fit_together(model):
  """rows=2, capacity=64 on paged:16 builds 8 pages; a 40 + 24 request takes 3 prompt pages and
  1 for its output (its last token is never stored), so two run side by side from the first step
  (issue 21: the count took the partial prompt page twice plus a copy page, 6 each)."""
  reqs = [Request(ids=ids, max_new_tokens=24, id=i) for i, ids in enumerate(prompts(10, [40, 40]))]
  engine = Engine(model, rows=2, capacity=64, stop_at_eos=False)
  assert engine.cache.n_pages == 8
  stream = engine.run(reqs)
  first = next(stream)
  assert engine.running() == 2, "run() admitted both requests at once"
  out = run_checked(engine, itertools.chain([first], stream))
  for r in reqs:
    assert out[(r.id, 0)] == alone(model, r.ids, 24), f"request {r.id}"


def test_pools_of_exactly_the_pages_requests_take(model):
  """Pools sized to the exact count run out of nothing. paged:8, 37-token prompt, n=3, 5 new:
  5 prompt pages, then each sample copies the partial 5th at its first token (the original goes
  free in that step) and takes a 6th: 10 pages at the worst, so 9 is refused and 10 runs. Then,
  beside each other, a 2-sample request wholly covered by the index (it copies the hit last page
  it writes into: 1 + 2 pages) and a fresh 20 + 4 one (3 pages) fill the 6 pages left beside the
  4 indexed ones; and a request that fits only if the index gives up its last hit page (the copy
  of it would cost one too many) adopts one page fewer instead of being refused or overflowing."""
  ids = prompts(7, [37])[0]
  with pytest.raises(kvjax.CapacityError, match="needs up to 10 pages, more than the pool's 9"):
    Engine(model, rows=4, capacity=64, cache="paged:8", pages=9).insert(
        Request(ids=ids, max_new_tokens=5, n=3))
  engine = Engine(model, rows=4, capacity=64, cache="paged:8", pages=10, stop_at_eos=False)
  assert engine.insert(Request(ids=ids, max_new_tokens=5, n=3, id="p")) == [0, 1, 2]
  out = run_checked(engine)
  assert [out[("p", s)] for s in range(3)] == [alone(model, ids, 5)] * 3
  covered, fresh = ids[:32], prompts(11, [20])[0]
  assert engine.insert(Request(ids=covered, max_new_tokens=9, n=2, id="c")) == [0, 1]
  assert engine.insert(Request(ids=fresh, max_new_tokens=4, id="f")) == [2]
  out = run_checked(engine)
  assert [out[("c", s)] for s in range(2)] == [alone(model, covered, 9)] * 2
  assert out[("f", 0)] == alone(model, fresh, 4)
  # 6 pages indexed (4 of the prompt, 2 of `fresh`); 2 samples of 25 new tokens on the covered
  # prompt take 1 + 2 x 3 pages: with all 4 hit pages kept only 6 can be freed, with 3 kept 7
  hits = engine.index.hits
  assert engine.insert(Request(ids=covered, max_new_tokens=25, n=2, id="d")) == [0, 1]
  assert engine.index.hits == hits + 24
  out = run_checked(engine)
  assert [out[("d", s)] for s in range(2)] == [alone(model, covered, 25)] * 2


def test_capacity_must_be_a_multiple_of_the_page_size(model):
  with pytest.raises(ValueError, match=r"capacity 60 is not a multiple of the page size 16 of "
                                       r"'paged:16'; use 48 or 64"):
    Engine(model, rows=2, capacity=60)
  with pytest.raises(ValueError, match=r"capacity 5 is not a multiple of the page size 8 .*use 8$"):
    Engine(model, rows=1, capacity=5, cache="paged:8")
  with pytest.raises(ValueError, match="capacity must be a positive int, got 64.0"):
    Engine(model, rows=1, capacity=64.0, cache="paged:8")


class EosTokenizer:
  """A tokenizer stand-in: text as bytes, and a chosen EOS id."""

  def __init__(self, eos_id):
    self.eos_id = eos_id

  def encode(self, text):
    return list(text.encode("utf-8"))


def test_eos_defaults_to_the_tokenizers(model):
  ids = prompts(8, [20])[0]
  first = alone(model, ids, 3)
  assert first[1] not in (first[0], first[2])
  told = dataclasses.replace(model, tokenizer=EosTokenizer(first[1]))
  req = Request(ids=ids, max_new_tokens=10, id=0)
  options = {"rows": 2, "capacity": 64}  # the default pool test's engine: no new programs
  assert Engine(told, **options).eos_id == first[1]
  assert collect(serve(told, [req], **options))[(0, 0)] == first[:2]
  # stop_at_eos=False: only max_new_tokens ends a sample, unless an eos_id is given
  longer = collect(serve(told, [req], stop_at_eos=False, **options))[(0, 0)]
  assert len(longer) == 10 and longer[:3] == first
  assert collect(serve(told, [req], stop_at_eos=False, eos_id=first[2], **options))[(0, 0)] == first
  assert Engine(dataclasses.replace(model, tokenizer=None), **options).eos_id is None


def test_collect_is_exported():
  events = [Event("a", 0, 5, False), Event("b", 1, 7, True), Event("a", 0, 6, True)]
  assert kvjax.collect is collect and "collect" in kvjax.__all__
  assert kvjax.collect(events) == {("a", 0): [5, 6], ("b", 1): [7]}


def test_text_prompts_and_refused_ids(model):
  """A string is encoded with the model's tokenizer; ids must be integers (never truncated); a
  request's error names its id, the order of insertion unless it has one."""
  text = "To be, or not"
  engine = Engine(model, rows=2, capacity=64, stop_at_eos=False)
  out = collect(engine.run([Request(ids=text, max_new_tokens=3)]))
  assert out[(0, 0)] == alone(model, model.tokenizer.encode(text), 3)
  with pytest.raises(TypeError, match=r"request 1 must hold integer token ids, got float 1\.0"):
    engine.insert(Request(ids=[1.0, 2.0], max_new_tokens=2))
  with pytest.raises(TypeError, match="request 1 token ids must be integers, got dtype float"):
    engine.insert(Request(ids=np.array([3.7, 2.0]), max_new_tokens=2))
  with pytest.raises(ValueError, match=r"request 'x' token ids must lie in \[0, 260\)"):
    engine.insert(Request(ids=[5, 260], max_new_tokens=2, id="x"))
  with pytest.raises(ValueError, match="request 1: max_new_tokens must be a positive int"):
    engine.insert(Request(ids=[5], max_new_tokens=0))
  bare = Engine(dataclasses.replace(model, tokenizer=None), rows=2, capacity=64)
  with pytest.raises(TypeError, match="request 0 is text, which needs a model with a tokenizer"):
    bare.insert(Request(ids=text, max_new_tokens=3))


@pytest.mark.slow  # ~30 s: the engine's steps (two pools) and generate compile
def test_sliding_layers_get_a_window_pool_and_equal_alone(tiny_gemma3):
  """tiny-gemma3 (16-token windows on layers 0-4, layer 5 global): the global layer pages every
  token, the sliding layers a window pool that gives pages back behind the window (a row holds at
  most `window_pages` there however long it runs); a 40-token shared prefix (past the window) is
  adopted on both, its window pages from the pins taken during the first prefill; samples fork
  on both pools; every output equals `generate` alone and the page invariants hold throughout."""
  from kvjax.caches.paged import PagedCache, window_pages
  from kvjax.engine import steps

  system = prompts(1, [40])[0]
  reqs = [Request(ids=system + t, max_new_tokens=k, id=i, n=n)
          for i, (t, k, n) in enumerate(zip(prompts(2, [3, 9, 1]), [6, 30, 5], [1, 1, 2]))]
  engine = Engine(tiny_gemma3, rows=3, capacity=80, cache="paged:8", stop_at_eos=False)
  window, full = steps.groups(engine.cache)
  assert isinstance(engine.cache, kvjax.HybridCache) and isinstance(full, PagedCache)
  assert (window.window_only, window.sliding, window.n_layers) == (True, 16, 5)
  assert (full.window_only, full.sliding, full.n_layers, full.n_pages) == (False, None, 1, 30)
  assert engine._chunks == (16,)  # prefill chunks no longer than the window
  assert window.n_pages == 3 * window_pages(16, 8, 16) + 3 * 2  # rows' share + a window of pins per row
  out = []
  for event in engine.run(reqs):
    assert engine.audit() == [], event
    table = np.asarray(steps.groups(engine.cache)[0].pages.table)
    held = (table < window.n_pages).sum(axis=1)
    assert held.max() <= 4, (event, held)  # 16-token window, 8-token pages, 1-token steps
    out.append(event)
  out = collect(out)
  for r in reqs:
    for sample in range(r.n):
      assert out[(r.id, sample)] == alone(tiny_gemma3, r.ids, r.max_new_tokens), (r.id, sample)
  assert engine.index.hits >= 2 * 39  # the later requests adopted the prefix on both pools
  pinned = steps.groups(engine.cache)[0].pages_in_use()
  assert int(pinned) == len(engine.window_index[0].pages) > 0  # only pins hold window pages now


@pytest.mark.slow  # ~20 s
def test_window_pages_gone_shorten_the_prefix_hit(tiny_gemma3):
  """With no pins for the window pool, a repeated prompt cannot restore its sliding layers from
  the index: the hit is dropped (recomputed from scratch), never taken with stale window pages."""
  ids = prompts(3, [40])[0]
  engine = Engine(tiny_gemma3, rows=1, capacity=64, cache="paged:8", stop_at_eos=False,
                  window_pins=0)
  out = collect(engine.run([Request(ids=ids, max_new_tokens=4, id=i) for i in range(2)]))
  assert out[(0, 0)] == out[(1, 0)] == alone(tiny_gemma3, ids, 4)
  assert engine.index.hits == 0 and engine.audit() == []

