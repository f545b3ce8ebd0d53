"""Quantized cache (kvjax.caches.quantized) against a NumPy oracle of what it must hold and see.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
int8, int4 with a residual, and int2 (held tokens within the kind's error bound of what was
appended, positions / mask / lengths / filled, padding ignored, rows independent, inputs not
mutated, jit equals eager, reset / crop / reorder, overflow, nbytes).

What is special to quantization, checked here against its own oracle: the oracle keeps, per row,
the tokens appended (current values) and the quantized count q; after an append holding c residual
tokens it quantizes floor(max(c - R, 0) / G) whole groups. Its view: positions < q are the float32
quantize-then-dequantize of their group (keys per channel over G tokens, values per token over G
channels, the arithmetic of kvjax.testing.oracle.quantize_groups), positions [q, n) are the tokens
as given, bit for bit.

Checked: contents after any sequence of ragged appends (hypothesis), chunking never changes the
contents, residual tokens are exact, what each query of `attend` sees (quantized region as of the
start of its call + full precision after), keys stored rotated, memory ratios from the arrays,
crop (what attention saw is kept) / reorder / reset / grow, capacity rounded to whole groups, the
`quantize` verb, spec wiring, and end to end on tiny (and SmolLM2 when marked slow).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.attention import RoPE
from kvjax.caches import api, packing
from kvjax.caches.quantized import QuantizedCache, from_full, from_spec, quantize
from kvjax.models.llama import Llama
from kvjax.spec import SpecError, make_cache, parse_spec
from kvjax.testing import oracle
from tests.helpers import examples

L, K, H = 2, 2, 32


# ---- oracle --------------------------------------------------------------------------------------
def np_fake_quant(k: np.ndarray, v: np.ndarray, bits: int, group: int):
  """Dequantized group of G tokens: k, v [L, K, G, H] -> (k, v) as the cache must return them."""
  sym = bits == 8
  kd = oracle.quantize_groups(k, bits, group, axis=2, symmetric=sym)[3]
  vd = oracle.quantize_groups(v, bits, min(group, k.shape[-1]), axis=3, symmetric=sym)[3]
  return kd, vd


class QuantOracle:
  """Per row: list of (k [L, K, H], v) current values, and the quantized count q."""

  def __init__(self, batch, bits, group, residual):
    self.rows = [[] for _ in range(batch)]
    self.q = [0] * batch
    self.bits, self.group, self.residual = bits, group, residual or 0
    self.frozen = [dict() for _ in range(batch)]  # group index -> dequantized (k, v) [L, K, G, H]

  def append(self, k, v, n_valid):
    """k, v [L, B, K, T, H]."""
    for b, n in enumerate(n_valid):
      for j in range(int(n)):
        self.rows[b].append((k[:, b, :, j].astype(np.float32), v[:, b, :, j].astype(np.float32)))
      held = len(self.rows[b]) - self.q[b]
      for _ in range(max(held - self.residual, 0) // self.group):
        start = self.q[b]
        ks = np.stack([t[0] for t in self.rows[b][start:start + self.group]], axis=2)
        vs = np.stack([t[1] for t in self.rows[b][start:start + self.group]], axis=2)
        self.frozen[b][start // self.group] = np_fake_quant(ks, vs, self.bits, self.group)
        self.q[b] += self.group

  def crop(self, lengths):
    for b, n in enumerate(lengths):
      n = min(int(n), len(self.rows[b]))
      if n < self.q[b]:
        new_q = (n // self.group) * self.group
        kd, vd = self.frozen[b][new_q // self.group]
        for i in range(n - new_q):  # kept tokens of the cut group become their dequantized values
          self.rows[b][new_q + i] = (kd[:, :, i], vd[:, :, i])
        self.q[b] = new_q
      del self.rows[b][n:]

  def expected(self, b):
    """(keys, values [L, K, n, H], q) of row b."""
    n = len(self.rows[b])
    if n == 0:
      return None, None, 0
    keys = np.stack([t[0] for t in self.rows[b]], axis=2)
    values = np.stack([t[1] for t in self.rows[b]], axis=2)
    for gi in range(self.q[b] // self.group):
      sl = slice(gi * self.group, (gi + 1) * self.group)
      keys[:, :, sl], values[:, :, sl] = self.frozen[b][gi]
    return keys, values, self.q[b]


def check_matches(cache, orc: QuantOracle):
  view = cache.view()
  keys, values, mask, pos = (np.asarray(a) for a in (view.keys, view.values, view.mask, view.positions))
  for b in range(cache.batch):
    n = len(orc.rows[b])
    assert int(cache.lengths[b]) == n
    assert int(cache.qcount[b]) == orc.q[b]
    live = np.arange(cache.capacity) < n
    np.testing.assert_array_equal(mask[:, b], np.broadcast_to(live, mask[:, b].shape))
    np.testing.assert_array_equal(pos[:, b, :, :n], np.broadcast_to(np.arange(n), (L, K, n)))
    np.testing.assert_array_equal(pos[:, b, :, n:], -1)
    if n == 0:
      continue
    ek, ev, q = orc.expected(b)
    np.testing.assert_allclose(keys[:, b, :, :q], ek[:, :, :q], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values[:, b, :, :q], ev[:, :, :q], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(keys[:, b, :, q:n], ek[:, :, q:])  # the residual is exact
    np.testing.assert_array_equal(values[:, b, :, q:n], ev[:, :, q:])


def assert_same_view(a, b):
  """Two views hold the same tokens (slots outside the mask may differ: they are stale)."""
  va, vb = a.view(), b.view()
  np.testing.assert_array_equal(np.asarray(va.mask), np.asarray(vb.mask))
  np.testing.assert_array_equal(np.asarray(va.positions), np.asarray(vb.positions))
  live = np.asarray(va.mask)[..., None]
  for x, y in ((va.keys, vb.keys), (va.values, vb.values)):
    np.testing.assert_array_equal(np.where(live, np.asarray(x), 0), np.where(live, np.asarray(y), 0))


def new_cache(batch=3, capacity=96, bits=4, group=16, residual=None, dtype=jnp.float32):
  return QuantizedCache.init(n_layers=L, batch=batch, kv_heads=K, head_dim=H, capacity=capacity,
                             bits=bits, group=group, residual=residual, dtype=dtype)


def random_kv(rng, batch, t, scale=1.0):
  k = (rng.standard_normal((L, batch, K, t, H)) * scale).astype(np.float32)
  v = (rng.standard_normal((L, batch, K, t, H)) * scale + 0.3).astype(np.float32)
  return k, v


_append = jax.jit(api.append)


@pytest.mark.parametrize("spec", [
    "int8+group:16",
    pytest.param("int4+residual:16+group:16", marks=pytest.mark.slow),
    pytest.param("int2+group:16", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec)


# ---- contents ------------------------------------------------------------------------------------
@examples(20)
@given(bits=st.sampled_from([8, 4, 3, 2]), residual=st.sampled_from([None, 16]),
       seed=st.integers(0, 2**31 - 1),
       steps=st.lists(st.tuples(st.sampled_from([1, 24]), st.lists(st.integers(0, 24), min_size=3,
                                                                   max_size=3)),
                      min_size=1, max_size=4))  # 4 * 24 = the capacity (96): no overflow
def test_contents_match_oracle(bits, residual, seed, steps):
  """Two call widths (1 and 24, so few compiles); the ragged n_valid vary the real chunk lengths.
  (Overflow inside jit drops tokens by design; test_capacity_checks_and_overflow covers it.)"""
  group = 8
  rng = np.random.default_rng(seed)
  cache = new_cache(bits=bits, group=group, residual=residual)
  orc = QuantOracle(3, bits, group, residual)
  for t, wanted in steps:
    n_valid = np.minimum(np.array(wanted), t)
    k, v = random_kv(rng, 3, t, scale=rng.choice([0.5, 4.0]))
    cache = _append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid, jnp.int32))
    orc.append(k, v, n_valid)
    check_matches(cache, orc)


@pytest.mark.parametrize("bits,residual", [(4, None), (2, 32), (8, 16)])
def test_chunking_never_changes_contents(bits, residual):
  rng = np.random.default_rng(0)
  k, v = random_kv(rng, 2, 80)
  whole = api.append(new_cache(batch=2, bits=bits, residual=residual), jnp.asarray(k), jnp.asarray(v))
  pieces = new_cache(batch=2, bits=bits, residual=residual)
  for a, b in ((0, 1), (1, 17), (17, 18), (18, 50), (50, 80)):
    width = 1 if b - a == 1 else 32  # few compiled shapes: padding carries the rest
    kp, vp = np.zeros((2, L, 2, K, width, H), np.float32)
    kp[..., :b - a, :], vp[..., :b - a, :] = k[:, :, :, a:b], v[:, :, :, a:b]
    pieces = _append(pieces, jnp.asarray(kp), jnp.asarray(vp), jnp.full((2,), b - a, jnp.int32))
  assert_same_view(whole, pieces)
  expected_q = ((80 - (residual or 0)) // 16) * 16
  assert whole.qcount.tolist() == pieces.qcount.tolist() == [expected_q] * 2


@pytest.mark.parametrize("residual", [None, 32, 64])
def test_newest_tokens_stay_exact(residual):
  rng = np.random.default_rng(1)
  cache = new_cache(batch=1, capacity=256, bits=2, group=32, residual=residual)
  k, v = random_kv(rng, 1, 200)
  for n in (1, 31, 32, 33, 95, 96, 97, 150, 200):
    c = _append(cache, jnp.asarray(k), jnp.asarray(v), jnp.array([n], jnp.int32))
    r = residual or 0
    assert n - int(c.qcount[0]) < r + 32
    assert n - int(c.qcount[0]) >= min(n, r)  # at least the newest R tokens are exact
    view = c.view()
    q = int(c.qcount[0])
    np.testing.assert_array_equal(np.asarray(view.keys[:, 0, :, q:n]), k[:, 0, :, q:n])
    np.testing.assert_array_equal(np.asarray(view.values[:, 0, :, q:n]), v[:, 0, :, q:n])
    if q:  # and the quantized part really is lossy
      assert np.abs(np.asarray(view.keys[:, 0, :, :q]) - k[:, 0, :, :q]).max() > 0


# ---- what each query sees -----------------------------------------------------------------------
def _q_of(n, residual, group):
  return group * (max(n - residual, 0) // group)


@pytest.mark.parametrize("bits,residual,chunks", [
    (4, None, [1] * 40),
    (2, 16, [5, 1, 30, 1, 1, 20]),
    (8, None, [37, 1, 1, 23]),
    (3, 16, [64]),
])
def test_attend_sees_quantized_prefix_and_exact_chunk(bits, residual, chunks):
  """Query at p in a call starting at s: positions [0, Q(s)) dequantized, [Q(s), p] exact."""
  rng = np.random.default_rng(2)
  group, nq, batch = 8, 4, 2
  rope = RoPE(H, 10000.0)
  cache = QuantizedCache.init(n_layers=1, batch=batch, kv_heads=K, head_dim=H, capacity=128,
                              bits=bits, group=group, residual=residual)
  total = sum(chunks)
  q_all = rng.standard_normal((batch, total, nq, H)).astype(np.float32)
  k_all = rng.standard_normal((batch, total, K, H)).astype(np.float32)
  v_all = rng.standard_normal((batch, total, K, H)).astype(np.float32)
  step = jax.jit(lambda c, q, k, v, n: c.attend(0, q, k, v, n, rope=rope))
  fed = [0] * batch  # real tokens per row
  rows_k = [[] for _ in range(batch)]
  rows_v = [[] for _ in range(batch)]
  for t in chunks:
    n_valid = np.array([t, t - 2 if t > 2 else t])  # row 1: the last 2 tokens of a chunk are padding
    q_in = np.zeros((batch, t, nq, H), np.float32)
    k_in = np.zeros((batch, t, K, H), np.float32)
    v_in = np.zeros((batch, t, K, H), np.float32)
    for b in range(batch):
      sl = slice(fed[b], fed[b] + n_valid[b])
      n = n_valid[b]
      q_in[b, :n], k_in[b, :n], v_in[b, :n] = q_all[b, sl], k_all[b, sl], v_all[b, sl]
      q_in[b, n:], k_in[b, n:], v_in[b, n:] = 9.0, 9.0, 9.0  # padding: must never be seen
    before = cache.view()
    out, cache = step(cache, jnp.asarray(q_in), jnp.asarray(k_in), jnp.asarray(v_in),
                      jnp.asarray(n_valid, jnp.int32))
    cache = cache.advance(jnp.asarray(n_valid, jnp.int32))
    for b in range(batch):
      s, n = fed[b], int(n_valid[b])
      pos = np.arange(s, s + n)
      rk = oracle.rope(k_in[b, :n], pos, 10000.0)
      rows_k[b].extend(rk)
      rows_v[b].extend(v_in[b, :n])
      qs = _q_of(s, residual or 0, group)
      keys = np.stack(rows_k[b])  # [p+1, K, H] exact, rotated
      values = np.stack(rows_v[b])
      keys[:qs] = np.asarray(before.keys[0, b, :, :qs]).transpose(1, 0, 2)
      values[:qs] = np.asarray(before.values[0, b, :, :qs]).transpose(1, 0, 2)
      assert int(before.mask[0, b, 0].sum()) == s
      mask = np.arange(s + n)[None, :] <= pos[:, None]
      want = oracle.attention(oracle.rope(q_in[b, :n], pos, 10000.0), keys, values, mask)
      np.testing.assert_allclose(np.asarray(out[b, :n]), want, atol=2e-5, rtol=1e-4)
      fed[b] += n
  assert cache.lengths.tolist() == fed


def test_keys_are_stored_rotated():
  rng = np.random.default_rng(3)
  rope = RoPE(H, 10000.0)
  cache = QuantizedCache.init(n_layers=1, batch=1, kv_heads=K, head_dim=H, capacity=64, bits=8,
                              group=16)
  k = rng.standard_normal((1, 20, K, H)).astype(np.float32)
  _, c = cache.attend(0, jnp.zeros((1, 20, K, H)), jnp.asarray(k), jnp.asarray(k),
                      jnp.array([20]), rope=rope)
  c = c.advance(jnp.array([20]))
  view = np.asarray(c.view().keys[0, 0]).transpose(1, 0, 2)  # [S, K, H]
  rotated = oracle.rope(k[0], np.arange(20), 10000.0)
  np.testing.assert_allclose(view[16:20], rotated[16:20], atol=1e-5)  # residual: exact
  np.testing.assert_allclose(view[:16], rotated[:16], atol=np.abs(rotated).max() / 127)


# ---- memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,limit,exact", [(8, 0.28, 0.265625), (4, 0.16, 0.15625),
                                              (2, 0.10, 0.09375), (3, 0.14, 0.125)])
def test_memory_ratio_from_the_arrays(bits, limit, exact):
  cfg = kvjax.SMOLLM2_135M
  cache = make_cache(f"int{bits}+residual:64", cfg, batch=2, capacity=1024)
  leaves = [cache.kq, cache.ks, cache.kz, cache.vq, cache.vs, cache.vz]
  quant = sum(int(a.size) * a.dtype.itemsize for a in leaves if a is not None)
  assert quant == cache.quantized_bytes()
  fp32 = 2 * cfg.n_layers * 2 * cfg.n_kv_heads * 1024 * cfg.head_dim * 4
  assert quant / fp32 == exact <= limit
  residual = int(cache.rk.nbytes + cache.rv.nbytes)
  assert api.total_bytes(cache) == quant + residual + 2 * 2 * 4  # + lengths and qcount
  assert cache.kq.dtype == jnp.uint8 and cache.ks.dtype == jnp.float16
  assert (cache.kz is None) == (bits == 8)


# ---- cache operations ----------------------------------------------------------------------------
def _filled(rng, bits=4, residual=16, n=(70, 45, 3)):
  cache = new_cache(bits=bits, residual=residual)
  orc = QuantOracle(3, bits, 16, residual)
  k, v = random_kv(rng, 3, max(n))
  cache = api.append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(n, jnp.int32))
  orc.append(k, v, n)
  return cache, orc


@pytest.mark.parametrize("lengths", [[64, 40, 3], [20, 5, 0], [69, 45, 3], 30])
def test_crop_keeps_what_attention_saw_then_continues(lengths):
  rng = np.random.default_rng(4)
  cache, orc = _filled(rng)
  before = cache.view()
  cropped = api.crop(cache, jnp.asarray(lengths, jnp.int32))
  orc.crop(np.broadcast_to(lengths, (3,)))
  check_matches(cropped, orc)
  after = cropped.view()
  for b, n in enumerate(np.minimum(np.broadcast_to(lengths, (3,)), [70, 45, 3])):
    for x, y in ((after.keys, before.keys), (after.values, before.values)):
      np.testing.assert_array_equal(np.asarray(x[:, b, :, :n]), np.asarray(y[:, b, :, :n]))
  k, v = random_kv(rng, 3, 30)
  more = _append(cropped, jnp.asarray(k), jnp.asarray(v), jnp.array([20, 7, 30], jnp.int32))
  orc.append(k, v, [20, 7, 30])
  check_matches(more, orc)


def test_reorder_reset_grow():
  rng = np.random.default_rng(5)
  cache, orc = _filled(rng)
  view = cache.view()
  perm = jnp.array([2, 0, 0])
  moved = api.reorder(cache, perm).view()
  for x, y in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(view)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[:, np.asarray(perm)])
  empty = api.reset(cache)
  assert not bool(empty.view().mask.any())
  k, v = random_kv(rng, 3, 40)
  fresh = api.append(new_cache(residual=16), jnp.asarray(k), jnp.asarray(v))
  again = api.append(empty, jnp.asarray(k), jnp.asarray(v))
  assert_same_view(fresh, again)
  grown = api.grow(cache, 200)
  assert grown.capacity == 208 and grown.fits(208) and not grown.fits(209)
  gv = grown.view()
  np.testing.assert_array_equal(np.asarray(gv.keys[..., :96, :]), np.asarray(view.keys))
  k, v = random_kv(rng, 3, 100)
  orc.append(k, v, [100, 100, 100])
  check_matches(api.append(grown, jnp.asarray(k), jnp.asarray(v)), orc)


def test_capacity_checks_and_overflow():
  cache = new_cache(capacity=90)  # rounded up to whole groups
  assert cache.capacity == 96 and cache.fits(96) and not cache.fits(97)
  assert bool(cache.has_room(96)) and not bool(cache.has_room(97))
  k = jnp.ones((L, 3, K, 97, H))
  with pytest.raises(kvjax.CapacityError):
    api.append(cache, k, k)
  over = _append(cache, k, k)  # inside jit: dropped, flagged
  assert over.overflowed().tolist() == [True] * 3


# ---- the quantize verb and specs -----------------------------------------------------------------
def test_quantize_full_cache_equals_feeding_it():
  rng = np.random.default_rng(7)
  full = kvjax.FullCache.init(n_layers=L, batch=3, kv_heads=K, head_dim=H, capacity=96)
  k, v = random_kv(rng, 3, 90)
  n = jnp.array([90, 33, 0], jnp.int32)
  full = api.append(full, jnp.asarray(k), jnp.asarray(v), n)
  qc = quantize(full, bits=4, group=16, residual=32)
  assert isinstance(qc, QuantizedCache) and qc.residual == 32 and qc.bits == 4
  fed = api.append(new_cache(bits=4, residual=32), jnp.asarray(k), jnp.asarray(v), n)
  assert_same_view(qc, fed)
  assert from_full(full, 8).capacity == 96
  arr = quantize(jnp.asarray(k[0, 0, :, :80]), bits=4, group=16, axis=1)
  assert isinstance(arr, packing.Quantized)
  np.testing.assert_allclose(np.asarray(packing.dequantize(arr)), k[0, 0, :, :80], atol=0.6)
  with pytest.raises(TypeError):
    quantize(qc)
  with pytest.raises(TypeError):
    quantize([1, 2, 3])


def test_spec_wiring():
  cfg = kvjax.TINY
  cache = make_cache("int4+residual:64", cfg, batch=2, capacity=100)
  assert isinstance(cache, QuantizedCache)
  assert (cache.bits, cache.group, cache.residual, cache.capacity) == (4, 32, 64, 128)
  assert cache.rk.shape == (cfg.n_layers, 2, cfg.n_kv_heads, 96, cfg.head_dim)
  assert make_cache("int2+group:16", cfg, batch=1, capacity=64).group == 16
  assert make_cache("int8", cfg, 1, 64, jnp.bfloat16).rk.dtype == jnp.bfloat16
  with pytest.raises(SpecError, match="not yet"):
    make_cache("int8+offload", cfg, batch=1, capacity=64)
  with pytest.raises(SpecError, match="divide the head dim"):
    make_cache("int4+group:48", cfg, batch=1, capacity=96)
  with pytest.raises(TypeError, match="unknown options"):
    from_spec(parse_spec("int4"), cfg, batch=1, capacity=64, extra=1)


# ---- end to end ----------------------------------------------------------------------------------
def _stepwise_logits(model, ids, spec, chunk=1):
  """Feeds ids [T] through a fresh cache `chunk` tokens at a time; logits [T, V]."""
  cache = make_cache(spec, model.config, 1, 256)
  llama = Llama(model.config, jnp.float32)
  step = jax.jit(lambda c, t: llama.apply({"params": model.params}, t, c))
  outs = []
  for s in range(0, len(ids), chunk):
    logits, cache = step(cache, jnp.asarray(ids[None, s:s + chunk], jnp.int32))
    outs.append(np.asarray(logits[0]))
  return np.concatenate(outs), cache


def test_tiny_logits_close_to_full(tiny):
  ids = np.random.default_rng(8).integers(0, 256, 140)
  full, _ = _stepwise_logits(tiny, ids, "full", chunk=20)
  int8, cache = _stepwise_logits(tiny, ids, "int8", chunk=20)
  assert int(cache.qcount[0]) == 128
  np.testing.assert_allclose(int8, full, atol=5e-2)
  int4, cache = _stepwise_logits(tiny, ids, "int4+residual:64", chunk=20)
  assert int(cache.qcount[0]) == 64
  np.testing.assert_allclose(int4, full, atol=5e-2)
  assert np.mean(int4.argmax(-1) == full.argmax(-1)) > 0.9


def test_chunked_prefill_close_to_token_by_token(tiny_gqa):
  ids = np.random.default_rng(9).integers(0, 256, 100)
  by_token, c1 = _stepwise_logits(tiny_gqa, ids, "int4", chunk=1)
  chunked, c2 = _stepwise_logits(tiny_gqa, ids, "int4", chunk=50)
  assert c1.qcount.tolist() == c2.qcount.tolist() == [96]
  # Within a chunk new tokens are seen at full precision: the first chunk is exactly the full forward.
  full, _ = _stepwise_logits(tiny_gqa, ids, "full", chunk=50)
  np.testing.assert_allclose(chunked[:50], full[:50], atol=1e-4)
  np.testing.assert_allclose(chunked, by_token, atol=0.1)
  np.testing.assert_allclose(np.asarray(c1.view().keys), np.asarray(c2.view().keys), atol=0.3)


@pytest.mark.parametrize("spec", ["int8", "int4+residual:64"])
def test_generate_tiny(tiny, spec):
  prompts = [list(range(1, 90)), [5, 6, 7]]
  res = kvjax.generate(tiny, prompts, max_new_tokens=24, cache=spec)
  ref = kvjax.generate(tiny, prompts, max_new_tokens=24, cache="full")
  assert res.tokens.shape == (2, 24)
  assert res.tokens.min() >= 0 and res.tokens.max() < tiny.config.vocab_size
  assert np.mean(res.tokens == ref.tokens) >= 0.75
  assert res.cache.lengths.tolist() == [89 + 23, 3 + 23]


def test_generate_tiny_dynamic_grows(tiny):
  prompt = [list(range(1, 60))]
  res = kvjax.generate(tiny, prompt, max_new_tokens=40, cache="dynamic+int4")
  ref = kvjax.generate(tiny, prompt, max_new_tokens=40, cache="int4", capacity=128)
  assert res.cache.capacity > 64  # started at 64 slots and doubled on the way
  np.testing.assert_array_equal(res.tokens, ref.tokens)


# ---- SmolLM2 -------------------------------------------------------------------------------------
def _shakespeare_ids(model, n):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, "..", "shared", "data", "tinyshakespeare.txt")
  if not os.path.exists(path):
    pytest.skip(f"tinyshakespeare not found at {os.path.normpath(path)}")
  with open(path) as f:
    text = f.read(8000)
  return np.asarray(model.tokenizer.encode(text)[:n], np.int32)


@pytest.mark.slow
def test_smollm2_generate_int8_matches_full_start(smollm2):
  model = smollm2
  prompt = "The quick brown fox"
  res = kvjax.generate(model, prompt, max_new_tokens=12, cache="int8")
  ref = kvjax.generate(model, prompt, max_new_tokens=12, cache="full")
  assert res.tokens.min() >= 0 and res.tokens.max() < model.config.vocab_size
  np.testing.assert_array_equal(res.tokens[:, :4], ref.tokens[:, :4])


@pytest.mark.slow
def test_smollm2_perplexity_int8_within_one_percent(smollm2):
  model = smollm2
  ids = _shakespeare_ids(model, 256)
  full = kvjax.perplexity(model, ids, cache="full")
  int8 = kvjax.perplexity(model, ids, cache="int8")
  assert abs(int8.ppl / full.ppl - 1) < 0.01, (int8.ppl, full.ppl)
