"""decoding (kvjax/presses/decoding.py): generation that recompresses the cache every
compression_interval tokens with a press that scores keys and values.

Checked: one recompression keeps, per (row, layer, kv head), the target_size held tokens with the
best inner scores (knorm, against NumPy), keys and values unchanged at their true positions; a
target that never binds generates exactly what kvjax.generate does with a full cache; with
streaming_llm the final cache holds the sinks and the most recent tokens (ragged rows); and the
inputs it cannot take are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from kvjax import presses
from kvjax.caches.terms import SpecError
from kvjax.presses import decoding

ROWS = [[(7 * i + 3) % 250 + 5 for i in range(9)], [(11 * i + 1) % 250 + 5 for i in range(6)]]


def test_recompress_keeps_the_best_held_tokens(tiny):
  cache = kvjax.compress(tiny, ROWS, "knorm", ratio=0.5, room=6)
  cache = kvjax.generate(tiny, [[40, 41], [50]], cache=cache, max_new_tokens=3).cache
  target = 4
  new = decoding.recompress(cache, presses.make_press("knorm"), target, 3,
                            decoding._attention_shape(tiny))
  np.testing.assert_array_equal(np.asarray(new.lengths), np.asarray(cache.lengths))
  old, got = cache.view(), new.view()
  for index in np.ndindex(*old.positions.shape[:3]):
    pos = np.asarray(old.positions[index])
    live = np.flatnonzero(pos >= 0)
    norms = np.linalg.norm(np.asarray(old.keys[index])[live], axis=-1)
    order = np.lexsort((pos[live], norms))[:target]  # smallest norm, ties to the lower position
    want = live[order]
    got_pos = np.asarray(got.positions[index])
    slots = np.flatnonzero(got_pos >= 0)
    assert sorted(got_pos[slots]) == sorted(pos[want]), index
    by_pos = {p: s for s, p in zip(slots, got_pos[slots])}
    for s in want:
      np.testing.assert_array_equal(np.asarray(got.keys[index])[by_pos[pos[s]]],
                                    np.asarray(old.keys[index])[s])
      np.testing.assert_array_equal(np.asarray(got.values[index])[by_pos[pos[s]]],
                                    np.asarray(old.values[index])[s])


def test_a_target_that_never_binds_generates_like_a_full_cache(tiny):
  tokens, cache = presses.decode(tiny, ROWS, "decoding(knorm, target_size=32, "
                                 "compression_interval=4)", max_new_tokens=8)
  want = kvjax.generate(tiny, ROWS, max_new_tokens=8, stop_at_eos=False)
  np.testing.assert_array_equal(tokens, np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) + 7 for r in ROWS])


def test_streaming_llm_keeps_the_sinks_and_the_most_recent(tiny):
  tokens, cache = presses.decode(tiny, ROWS, "decoding(streaming_llm(n_sink=2), target_size=5, "
                                 "compression_interval=4)", max_new_tokens=8)
  assert tokens.shape == (2, 8)
  positions = np.asarray(cache.view().positions)
  for row, ids in enumerate(ROWS):
    n = len(ids) + 7  # the last generated token is not fed
    assert int(cache.lengths[row]) == n
    want = [0, 1, n - 3, n - 2, n - 1]
    for held in positions[:, row].reshape(-1, positions.shape[-1]):
      assert sorted(held[held >= 0]) == want


def test_refuses_what_it_cannot_run(tiny):
  with pytest.raises(SpecError, match="reads the queries"):
    presses.decode(tiny, ROWS, "decoding(snapkv)", max_new_tokens=4)
  with pytest.raises(SpecError, match="selects its own way"):
    presses.make_press("decoding(adakv(knorm))")
  with pytest.raises(SpecError, match="decoding"):
    presses.decode(tiny, ROWS, "knorm", max_new_tokens=4)
  cache = kvjax.compress(tiny, ROWS, "knorm", ratio=0.5, room=2)
  with pytest.raises(SpecError, match="room >= 12"):
    presses.decode(tiny, [[1, 2, 3], [4]], "decoding(knorm, compression_interval=10)",
                   cache=cache, max_new_tokens=4)
