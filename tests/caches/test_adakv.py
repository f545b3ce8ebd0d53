"""AdaKV-style head budgets (`+adakv` on h2o / snapkv): one scored pool per layer shared by the
kv heads.

Against a NumPy oracle written from the definition (kvjax.caches.h2o, `_admit_shared`): per
(layer, row) a dict (head, position) -> [key, value, score]; a token brings one entry per head;
every head keeps its sinks and its W most recent tokens, and the other entries of all heads
compete for kv_heads x K slots by score; each head's queries attend over that head's entries only
and add their attention to those entries' scores. Checked token by token with ragged n_valid:
outputs, held sets per head, scores. A snapkv prompt keeps the best-scored entries across heads.
Plus the conformance kit, bytes, a budget above the stream equals the full cache, spec errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.attention import RoPE
from kvjax.caches import h2o
from kvjax.testing import oracle
from tests.helpers import SETTINGS

L, B, K, G, H = 2, 2, 3, 2, 16
ROPE = RoPE(H, 10000.0)


@pytest.mark.parametrize("spec", [
    "snapkv:2+window:4+adakv",
    pytest.param("h2o:2+window:4+sink:1+adakv", marks=pytest.mark.slow),
    pytest.param("int4+h2o:2+window:4+group:4+adakv", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  check_kind(spec)


class SharedOracle:
  def __init__(self, batch, *, heavy, window, sink=0):
    self.heavy, self.window, self.sink = heavy, window, sink
    self.held = {(l, b): {} for l in range(L) for b in range(batch)}
    self.n = [0] * batch

  def admit(self, b, k, v):
    """Token n[b] of row b (k, v [L, K, H], key rotated)."""
    p = self.n[b]
    self.n[b] = n = p + 1
    for l in range(L):
      held = self.held[l, b]
      for h in range(K):
        held[h, p] = [k[l, h].astype(np.float32), v[l, h].astype(np.float32), np.float32(0)]
      protected = {e for e in held if e[1] < self.sink or e[1] >= n - self.window}
      others = sorted(set(held) - protected, key=lambda e: -held[e][2])
      for e in others[K * self.heavy:]:
        del held[e]

  def attend(self, b, q):
    """q [L, N, H] rotated -> out [L, N, H]; adds each head's mass to its own entries."""
    out = np.zeros(q.shape)
    for l in range(L):
      held = self.held[l, b]
      for h in range(K):
        mine = sorted(p for hh, p in held if hh == h)
        ks = np.stack([held[h, p][0] for p in mine]).astype(np.float64)
        vs = np.stack([held[h, p][1] for p in mine]).astype(np.float64)
        mass = np.zeros(len(mine))
        for g in range(G):
          s = ks @ q[l, h * G + g].astype(np.float64) / np.sqrt(H)
          w = np.exp(s - s.max())
          w /= w.sum()
          out[l, h * G + g] = w @ vs
          mass += w
        for p, m in zip(mine, mass):
          held[h, p][2] = np.float32(held[h, p][2] + m)
    return out


@functools.partial(jax.jit, static_argnames=("layer",))
def _attend(cache, q, k, v, n_valid, *, layer):
  return cache.attend(layer, q, k, v, n_valid, rope=ROPE)


@pytest.mark.parametrize("policy", [dict(heavy=2, window=2), dict(heavy=1, window=2, sink=1)],
                         ids=["w2k2", "s1w2k1"])
@SETTINGS
@given(plan=st.lists(st.lists(st.integers(0, 1), min_size=B, max_size=B), min_size=1, max_size=9),
       seed=st.integers(0, 2**31 - 1))
