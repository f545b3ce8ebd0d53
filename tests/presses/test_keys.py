"""The key/value presses (kvjax/presses/keys.py) against small NumPy oracles (fast lane).

Synthetic `LayerInputs` hold three ragged rows (40, 27 and 9 real tokens, right-padded): each
press's scores at a row's real positions must equal its NumPy oracle run on that row alone, so
padding never leaks into a row's statistics. One compress on the tiny model checks ThinK's
`prune_keys` end to end (the cache stores keys with the pruned channels zeroed, every token kept).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kvjax import presses
from kvjax.caches.terms import SpecError
from kvjax.presses.keys import (CURPress, KeyDiffPress, LagKVPress, LeverageScorePress,
                                RandomPress, ThinKPress)

B, T, K, G, H = 3, 40, 2, 2, 8
N_VALID = (40, 27, 9)


@pytest.fixture(scope="module")
def x():
  """LayerInputs of 3 ragged rows; padding holds large garbage (it must never matter)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q, q_raw = normal(B, T, K * G, H), normal(B, T, K * G, H)
  k, k_raw, v = normal(B, K, T, H) + 0.5, normal(B, K, T, H), normal(B, K, T, H)
  for b, n in enumerate(N_VALID):
    for a in (k, k_raw, v):
      a[b, :, n:] = 1e3
    for a in (q, q_raw):
      a[b, n:] = 1e3
  return presses.LayerInputs(q=jnp.asarray(q), q_raw=jnp.asarray(q_raw), k=jnp.asarray(k),
                             k_raw=jnp.asarray(k_raw), v=jnp.asarray(v),
                             n_valid=jnp.asarray(N_VALID, jnp.int32), layer=1, n_layers=2,
                             scale=H**-0.5)


def rows(x):
  """Per row alone: (n, q [n, N, H], k [K, n, H], k_raw, v) as float64 NumPy."""
  for b, n in enumerate(N_VALID):
    f = lambda a: np.asarray(a[b], np.float64)
    yield n, f(x.q)[:n], f(x.k)[:, :n], f(x.k_raw)[:, :n], f(x.v)[:, :n]


def check_rows(press, x, oracle, rtol=1e-5):
  """press.score on the ragged batch equals oracle(row) at every row's real positions."""
  got = np.asarray(jax.jit(press.score)(x, jnp.asarray(N_VALID, jnp.int32)))
  assert got.shape == (B, K, T) and np.isfinite(got).all()
  for b, row in enumerate(rows(x)):
    n = row[0]
    np.testing.assert_allclose(got[b, :, :n], oracle(*row), rtol=rtol, atol=rtol,
                               err_msg=f"{press} row {b} ({n} tokens)")


# ---- NumPy oracles (one row: k, v [K, n, H]) -------------------------------------------------
def keydiff_np(n, q, k, k_raw, v):
  unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
  anchor = unit.mean(axis=1, keepdims=True)
  return -np.sum(unit * anchor, axis=-1) / np.linalg.norm(anchor, axis=-1)


def lagkv_np(n, q, k, k_raw, v, *, sink, lag, cross):
  s = np.ones((K, n))
  if n < sink + 2 * lag:  # too short: sinks, then a ramp up to the last token
    s[:, sink:] = np.arange(max(0, n - sink)) / max(1, n - sink)
    return s
  parts = (n - sink) // lag

  def spread(x):
    out = np.zeros((K, parts - 1, lag))
    for p in range(parts - 1):
      part = x[:, sink + p * lag:sink + (p + 1) * lag]
      ref = x[:, sink + (p + 1) * lag:sink + (p + 2) * lag]
      low, high = ref.min(axis=1, keepdims=True), ref.max(axis=1, keepdims=True)
      std = ((part - low) / (high - low)).std(axis=-1, ddof=1)
      e = np.exp(std - std.max(axis=-1, keepdims=True))
      out[:, p] = e / e.sum(axis=-1, keepdims=True)
    return out

  both = (spread(k) + spread(v)) / 2
  if not cross:
    both = both.argsort(axis=-1).argsort(axis=-1) / lag
  s[:, sink:sink + (parts - 1) * lag] = both.reshape(K, -1)
  return s


