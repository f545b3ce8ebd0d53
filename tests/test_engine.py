"""Continuous batching (kvjax.engine) and beam search (kvjax.beam) on paged caches.

Invariants: every request's output equals running it alone, whatever joins and leaves the batch
around it; a prompt that starts with indexed pages adopts them (no copy, fewer pages in use) and
still equals running alone; the page index is keyed by weights, spec and dtype; a warmed-up engine
compiles nothing new; forks (parallel samples, beams) share their prompt's pages; requests that
can never run are refused with a message; beams share pages and equal the full cache's beams.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from kvjax.beam import beam_search
from kvjax.engine import Engine, Request, collect, serve
from kvjax.sampling import Sampler
from tests.helpers import lively


@pytest.fixture(scope="module")
def model(tiny):
  return lively(tiny)


def alone(model, ids, n):
  out = kvjax.generate(model, [ids], max_new_tokens=n, cache="full", stop_at_eos=False)
  return [int(t) for t in np.asarray(out.tokens[0][:n])]


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
  assert engine.index.hits == 40 + 40 + 39  # 5 pages each after the first; the last token recomputed
  # one row at a time: in use are the 5 indexed pages of the system prompt plus the tails' pages
  assert int(engine.cache.pages_in_use()) == len(engine.index.pages)


def test_prefix_sharing_saves_pages(model):
  """Four requests on one 64-token prompt in four rows: the prompt's pages are stored once."""
  system = prompts(3, [64])[0]
  reqs = [Request(ids=system + t, max_new_tokens=2, id=i) for i, t in enumerate(prompts(4, [4] * 4))]
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
  with pytest.raises(kvjax.CapacityError, match="capacity 32"):
    engine.insert(Request(ids=[1] * 30, max_new_tokens=5))
  with pytest.raises(kvjax.CapacityError, match="pool's 3"):
    engine.insert(Request(ids=[1] * 20, max_new_tokens=8))
  with pytest.raises(ValueError, match="empty prompt"):
    engine.insert(Request(ids=[], max_new_tokens=5))
  with pytest.raises(ValueError, match="n must lie"):
    engine.insert(Request(ids=[1], max_new_tokens=5, n=2))
  with pytest.raises(kvjax.SpecError, match="not paged"):
    Engine(model, cache="full")
  assert engine.insert(Request(ids=[1] * 3, max_new_tokens=2)) == [0]
  assert engine.insert(Request(ids=[1] * 3, max_new_tokens=2)) is None  # no free row now


def test_one_beam_is_greedy(model):
  ids = prompts(9, [37])[0]
  one = beam_search(model, ids, beams=1, max_new_tokens=10, cache="paged:8")
  assert one.tokens[0].tolist() == alone(model, ids, 10)


def test_beam_search_shares_pages_and_matches_full(model):
  ids = prompts(9, [37])[0]
  paged = beam_search(model, ids, beams=4, max_new_tokens=10, cache="paged:8")
  full = beam_search(model, ids, beams=4, max_new_tokens=10, cache="full")
  np.testing.assert_array_equal(paged.tokens, full.tokens)
  np.testing.assert_allclose(paged.scores, full.scores, rtol=1e-5)
  assert int(paged.cache.pages_in_use()) < 4 * 6, "beams share their common prefix's pages"
  assert (np.diff(paged.scores) <= 0).all()