def test_decode_matches_oracle(policy, plan, seed):
  rng = np.random.default_rng(seed)
  cache = h2o.H2OCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, shared_heads=True,
                            **policy)
  orc = SharedOracle(B, **policy)
  for nv in plan:
    nv = np.asarray(nv, np.int32)
    at = np.asarray(cache.lengths)
    q = rng.normal(size=(L, B, 1, K * G, H)).astype(np.float32)
    k = rng.normal(size=(L, B, 1, K, H)).astype(np.float32)
    v = rng.normal(size=(L, B, 1, K, H)).astype(np.float32)
    qr, kr = oracle.rope(q, at[:, None], ROPE.theta), oracle.rope(k, at[:, None], ROPE.theta)
    outs = []
    for layer in range(L):
      out, cache = _attend(cache, jnp.asarray(q[layer]), jnp.asarray(k[layer]),
                           jnp.asarray(v[layer]), jnp.asarray(nv), layer=layer)
      outs.append(np.asarray(out))
    cache = cache.advance(jnp.asarray(nv))
    for b in range(B):
      if nv[b]:
        orc.admit(b, kr[:, b, 0], v[:, b, 0])
        want = orc.attend(b, qr[:, b, 0])
        for layer in range(L):
          np.testing.assert_allclose(outs[layer][b, 0], want[layer], atol=1e-4)
  view = jax.device_get(cache.view())
  scores, heads = np.asarray(cache.scores), np.asarray(cache.heads)
  for (l, b), held in orc.held.items():
    for h in range(K):
      got = sorted(int(p) for p in view.positions[l, b, h] if p >= 0)
      assert got == sorted(p for hh, p in held if hh == h), (l, b, h)
    for s in np.nonzero(np.asarray(cache.positions)[l, b, 0] >= 0)[0]:
      entry = held[int(heads[l, b, 0, s]), int(np.asarray(cache.positions)[l, b, 0, s])]
      np.testing.assert_allclose(scores[l, b, 0, s], entry[2], rtol=1e-4, atol=1e-5)
  assert np.asarray(cache.held()).sum(axis=-1).max() <= K * (policy["heavy"] + policy["window"]
                                                              + policy.get("sink", 0))


def test_snapkv_prompt_shares_the_budget_by_score():
  """A prompt whose last queries read only head 0's early tokens: head 0 takes (almost) all the
  scored slots, the others keep little beyond their window."""
  rng = np.random.default_rng(0)
  t, heavy, window = 24, 3, 4
  q = rng.normal(size=(1, t, K * G, H)).astype(np.float32) * 0.05
  k = rng.normal(size=(1, t, K, H)).astype(np.float32) * 0.05
  v = rng.normal(size=(1, t, K, H)).astype(np.float32)
  k[0, 2:8, 0] = 2.0  # head 0's needle tokens
  q[0, -4:, :G] = 2.0  # head 0's query heads look for them at the end
  cache = h2o.H2OCache.init(n_layers=1, batch=1, kv_heads=K, head_dim=H, heavy=heavy,
                            window=window, scorer="snapkv", observe=4, kernel=1,
                            shared_heads=True)
  _, cache = cache.attend(0, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([t]),
                          rope=None)
  held = np.asarray(cache.held())[0, 0]
  assert held.sum() == K * (heavy + window)
  assert held[0] > heavy + window and held[1:].min() < heavy + window
  view = cache.view()
  kept = set(np.asarray(view.positions)[0, 0, 0].tolist())
  assert len(kept & set(range(2, 8))) >= min(6, K * heavy)


def test_bytes_and_full_equivalence(tiny):
  spec = "snapkv:64+window:16+adakv"
  cache = kvjax.make_cache(spec, tiny, 2)
  assert sum(cache.nbytes().values()) == h2o.estimate_bytes(kvjax.parse_spec(spec), tiny.config,
                                                            0, 2, jnp.float32)
  plain = sum(kvjax.make_cache("snapkv:64+window:16", tiny, 2).nbytes().values())
  slots = tiny.config.n_layers * 2 * tiny.config.n_kv_heads * 80
  assert sum(cache.nbytes().values()) - plain == 4 * slots  # the kv head of each slot
  ids = np.random.default_rng(0).integers(0, 250, 40)
  want = kvjax.perplexity(tiny, ids, cache="full").token_nll
  got = kvjax.perplexity(tiny, ids, cache=spec).token_nll
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    ("window:8+adakv", "needs h2o:K or snapkv:K"),
    ("int4+residual:32+snapkv:8+window:32+adakv", "residual"),
    ("snapkv:8+window:8+adakv:2", "no value"),
])
def test_spec_errors(spec, message):
  with pytest.raises(kvjax.SpecError, match=message):
    kvjax.parse_spec(spec)
