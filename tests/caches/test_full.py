"""FullCache: what is special to it; the generic invariants come from `kvjax.testing`.

`test_conformance` runs `kvjax.testing.check_cache_kind` on `full` and `dynamic`: contents vs what
was appended, positions / mask / lengths / filled, padding (n_valid) ignored, rows independent,
inputs not mutated, jit equals eager, chunk-exact, attention and a Llama forward vs NumPy, reset /
crop / reorder, overflow (CapacityError outside jit, dropped and flagged inside), nbytes.

What stays here, against a NumPy oracle (kvjax.testing.oracle.FullCacheOracle, oracle.attention):
  * the blockwise attend over several blocks (block_size < capacity; the kit's capacity 8 is one
    block): oracle attention with RoPE at every token, keys stored rotated, only the attended layer
    written; chunks crossing block boundaries equal token-by-token decoding;
  * the CapacityError message and has_room / fits at the capacity; filled() and the mask after an
    overflow inside jit;
  * crop per row (a [B] length) and appending after a crop; grow; nbytes formulas and make_cache;
  * rejection of bad inputs and sizes.

Shapes: L layers, B batch, K kv heads, T new tokens, S slots, H head dim, N = K * G query heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.attention import RoPE
from kvjax.caches.full import FullCache
from kvjax.testing import oracle
from kvjax.testing import strategies as kst
from tests.helpers import examples

L, B, K, H, CAP = 2, 3, 2, 4, 16


@pytest.mark.parametrize("spec", ["full", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec)


def new_cache(batch=B, capacity=CAP, block_size=None, layers=L, kv_heads=K, head_dim=H):
  return FullCache.init(n_layers=layers, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                        capacity=capacity, block_size=block_size)


def random_kv(rng, t):
  """k, v [L, B, K, T, H] float32, standard normal."""
  return kst.random_tokens(rng, kst.CacheShape(L, B, K, H, CAP), kst.AppendStep(t, (t,) * B))


def assert_matches_oracle(cache, orc: oracle.FullCacheOracle):
  """The cache's view holds exactly the oracle's tokens, in order, with the right mask/positions."""
  view = kvjax.view(cache)
  keys, values = np.asarray(view.keys), np.asarray(view.values)
  mask, positions = np.asarray(view.mask), np.asarray(view.positions)
  np.testing.assert_array_equal(np.asarray(cache.lengths), orc.lengths())
  s = cache.capacity
  for b in range(cache.batch):
    n = min(len(orc.rows[b]), s)
    want_k, want_v = orc.stored(b)
    if n:
      np.testing.assert_array_equal(keys[:, b, :, :n], want_k)
      np.testing.assert_array_equal(values[:, b, :, :n], want_v)
    assert mask[:, b, :, :n].all() and not mask[:, b, :, n:].any()
    np.testing.assert_array_equal(positions[:, b, :, :n], np.broadcast_to(np.arange(n), (L, K, n)))
    assert (positions[:, b, :, n:] == -1).all()


# ---- capacity --------------------------------------------------------------------------------------
def test_overflow_outside_jit_raises():
  """The message names row, tokens and capacity; has_room / fits at the edge (the kit checks that
  CapacityError is raised at all)."""
  rng = np.random.default_rng(1)
  cache = kvjax.append(new_cache(capacity=8), *map(jnp.asarray, random_kv(rng, 6)))
  k, v = random_kv(rng, 4)
  with pytest.raises(kvjax.CapacityError, match=r"row 0 would hold 10 tokens but the cache capacity is 8"):
    kvjax.append(cache, jnp.asarray(k), jnp.asarray(v), np.array([4, 1, 2], np.int32))
  # Exactly filling the cache is fine.
  full = kvjax.append(cache, jnp.asarray(k[:, :, :, :2]), jnp.asarray(v[:, :, :, :2]))
  assert not bool(full.has_room(1)) and bool(full.has_room(0))
  assert full.fits(8) and not full.fits(9)


def test_overflow_inside_jit_drops_and_flags():
  """filled() and the mask after an overflow inside jit (the kit checks lengths, overflowed() and
  the held contents)."""
  rng = np.random.default_rng(2)
  cache = kvjax.append(new_cache(capacity=8), *map(jnp.asarray, random_kv(rng, 6)))
  k, v = random_kv(rng, 4)
  nv = jnp.array([4, 1, 2], jnp.int32)
  before = np.array(cache.k), np.array(cache.v)
  out = jax.jit(kvjax.append)(cache, jnp.asarray(k), jnp.asarray(v), nv)
  np.testing.assert_array_equal(np.asarray(out.lengths), [10, 7, 8])
  np.testing.assert_array_equal(np.asarray(out.overflowed()), [True, False, False])
  np.testing.assert_array_equal(np.asarray(out.filled()), [8, 7, 8])
  got_k = np.asarray(out.k)
  # Row 0: positions 6, 7 stored; 8, 9 dropped (never clamped onto slot 7).
  np.testing.assert_array_equal(got_k[:, 0, :, 6:8], k[:, 0, :, 0:2])
  np.testing.assert_array_equal(got_k[:, 0, :, :6], before[0][:, 0, :, :6])
  # Other rows: their slots below the write are untouched and their new tokens are in place.
  np.testing.assert_array_equal(got_k[:, 1, :, :6], before[0][:, 1, :, :6])
  np.testing.assert_array_equal(got_k[:, 1, :, 6], k[:, 1, :, 0])
  np.testing.assert_array_equal(got_k[:, 2, :, 6:8], k[:, 2, :, 0:2])
  mask = np.asarray(kvjax.view(out).mask)
  assert mask[:, 0].all() and mask[:, 2].all() and mask[:, 1, :, :7].all() and not mask[:, 1, :, 7:].any()


# ---- attend --------------------------------------------------------------------------------------
G = 2
ROPE = RoPE(H * 2, 10000.0)  # attend tests use head dim 8


@jax.jit
def _attend(cache, layer_q_k_v_n):
  q, k, v, n_valid = layer_q_k_v_n
  return cache.attend(1, q, k, v, n_valid, rope=ROPE)


class AttendOracle:
  """Per row: rotated keys, values and positions of every real token fed so far (float64)."""

  def __init__(self, batch):
    self.k = [np.zeros((0, K, 2 * H)) for _ in range(batch)]
    self.v = [np.zeros((0, K, 2 * H)) for _ in range(batch)]

  def attend(self, q, k, v, n_valid):
    out = {}
    for b, n in enumerate(n_valid):
      start = len(self.k[b])
      pos = start + np.arange(n)
      self.k[b] = np.concatenate([self.k[b], oracle.rope(k[b, :n].astype(np.float64), pos, ROPE.theta)])
      self.v[b] = np.concatenate([self.v[b], v[b, :n]])
      qr = oracle.rope(q[b, :n].astype(np.float64), pos, ROPE.theta)
      mask = np.arange(len(self.k[b]))[None, :] <= pos[:, None]
      out[b] = oracle.attention(qr, self.k[b], self.v[b], mask) if n else np.zeros((0,) + q.shape[2:])
    return out


def feed(cache, orc, rng, t, n_valid):
  """One attend call of T tokens; checks real queries against the oracle; returns (cache, outputs)."""
  q = rng.standard_normal((B, t, K * G, 2 * H)).astype(np.float32)
  k = rng.standard_normal((B, t, K, 2 * H)).astype(np.float32)
  v = rng.standard_normal((B, t, K, 2 * H)).astype(np.float32)
  for b, n in enumerate(n_valid):
    k[b, n:], v[b, n:] = 1e4, -1e4
  out, new = _attend(cache, (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid, jnp.int32)))
  want = orc.attend(q, k, v, n_valid)
  for b, n in enumerate(n_valid):
    np.testing.assert_allclose(np.asarray(out[b, :n]), want[b], atol=1e-5)
  new = new.advance(jnp.asarray(n_valid, jnp.int32))
  return new, (q, k, v, np.asarray(out))


@given(steps=st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.integers(0, 2**16)), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
@examples(12)
def test_attend_matches_oracle(steps, seed):
  """Several blocks, RoPE: oracle attention at every real query, keys stored rotated, one layer."""
  rng = np.random.default_rng(seed)
  cache = new_cache(capacity=32, block_size=8, head_dim=2 * H)  # four blocks
  orc = AttendOracle(B)
  for t, nseed in steps:
    n_valid = np.random.default_rng(nseed).integers(0, t + 1, B)
    cache, _ = feed(cache, orc, rng, t, n_valid)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(x) for x in orc.k])
  view = kvjax.view(cache)
  # attend writes layer 1 only; layer 0 is still empty (zeros).
  assert float(jnp.abs(cache.k[0]).max()) == 0.0
  for b in range(B):
    n = len(orc.k[b])
    np.testing.assert_allclose(np.asarray(view.keys[1, b, :, :n]).transpose(1, 0, 2), orc.k[b], atol=1e-5)


def test_chunked_prefill_equals_token_by_token():
  """Chunks crossing block boundaries (block 4) give what token-by-token decoding gives."""
  rng = np.random.default_rng(3)
  t = 11
  q = rng.standard_normal((B, t, K * G, 2 * H)).astype(np.float32)
  k = rng.standard_normal((B, t, K, 2 * H)).astype(np.float32)
  v = rng.standard_normal((B, t, K, 2 * H)).astype(np.float32)

  def run(chunks):
    cache = new_cache(capacity=16, block_size=4, head_dim=2 * H)
    outs, start = [], 0
    for c in chunks:
      sl = slice(start, start + c)
      out, cache = _attend(cache, (jnp.asarray(q[:, sl]), jnp.asarray(k[:, sl]), jnp.asarray(v[:, sl]),
                                   jnp.full((B,), c, jnp.int32)))
      cache = cache.advance(jnp.full((B,), c, jnp.int32))
      outs.append(np.asarray(out))
      start += c
    return np.concatenate(outs, axis=1), cache

  one_by_one, c1 = run([1] * t)
  chunked, c2 = run([5, 1, 5])
  whole, c3 = run([t])
  np.testing.assert_allclose(chunked, one_by_one, atol=1e-5)
  np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
  np.testing.assert_allclose(np.asarray(c2.k), np.asarray(c1.k), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(c3.lengths), [t] * B)


# ---- crop / grow / nbytes ---------------------------------------------------------------------------
def filled_cache(rng, capacity=CAP):
  cache, orc = new_cache(capacity=capacity), oracle.FullCacheOracle(B, capacity)
  for t, nv in ((4, [4, 2, 3]), (3, [3, 3, 0])):
    k, v = random_kv(rng, t)
    cache = kvjax.append(cache, jnp.asarray(k), jnp.asarray(v), np.array(nv, np.int32))
    orc.append(k, v, nv)
  return cache, orc  # lengths [7, 5, 3]


@pytest.mark.parametrize("length", [4, [6, 1, 3], 0])
def test_crop(length):
  rng = np.random.default_rng(4)
  cache, orc = filled_cache(rng)
  cropped = kvjax.crop(cache, jnp.asarray(length))
  for b, n in enumerate(np.broadcast_to(length, (B,))):
    orc.rows[b] = orc.rows[b][:n]
  assert_matches_oracle(cropped, orc)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 5, 3])  # the old cache is intact
  # Appending after a crop continues at the cropped length (speculative decoding's rollback).
  k, v = random_kv(rng, 2)
  orc.append(k, v)
  assert_matches_oracle(kvjax.append(cropped, jnp.asarray(k), jnp.asarray(v)), orc)


def test_grow_keeps_contents_and_doubles():
  rng = np.random.default_rng(6)
  cache, orc = filled_cache(rng, capacity=8)
  grown = kvjax.grow(cache)
  assert grown.capacity == 16 and grown.block_size == 16
  orc.capacity = 16
  assert_matches_oracle(grown, orc)
  k, v = random_kv(rng, 6)  # row 0 goes to 13 > old capacity
  orc.append(k, v)
  assert_matches_oracle(kvjax.append(grown, jnp.asarray(k), jnp.asarray(v)), orc)
  assert kvjax.grow(cache, 64).capacity == 64
  with pytest.raises(ValueError, match="smaller than the current"):
    kvjax.grow(cache, 4)


def test_nbytes_and_make_cache():
  cache = kvjax.make_cache("full", kvjax.TINY, 2, 64)
  assert isinstance(cache, FullCache)
  assert (cache.n_layers, cache.batch, cache.kv_heads, cache.capacity, cache.head_dim) == (4, 2, 4, 64, 64)
  kv = 2 * 4 * 2 * 4 * 64 * 64 * 4
  assert kvjax.nbytes(cache) == {"device": kv + 2 * 4}
  assert kvjax.total_bytes(cache) == kv + 8
  assert kvjax.nbytes(kvjax.make_cache("dynamic", kvjax.TINY, 2, 128))["device"] == 2 * kv + 8
  bf16 = kvjax.make_cache("full", kvjax.TINY, 2, 64, jnp.bfloat16)
  assert kvjax.total_bytes(bf16) == kv // 2 + 8


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_shape,v_shape,dtype,exc,fragment", [
    ((B, K, 3, H), (B, K, 3, H), np.float32, ValueError, "rank 5"),
    ((L, B, K + 1, 3, H), (L, B, K + 1, 3, H), np.float32, ValueError, "kv_heads=3"),
    ((L, B, K, 3, H + 2), (L, B, K, 3, H + 2), np.float32, ValueError, "head_dim=6"),
    ((L, B + 1, K, 3, H), (L, B + 1, K, 3, H), np.float32, ValueError, "batch=4"),
    ((L + 1, B, K, 3, H), (L + 1, B, K, 3, H), np.float32, ValueError, "layers=3"),
    ((L, B, K, 3, H), (L, B, K, 2, H), np.float32, ValueError, "k and v shapes differ"),
    ((L, B, K, 3, H), (L, B, K, 3, H), np.int32, TypeError, "floating"),
])
def test_append_rejects_bad_kv(k_shape, v_shape, dtype, exc, fragment):
  cache = new_cache()
  with pytest.raises(exc, match=fragment):
    kvjax.append(cache, jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype))


def test_append_rejects_bad_n_valid():
  cache = new_cache()
  k = jnp.zeros((L, B, K, 3, H))
  with pytest.raises(ValueError, match=r"n_valid must have shape"):
    kvjax.append(cache, k, k, np.array([1, 2], np.int32))
  with pytest.raises(ValueError, match=r"n_valid must lie in \[0, 3\]"):
    kvjax.append(cache, k, k, np.array([1, 4, 0], np.int32))
  with pytest.raises(TypeError, match="n_valid must be integer"):
    kvjax.append(cache, k, k, np.array([1.0, 1.0, 1.0]))
  with pytest.raises(TypeError, match="must be an array"):
    kvjax.append(cache, [[1.0]], k)


def test_init_rejects_bad_sizes():
  with pytest.raises(ValueError, match="capacity must be positive"):
    new_cache(capacity=0)
  with pytest.raises(ValueError, match="must divide capacity"):
    new_cache(capacity=12, block_size=8)