def cur_np(n, q, k, k_raw, v, *, sinks, kind, window):
  k2, v2 = np.sum(k**2, axis=-1), np.sum(v**2, axis=-1)
  if window:
    for a in (k2, v2):
      for start in range(0, n, window):
        a[:, start:start + window] /= a[:, start:start + window].sum(axis=-1, keepdims=True)
  s = {"kv_product": k2 * v2, "kv_avg": (k2 + v2) / 2, "key": k2, "value": v2}[kind]
  s = s / s.sum(axis=-1, keepdims=True)
  s[:, :sinks] = 1.0
  return s


def leverage_np(n, q, k, k_raw, v, *, sketch):
  lev = np.zeros((K, n))
  for h in range(K):
    xs = (k_raw[h] - k_raw[h].mean(axis=0)) @ sketch[h]  # [n, S]
    gram = xs.T @ xs + 1e-2 * np.eye(xs.shape[1])
    lev[h] = np.maximum(np.sum(xs * np.linalg.solve(gram, xs.T).T, axis=-1), 0)
  return (lev - lev.mean()) / lev.std(ddof=1)


def think_channels_np(n, q, k, window):
  q2 = (q[-window:] ** 2).mean(axis=0)  # [N, H]
  return q2.reshape(K, G, H).mean(axis=1) * (k**2).mean(axis=1)


# ---- scores against the oracles ------------------------------------------------------------------
def test_keydiff(x):
  check_rows(KeyDiffPress(), x, keydiff_np)


@pytest.mark.parametrize("cross", [False, True])
def test_lagkv(x, cross):
  # rows of 40 and 27 have 9 and 6 partitions of 4 after 2 sinks; 9 < 2 + 2 * 4 takes the ramp
  press = LagKVPress(n_sink=2, lag_size=4, cross_scoring=cross)
  check_rows(press, x, lambda *r: lagkv_np(*r, sink=2, lag=4, cross=cross))


def test_lagkv_short_prompts_keep_sinks_and_recent(x):
  check_rows(LagKVPress(), x, lambda *r: lagkv_np(*r, sink=4, lag=128, cross=False))


@pytest.mark.parametrize("kind, window", [("kv_product", 16), ("kv_avg", 16), ("key", 0),
                                          ("value", 5)])
def test_cur(x, kind, window):
  press = CURPress(leverage_type=kind, use_local_approximation=window > 0,
                   local_window_size=max(window, 1))
  check_rows(press, x, lambda *r: cur_np(*r, sinks=4, kind=kind, window=window))


def test_leverage(x):
  press = LeverageScorePress(sketch_dimension=6, seed=3)
  sketch = np.asarray(press.sketch(x.layer, K, H), np.float64)
  check_rows(press, x, lambda *r: leverage_np(*r, sketch=sketch), rtol=1e-3)


def test_leverage_sketch_is_seeded_per_layer():
  press = LeverageScorePress(seed=1)
  a = np.asarray(press.sketch(0, K, H))
  assert a.shape == (K, H, 48)
  np.testing.assert_array_equal(a, np.asarray(press.sketch(0, K, H)))
  assert not np.allclose(a, np.asarray(press.sketch(1, K, H)))
  assert not np.allclose(a, np.asarray(LeverageScorePress(seed=2).sketch(0, K, H)))


def test_random_is_seeded_and_independent_of_the_batch(x):
  n_kept = jnp.asarray(N_VALID, jnp.int32)
  s = np.asarray(RandomPress(seed=5).score(x, n_kept))
  assert s.shape == (B, K, T) and (s >= 0).all() and (s < 1).all()
  np.testing.assert_array_equal(s, np.asarray(RandomPress(seed=5).score(x, n_kept)))
  np.testing.assert_array_equal(s[0], s[1])  # a position draws the same in every row
  assert not np.allclose(s[0, 0], s[0, 1])  # heads differ
  assert not np.allclose(s, np.asarray(RandomPress(seed=6).score(x, n_kept)))
  other_layer = x.replace(layer=0)
  assert not np.allclose(s, np.asarray(RandomPress(seed=5).score(other_layer, n_kept)))
  short = presses.LayerInputs(q=x.q[:1, :9], q_raw=x.q_raw[:1, :9], k=x.k[:1, :, :9],
                              k_raw=x.k_raw[:1, :, :9], v=x.v[:1, :, :9],
                              n_valid=jnp.asarray([9], jnp.int32), layer=1)
  np.testing.assert_array_equal(np.asarray(RandomPress(seed=5).score(short, n_kept[:1]))[0],
                                s[2, :, :9])  # shorter batches draw the same prefix


