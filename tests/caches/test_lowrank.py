"""Tests for the `lowrank:R` latent cache (kvjax/caches/lowrank.py) and `fit_lowrank`.

What is checked:
  * the `kvjax.testing` conformance kit on `lowrank:R` (fp32 latents; int4 latents and the
    post-RoPE key mode under `slow`), with random orthonormal maps of the kit's shapes;
  * attention equals a float64 NumPy oracle of the latent cache (project, store, rebuild the keys,
    rotate or not, attend, up-project the values), for both key modes, ragged rows, two calls;
  * with R = K * H and maps fitted on the model's own keys, logits and greedy generation equal the
    full cache's (both key modes);
  * PCA: the calibration reconstruction error never grows with R; the basis is orthonormal;
  * `estimate_bytes` equals the measured `nbytes()`; int8/int4 latents lie within their error bound;
  * clear errors: no maps, R > K * H, wrong map shapes, a key mode that disagrees with the maps;
  * perplexity runs with `cache_options={"maps": ...}`; prefill and decode export for cuda and tpu.
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
from kvjax import calibrate
from kvjax.attention import RoPE
from kvjax.caches import packing
from kvjax.caches.lowrank import LowRankCache, LowRankMaps, estimate_bytes
from tests.helpers import SETTINGS, model_logits


def random_maps(n_layers, features, rank, seed=0, rotated=False, mean_scale=0.3):
  """Random orthonormal bases (QR of a Gaussian) and small random means."""
  rng = np.random.default_rng(seed)

  def basis():
    q, _ = np.linalg.qr(rng.standard_normal((n_layers, features, features)))
    return jnp.asarray(q[:, :, :rank], jnp.float32)

  def mean():
    return jnp.asarray(mean_scale * rng.standard_normal((n_layers, features)), jnp.float32)

  return LowRankMaps(k_basis=basis(), k_mean=mean(), v_basis=basis(), v_mean=mean(), rotated=rotated)


def kit_options(rank, rotated=False):
  """The kit's options= for lowrank: maps sized from the config it builds each cache with."""
  def options(config):
    return {"maps": random_maps(config.n_layers, config.n_kv_heads * config.head_dim, rank,
                                rotated=rotated)}
  return options


# ---- the kit's generic invariants ------------------------------------------------------------------
@pytest.mark.parametrize("spec,options", [
    pytest.param("lowrank:8", kit_options(8), id="lowrank:8"),
    pytest.param("lowrank:8", kit_options(8, rotated=True), marks=pytest.mark.slow,
                 id="lowrank:8-post"),
    pytest.param("lowrank:8+int4+group:8", kit_options(8), marks=pytest.mark.slow,
                 id="lowrank:8+int4")])
def test_conformance(check_kind, spec, options):
  check_kind(spec, options=options)


# ---- NumPy oracle ---------------------------------------------------------------------------------
def np_rope(x, positions, theta):
  """x [T, K, H] rotated at positions [T] (float64)."""
  h = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = positions[:, None, None] * inv
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def oracle_attend(maps, rows, q, kh, theta, scale):
  """Attention of row queries q [T, N, H] at the last T positions of `rows` (a list of (k, v) [K, H]
  as given to attend, un-rotated), through latents: project, rebuild, rotate keys, attend."""
  kb, km = np.asarray(maps.k_basis[0], np.float64), np.asarray(maps.k_mean[0], np.float64)
  vb, vm = np.asarray(maps.v_basis[0], np.float64), np.asarray(maps.v_mean[0], np.float64)
  k = np.stack([r[0] for r in rows]).astype(np.float64)  # [S, K, H]
  v = np.stack([r[1] for r in rows]).astype(np.float64)
  s, _, h = k.shape
  pos = np.arange(s)
  if maps.rotated:  # the latents hold rotated keys
    k = np_rope(k, pos, theta)
  k_hat = ((k.reshape(s, -1) - km) @ kb @ kb.T + km).reshape(s, kh, h)
  v_hat = ((v.reshape(s, -1) - vm) @ vb @ vb.T + vm).reshape(s, kh, h)
  if not maps.rotated:
    k_hat = np_rope(k_hat, pos, theta)
  t, n, _ = q.shape
  qpos = pos[s - t:]
  qr = np_rope(q.astype(np.float64), qpos, theta)
  out = np.zeros((t, n, h))
  for i in range(t):
    for head in range(n):
      g = head // (n // kh)
      sc = (k_hat[: qpos[i] + 1, g] @ qr[i, head]) * scale
      p = np.exp(sc - sc.max())
      out[i, head] = (p / p.sum()) @ v_hat[: qpos[i] + 1, g]
  return out


