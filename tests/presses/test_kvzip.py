"""kvzip (kvjax/presses/kvzip.py): the rows are extended to [context, repeat prompt, context] and a
context token scores the most attention the repetition's queries give it.

Checked: the extension (kvpress's prompt and chat-template suffix), the scores against a NumPy
transcription of kvpress's score_kvzip on random inputs, ratio 0 keeps every context token and
decodes exactly like a full cache of the context (and on a hybrid layout, like a plain compress:
the sliding layers' windows hold the context, not its repetition), the pooled per-layer budget
with its sinks, and ragged rows equal each row alone. Rows over `chunk` tokens are repeated chunk
by chunk after a plain prefill: checked against a NumPy kvpress score_kvzip over uncached runs of
[context, repetition] (and against kvpress itself in test_kvpress_oracle.py, full lane).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention as attn
from kvjax import presses
from kvjax.caches.full import FullCache
from kvjax.caches.terms import SpecError
from kvjax.models.config import layer_windows
from kvjax.models.protocol import static_step
from kvjax.presses.kvzip import chunked_scores
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


# ---- the chunked repetition (rows longer than `chunk`) ----------------------------------------
LONG = [[(7 * i + 3) % 250 + 5 for i in range(37)], [(11 * i + 1) % 250 + 5 for i in range(23)]]
CHUNKED = f"kvzip(prompt_ids={IDS}, next_prompt_ids=(210, 211), chunk=8, overlap=3, n_sink=2)"


def chunk_reference(model, rows, press):
  """float64 [pressed layers, B, K, T]: kvpress's chunked score_kvzip from one plain causal run
  of [context, chunk c's repetition] per (row, chunk): the repetition's queries over the first
  n_sink keys (not for chunk 0), the chunk's keys and their own (causal), max over the queries
  and each kv head's query heads; the sinks are left at 0 (kvjax raises them above the rest)."""
  runs, where = [], []
  for b, r in enumerate(rows):
    for start in range(0, len(r), press.chunk):
      head = press.repeat_ids(None) if start == 0 else \
          press.next_ids(None, r[max(0, start - press.overlap):start])
      runs.append(r + head + r[start:start + press.chunk])
      where.append((b, start, len(r)))
  pre = presses.prefill(model, runs)  # every run at once: one compile
  pressed = [i for i, w in enumerate(layer_windows(model.config)) if w is None]
  c = model.config
  out = np.zeros((len(pressed), len(rows), c.n_kv_heads, max(len(r) for r in rows)))
  for j, (run, (b, start, n)) in enumerate(zip(runs, where)):
    end, sink = min(start + press.chunk, n), min(press.n_sink, start)
    seen = list(range(sink)) + list(range(start, end)) + list(range(n, len(run)))
    for li, layer in enumerate(pressed):
      rope, scale = pre.meta[layer]
      pos = jnp.arange(len(run))[None]
      q = np.asarray(attn.apply_rope(rope, pre.q[layer][j:j + 1, :len(run)], pos), np.float64)[0]
      k = np.asarray(attn.apply_rope(rope, pre.k[layer][j:j + 1, :len(run)], pos), np.float64)[0]
      groups = c.n_heads // c.n_kv_heads
      logits = np.einsum("qnh,snh->nqs", q[n:], np.repeat(k[seen], groups, axis=1))
      logits *= c.head_dim**-0.5 if scale is None else scale
      w = len(run) - n
      mask = np.ones((w, len(seen)), bool)
      mask[:, len(seen) - w:] = np.tril(np.ones((w, w), bool))
      p = np.exp(np.where(mask, logits, -np.inf) - logits.max(-1, keepdims=True))
      p = np.where(mask, p, 0.0)
      p /= p.sum(-1, keepdims=True)
      best = p[:, :, sink:sink + end - start].max(axis=1)  # [N, chunk]
      out[li, b, :, start:end] = best.reshape(c.n_kv_heads, groups, -1).max(axis=1)
  return out


@pytest.mark.parametrize("name", ["tiny", "tiny_gemma3"])
def test_chunked_scores_equal_a_causal_run_of_each_repetition(request, name):
  """Rows over `chunk` tokens are repeated chunk by chunk after the plain prefill (5 and 3 chunks
  of 8, ragged rows, a later chunk's prompt and overlap, sinks in its softmax; on Gemma 3's layout
  the sliding layers slide over the context and the repetition): the scores equal a NumPy
  kvpress score_kvzip over an uncached run of [context, repetition], and the sinks outrank all."""
  model = request.getfixturevalue(name)
  press = presses.make_press(CHUNKED)
  got = np.asarray(presses.score_prompt(model, LONG, press, ratio=0.5).scores)
  want = chunk_reference(model, LONG, press)
  for b, r in enumerate(LONG):
    n = len(r)
    np.testing.assert_allclose(got[:, b, :, 2:n], want[:, b, :, 2:n], atol=2e-6)
    assert (got[:, b, :, :2] > got[:, b, :, 2:n].max(axis=-1, keepdims=True)).all()
    assert not got[:, b, :, n:].any()


def test_one_chunk_is_the_one_pass_extension(tiny):
  """A chunk as long as the row repeats it in one pass: the same scores as the extension."""
  plain = presses.prefill(tiny, LONG)
  one = presses.make_press(f"kvzip(prompt_ids={IDS}, chunk=None, n_sink=2)")
  want = presses.score_prompt(tiny, LONG, one, ratio=0.5).scores
  got = chunked_scores(tiny, plain, presses.make_press(f"kvzip(prompt_ids={IDS}, n_sink=2)"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_chunked_compress_reads_the_plain_prefill(tiny):
  """compress with chunked kvzip from ids equals it from a plain Prefilled and equals compress
  with the same scores given; an extended Prefilled, or a wrapper that rescores, is refused."""
  plain = presses.prefill(tiny, LONG)
  a, info = kvjax.compress(tiny, LONG, CHUNKED, ratio=0.5, room=4, details=True)
  b, again = kvjax.compress(tiny, plain, CHUNKED, ratio=0.5, room=4, details=True)
  np.testing.assert_array_equal(np.asarray(again.kept), np.asarray(info.kept))
  np.testing.assert_array_equal(np.asarray(info.logits), np.asarray(plain.logits))
  _, given = kvjax.compress(tiny, plain, CHUNKED, ratio=0.5, room=4, details=True,
                            scores=info.scores)
  np.testing.assert_array_equal(np.asarray(given.kept), np.asarray(info.kept))
  np.testing.assert_array_equal(np.asarray(a.lengths), [len(r) for r in LONG])
  nxt, n = jnp.asarray([[40, 41], [50, 51]], jnp.int32), jnp.asarray([2, 2], jnp.int32)
  x, _ = _step(static_step(tiny), tiny.params, nxt, a, n)
  y, _ = _step(static_step(tiny), tiny.params, nxt, b, n)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  extended = presses.prefill(tiny, LONG, press=f"kvzip(prompt_ids={IDS})")
  with pytest.raises(SpecError, match="plain prefill"):
    kvjax.compress(tiny, extended, CHUNKED, ratio=0.5)
  with pytest.raises(SpecError, match="rescores"):
    kvjax.compress(tiny, LONG, f"criticalkv({CHUNKED})", ratio=0.5)
  with pytest.raises(SpecError, match="chunk must be"):
    presses.make_press("kvzip(chunk=4, overlap=8)")
