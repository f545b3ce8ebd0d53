"""SharedCache (cross-layer sharing, `share:G` / `share:G:cal`) and kvjax.calibrate.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
`share:2` over a full, a window and an int8 inner kind, and on `share:2:cal` with identity maps
(positions / mask / lengths / filled, padding ignored, rows independent, inputs not mutated, jit
equals eager, chunk-exact but for the int8 inner, reset / crop / reorder, overflow, nbytes;
`contents` does not apply: a follower's view is its leader's tokens, not what was appended to it).

What is special to sharing, checked here:
  * logits equal a NumPy Llama forward in which every follower layer uses its group leader's
    un-rotated K/V (mapped by the calibration maps for `:cal`), then RoPE (float64 oracle, 1e-4),
    for G = 2 and 3 (3 does not divide the 4 layers), MHA and GQA, chunked and token by token;
  * `share:G:cal` with identity maps equals `share:G`; a non-full inner kind (window larger than the
    sequence) gives the full inner's logits;
  * `kvjax.append` writes leader layers only, `view()` gives L layers (a follower's = its leader's,
    mapped and rotated for `:cal`), compared with the full-cache oracle over hypothesis-generated
    ragged append sequences (5 layers in groups of 2); one forward advances lengths once;
  * memory is ceil(L / G) layers of the inner kind; share:1, missing/wrong maps are refused; a
    donated cache keeps the caller's maps;
  * calibrate: recorded k/v equal the oracle's pre-RoPE projections, `fit_affine` recovers an exact
    affine map, fitted maps never fit worse than the identity on the calibration tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax import calibrate
from kvjax.attention import RoPE
from kvjax.caches.shared import SharedCache, ShareMaps
from kvjax.models.llama import Llama
from kvjax.testing import oracle
from tests.helpers import examples


# ---- the kit's generic invariants ------------------------------------------------------------------
def _identity_maps(config):
  return {"maps": ShareMaps.identity(config.n_layers, config.n_kv_heads * config.head_dim)}


@pytest.mark.parametrize("spec,options", [
    pytest.param("share:2", {}, id="share:2"),
    pytest.param("share:2+window:6", {}, marks=pytest.mark.slow, id="share:2+window:6"),
    pytest.param("share:2+int8+group:16", {}, marks=pytest.mark.slow, id="share:2+int8+group:16"),
    pytest.param("share:2:cal", _identity_maps, marks=pytest.mark.slow,
                 id="share:2:cal")])
def test_conformance(check_kind, spec, options):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec, options=options)


# ---- NumPy oracle ---------------------------------------------------------------------------------
def cla_forward(config, params, tokens, group, maps=None):
  """tokens [T] -> logits [T, V] (float64) with layers sharing K/V in groups of `group`."""
  p = oracle._to_numpy(params)
  c = config
  x = p["embed"]["embedding"][tokens]
  t = len(tokens)
  pos = np.arange(t)
  mask = pos[:, None] >= pos[None, :]
  for i in range(c.n_layers):
    lp = p[f"layers_{i}"]
    hn = oracle.rmsnorm(x, lp["attn_norm"]["scale"], c.norm_eps)
    q = (hn @ lp["attn"]["wq"]).reshape(t, c.n_heads, c.head_dim)
    if i % group == 0:
      lead_k = hn @ lp["attn"]["wk"]  # [T, K*H] un-rotated
      lead_v = hn @ lp["attn"]["wv"]
      k, v = lead_k, lead_v
    elif maps is None:
      k, v = lead_k, lead_v
    else:
      k = lead_k @ np.asarray(maps.k_w[i], np.float64) + np.asarray(maps.k_b[i], np.float64)
      v = lead_v @ np.asarray(maps.v_w[i], np.float64) + np.asarray(maps.v_b[i], np.float64)
    k = k.reshape(t, c.n_kv_heads, c.head_dim)
    v = v.reshape(t, c.n_kv_heads, c.head_dim)
    att = oracle.attention(oracle.rope(q, pos, c.rope_theta), oracle.rope(k, pos, c.rope_theta), v, mask)
    x = x + att.reshape(t, -1) @ lp["attn"]["wo"]
    hn = oracle.rmsnorm(x, lp["mlp_norm"]["scale"], c.norm_eps)
    x = x + (oracle.silu(hn @ lp["mlp"]["w_gate"]) * (hn @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]
  x = oracle.rmsnorm(x, p["final_norm"]["scale"], c.norm_eps)
  return x @ p["embed"]["embedding"].T


def random_maps(config, seed, scale=0.1):
  """Identity plus noise: maps that change the logits but keep them in range."""
  rng = np.random.default_rng(seed)
  f = config.n_kv_heads * config.head_dim
  eye = np.eye(f)[None]

  def w():
    return jnp.asarray(eye + scale * rng.standard_normal((config.n_layers, f, f)) / np.sqrt(f), jnp.float32)

  def b():
    return jnp.asarray(scale * rng.standard_normal((config.n_layers, f)), jnp.float32)

  return ShareMaps(k_w=w(), k_b=b(), v_w=w(), v_b=b())


# ---- decoder through the cache ------------------------------------------------------------------------
class _Static:
  """A model as a static jit argument (hashed by identity)."""

  def __init__(self, model):
    self.config, self.params, self.dtype = model.config, model.params, model.dtype


def _apply(model, cache, tokens):
  return Llama(model.config, model.dtype).apply({"params": model.params}, tokens, cache)


_apply_jit = jax.jit(_apply, static_argnums=0)


def feed(model, cache, ids, chunks):
  logits, start = [], 0
  for c in chunks:
    out, cache = _apply_jit(model, cache, jnp.asarray(ids[:, start:start + c]))
    logits.append(np.asarray(out))
    start += c
  return np.concatenate(logits, axis=1), cache


IDS = np.random.default_rng(0).integers(0, 260, (1, 12)).astype(np.int32)


@pytest.mark.parametrize("group,calibrated,fixture", [
    (2, False, "tiny"), (3, False, "tiny_gqa"), (2, True, "tiny_gqa"), (3, True, "tiny")])
def test_logits_match_numpy_oracle(group, calibrated, fixture, request):
  model = request.getfixturevalue(fixture)
  cfg = model.config
  maps = random_maps(cfg, group) if calibrated else None
  spec = f"share:{group}" + (":cal" if calibrated else "")
  cache = kvjax.make_cache(spec, cfg, 1, 16, **({"maps": maps} if calibrated else {}))
  assert isinstance(cache, SharedCache) and cache.inner.n_layers == math.ceil(cfg.n_layers / group)
  before = [np.array(x) for x in jax.tree_util.tree_leaves(cache)]
  want = cla_forward(cfg, model.params, IDS[0], group, maps)
  chunked, after = feed(_Static(model), cache, IDS, [5, 1, 6])
  np.testing.assert_allclose(chunked[0], want, atol=1e-4, rtol=1e-4)
  for x, y in zip(before, jax.tree_util.tree_leaves(cache)):  # the input cache is untouched
    np.testing.assert_array_equal(x, np.asarray(y))
  np.testing.assert_array_equal(np.asarray(after.lengths), [12])  # advanced once per forward
  assert after.pending is None


def test_token_by_token_equals_chunked_and_identity_maps_equal_plain(tiny_gqa):
  model = _Static(tiny_gqa)
  cfg = tiny_gqa.config
  plain, _ = feed(model, kvjax.make_cache("share:2", cfg, 1, 16), IDS, [12])
  steps, _ = feed(model, kvjax.make_cache("share:2", cfg, 1, 16), IDS, [1] * 12)
  ident = ShareMaps.identity(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim)
  cal, _ = feed(model, kvjax.make_cache("share:2:cal", cfg, 1, 16, maps=ident), IDS, [12])
  np.testing.assert_allclose(steps, plain, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cal, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("kvjax.caches.window") is None, reason="window kind not built")
def test_generic_inner_kind_equals_full_inner(tiny):
  """share:2+window:N with N above the sequence: the follower path that replays the leader's attend."""
  model = _Static(tiny)
  cfg = tiny.config
  want, _ = feed(model, kvjax.make_cache("share:2", cfg, 1, 16), IDS, [12])
  cache = kvjax.make_cache("share:2+window:16", cfg, 1, 16)
  assert not isinstance(cache.inner, kvjax.FullCache)
  got, after = feed(model, cache, IDS, [5, 7])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert after.pending is None