@pytest.mark.parametrize("rotated", [False, True], ids=["pre", "post"])
def test_attention_equals_numpy_oracle(rotated):
  kh, n, h, r, theta, cap = 2, 4, 8, 6, 10000.0, 16
  maps = random_maps(1, kh * h, r, seed=3, rotated=rotated)
  cache = LowRankCache.init(maps=maps, batch=2, kv_heads=kh, head_dim=h, capacity=cap, block_size=4)
  rope = RoPE(h, theta)
  rng = np.random.default_rng(1)
  rows = [[], []]
  attend = jax.jit(lambda c, q, k, v, nv: c.attend(0, q, k, v, nv, rope=rope))
  for t, n_valid in ((5, [3, 5]), (3, [3, 1]), (1, [1, 1])):
    q = rng.standard_normal((2, t, n, h)).astype(np.float32)
    k = rng.standard_normal((2, t, kh, h)).astype(np.float32)
    v = rng.standard_normal((2, t, kh, h)).astype(np.float32)
    out, cache = attend(cache, q, k, v, jnp.asarray(n_valid, jnp.int32))
    cache = cache.advance(jnp.asarray(n_valid, jnp.int32))
    for b in range(2):
      rows[b] += [(k[b, i], v[b, i]) for i in range(n_valid[b])]
      want = oracle_attend(maps, rows[b], q[b, :n_valid[b]], kh, theta, h**-0.5)
      np.testing.assert_allclose(np.asarray(out[b, :n_valid[b]]), want, atol=2e-5, rtol=1e-4)


# ---- full rank == full cache ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(tiny):
  ids = np.random.default_rng(7).integers(0, 260, 256).astype(np.int32)
  return calibrate.collect_kv(tiny, ids, window=128)


def _lowrank_logits(model, maps, ids, chunks, spec):
  step = jax.jit(model.step)
  cache = kvjax.make_cache(spec, model.config, 1, 64, maps=maps)
  out, i = [], 0
  for c in chunks:
    logits, cache = step(model.params, jnp.asarray(ids[None, i:i + c]), cache, jnp.array([c], jnp.int32))
    out.append(np.asarray(logits[0]))
    i += c
  return np.concatenate(out)


@pytest.mark.parametrize("rotated", [False, True], ids=["pre", "post"])
def test_full_rank_equals_full_cache(tiny, calib, rotated):
  f = tiny.config.n_kv_heads * tiny.config.head_dim
  maps = calibrate.fit_lowrank(tiny, None, f, kv=calib, window=128, rotated=rotated)
  ids = np.random.default_rng(2).integers(0, 260, 20).astype(np.int32)
  want, _ = model_logits(tiny, "full", ids, [12, 1, 7])
  got = _lowrank_logits(tiny, maps, ids, [12, 1, 7], f"lowrank:{f}")
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_full_rank_generation_equals_full_cache(tiny, calib):
  from tests.helpers import lively

  model = lively(tiny)
  kv = calibrate.collect_kv(model, np.random.default_rng(7).integers(0, 260, 256), window=128)
  f = model.config.n_kv_heads * model.config.head_dim
  maps = calibrate.fit_lowrank(model, None, f, kv=kv, window=128)
  prompts = [np.arange(1, 9, dtype=np.int32), np.arange(3, 8, dtype=np.int32)]
  want = kvjax.generate(model, prompts, max_new_tokens=8, cache="full")
  got = kvjax.generate(model, prompts, max_new_tokens=8, cache=f"lowrank:{f}",
                       cache_options={"maps": maps})
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  # the caller's maps survive the donated cache and can be used again
  assert np.isfinite(np.asarray(maps.k_basis)).all()


