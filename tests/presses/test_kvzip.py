"""kvzip (kvjax/presses/kvzip.py): the rows are extended to [context, repeat prompt, context] and a
context token scores the most attention the repetition's queries give it.

Checked: the extension (kvpress's prompt and chat-template suffix), the scores against a NumPy
transcription of kvpress's score_kvzip on random inputs, ratio 0 keeps every context token and
decodes exactly like a full cache of the context (and on a hybrid layout, like a plain compress:
the sliding layers' windows hold the context, not its repetition), the pooled per-layer budget
with its sinks, and ragged rows equal each row alone.
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
from tests.presses import synthetic

ROWS = [[(7 * i + 3) % 250 + 5 for i in range(21)], [(11 * i + 1) % 250 + 5 for i in range(14)]]
IDS = (200, 201, 202)  # a short stand-in for the repeat prompt


def test_extends_each_row_with_the_repeat_prompt(tiny):
  press = presses.make_press("kvzip")
  middle = list(presses.kvzip.REPEAT_PROMPT.encode()) + list(b"\nassistant: ")  # byte template
  assert press.repeat_ids(tiny.tokenizer) == middle
  rows, context = press.extend([[1, 2], [3]], tiny.tokenizer)
  assert rows == [[1, 2] + middle + [1, 2], [3] + middle + [3]] and context == [2, 1]
  assert presses.make_press("kvzip(suffix='\\n')").repeat_ids(tiny.tokenizer)[-1] == 10
  with pytest.raises(SpecError, match="prompt_ids"):
    press.repeat_ids(None)


def kvzip_oracle(x, b, n_sink):
  """[K, c] kvpress's score_kvzip + compress_post for row b, one chunk, no chat prefix: max over
  the group's heads and the repetition's queries of their attention (softmax over the context and
  the repetition up to the query), the first n_sink set to max + 1."""
  c, n = int(x.n_context[b]), int(x.n_valid[b])
  p = synthetic.probs(x, b, range(c, n))  # [N, n - c, n]
  s = p.max(axis=1).reshape(x.kv_heads, x.groups, n).max(axis=1)[:, :c]
  s[:, :n_sink] = s.max() + 1.0
  return s


def test_scores_match_kvpress():
  x = synthetic.layer_inputs([15, 11], n_context=[6, 5], seed=2)
  press = presses.make_press("kvzip(n_sink=2, block=4)")
  got = np.asarray(press.score(x, jnp.asarray([3, 2])))
  for b in range(x.batch):
    c = int(x.n_context[b])
    np.testing.assert_allclose(got[b, :, :c], kvzip_oracle(x, b, 2), rtol=1e-5)


def test_selection_pools_the_heads_of_a_layer():
  x = synthetic.layer_inputs([15, 11], n_context=[6, 5], seed=2)
  press = presses.make_press("kvzip(n_sink=2)")
  scores = press.score(x, jnp.asarray([3, 2]))
  keep = np.asarray(press.select(x, scores, jnp.asarray([3, 2])))
  assert keep.sum(axis=(1, 2)).tolist() == [x.kv_heads * 3, x.kv_heads * 2]
  assert keep[:, :, :2].all() and not keep[0, :, 6:].any() and not keep[1, :, 5:].any()
  s = np.asarray(scores)
  for b, c in enumerate([6, 5]):  # every kept pair scores at least every dropped one
    assert s[b][keep[b]].min() >= s[b, :, :c][~keep[b, :, :c]].max()


@functools.partial(jax.jit, static_argnums=0)
def _step(step, params, tokens, cache, n_valid):
  return step.step(params, tokens, cache, n_valid)


def test_ratio_zero_keeps_the_context_and_decodes_like_a_full_cache(tiny):
  c = tiny.config
  cache = kvjax.compress(tiny, ROWS, f"kvzip(prompt_ids={IDS})", ratio=0.0, room=4)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) for r in ROWS])
  np.testing.assert_array_equal(np.asarray(cache.held()),
                                np.broadcast_to([len(r) for r in ROWS], (c.n_layers, 2))[..., None]
                                * np.ones(c.n_kv_heads, int))
  t = max(len(r) for r in ROWS)
  tokens = np.zeros((2, t), np.int32)
  for b, r in enumerate(ROWS):
    tokens[b, :len(r)] = r
  full = FullCache.init(n_layers=c.n_layers, batch=2, kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                        capacity=32)
  _, full = _step(static_step(tiny), tiny.params, jnp.asarray(tokens), full,
                  jnp.asarray([len(r) for r in ROWS], jnp.int32))
  nxt, n = jnp.asarray([[40, 41], [50, 51]], jnp.int32), jnp.asarray([2, 2], jnp.int32)
  got, _ = _step(static_step(tiny), tiny.params, nxt, cache, n)
  want, _ = _step(static_step(tiny), tiny.params, nxt, full, n)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


@pytest.mark.parametrize("replay", [False, True], ids=["ids", "prefilled"])
def test_hybrid_window_layers_hold_the_context_not_its_repetition(tiny_gemma3, replay):
  """On Gemma 3's layout the sliding layers keep their window of the context (the extension is
  read by the prefill only): at ratio 0 kvzip decodes exactly like a plain compress at ratio 0.
  The longer row (21 tokens) overflows the 16-token window."""
  model, spec = tiny_gemma3, f"kvzip(prompt_ids={IDS})"
  ids = presses.prefill(model, ROWS, press=spec) if replay else ROWS
  cache = kvjax.compress(model, ids, spec, ratio=0.0, room=4)
  plain = kvjax.compress(model, ROWS, "knorm", ratio=0.0, room=4)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) for r in ROWS])
  nxt, n = jnp.asarray([[40, 41], [50, 51]], jnp.int32), jnp.asarray([2, 2], jnp.int32)
  got, _ = _step(static_step(model), model.params, nxt, cache, n)
  want, _ = _step(static_step(model), model.params, nxt, plain, n)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny_gemma3"])
def test_scored_once_it_compresses_a_plain_prefill(request, name):
  """kvzip's scores from one run of the extension serve any ratio over a plain prefill of the
  context (no extended Prefilled): the same kept tokens, the same decoding, and the context's own
  first-token logits."""
  model, spec = request.getfixturevalue(name), f"kvzip(prompt_ids={IDS})"
  scores = presses.score_prompt(model, ROWS, spec, ratio=0.25).scores
  plain = presses.prefill(model, ROWS)
  want, info = kvjax.compress(model, ROWS, spec, ratio=0.5, room=4, details=True)
  got, given = kvjax.compress(model, plain, spec, ratio=0.5, room=4, details=True, scores=scores)
  np.testing.assert_array_equal(np.asarray(given.kept), np.asarray(info.kept))
  np.testing.assert_array_equal(np.asarray(got.lengths), [len(r) for r in ROWS])
  np.testing.assert_array_equal(np.asarray(given.logits), np.asarray(plain.logits))
  nxt, n = jnp.asarray([[40, 41], [50, 51]], jnp.int32), jnp.asarray([2, 2], jnp.int32)
  a, _ = _step(static_step(model), model.params, nxt, got, n)
  b, _ = _step(static_step(model), model.params, nxt, want, n)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
  extended = presses.prefill(model, ROWS, press=spec)  # scores given to the extended run: the same
  _, again = kvjax.compress(model, extended, spec, ratio=0.5, room=4, details=True, scores=scores)
  np.testing.assert_array_equal(np.asarray(again.kept), np.asarray(info.kept))


def test_ragged_rows_equal_each_row_alone(tiny):
  """The short row (padded in the batch) scores and keeps what it does alone."""
  spec = f"kvzip(prompt_ids={IDS})"
  both = presses.score_prompt(tiny, ROWS, spec, ratio=0.5)
  for b, row in [(1, ROWS[1])]:
    alone = presses.score_prompt(tiny, [row], spec, ratio=0.5)
    n = len(row)
    np.testing.assert_allclose(np.asarray(both.scores[:, b, :, :n]),
                               np.asarray(alone.scores[:, 0, :, :n]), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(both.kept[:, b, :, :n]),
                                  np.asarray(alone.kept[:, 0]))
    assert not np.asarray(both.kept[:, b, :, n:]).any()
