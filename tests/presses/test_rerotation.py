"""key_rerotation and finch (kvjax/presses/rerotation.py).

The contract: after compression the i-th kept token of each (row, layer, kv head) sits at position
i, its key re-rotated there, and the row continues at n = its kept count. So the compressed cache
must equal a full cache holding only the kept tokens' keys (rotated at 0..n-1, from the
uncompressed prefill, in NumPy) and values, and decoding through both gives the same logits.
Ragged rows are checked against each row alone by the same oracle (it works row by row). Finch's
scores against a NumPy transcription of kvpress's FinchPress.score on random inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import presses
from kvjax.caches.full import FullCache
from kvjax.caches.terms import SpecError
from kvjax.models.protocol import static_step
from kvjax.testing import oracle
from tests.presses import synthetic

ROWS = [[(7 * i + 3) % 250 + 5 for i in range(23)], [(11 * i + 1) % 250 + 5 for i in range(17)]]
NEXT = [[40, 41, 42], [50, 51, 52]]
CAPACITY = 32


@functools.partial(jax.jit, static_argnums=0)
def _step(step, params, tokens, cache, n_valid):
  return step.step(params, tokens, cache, n_valid)


def step(model, cache, rows):
  """(logits [B, T, V], cache) of feeding `rows` (equal lengths) after what the cache holds."""
  tokens = jnp.asarray(rows, jnp.int32)
  n_valid = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
  return _step(static_step(model), model.params, tokens, cache, n_valid)


def full_cache(model, batch):
  c = model.config
  return FullCache.init(n_layers=c.n_layers, batch=batch, kv_heads=c.n_kv_heads,
                        head_dim=c.head_dim, capacity=CAPACITY)


@pytest.fixture(scope="module")
def prompt_kv(tiny):
  """Keys (rotated at their true positions) and values [L, B, K, T, H] of the ragged ROWS."""
  t = max(len(r) for r in ROWS)
  tokens = np.zeros((len(ROWS), t), np.int32)
  for b, r in enumerate(ROWS):
    tokens[b, :len(r)] = r
  _, cache = _step(static_step(tiny), tiny.params, jnp.asarray(tokens), full_cache(tiny, len(ROWS)),
                   jnp.asarray([len(r) for r in ROWS], jnp.int32))
  view = cache.view()
  return np.asarray(view.keys)[..., :t, :], np.asarray(view.values)[..., :t, :]


def kept_only(model, prompt_kv, kept):
  """The oracle: a FullCache holding, per (row, layer, kv head), the kept tokens in position order
  at positions 0..n-1 (keys re-rotated in NumPy by new - old). kept bool [L, B, K, T]."""
  keys, values = prompt_kv
  nl, b, kh, _, h = keys.shape
  new_k = np.zeros((nl, b, kh, CAPACITY, h), np.float32)
  new_v = np.zeros_like(new_k)
  lengths = kept[0, :, 0].sum(-1)
  for layer in range(nl):
    for row in range(b):
      for head in range(kh):
        at = np.flatnonzero(kept[layer, row, head])
        assert len(at) == lengths[row], "every (layer, kv head) of a row keeps the same count"
        shift = np.arange(len(at)) - at
        k = oracle.rope(keys[layer, row, head, at][:, None], shift, model.config.rope_theta)
        new_k[layer, row, head, :len(at)] = k[:, 0]
        new_v[layer, row, head, :len(at)] = values[layer, row, head, at]
  return full_cache(model, b).replace(k=jnp.asarray(new_k), v=jnp.asarray(new_v),
                                      lengths=jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("spec", ["key_rerotation(knorm)", "finch(window_size=5)"])
def test_equals_a_full_cache_of_the_kept_tokens(tiny, prompt_kv, spec):
  cache, info = kvjax.compress(tiny, ROWS, spec, ratio=0.5, room=8, details=True)
  kept = np.asarray(info.kept)
  want = kept_only(tiny, prompt_kv, kept)
  n = np.asarray(want.lengths)
  np.testing.assert_array_equal(np.asarray(cache.lengths), n)
  np.testing.assert_array_equal(n, np.asarray(info.n_kept[0]))
  view = cache.view()
  for row in range(len(ROWS)):
    pos = np.asarray(view.positions[:, row, :, :n[row]])
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(n[row]), pos.shape))
    np.testing.assert_allclose(np.asarray(view.keys[:, row, :, :n[row]]),
                               np.asarray(want.k[:, row, :, :n[row]]), atol=2e-5)
  got, _ = step(tiny, cache, NEXT)
  ref, _ = step(tiny, want, NEXT)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4)


def test_keeps_the_inner_press_top_k(tiny):
  """The kept sets are the inner press's per-head top-k (kvpress: the inner score, n_kept per
  layer even when the inner press tapers it, as pyramidkv does)."""
  rotated = presses.score_prompt(tiny, ROWS, "key_rerotation(knorm)", ratio=0.5)
  plain = presses.score_prompt(tiny, ROWS, "knorm", ratio=0.5)
  np.testing.assert_array_equal(np.asarray(rotated.kept), np.asarray(plain.kept))
  press = presses.make_press("key_rerotation(pyramidkv)")
  assert {press.layer_kept(10, 40, layer, 4, 0.75) for layer in range(4)} == {10}


def test_refuses_selections_it_cannot_rerotate(tiny):
  with pytest.raises(SpecError, match="per-head top-k"):
    presses.make_press("key_rerotation(adakv(knorm))")
  with pytest.raises(SpecError, match="already re-rotates"):
    presses.make_press("key_rerotation(finch(window_size=4))")
  with pytest.raises(SpecError, match="same number of kept tokens"):
    kvjax.compress(tiny, ROWS, "adakv(finch(window_size=4))", ratio=0.5)
  with pytest.raises(SpecError, match="window_size=N"):
    presses.score_prompt(tiny, ROWS, "finch", ratio=0.5)
  with pytest.raises(SpecError, match="chunk_length"):
    presses.make_press("finch(window_size=4, chunk_length=64)")


def finch_oracle(x, b, w, normalize):
  """[K, n] kvpress's FinchPress.score for row b (batch 1 there): the window's attention with the
  window's columns dropped, times the query's position, mean over the window and the group, the
  window padded with max + 1."""
  n = int(x.n_valid[b])
  window = list(range(n - w, n))
  p = synthetic.probs(x, b, window)[:, :, :n - w]  # [N, w, n - w]
  if normalize:
    p = p * np.asarray(window, np.float64)[None, :, None]
  s = synthetic.group_mean(x, p.mean(axis=1))
  return np.concatenate([s, np.full((x.kv_heads, w), s.max() + 1.0)], axis=1)


@pytest.mark.parametrize("normalize", [True, False])
def test_finch_scores_match_kvpress(normalize):
  x = synthetic.layer_inputs([13, 9], seed=1)
  press = presses.make_press(f"finch(window_size=4, normalize_scores={normalize})")
  got = np.asarray(press.score(x, jnp.asarray([6, 4])))
  for b in range(x.batch):
    n = int(x.n_valid[b])
    np.testing.assert_allclose(got[b, :, :n], finch_oracle(x, b, 4, normalize), rtol=1e-5)


def test_finch_without_rerotation_keeps_true_positions(tiny):
  cache, info = kvjax.compress(tiny, ROWS, "finch(window_size=5, rerotate_keys=False)",
                               ratio=0.5, room=8, details=True)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) for r in ROWS])
  view = cache.view()
  kept = np.asarray(info.kept)
  for row, ids in enumerate(ROWS):  # the question (last 5 tokens) is kept in every head
    assert kept[:, row, :, len(ids) - 5:len(ids)].all()
    held = np.sort(np.asarray(view.positions[:, row]), axis=-1)[..., -int(info.n_kept[0, row]):]
    np.testing.assert_array_equal(held, np.sort(np.nonzero(kept[:, row])[-1].reshape(
        held.shape), axis=-1))
