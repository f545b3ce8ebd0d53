"""Self-speculative decoding (kvjax.speculative, `generate(..., draft=...)`).

The rule on its own (`accept_drafts`): greedy keeps the drafts that equal the target argmax; with
sampling, the first emitted token is distributed as the target p_0 whatever the draft q (checked
on 40k draws against the exact distribution). Through `generate` on the tiny model: greedy output
equals plain greedy decoding token for token for several draft kinds and draft lengths, with
ragged prompts, EOS stops and streaming; sampled output matches the exact two-token distribution
of the main cache alone; clear errors; a second call compiles nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import speculative
from kvjax.sampling import Sampler
from tests.helpers import lively


@pytest.fixture(scope="module")
def model():
  return lively(kvjax.load("tiny"))


PROMPTS = [list(np.random.default_rng(0).integers(0, 250, n)) for n in (30, 12, 50)]


def test_accept_greedy():
  p = jnp.asarray(np.eye(5, dtype=np.float32)[[[1, 2, 3, 4], [1, 0, 3, 4], [0, 2, 3, 4]]])
  drafts = jnp.asarray([[1, 2, 3], [1, 2, 3], [1, 2, 3]], jnp.int32)
  n, nxt = speculative.accept_drafts(p, None, drafts, None, greedy=True)
  assert n.tolist() == [3, 1, 0] and nxt.tolist() == [4, 0, 0]


def test_accept_sampling_keeps_the_target_distribution():
  """First emitted token ~ p_0 exactly, for a draft q far from p (k = 2, V = 5)."""
  rng = np.random.default_rng(0)
  v, k, n = 5, 2, 40000
  p = rng.dirichlet(np.ones(v), size=k + 1).astype(np.float32)
  q = rng.dirichlet(np.ones(v) * 0.5, size=k).astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  drafts = jnp.stack([jax.random.categorical(jax.random.fold_in(keys[0], i), jnp.log(q[i]), shape=(n,))
                      for i in range(k)], axis=1).astype(jnp.int32)
  got_n, nxt = speculative.accept_drafts(jnp.broadcast_to(p, (n, k + 1, v)),
                                         jnp.broadcast_to(q, (n, k, v)), drafts, keys[1], greedy=False)
  first = np.where(np.asarray(got_n) > 0, np.asarray(drafts[:, 0]), np.asarray(nxt))
  freq = np.bincount(first, minlength=v) / n
  assert 0.5 * np.abs(freq - p[0]).sum() < 0.015
  # The rule rejects sometimes (q differs from p) and accepts sometimes.
  assert 0.05 < float(np.mean(np.asarray(got_n) > 0)) < 0.95


@pytest.mark.parametrize("draft, k", [("sink:2+window:8", 3), ("int4", 4), ("window:16", 1),
                                      ("snapkv:8+window:8", 2), ("full", 2)])
def test_greedy_equals_plain(model, draft, k):
  plain = kvjax.generate(model, PROMPTS, max_new_tokens=24, stop_at_eos=False)
  spec = kvjax.generate(model, PROMPTS, max_new_tokens=24, stop_at_eos=False, draft=draft,
                        draft_tokens=k)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_array_equal(spec.n_generated, plain.n_generated)
  assert 0.0 <= spec.draft_acceptance <= 1.0 and spec.draft_spec == str(kvjax.parse_spec(draft))
  if draft == "full":
    assert spec.draft_acceptance == 1.0  # the same cache drafts exactly what it verifies
  assert not spec.overflowed.any()


@pytest.fixture(scope="module")
def gemma():
  """tiny-gemma3 (sliding layers 0-4 with a 16-token window, layer 5 global) and plain greedy
  output for prompts longer than the window."""
  m = kvjax.load("tiny-gemma3", dtype=jnp.float32, seed=3)
  prompts = [list(np.random.default_rng(1).integers(0, 250, n)) for n in (37, 21)]
  return m, prompts, kvjax.generate(m, prompts, max_new_tokens=40, stop_at_eos=False)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["window:8@all", "int4@global; window:4@sliding"])
def test_greedy_equals_plain_on_sliding_layers(gemma, draft):
  """The main cache's window rings (sliding layers) keep draft_tokens + 1 slack slots, so cropping
  rejected drafts loses nothing (without the slack, window:8@all diverges from plain greedy), and
  draft= takes layouts."""
  m, prompts, plain = gemma
  spec = kvjax.generate(m, prompts, max_new_tokens=40, stop_at_eos=False, draft=draft,
                        draft_tokens=3)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  assert spec.draft_acceptance < 1.0  # rejections happened: crops were exercised
  assert spec.draft_spec == str(kvjax.layouts.parse_layout(draft))


def test_eos_and_streaming(model):
  plain = kvjax.generate(model, PROMPTS, max_new_tokens=20, stop_at_eos=False)
  eos = int(plain.tokens[1, 6])  # row 1 stops at its 7th token; others may too
  want = kvjax.generate(model, PROMPTS, max_new_tokens=20, eos_id=eos, pad_id=0)
  blocks = []
  got = kvjax.generate(model, PROMPTS, max_new_tokens=20, eos_id=eos, pad_id=0,
                       draft="sink:2+window:8", draft_tokens=3, on_tokens=blocks.append,
                       stream_chunk=4)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.n_generated, want.n_generated)
  streamed = np.concatenate(blocks, axis=1)
  assert streamed.shape[1] == int(got.n_generated.max())
  for b in range(len(PROMPTS)):
    n = int(got.n_generated[b])
    np.testing.assert_array_equal(streamed[b, :n], got.tokens[b, :n])


def test_sampling_matches_the_exact_distribution(model):
  """Two sampled tokens (top-k 3): the second comes from a speculative round whose window draft
  is rejected often; the joint frequency over 3 x 3 outcomes matches the exact probabilities of
  the main cache alone."""
  sampler = Sampler(temperature=1.0, top_k=3)
  prompt = PROMPTS[0][:20]
  n = 3000
  res = kvjax.generate(model, [prompt] * n, max_new_tokens=2, stop_at_eos=False, sampler=sampler,
                       seed=5, draft="window:4", draft_tokens=2)
  assert res.draft_acceptance < 0.9  # rejections happen
  logits = lambda ids: model.step(model.params, jnp.asarray([ids]), kvjax.make_cache(
      "full", model, 1, 64), jnp.asarray([len(ids)], jnp.int32))[0][0, -1]
  p1 = np.asarray(sampler.probs(logits(prompt)))
  exact = {}
  for t1 in np.flatnonzero(p1):
    p2 = np.asarray(sampler.probs(logits(prompt + [int(t1)])))
    for t2 in np.flatnonzero(p2):
      exact[int(t1), int(t2)] = p1[t1] * p2[t2]
  counts = {}
  for t1, t2 in res.tokens.tolist():
    counts[t1, t2] = counts.get((t1, t2), 0) + 1
  assert set(counts) <= set(exact)
  tv = 0.5 * sum(abs(counts.get(o, 0) / n - pr) for o, pr in exact.items())
  assert tv < 0.05, (tv, counts, exact)


def test_second_call_compiles_nothing(model):
  kvjax.generate(model, PROMPTS, max_new_tokens=10, draft="sink:2+window:8", draft_tokens=3)
  again = kvjax.generate(model, [p[::-1] for p in PROMPTS], max_new_tokens=10,
                         draft="sink:2+window:8", draft_tokens=3)
  assert again.n_compiles == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(draft="none"), ValueError, "'none'"),
    (dict(cache="none", draft="window:8"), ValueError, "'none'"),
    (dict(draft="window:8", draft_tokens=0), ValueError, "draft_tokens"),
    (dict(draft="window:8", cache="dynamic"), ValueError, "dynamic"),
    (dict(draft="nonsense:3"), kvjax.SpecError, "unknown term"),
    # a wrapper whose inner kind cannot crop is refused before anything runs
    (dict(draft="share:2+tier:4:fp32,8:int8"), ValueError, "cannot crop"),
])
def test_errors(model, kwargs, error, match):
  with pytest.raises(error, match=match):
    kvjax.generate(model, PROMPTS, max_new_tokens=4, **kwargs)