def test_perplexity_with_maps(tiny, calib):
  maps = calibrate.fit_lowrank(tiny, None, 32, kv=calib, window=128)
  ids = np.random.default_rng(4).integers(0, 260, 40).astype(np.int32)
  full = kvjax.perplexity(tiny, ids, cache="full")
  low = kvjax.perplexity(tiny, ids, cache="lowrank:32", cache_options={"maps": maps})
  low8 = kvjax.perplexity(tiny, ids, cache="lowrank:32+int8", cache_options={"maps": maps})
  assert np.isfinite(low.ppl) and np.isfinite(low8.ppl)
  assert abs(low8.nll - low.nll) < 0.05 * abs(low.nll) + 0.05
  assert low.ppl != full.ppl


# ---- PCA properties -----------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(4, 60), f=st.integers(2, 12))
def test_reconstruction_error_never_grows_with_rank(seed, n, f):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, f)) @ rng.standard_normal((f, f)) + rng.standard_normal(f)
  errors = []
  for r in range(1, f + 1):
    basis, mean = calibrate.principal_basis(x, r)
    np.testing.assert_allclose(basis.T @ basis, np.eye(r), atol=1e-9)
    rebuilt = (x - mean) @ basis @ basis.T + mean
    errors.append(np.sum((x - rebuilt) ** 2))
  assert all(b <= a + 1e-9 * (1 + a) for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-9 * (1 + np.sum(x**2))


def test_fitted_error_never_grows_with_rank_on_the_model(tiny, calib):
  k, v = calib
  previous = np.inf
  for r in (4, 16, 64, 256):
    maps = calibrate.fit_lowrank(tiny, None, r, kv=calib)
    kb, km = np.asarray(maps.k_basis[1], np.float64), np.asarray(maps.k_mean[1], np.float64)
    err = np.sum(((k[1] - km) @ kb @ kb.T + km - k[1]) ** 2)
    assert err <= previous * (1 + 1e-6)
    previous = err
  assert previous < 1e-6 * np.sum(k[1].astype(np.float64) ** 2)


@SETTINGS
@given(rank=st.sampled_from([4, 8, 12, 16]), bits=st.sampled_from([None, 8, 4, 2]),
       group=st.sampled_from([4, 8, 32]), batch=st.integers(1, 3), capacity=st.sampled_from([8, 24]))
def test_bytes_formula_equals_measured(rank, bits, group, batch, capacity):
  cfg = kvjax.TINY.replace(n_layers=2, n_kv_heads=2, head_dim=8, n_heads=2)
  if bits is not None and rank % min(group, rank):
    return
  spec = kvjax.parse_spec(f"lowrank:{rank}" + (f"+int{bits}+group:{group}" if bits else ""))
  maps = random_maps(2, 16, rank)
  cache = kvjax.make_cache(spec, cfg, batch, capacity, jnp.float32, maps=maps)
  measured = sum(cache.nbytes().values())
  assert estimate_bytes(spec, cfg, capacity, batch, jnp.float32) == measured
  assert kvjax.estimate_bytes(spec, cfg, capacity, batch=batch, dtype=jnp.float32) == measured
  assert measured == sum(cache.kv_nbytes().values()) + cache.maps_nbytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_latents_within_their_bound(bits):
  kh, h, r, g = 2, 8, 16, 8
  maps = random_maps(1, kh * h, r, seed=5)
  cache = LowRankCache.init(maps=maps, batch=2, kv_heads=kh, head_dim=h, capacity=8, bits=bits, group=g)
  plain = LowRankCache.init(maps=maps, batch=2, kv_heads=kh, head_dim=h, capacity=8)
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((2, 8, kh, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 8, kh, h)), jnp.float32)
  cache, plain = cache.write(0, k, v), plain.write(0, k, v)
  for which in ("zk", "zv"):
    exact = np.asarray(plain._load(which, 0, 0, 8)).reshape(2, 8, r // g, g)
    got = np.asarray(cache._load(which, 0, 0, 8)).reshape(2, 8, r // g, g)
    bound = packing.error_bound(bits) * np.abs(exact).max(-1, keepdims=True) + 1e-6
    assert (np.abs(got - exact) <= bound).all()
  assert sum(cache.kv_nbytes().values()) < sum(plain.kv_nbytes().values()) / (3 if bits == 8 else 3.5)


# ---- errors -------------------------------------------------------------------------------------------
def test_clear_errors(tiny):
  cfg = tiny.config
  f = cfg.n_kv_heads * cfg.head_dim
  with pytest.raises(kvjax.SpecError, match="fit_lowrank"):
    kvjax.make_cache("lowrank:8", cfg, 1, 16)
  with pytest.raises(kvjax.SpecError, match="larger than"):
    kvjax.make_cache(f"lowrank:{f + 1}", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 8))
  with pytest.raises(ValueError, match="k_basis has shape"):
    kvjax.make_cache("lowrank:16", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 8))
  with pytest.raises(ValueError, match="k_basis has shape"):
    kvjax.make_cache("lowrank:8", cfg, 1, 16, maps=random_maps(cfg.n_layers - 1, f, 8))
  with pytest.raises(ValueError, match="post-RoPE"):
    kvjax.make_cache("lowrank:8", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 8, rotated=True),
                     keys="pre")
  with pytest.raises(ValueError, match="keys must be"):
    kvjax.make_cache("lowrank:8", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 8), keys="both")
  with pytest.raises(TypeError, match="unknown options"):
    kvjax.make_cache("lowrank:8", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 8), scale=2)
  with pytest.raises(ValueError, match="group:8 must divide"):
    kvjax.make_cache("lowrank:12+int4+group:8", cfg, 1, 16, maps=random_maps(cfg.n_layers, f, 12))
  with pytest.raises(ValueError, match="larger than"):
    calibrate.fit_lowrank(tiny, None, f + 1, kv=(np.zeros((4, 2, f)), np.zeros((4, 2, f))))
  for spec in ("lowrank:8+window:16", "lowrank:8+share:2", "lowrank:8+offload"):
    with pytest.raises(kvjax.SpecError):
      kvjax.parse_spec(spec)