def test_ragged_batch_rows_match_single_rows(tiny):
  cfg = tiny.config
  ids = np.random.default_rng(1).integers(0, 260, (2, 8)).astype(np.int32)
  nv = jnp.array([8, 3], jnp.int32)
  fn = jax.jit(lambda c, t, n: Llama(cfg, tiny.dtype).apply({"params": tiny.params}, t, c, n))
  got, _ = fn(kvjax.make_cache("share:2", cfg, 2, 16), jnp.asarray(ids), nv)
  for b, n in enumerate((8, 3)):
    want = cla_forward(cfg, tiny.params, ids[b, :n], 2)
    np.testing.assert_allclose(np.asarray(got)[b, :n], want, atol=1e-4, rtol=1e-4)


def test_generate_end_to_end(tiny):
  prompt = list(range(30, 45))
  out = kvjax.generate(tiny, [prompt], max_new_tokens=6, cache="share:2")
  assert out.tokens.shape == (1, 6) and ((out.tokens >= 0) & (out.tokens < 260)).all()
  want = cla_forward(tiny.config, tiny.params, np.array(prompt), 2)
  assert out.tokens[0, 0] == int(np.argmax(want[-1]))
  full = sum(kvjax.generate(tiny, [prompt], max_new_tokens=6, cache="full").cache_bytes.values())
  assert sum(out.cache_bytes.values()) * 2 <= full + 64  # half the layers (plus lengths)


