"""simlayerkv (kvjax/presses/simlayerkv.py): a layer is lazy for a row when its last queries
attend mostly to the initial and recent tokens; lazy layers keep only those, the others all.

Checked against a NumPy transcription of kvpress's SimLayerKVPress.is_lazy / compress on random
inputs (per row; rows too short are never compressed), and end to end on the tiny model: the
cache holds what the kept mask says, sized for every token, and `compress` takes no ratio.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import presses
from kvjax.caches.terms import SpecError
from tests.presses import synthetic

N_INITIAL, N_RECENT, N_LAST = 2, 4, 2


def lazy_mass_oracle(x, b):
  """kvpress's is_lazy score for row b: the window's attention without the window's columns,
  mean over heads and window queries, summed over the first n_initial and last n_recent."""
  n = int(x.n_valid[b])
  a = synthetic.probs(x, b, range(n - N_LAST, n))[:, :, :n - N_LAST].mean(axis=(0, 1))
  return a[:N_INITIAL].sum() + a[-N_RECENT:].sum()


def kept_oracle(n, t, lazy):
  """bool [t]: kvpress keeps keys[:n_initial] and keys[-n_recent + n_last:] of a lazy layer."""
  keep = np.zeros(t, bool)
  if lazy:
    keep[:N_INITIAL] = True
    keep[n - N_RECENT + N_LAST:n] = True
  else:
    keep[:n] = True
  return keep


def test_lazy_layers_match_kvpress():
  x = synthetic.layer_inputs([15, 12, 8], seed=3)
  masses = [lazy_mass_oracle(x, b) for b in range(2)]
  spec = f"simlayerkv(n_initial={N_INITIAL}, n_recent={N_RECENT}, n_last={N_LAST}"
  np.testing.assert_allclose(np.asarray(presses.make_press(spec + ")").lazy_mass(x))[:2], masses,
                             rtol=1e-5)
  threshold = float(np.mean(masses))  # one row lazy, the other not; row 2 is too short
  press = presses.make_press(spec + f", lazy_threshold={threshold})")
  scores = press.score(x, jnp.asarray([15, 12, 8]))
  keep = np.asarray(press.select(x, scores, jnp.asarray([15, 12, 8])))
  lazy = [m > threshold for m in masses] + [False]
  assert sorted(lazy[:2]) == [False, True]
  for b, n in enumerate([15, 12, 8]):
    assert (keep[b] == kept_oracle(n, 15, lazy[b])).all(), b


def test_compress_sizes_every_layer_for_the_whole_row(tiny):
  rows = [[(7 * i + 3) % 250 + 5 for i in range(20)], [(11 * i + 1) % 250 + 5 for i in range(8)]]
  spec = f"simlayerkv(lazy_threshold=0.0, n_initial={N_INITIAL}, n_recent={N_RECENT}, " \
         f"n_last={N_LAST})"
  cache, info = kvjax.compress(tiny, rows, spec, room=4, details=True)
  held = np.asarray(cache.held())  # [L, B, K]: every layer lazy for row 0, row 1 too short
  assert (held[:, 0] == N_INITIAL + N_RECENT - N_LAST).all() and (held[:, 1] == 8).all()
  assert cache.capacity == 20 + 4
  np.testing.assert_array_equal(np.asarray(cache.lengths), [20, 8])
  kept = np.asarray(info.kept)
  assert (kept[:, 0] == kept_oracle(20, 20, True)).all()
  with pytest.raises(SpecError, match="drop ratio"):
    kvjax.compress(tiny, rows, spec, ratio=0.5)
  off = presses.score_prompt(tiny, rows, spec.replace("0.0", "1.0"))
  assert np.asarray(off.kept).sum() == tiny.config.n_layers * tiny.config.n_kv_heads * 28
