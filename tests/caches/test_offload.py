"""OffloadCache: its host / device split against a NumPy oracle and against the full cache.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
`offload` (contents, positions, padding ignored, rows independent, inputs not mutated, jit equals
eager, chunk-exact, attention and a Llama forward vs NumPy, reset / crop / reorder, overflow,
nbytes), once with the default ring (one block, the whole capacity at the kit's capacity 8) and
once with a ring of half the capacity, so that attention reads tokens back from the host.

What is special to offload, checked here:
  * after any hypothesis-generated sequence of appends (ragged rows via n_valid, overflow inside
    jit included) the host buffers hold what `kvjax.testing.oracle.FullCacheOracle` says a full
    cache holds, and the device ring holds the last min(filled, R) tokens of each row at slot
    p mod R;
  * the big buffers live in host memory ('pinned_host' on CPU and GPU), `nbytes()` shows the split,
    and the device part does not grow with the capacity; the emulation without host memory;
  * logits equal the full cache's (exact up to summation order, 1e-5) for the tiny model, chunked
    prefill equals token-by-token decoding, generate gives the full cache's tokens;
  * crop (refills the ring from the host), reorder and grow keep those invariants; host writes and
    the ring refill are loops, not unrolled per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.caches import offload
from kvjax.caches.offload import OffloadCache
from kvjax.models.llama import Llama
from kvjax.testing import oracle
from kvjax.testing import strategies as kst
from tests.helpers import examples

L, B, K, H, CAP, BS, R = 2, 3, 2, 4, 16, 4, 8


def new_cache(batch=B, capacity=CAP, block_size=BS, recent=R, host_kind=None):
  return OffloadCache.init(n_layers=L, batch=batch, kv_heads=K, head_dim=H, capacity=capacity,
                           block_size=block_size, recent=recent, host_kind=host_kind)


def random_kv(rng, t, n_valid=None):
  """k, v [L, B, K, T, H] float32, standard normal; padding (t >= n_valid[b]) is large garbage."""
  n_valid = (t,) * B if n_valid is None else tuple(int(n) for n in n_valid)
  return kst.random_tokens(rng, kst.CacheShape(L, B, K, H, CAP), kst.AppendStep(t, n_valid))


@pytest.mark.parametrize("options", [
    pytest.param({}, id="offload"),
    pytest.param({"block_size": 4, "recent": 4}, marks=pytest.mark.slow, id="offload-recent-4")])
def test_conformance(check_kind, options):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind("offload", options=options)


def assert_matches_oracle(cache: OffloadCache, orc: oracle.FullCacheOracle):
  view = kvjax.view(cache)
  keys, values, mask = np.asarray(view.keys), np.asarray(view.values), np.asarray(view.mask)
  ring_k, ring_v = np.asarray(cache.ring_k), np.asarray(cache.ring_v)
  ring_pos = np.asarray(cache.ring_positions())
  np.testing.assert_array_equal(np.asarray(cache.lengths), orc.lengths())
  for b in range(cache.batch):
    n = min(len(orc.rows[b]), cache.capacity)
    want_k, want_v = orc.stored(b)
    assert mask[:, b, :, :n].all() and not mask[:, b, :, n:].any()
    if not n:
      continue
    np.testing.assert_array_equal(keys[:, b, :, :n], want_k)
    np.testing.assert_array_equal(values[:, b, :, :n], want_v)
    held = list(range(max(0, n - R), n))  # the ring holds the R most recent stored tokens
    assert sorted(p for p in ring_pos[b] if p >= 0) == held
    for p in held:
      np.testing.assert_array_equal(ring_k[:, b, :, p % R], want_k[:, :, p])
      np.testing.assert_array_equal(ring_v[:, b, :, p % R], want_v[:, :, p])


def host_kinds(cache):
  return {cache.host_k.sharding.memory_kind, cache.host_v.sharding.memory_kind}


_jit_append = jax.jit(kvjax.append)

step_strategy = st.integers(1, 6).flatmap(
    lambda t: st.tuples(st.just(t), st.one_of(st.none(), st.lists(st.integers(0, t), min_size=B, max_size=B))))


@given(steps=st.lists(step_strategy, min_size=1, max_size=6), seed=st.integers(0, 2**16))
@examples(20)
def test_ring_and_host_follow_appends(steps, seed):
  """The host holds every stored token, the ring the last R at slot p mod R (overflow inside jit
  included: dropped, never written onto others), and the buffers stay in host memory."""
  rng = np.random.default_rng(seed)
  cache, orc = new_cache(), oracle.FullCacheOracle(B, CAP)
  for t, n_valid in steps:
    nv = np.full(B, t, np.int32) if n_valid is None else np.array(n_valid, np.int32)
    k, v = random_kv(rng, t, nv)
    orc.append(k, v, nv)
    cache = _jit_append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(nv))
    assert_matches_oracle(cache, orc)
    assert host_kinds(cache) == host_kinds(new_cache())


def test_buffers_live_in_host_memory_and_nbytes_splits():
  kind = offload.host_memory_kind()
  cache = new_cache()
  if kind is None:
    pytest.skip("this backend has no pinned_host memory (the emulation is tested separately)")
  assert host_kinds(cache) == {"pinned_host"}
  assert cache.ring_k.sharding.memory_kind == "device"
  host = 2 * L * B * K * CAP * H * 4
  ring = 2 * L * B * K * R * H * 4
  assert cache.nbytes() == {"pinned_host": host, "device": ring + 4 * B}
  # The device part is set by R, not by the capacity.
  big = new_cache(capacity=8 * CAP)
  assert big.nbytes()["device"] == cache.nbytes()["device"]
  assert big.nbytes()["pinned_host"] == 8 * host


def test_emulation_without_host_memory():
  cache = new_cache(host_kind=offload.EMULATED)
  assert host_kinds(cache) == {"device"}
  assert set(cache.nbytes()) == {"device", "emulated_host"}
  rng = np.random.default_rng(3)
  orc = oracle.FullCacheOracle(B, CAP)
  for t, nv in ((5, [5, 2, 0]), (6, [6, 6, 3])):
    nv = np.array(nv, np.int32)
    k, v = random_kv(rng, t, nv)
    orc.append(k, v, nv)
    cache = _jit_append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(nv))
  assert_matches_oracle(cache, orc)


def test_init_validates():
  with pytest.raises(ValueError, match="multiple of block_size"):
    new_cache(recent=6)
  with pytest.raises(ValueError, match="at most the capacity"):
    new_cache(recent=32)
  with pytest.raises(ValueError, match="must divide capacity"):
    new_cache(block_size=5)


def filled_cache(rng, lengths=(13, 4, 9)):
  cache = new_cache()
  orc = oracle.FullCacheOracle(B, CAP)
  t = max(lengths)
  nv = np.array(lengths, np.int32)
  k, v = random_kv(rng, t, nv)
  orc.append(k, v, nv)
  return kvjax.append(cache, jnp.asarray(k), jnp.asarray(v), nv), orc


def test_crop_refills_ring_from_host():
  cache, orc = filled_cache(np.random.default_rng(4))
  cropped = jax.jit(lambda c: kvjax.crop(c, jnp.array([10, 4, 2], jnp.int32)))(cache)
  for b, n in enumerate((10, 4, 2)):
    del orc.rows[b][n:]
  assert_matches_oracle(cropped, orc)
  assert host_kinds(cropped) == host_kinds(cache)
  # Appending after the crop continues from the cropped length and keeps the invariants.
  k, v = random_kv(np.random.default_rng(5), 3)
  orc.append(k, v)
  assert_matches_oracle(kvjax.append(cropped, jnp.asarray(k), jnp.asarray(v)), orc)


def test_reorder_grow_reset():
  cache, orc = filled_cache(np.random.default_rng(6))
  order = np.array([2, 0, 0])
  moved = kvjax.reorder(cache, order)
  re_orc = oracle.FullCacheOracle(B, CAP)
  re_orc.rows = [list(orc.rows[i]) for i in order]
  assert_matches_oracle(moved, re_orc)
  assert host_kinds(moved) == host_kinds(cache)
  grown = kvjax.grow(cache, 2 * CAP)
  assert grown.capacity == 2 * CAP and grown.recent == R and host_kinds(grown) == host_kinds(cache)
  big_orc = oracle.FullCacheOracle(B, 2 * CAP)
  big_orc.rows = orc.rows
  assert_matches_oracle(grown, big_orc)
  empty = kvjax.reset(cache)
  assert not np.asarray(kvjax.view(empty).mask).any() and (np.asarray(empty.lengths) == 0).all()


# ---- the decoder through the cache ---------------------------------------------------------------
def _apply(model, cache, tokens, n_valid=None):
  return Llama(model.config, model.dtype).apply({"params": model.params}, tokens, cache, n_valid)


_apply_jit = jax.jit(_apply, static_argnums=0)


def _feed(model, cache, ids, chunks, apply=_apply):
  logits, start = [], 0
  for c in chunks:
    out, cache = apply(model, cache, jnp.asarray(ids[:, start:start + c]))
    logits.append(np.asarray(out))
    start += c
  return np.concatenate(logits, axis=1), cache


class _Hashable:
  """Wraps a model so it can be a static jit argument (by identity)."""

  def __init__(self, model):
    self.config, self.params, self.dtype = model.config, model.params, model.dtype


def test_logits_equal_full_cache(tiny_gqa):
  model = _Hashable(tiny_gqa)
  cfg = tiny_gqa.config
  ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 37)).astype(np.int32)
  full, _ = _feed(model, kvjax.make_cache("full", cfg, 2, 48), ids, [37])
  off = kvjax.make_cache("offload", cfg, 2, 48, block_size=8, recent=16)
  chunked, after = _feed(model, off, ids, [16, 1, 1, 16, 3], apply=_apply_jit)
  token_by_token, _ = _feed(model, off, ids, [1] * 37, apply=_apply_jit)
  np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(token_by_token, full, atol=1e-5, rtol=1e-5)
  assert after.nbytes()["pinned_host"] > 0 if offload.host_memory_kind() else True
  # 37 tokens held, 16 on the device: the rest is read back from the host copy.
  assert int(after.lengths[0]) - after.recent > 0


def test_ragged_prefill_equals_full(tiny):
  """Right-padded rows: the padding never reaches the ring nor becomes visible."""
  cfg = tiny.config
  ids = np.random.default_rng(8).integers(0, cfg.vocab_size, (3, 20)).astype(np.int32)
  nv = jnp.array([20, 7, 13], jnp.int32)
  model = _Hashable(tiny)
  want, full = _apply_jit(model, kvjax.make_cache("full", cfg, 3, 32), jnp.asarray(ids), nv)
  got, off = _apply_jit(model, kvjax.make_cache("offload", cfg, 3, 32, block_size=4, recent=8),
                        jnp.asarray(ids), nv)
  for b, n in enumerate(np.asarray(nv)):
    np.testing.assert_allclose(np.asarray(got)[b, :n], np.asarray(want)[b, :n], atol=1e-5, rtol=1e-5)
  step = jnp.asarray(ids[:, :1])
  np.testing.assert_allclose(np.asarray(_apply_jit(model, off, step)[0]),
                             np.asarray(_apply_jit(model, full, step)[0]), atol=1e-5, rtol=1e-5)


def test_generate_equals_full(tiny):
  prompts = [list(range(40, 60)), [5, 6, 7]]
  full = kvjax.generate(tiny, prompts, max_new_tokens=8, cache="full")
  off = kvjax.generate(tiny, prompts, max_new_tokens=8, cache="offload")
  np.testing.assert_array_equal(off.tokens, full.tokens)
  assert sum(off.cache_bytes.values()) > 0


@pytest.mark.slow
def test_smollm2_offload_matches_full(smollm2):
  model = smollm2
  prompt = "The capital of France is"
  full = kvjax.generate(model, prompt, max_new_tokens=8, cache="full")
  off = kvjax.generate(model, prompt, max_new_tokens=8, cache="offload")
  assert ((off.tokens >= 0) & (off.tokens < model.config.vocab_size)).all()
  np.testing.assert_array_equal(off.tokens, full.tokens)


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_writes_and_crops_are_loops_not_unrolled_rows(batch):
  """The host writes and the crop's ring refill are one fori_loop over rows: the traced program
  does not grow with the batch (it used to unroll one dynamic_update_slice per row and layer)."""
  cache = OffloadCache.init(n_layers=3, batch=batch, kv_heads=2, head_dim=8, capacity=32,
                            block_size=8)
  k = jnp.ones((batch, 4, 2, 8))
  write = jax.make_jaxpr(lambda c: c.write(1, k, k))(cache)
  crop = jax.make_jaxpr(lambda c: c.crop(3))(cache)
  count = lambda jaxpr: str(jaxpr).count("dynamic_update_slice")
  assert count(write) <= 3 and count(crop) <= 3
  loops = lambda jaxpr: str(jaxpr).count("scan[") + str(jaxpr).count("while[")
  assert loops(write) >= 2 and loops(crop) >= 1  # k and v: a loop each


def test_unexpected_backend_errors_are_not_swallowed(monkeypatch):
  """Only "this backend has no memory kinds" means emulation; any other error surfaces."""
  class Broken:
    platform = "cpu"

    def addressable_memories(self):
      raise ZeroDivisionError("a bug, not a missing feature")

  with pytest.raises(ZeroDivisionError):
    offload.host_memory_kind(Broken())

  class Old:
    platform = "cpu"

    def addressable_memories(self):
      raise NotImplementedError

  assert offload.host_memory_kind(Old()) is None
