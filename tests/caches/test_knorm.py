"""knorm (`knorm:K+window:W`): the recent window plus the older tokens with the smallest key norm.

The generic invariants come from `kvjax.testing` (`test_conformance`, through `check_kind`). What
is special to knorm, against a NumPy oracle written from the definition in
kvjax/caches/scored/knorm.py: per (layer, row, kv head) tokens arrive one by one, each scored
-||k|| once; after each arrival the sinks, the W most recent and the K best-scored others are kept
and the rest forgotten for good. The oracle takes the norm of the UN-rotated key while the cache
scores the rotated one (RoPE keeps norms), so agreement also checks that claim. Then: a budget
above the sequence equals the full cache; spec parsing and composition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import RoPE
from kvjax.caches.scored.knorm import KNorm
from kvjax.models import llama
from tests.helpers import PRE_ROTATED, model_logits

L, B, K, G, H = 2, 2, 2, 2, 16
ROPE = RoPE(H, 10000.0)


class Config:
  n_layers, n_kv_heads, n_heads, head_dim = L, K, K * G, H


@pytest.mark.parametrize("spec", [
    "knorm:2+window:4",
    pytest.param("knorm:2+window:4+sink:1", marks=pytest.mark.slow),
    pytest.param("int4+residual:4+knorm:2+window:4+group:4", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see `kvjax.testing.conformance`)."""
  check_kind(spec)


def kept_oracle(norms, *, heavy, window, sink):
  """Positions kept after feeding tokens 0..n-1 one by one, with fixed scores -norms [n]."""
  held = []
  for pos in range(len(norms)):
    held.append(pos)
    n = pos + 1
    protected = [p for p in held if p < sink or p >= n - window]
    rest = sorted((p for p in held if p not in protected), key=lambda p: norms[p])
    held = protected + rest[: sink + window + heavy - len(protected)]
  return sorted(held)


@functools.partial(jax.jit, static_argnames=("rope",))
def _attend_layers(cache, q, k, v, n_valid, *, rope):
  """Every layer attends (k [L, B, T, K, H]), then the lengths advance: one compile per T."""
  for layer in range(L):
    _, cache = cache.attend(layer, q, k[layer], v, n_valid, rope=rope)
  return cache.advance(n_valid)


@pytest.mark.parametrize("spec, rope", [
    ("knorm:3+window:2+sink:1", ROPE),
    ("int4+residual:4+knorm:2+window:4+group:4", PRE_ROTATED)])
def test_kept_tokens_match_oracle(spec, rope):
  """Ragged chunks through `attend`: every (layer, row, head) holds exactly the oracle's tokens,
  each scored -||k||. Keys get different scales so norms are far apart (no near-ties)."""
  parsed = kvjax.parse_spec(spec)
  cache = kvjax.make_cache(spec, Config, B, 16)
  rng = np.random.default_rng(0)
  keys = []  # per chunk: [L, B, T, K, H] un-rotated
  for t, nv in [(4, [4, 3]), (1, [1, 1]), (4, [2, 4]), (1, [1, 0]), (4, [4, 1])]:
    q = jnp.asarray(rng.normal(size=(B, t, K * G, H)), jnp.float32)
    k = rng.normal(size=(L, B, t, K, H)) * rng.uniform(0.2, 3.0, size=(L, B, t, K, 1))
    v = jnp.asarray(rng.normal(size=(B, t, K, H)), jnp.float32)
    cache = _attend_layers(cache, q, jnp.asarray(k, jnp.float32), v, jnp.asarray(nv), rope=rope)
    keys.append([k[:, b, :nv[b]] for b in range(B)])
  positions, scores = np.asarray(cache.positions), np.asarray(cache.scores)
  for b in range(B):
    row = np.concatenate([chunk[b] for chunk in keys], axis=1)  # [L, n, K, H]
    norms = np.linalg.norm(row, axis=-1)  # [L, n, K]
    for layer in range(L):
      for h in range(K):
        want = kept_oracle(norms[layer, :, h], heavy=parsed.knorm, window=parsed.window,
                           sink=parsed.sink)
        pos = positions[layer, b, h]
        assert sorted(pos[pos >= 0].tolist()) == want, (layer, b, h)
        np.testing.assert_allclose(scores[layer, b, h][pos >= 0], -norms[layer, pos[pos >= 0], h],
                                   rtol=1e-5)


def test_append_scores_by_norm():
  """`kvjax.append` (no queries) scores by key norm too: the largest-norm older key goes first."""
  cache = kvjax.make_cache("knorm:1+window:1", Config, 1, 8)
  k = np.ones((L, 1, K, 3, H), np.float32)
  k[:, :, :, 0] *= 2.0  # position 0 has the largest norm: evicted when position 2 arrives
  cache = kvjax.append(cache, jnp.asarray(k), jnp.asarray(k))
  assert np.asarray(cache.positions).max(axis=-1).tolist() == [[[2, 2]]] * L
  assert sorted(np.asarray(cache.positions)[0, 0, 0].tolist()) == [1, 2]


@pytest.mark.parametrize("fixture", ["tiny", pytest.param("tiny_gqa", marks=pytest.mark.slow)])
def test_budget_above_sequence_equals_full(fixture, request):
  model = request.getfixturevalue(fixture)
  ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 24).astype(np.int32)
  full = np.asarray(llama.forward(model.config, model.params, jnp.asarray(ids[None])))[0]
  got, cache = model_logits(model, "knorm:8+window:16+sink:2", ids, [9, 1, 1, 13])
  np.testing.assert_allclose(got, full, atol=1e-4)
  assert int(cache.filled().min()) == 24


def test_spec_and_composition():
  spec = kvjax.parse_spec("int8+knorm:16+sink:4+window:32")
  assert (spec.kind, spec.budget, spec.bounded, str(kvjax.parse_spec(str(spec)))) == \
      ("knorm", 52, True, str(spec))
  cache = kvjax.make_cache("knorm:2+window:3", Config, 1, 8)
  assert (cache.scorer, cache.scoring, cache.chunk_exact) == ("knorm", KNorm(), True)
  assert kvjax.make_cache("knorm:2+window:3+adakv", Config, 1, 8).shared_heads
  layered = kvjax.make_cache("knorm:4+window:3+pyramid", Config, 1, 16)
  assert type(layered).__name__ == "LayeredCache"
  with pytest.raises(kvjax.SpecError, match="window"):
    kvjax.parse_spec("knorm:4")
  with pytest.raises(kvjax.SpecError, match="two scorers"):
    kvjax.parse_spec("knorm:4+h2o:4+window:4")
  with pytest.raises(TypeError, match="unknown options"):
    kvjax.make_cache("knorm:4+window:4", Config, 1, 8, observe=8)