# ---- export --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["lowrank:32", "lowrank:32+int4"])
def test_prefill_and_decode_export_for_gpu_and_tpu(spec):
  from jax import export
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from kvjax import decode
  from kvjax.sampling import GREEDY

  model, batch = kvjax.load("tiny", dtype=jnp.bfloat16), 2
  f = model.config.n_kv_heads * model.config.head_dim
  maps = random_maps(model.config.n_layers, f, 32)
  cache = kvjax.make_cache(spec, model, batch, 64, maps=maps)
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  abstract = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())), tree)
  params, cache_abs = abstract(model.params), abstract(cache)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  step = kvjax.static_step(model)
  prefill = functools.partial(decode._prefill, model=step, sampler=GREEDY, out_size=16)
  exported = export.export(jax.jit(prefill), platforms=["cuda", "tpu"])(
      params, i32(batch, 16), i32(batch), cache_abs, key, i32())
  assert exported.platforms == ("cuda", "tpu")
  state = jax.eval_shape(prefill, params, i32(batch, 16), i32(batch), cache_abs, key, i32())
  state = state.replace(cache=cache_abs)
  step_fn = functools.partial(decode._decode, model=step, sampler=GREEDY)
  exported = export.export(jax.jit(step_fn), platforms=["cuda", "tpu"])(params, state, i32(), i32(), i32())
  assert exported.platforms == ("cuda", "tpu")