# ---- ThinK -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_think_prunes_the_lowest_channels(x, ratio):
  press = ThinKPress(key_channel_compression_ratio=ratio, window_size=16)
  scores = np.asarray(press.channel_scores(x))
  pruned = np.asarray(press.pruned_channels(x))
  keys = np.asarray(press.prune_keys(x))
  n_pruned = int(H * ratio)
  for b, (n, q, k, _, _) in enumerate(rows(x)):  # row 2 (9 tokens) is shorter than the window
    want = think_channels_np(n, q, k, 16)
    np.testing.assert_allclose(scores[b], want, rtol=1e-5)
    lowest = np.argsort(want, axis=-1)[:, :n_pruned]
    assert (pruned[b].sum(axis=-1) == n_pruned).all()
    assert np.take_along_axis(pruned[b], lowest, axis=-1).all()
    np.testing.assert_array_equal(keys[b], np.where(pruned[b][:, None, :], 0, x.k[b]))


def test_think_keeps_every_token_and_refuses_a_token_budget(x):
  press = ThinKPress()
  n_kept = jnp.asarray(N_VALID, jnp.int32)
  kept = np.asarray(press.select(x, press.score(x, n_kept), n_kept))
  np.testing.assert_array_equal(kept, np.broadcast_to(np.asarray(x.valid)[:, None], kept.shape))
  assert press.layer_kept(40, 40, 0, 2, 0.0) == 40
  with pytest.raises(SpecError, match="ratio=0"):
    press.layer_kept(20, 40, 0, 2, 0.5)


def test_think_compress_zeroes_channels_in_the_cache(tiny):
  ids = [list(range(5, 45)), list(range(50, 73))]
  cache = presses.compress(tiny, ids, "think", ratio=0.0, key_channel_compression_ratio=0.5,
                           room=4)
  view = cache.view()
  mask, keys = np.asarray(view.mask), np.asarray(view.keys)  # [L, B, K, S], [L, B, K, S, H]
  head_dim = keys.shape[-1]
  for b, row in enumerate(ids):
    assert (mask[:, b].sum(axis=-1) == len(row)).all()  # every token kept
    live = np.where(mask[:, b, :, :, None], np.abs(keys[:, b]), 0).sum(axis=2)  # [L, K, H]
    assert ((live == 0).sum(axis=-1) == head_dim // 2).all()
  with pytest.raises(SpecError, match="keeps every token"):
    presses.compress(tiny, ids, "think", ratio=0.5)


# ---- options and specs -----------------------------------------------------------------------
def test_specs_and_kvpress_defaults():
  assert presses.make_press("lagkv(lag_size=32)") == LagKVPress(lag_size=32)
  assert presses.make_press("cur(leverage_type='key')") == CURPress(leverage_type="key")
  think = presses.make_press("think")
  assert think.option("key_channel_compression_ratio", 0.5) == 0.5
  assert think.resolve("kvpress").key_channel_compression_ratio == 0.0
  for name in ("keydiff", "lagkv", "cur", "random", "leverage", "think"):
    cls = presses.press_class(name)
    assert cls.doc and cls.__doc__


@pytest.mark.parametrize("bad, match", [
    ("cur(use_random_leverage=True)", "use_random_leverage"),
    ("cur(leverage_type='both')", "leverage_type"),
    ("lagkv(lag_size=0)", "lag_size"),
    ("think(key_channel_compression_ratio=1.5)", "key_channel_compression_ratio"),
    ("leverage(sketch_dimension=0)", "sketch_dimension"),
])
def test_bad_options_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    presses.make_press(bad)