# ---- storage: append / view / nbytes ---------------------------------------------------------------
LAYERS, B, K, H, CAP, GROUP = 5, 2, 2, 4, 8, 2  # 5 layers in groups of 2: leaders 0, 2, 4


def shared_cache(maps=None):
  inner = kvjax.FullCache.init(n_layers=math.ceil(LAYERS / GROUP), batch=B, kv_heads=K, head_dim=H,
                               capacity=CAP)
  return SharedCache.wrap(inner, group=GROUP, model_layers=LAYERS, maps=maps, rope=RoPE(H, 10000.0))


step_strategy = st.integers(1, 3).flatmap(
    lambda t: st.tuples(st.just(t), st.lists(st.integers(0, t), min_size=B, max_size=B)))


@given(steps=st.lists(step_strategy, min_size=1, max_size=4), seed=st.integers(0, 2**16))
@examples(15)
def test_append_writes_leaders_and_view_serves_followers(steps, seed):
  rng = np.random.default_rng(seed)
  eager = jitted = shared_cache()
  orc = oracle.FullCacheOracle(B, CAP)
  leaders = list(range(0, LAYERS, GROUP))
  for t, nv in steps:
    k = rng.standard_normal((LAYERS, B, K, t, H)).astype(np.float32)
    v = rng.standard_normal((LAYERS, B, K, t, H)).astype(np.float32)
    nv = np.array(nv, np.int32)
    if (orc.lengths() + nv > CAP).any():
      break
    orc.append(k[leaders], v[leaders], nv)
    before = [np.array(x) for x in jax.tree_util.tree_leaves(eager)] + [k.copy(), v.copy()]
    new = kvjax.append(eager, jnp.asarray(k), jnp.asarray(v), nv)
    for x, y in zip(before, jax.tree_util.tree_leaves(eager) + [k, v]):
      np.testing.assert_array_equal(x, np.asarray(y))
    eager = new
    jitted = jax.jit(kvjax.append)(jitted, jnp.asarray(k), jnp.asarray(v), jnp.asarray(nv))
    chex.assert_trees_all_equal(eager, jitted)
  view = kvjax.view(eager)
  keys, mask = np.asarray(view.keys), np.asarray(view.mask)
  assert keys.shape == (LAYERS, B, K, CAP, H)
  np.testing.assert_array_equal(np.asarray(eager.lengths), orc.lengths())
  for b in range(B):
    n = len(orc.rows[b])
    want_k, _ = orc.stored(b)
    for layer in range(LAYERS):
      if n:
        np.testing.assert_array_equal(keys[layer, b, :, :n], want_k[layer // GROUP])
      assert mask[layer, b, :, :n].all() and not mask[layer, b, :, n:].any()


def test_calibrated_view_maps_and_rotates():
  f = K * H
  maps = random_maps(kvjax.TINY.replace(n_layers=LAYERS, n_kv_heads=K, head_dim=H, n_heads=K), 3)
  cache = shared_cache(maps)
  rng = np.random.default_rng(4)
  k = rng.standard_normal((LAYERS, B, K, 5, H)).astype(np.float32)
  v = rng.standard_normal((LAYERS, B, K, 5, H)).astype(np.float32)
  view = kvjax.view(kvjax.append(cache, jnp.asarray(k), jnp.asarray(v)))
  for layer in (1, 2, 3):
    lead = layer - layer % GROUP
    lk = k[lead].transpose(0, 2, 1, 3).reshape(B, 5, f).astype(np.float64)  # [B, T, K*H]
    lv = v[lead].transpose(0, 2, 1, 3).reshape(B, 5, f).astype(np.float64)
    if layer != lead:
      lk = lk @ np.asarray(maps.k_w[layer], np.float64) + np.asarray(maps.k_b[layer], np.float64)
      lv = lv @ np.asarray(maps.v_w[layer], np.float64) + np.asarray(maps.v_b[layer], np.float64)
    want_k = oracle.rope(lk.reshape(B, 5, K, H), np.arange(5), 10000.0).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(view.keys[layer, :, :, :5]), want_k, atol=1e-5)
    np.testing.assert_allclose(np.asarray(view.values[layer, :, :, :5]),
                               lv.reshape(B, 5, K, H).transpose(0, 2, 1, 3), atol=1e-5)


def test_donating_a_cache_keeps_the_callers_maps():
  """generate donates its cache: the maps given to make_cache must survive that, and be reusable."""
  cfg = kvjax.TINY
  maps = ShareMaps.identity(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim)
  leaves = jax.tree_util.tree_leaves(maps)
  assert len({id(x) for x in leaves}) == len({x.unsafe_buffer_pointer() for x in leaves}) == 4
  donate = jax.jit(lambda c: c.reset(), donate_argnums=0)
  for _ in range(2):
    donate(kvjax.make_cache("share:2:cal", cfg, 1, 16, maps=maps))
  assert not any(x.is_deleted() for x in leaves)


def test_memory_is_ceil_layers_over_group(tiny):
  cfg = tiny.config
  full = sum(kvjax.make_cache("full", cfg, 2, 64).nbytes().values())
  per_layer = 2 * 2 * cfg.n_kv_heads * 64 * cfg.head_dim * 4
  for group in (2, 3, 4):
    shared = kvjax.make_cache(f"share:{group}", cfg, 2, 64)
    assert sum(shared.nbytes().values()) == math.ceil(cfg.n_layers / group) * per_layer + 8
  assert full == cfg.n_layers * per_layer + 8
  maps = ShareMaps.identity(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim)
  cal = kvjax.make_cache("share:2:cal", cfg, 2, 64, maps=maps)
  maps_bytes = 2 * cfg.n_layers * (256 * 256 + 256) * 4
  assert cal.kv_nbytes() == kvjax.make_cache("share:2", cfg, 2, 64).nbytes()
  assert cal.maps_nbytes() == maps_bytes
  assert sum(cal.nbytes().values()) == sum(cal.kv_nbytes().values()) + maps_bytes
  from kvjax.planning import estimate_bytes
  assert estimate_bytes("share:2:cal", cfg, 64, 2) == sum(cal.nbytes().values())


def test_refusals(tiny):
  cfg = tiny.config
  with pytest.raises(kvjax.SpecError, match="share:1:cal shares nothing"):
    kvjax.parse_spec("share:1:cal")
  with pytest.raises(ValueError, match="group must be an int >= 2"):
    SharedCache.wrap(kvjax.make_cache("full", cfg, 1, 16), group=1, model_layers=4)
  with pytest.raises(kvjax.SpecError, match="needs calibration maps.*fit_share_maps"):
    kvjax.make_cache("share:2:cal", cfg, 1, 16)
  with pytest.raises(kvjax.SpecError, match="takes no maps"):
    kvjax.make_cache("share:2", cfg, 1, 16, maps=ShareMaps.identity(4, 256))
  with pytest.raises(ValueError, match="share maps must have"):
    kvjax.make_cache("share:2:cal", cfg, 1, 16, maps=ShareMaps.identity(4, 128))
  with pytest.raises(ValueError, match="inner layers"):
    SharedCache.wrap(kvjax.make_cache("full", cfg, 1, 16), group=2, model_layers=4)


# ---- calibration ---------------------------------------------------------------------------------------
def test_collect_kv_matches_oracle_projections(tiny_gqa):
  cfg = tiny_gqa.config
  ids = np.random.default_rng(5).integers(0, 260, 20).astype(np.int32)
  k, v = calibrate.collect_kv(tiny_gqa, ids, window=10)
  assert k.shape == (cfg.n_layers, 20, cfg.n_kv_heads * cfg.head_dim)
  p = oracle._to_numpy(tiny_gqa.params)
  for row in range(2):  # each window starts again at position 0
    toks = ids[row * 10:(row + 1) * 10]
    x = p["embed"]["embedding"][toks]
    pos = np.arange(10)
    for i in range(cfg.n_layers):
      lp = p[f"layers_{i}"]
      hn = oracle.rmsnorm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
      np.testing.assert_allclose(k[i, row * 10:(row + 1) * 10], hn @ lp["attn"]["wk"], atol=1e-4)
      np.testing.assert_allclose(v[i, row * 10:(row + 1) * 10], hn @ lp["attn"]["wv"], atol=1e-4)
      q = (hn @ lp["attn"]["wq"]).reshape(10, cfg.n_heads, cfg.head_dim)
      kk = (hn @ lp["attn"]["wk"]).reshape(10, cfg.n_kv_heads, cfg.head_dim)
      vv = (hn @ lp["attn"]["wv"]).reshape(10, cfg.n_kv_heads, cfg.head_dim)
      att = oracle.attention(oracle.rope(q, pos, cfg.rope_theta), oracle.rope(kk, pos, cfg.rope_theta), vv,
                             pos[:, None] >= pos[None, :])
      x = x + att.reshape(10, -1) @ lp["attn"]["wo"]
      hn = oracle.rmsnorm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
      x = x + (oracle.silu(hn @ lp["mlp"]["w_gate"]) * (hn @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]


@given(n_in=st.integers(1, 6), n_out=st.integers(1, 6), seed=st.integers(0, 2**16))
@examples(20)
def test_fit_affine_recovers_exact_maps(n_in, n_out, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((40, n_in))
  w, b = rng.standard_normal((n_in, n_out)), rng.standard_normal(n_out)
  got_w, got_b = calibrate.fit_affine(x, x @ w + b)
  np.testing.assert_allclose(got_w, w, atol=1e-8)
  np.testing.assert_allclose(got_b, b, atol=1e-8)
  ridge_w, _ = calibrate.fit_affine(x, x @ w + b, ridge=1e3)
  assert np.linalg.norm(ridge_w) < np.linalg.norm(w)  # ridge shrinks the weights


def test_fit_share_maps_beats_identity_on_calibration_data(tiny_gqa):
  ids = np.random.default_rng(6).integers(0, 260, 96).astype(np.int32)
  kv = calibrate.collect_kv(tiny_gqa, ids, window=32)
  maps = calibrate.fit_share_maps(tiny_gqa, ids, 2, kv=kv)
  k, v = kv
  f = k.shape[-1]
  np.testing.assert_array_equal(np.asarray(maps.k_w[0]), np.eye(f))  # leaders keep the identity
  for layer in (1, 3):
    for x, w, bias in ((k, maps.k_w, maps.k_b), (v, maps.v_w, maps.v_b)):
      fitted = np.mean((x[layer - 1] @ np.asarray(w[layer]) + np.asarray(bias[layer]) - x[layer]) ** 2)
      assert fitted <= np.mean((x[layer - 1] - x[layer]) ** 2) + 1e-7
  with pytest.raises(ValueError, match="group must be an int >= 2"):
    calibrate.fit_share_maps(tiny_gqa, ids, 1, kv=kv)


@pytest.mark.slow
def test_smollm2_shared_generates_sane_tokens(smollm2):
  model = smollm2
  out = kvjax.generate(model, "The capital of France is", max_new_tokens=6, cache="share:2")
  assert ((out.tokens >= 0) & (out.tokens < model.config.vocab_size)).all()
  full = kvjax.make_cache("full", model.config, 1, 64)
  assert sum(out.cache_bytes.values()) < sum(full.nbytes().values())


def test_supports_asks_the_inner_cache():
  """`kvjax.supports` answers for what a wrapper wraps: share:2 over a tiered cache cannot crop
  (tiers cannot), over a full cache it can; a LayeredCache only if every layer can."""
  make = lambda spec: kvjax.make_cache(spec, kvjax.TINY, 1, 16)
  assert kvjax.supports(make("share:2"), "crop") and kvjax.supports(make("share:2"), "reorder")
  tiered = make("share:2+tier:4:fp32,8:int8")
  assert not kvjax.supports(tiered, "crop") and kvjax.supports(tiered, "reorder")
  one = dataclasses.replace(kvjax.TINY, n_layers=1)
  layered = lambda spec: kvjax.LayeredCache.of([kvjax.make_cache(spec, one, 1, 16)] * 2)
  assert kvjax.supports(layered("window:8"), "crop")
  assert not kvjax.supports(layered("tier:4:fp32,8:int8"), "crop")
  assert kvjax.supports(layered("tier:4:fp32,8:int8"), "reorder")
