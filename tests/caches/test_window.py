"""Sliding-window / attention-sink cache (kvjax/caches/window.py): its policy against NumPy oracles.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
`window:6` and `sink:2+window:6` (held tokens are what was appended at their positions, positions /
mask / lengths / filled, padding ignored, rows independent, inputs not mutated, jit equals eager,
chunk-exact, attention over what is held and a Llama forward vs NumPy while the stream fits, never
overflows, never holds more than its budget, reset / crop / reorder, nbytes).

What is special to the window, checked here:
  * storage: after any sequence of ragged appends (`slide` and `kvjax.append`), each row holds
    exactly its first S and last N tokens, in the slots the layout prescribes, and `view()` names
    them (mask, positions); `slide` equals `kvjax.append`, jitted or not, and mutates nothing past
    the budget (the kit's jit / mutation streams stay within it); static facts, crop / reorder
    layouts;
  * attention: `attend` over any chunk (one block or several) equals a float64 oracle that
    rebuilds, for every query, the StreamingLLM picture (sinks at cache positions 0..S-1, window
    right before the query);
  * bounded RoPE: a row 20,000 tokens in attends exactly like a row that has just filled its cache;
  * model level (tiny): chunked prefill == token-by-token decode; a window longer than the sequence
    == the full cache; jit == no-jit; ragged batches; constant-memory streaming `generate` with one
    decode compile;
  * SmolLM2 (slow): perplexity with sinks is finite and near full; window-only is finite.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.attention import RoPE
from kvjax.caches.window import WindowCache, slide
from kvjax.models.llama import Llama
from kvjax.testing import oracle
from tests.helpers import SETTINGS

THETA = 10000.0


# ---------------------------------------------------------------------------------------------
# Oracle: a plain list per row that keeps the first S tokens and the last N
# ---------------------------------------------------------------------------------------------
class WindowOracle:
  """What a window cache must hold: per row, {position: (k [L, K, H], v)} of the kept tokens."""

  def __init__(self, batch: int, sink: int, window: int):
    self.sink, self.window = sink, window
    self.rows = [[] for _ in range(batch)]  # every token ever appended, in order

  def append(self, k, v, n_valid):
    """k, v [L, B, K, T, H]; n_valid [B]."""
    for b, row in enumerate(self.rows):
      for t in range(int(n_valid[b])):
        row.append((k[:, b, :, t], v[:, b, :, t]))

  def lengths(self):
    return np.array([len(r) for r in self.rows])

  def held(self, b: int) -> dict:
    row = self.rows[b]
    keep = set(range(min(self.sink, len(row)))) | set(range(max(0, len(row) - self.window), len(row)))
    return {p: row[p] for p in sorted(keep)}


jit_view = jax.jit(lambda cache: cache.view())


def check_against_oracle(cache: WindowCache, orc: WindowOracle):
  np.testing.assert_array_equal(np.asarray(cache.lengths), orc.lengths())
  view = jax.tree_util.tree_map(np.asarray, jit_view(cache))
  keys, values = view.keys, view.values
  mask, positions = np.asarray(view.mask), np.asarray(view.positions)
  s, n = orc.sink, orc.window
  assert keys.shape[3] == s + n == cache.capacity
  # Positions and mask are the same for every layer and kv head.
  assert (mask == mask[:1, :, :1]).all() and (positions == positions[:1, :, :1]).all()
  for b in range(cache.batch):
    held = orc.held(b)
    pos_b = positions[0, b, 0]
    live = mask[0, b, 0]
    np.testing.assert_array_equal(live, pos_b >= 0)
    assert sorted(pos_b[live].tolist()) == sorted(held), (b, pos_b, sorted(held))
    assert live.sum() == len(held)
    for slot in np.flatnonzero(live):
      p = int(pos_b[slot])
      expected_slot = p if p < s else s + (p - s) % n
      assert slot == expected_slot, (b, p, slot)
      np.testing.assert_array_equal(keys[:, b, :, slot], held[p][0])
      np.testing.assert_array_equal(values[:, b, :, slot], held[p][1])
    # Sinks always present (once seen); the window is exactly the last N.
    length = len(orc.rows[b])
    assert set(range(min(s, length))) <= set(pos_b[live].tolist())
    assert set(range(max(0, length - n), length)) <= set(pos_b[live].tolist())


def empty_cache(batch, sink, window, *, layers=2, kv_heads=2, head_dim=4, dtype=jnp.float32, block=256):
  return WindowCache.init(n_layers=layers, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                          window=window, sink=sink, dtype=dtype, block=block)


BATCH, CHUNK = 3, 8  # fixed shapes keep the jitted helpers to one compile per (sink, window)


@st.composite
def append_sequences(draw):
  """(sink, window, [(tokens, n_valid [B])...], seed): ragged appends of up to CHUNK tokens,
  always given as CHUNK-token arrays so the tail doubles as padding that must not land."""
  sink = draw(st.sampled_from([0, 1, 3]))
  window = draw(st.sampled_from([1, 2, 5]))
  steps = []
  for _ in range(draw(st.integers(1, 6))):
    t = draw(st.integers(1, CHUNK))
    steps.append(draw(st.lists(st.integers(0, t), min_size=BATCH, max_size=BATCH)))
  return sink, window, steps, draw(st.integers(0, 2**31 - 1))


jit_slide = jax.jit(slide)
jit_append = jax.jit(kvjax.append)


def feed(cache, orc, steps, rng, *, how="slide", layers=2, kv_heads=2, head_dim=4, check=False):
  for n_valid in steps:
    k = rng.standard_normal((layers, BATCH, kv_heads, CHUNK, head_dim)).astype(np.float32)
    v = rng.standard_normal((layers, BATCH, kv_heads, CHUNK, head_dim)).astype(np.float32)
    nv = np.asarray(n_valid, np.int32)
    fn = jit_slide if how == "slide" else jit_append
    cache = fn(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(nv))
    orc.append(k, v, nv)
    if check:
      check_against_oracle(cache, orc)
  return cache


# ---------------------------------------------------------------------------------------------
# The kit's generic invariants
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["window:6", pytest.param("sink:2+window:6", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec)


# ---------------------------------------------------------------------------------------------
# Storage: which tokens are kept, and where
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(append_sequences(), st.sampled_from(["slide", "append"]))
def test_ring_matches_oracle(case, how):
  sink, window, steps, seed = case
  orc = WindowOracle(BATCH, sink, window)
  feed(empty_cache(BATCH, sink, window), orc, steps, np.random.default_rng(seed), how=how, check=True)


def test_slide_equals_append_and_jit_equals_eager():
  rng = np.random.default_rng(0)
  cache = empty_cache(2, 2, 3)
  jitted = jax.jit(slide)
  a = b = c = cache
  for t, nv in ((4, [4, 1]), (6, [2, 6]), (1, [1, 0]), (9, [9, 3])):
    k = jnp.asarray(rng.standard_normal((2, 2, 2, t, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 2, 2, t, 4)), jnp.float32)
    nv = jnp.asarray(nv, jnp.int32)
    a, b, c = slide(a, k, v, nv), kvjax.append(b, k, v, nv), jitted(c, k, v, nv)
  for x, y in ((a, b), (a, c)):
    for f in ("k", "v", "pos", "lengths"):
      np.testing.assert_array_equal(np.asarray(getattr(x, f)), np.asarray(getattr(y, f)))


def test_nothing_mutated():
  """Past the budget (the kit's streams stay within it), and crop / reorder / reset too."""
  rng = np.random.default_rng(1)
  cache = slide(empty_cache(2, 1, 3), jnp.asarray(rng.standard_normal((2, 2, 2, 5, 4)), jnp.float32),
                jnp.asarray(rng.standard_normal((2, 2, 2, 5, 4)), jnp.float32))
  snapshot = jax.tree_util.tree_map(np.array, cache)
  k = jnp.asarray(rng.standard_normal((2, 2, 2, 4, 4)), jnp.float32)
  k_copy = np.array(k)
  q = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
  q_copy = np.array(q)
  slide(cache, k, k, jnp.array([4, 2]))
  cache.attend(0, q, k[0].transpose(0, 2, 1, 3), k[0].transpose(0, 2, 1, 3), jnp.array([4, 2]), rope=RoPE(4))
  cache.crop(2), cache.reorder(jnp.array([1, 0])), cache.reset()
  for f in ("k", "v", "pos", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(cache, f)), getattr(snapshot, f))
  np.testing.assert_array_equal(np.asarray(k), k_copy)
  np.testing.assert_array_equal(np.asarray(q), q_copy)


def test_static_facts_reset_crop_reorder():
  cache = empty_cache(2, 2, 4)
  assert cache.capacity == 6 and cache.limited is False and cache.fits(10**9)
  assert bool(jax.jit(lambda c: c.has_room(10**6))(cache))
  with pytest.raises(NotImplementedError, match="never grows"):
    cache.grow(12)
  k = jnp.arange(2 * 2 * 2 * 9 * 4, dtype=jnp.float32).reshape(2, 2, 2, 9, 4)
  cache = slide(cache, k, k, jnp.array([9, 3]))
  assert np.asarray(cache.pos).tolist() == [[0, 1, 6, 7, 8, 5], [0, 1, 2, -1, -1, -1]]
  assert np.asarray(cache.filled()).tolist() == [6, 3]
  assert not np.asarray(cache.overflowed()).any()
  cropped = cache.crop(7)
  assert np.asarray(cropped.pos).tolist() == [[0, 1, 6, -1, -1, 5], [0, 1, 2, -1, -1, -1]]
  assert np.asarray(cropped.lengths).tolist() == [7, 3]
  swapped = cache.reorder(jnp.array([1, 0]))
  np.testing.assert_array_equal(np.asarray(swapped.k[:, 0]), np.asarray(cache.k[:, 1]))
  assert np.asarray(swapped.pos).tolist()[0] == [0, 1, 2, -1, -1, -1]
  empty = cache.reset()
  assert not np.asarray(empty.view().mask).any() and np.asarray(empty.lengths).tolist() == [0, 0]
  assert sum(cache.nbytes().values()) == sum(empty.nbytes().values())


def test_spec_errors_and_from_spec():
  cfg = kvjax.TINY
  cache = kvjax.make_cache("sink:4+window:32", cfg, 2, 64)
  assert isinstance(cache, WindowCache) and (cache.sink, cache.window, cache.capacity) == (4, 32, 36)
  assert cache.k.shape == (cfg.n_layers, 2, cfg.n_kv_heads, 36, cfg.head_dim)
  assert isinstance(kvjax.make_cache("window:8", cfg, 1, 8), WindowCache)
  with pytest.raises(kvjax.SpecError, match="int8"):
    kvjax.make_cache("int8+window:32", cfg, 1, 64)
  with pytest.raises(NotImplementedError):
    kvjax.make_cache("int4+sink:2+window:32", cfg, 1, 64)
  with pytest.raises(TypeError, match="WindowCache"):
    slide(kvjax.make_cache("full", cfg, 1, 16), jnp.zeros((4, 1, 4, 1, 64)), jnp.zeros((4, 1, 4, 1, 64)))


# ---------------------------------------------------------------------------------------------
# Attention against the StreamingLLM definition
# ---------------------------------------------------------------------------------------------
def oracle_outputs(orc: WindowOracle, b, layer, q, k_new, v_new, n_valid):
  """Float64 outputs [n_valid, N, H] of row b: each query sees sinks + (p - N, p] at cache
  positions (sinks 0..S-1, the window ending at the query's own cache position min(p, S+N-1))."""
  s, n = orc.sink, orc.window
  start = len(orc.rows[b])
  tokens = {p: (kv[0][layer], kv[1][layer]) for p, kv in orc.held(b).items()}
  outs = []
  for t in range(n_valid):
    p = start + t
    tokens[p] = (k_new[t], v_new[t])
    visible = [j for j in sorted(tokens) if j <= p and (j < s or j > p - n)]
    here = min(p, s + n - 1)
    cache_pos = np.array([j if j < s else here - (p - j) for j in visible])
    assert (cache_pos >= 0).all() and len(set(cache_pos.tolist())) == len(visible)
    keys = oracle.rope(np.stack([tokens[j][0] for j in visible]).astype(np.float64), cache_pos, THETA)
    vals = np.stack([tokens[j][1] for j in visible]).astype(np.float64)
    qr = oracle.rope(q[t][None].astype(np.float64), np.array([here]), THETA)
    outs.append(oracle.attention(qr, keys, vals, np.ones((1, len(visible)), bool))[0])
  return np.stack(outs) if outs else np.zeros((0,) + q.shape[1:])


ATTEND_T = 10
jit_attend = jax.jit(lambda cache, q, k, v, nv: cache.attend(1, q, k, v, nv, rope=RoPE(8, THETA)))


@SETTINGS
@given(append_sequences(), st.lists(st.integers(0, ATTEND_T), min_size=BATCH, max_size=BATCH),
       st.sampled_from([256, 3]))
def test_attend_matches_oracle(case, n_valid, block):
  sink, window, steps, seed = case
  rng = np.random.default_rng(seed)
  layers, kv_heads, heads, hd, t, layer = 2, 2, 4, 8, ATTEND_T, 1
  orc = WindowOracle(BATCH, sink, window)
  cache = feed(empty_cache(BATCH, sink, window, layers=layers, kv_heads=kv_heads, head_dim=hd,
                           block=block), orc, steps, rng, layers=layers, kv_heads=kv_heads, head_dim=hd)
  q = rng.standard_normal((BATCH, t, heads, hd)).astype(np.float32)
  k = rng.standard_normal((BATCH, t, kv_heads, hd)).astype(np.float32)
  v = rng.standard_normal((BATCH, t, kv_heads, hd)).astype(np.float32)
  n_valid = np.asarray(n_valid, np.int32)
  out, new = jit_attend(cache, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(n_valid))
  out = np.asarray(out)
  for b in range(BATCH):
    want = oracle_outputs(orc, b, layer, q[b], k[b], v[b], int(n_valid[b]))
    np.testing.assert_allclose(out[b, : n_valid[b]], want, atol=2e-5, rtol=1e-4)
  # attend stored the survivors for this layer; after advance the layer matches the oracle.
  new = new.advance(jnp.asarray(n_valid))
  kt, vt = k.transpose(0, 2, 1, 3)[None], v.transpose(0, 2, 1, 3)[None]  # [1, B, K, T, H]
  orc.append(np.repeat(kt, layers, axis=0), np.repeat(vt, layers, axis=0), n_valid)
  np.testing.assert_array_equal(np.asarray(new.lengths), orc.lengths())
  for b in range(BATCH):
    held = orc.held(b)
    pos_b = np.asarray(new.pos[b])
    assert sorted(pos_b[pos_b >= 0].tolist()) == sorted(held)
    for slot in np.flatnonzero(pos_b >= 0):
      np.testing.assert_array_equal(np.asarray(new.k[layer, b, :, slot]), held[int(pos_b[slot])][0][layer])


@pytest.mark.slow  # ~15 s: eager attends over several shapes
def test_slack_attends_like_no_slack_and_survives_a_crop():
  """slack=3 keeps 3 more ring slots: every chunk and decode step attends exactly as slack=0 (the
  window mask hides the extra keys), and after writing 4 tokens and cropping 3 the next step
  still sees a full window (slack 0 lost the tokens the cropped ones evicted)."""
  rng = np.random.default_rng(11)
  sink, window, hd, heads, kv = 2, 6, 8, 4, 2
  rope = RoPE(hd, THETA)
  mk = lambda slack: WindowCache.init(n_layers=1, batch=2, kv_heads=kv, head_dim=hd, window=window,
                                      sink=sink, slack=slack)
  plain, slacked, exact = mk(0), mk(3), mk(0)
  assert slacked.capacity == sink + window + 3 and slacked.ring == window + 3

  def step(cache, t, x, nv):
    q, k, v = x
    out, cache = cache.attend(0, q[:, :t], k[:, :t], v[:, :t], jnp.asarray(nv), rope=rope)
    return np.asarray(out), cache.advance(jnp.asarray(nv))

  draw = lambda t: tuple(jnp.asarray(rng.standard_normal((2, t, h, hd)).astype(np.float32))
                         for h in (heads, kv, kv))
  for t, nv in [(9, [9, 5]), (1, [1, 1]), (4, [4, 0]), (1, [1, 1]), (1, [0, 1])]:
    x = draw(t)
    o1, plain = step(plain, t, x, nv)
    o2, slacked = step(slacked, t, x, nv)
    _, exact = step(exact, t, x, nv)
    np.testing.assert_allclose(o2, o1, atol=1e-5)
  # Speculative verification: 4 tokens in, 3 cropped; the next step must equal a cache that only
  # ever saw the kept token.
  lengths = np.asarray(slacked.lengths)
  x4 = draw(4)
  _, slacked = step(slacked, 4, x4, [4, 4])
  _, plain = step(plain, 4, x4, [4, 4])
  slacked, plain = slacked.crop(jnp.asarray(lengths + 1)), plain.crop(jnp.asarray(lengths + 1))
  _, exact = step(exact, 1, tuple(a[:, :1] for a in x4), [1, 1])
  x = draw(1)
  want, _ = step(exact, 1, x, [1, 1])
  got, _ = step(slacked, 1, x, [1, 1])
  lossy, _ = step(plain, 1, x, [1, 1])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(lossy, want, atol=1e-3)  # why the slack is there


def test_absolute_rings_attend_like_cache_positions():
  """absolute=True (sink 0; what a model's own sliding layers get) stores keys rotated at their
  true positions: ragged chunks, long chunks in sub-blocks and decode steps past several wraps
  attend as the cache-position ring does (same distances), and its decode step, which reads only
  the filled blocks of the ring, too; it refuses sinks."""
  rng = np.random.default_rng(12)
  hd, heads, kv = 8, 4, 2
  rope = RoPE(hd, THETA)
  attend = jax.jit(lambda c, q, k, v, nv: c.attend(0, q, k, v, nv, rope=rope))

  def compare(window, block, chunks):
    """Feeds the same (tokens, n_valid) chunks to both rings; returns them (positions equal)."""
    rel, ab = (WindowCache.init(n_layers=1, batch=2, kv_heads=kv, head_dim=hd, window=window,
                                block=block, absolute=a) for a in (False, True))
    for t, nv in chunks:
      q, k, v = (jnp.asarray(rng.standard_normal((2, t, h, hd)).astype(np.float32))
                 for h in (heads, kv, kv))
      nv = jnp.asarray(nv)
      want, rel = attend(rel, q, k, v, nv)
      got, ab = attend(ab, q, k, v, nv)
      rel, ab = rel.advance(nv), ab.advance(nv)
      real = np.arange(t)[None, :] < np.asarray(nv)[:, None]
      np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
    return rel, ab

  rel, ab = compare(6, 4, [(9, [9, 5]), (1, [1, 1]), (3, [3, 0]), (1, [1, 1]), (4, [2, 4])]
                    + [(1, [1, 1])] * 8)
  np.testing.assert_array_equal(np.asarray(ab.pos), np.asarray(rel.pos))
  # a 96-slot ring read in 32-slot blocks: decode steps while it fills (1, 2, then 3 blocks read)
  # and after it wraps
  decode = [(1, [1, 1])] * 3
  compare(96, 256, [(5, [5, 3])] + decode + [(40, [40, 30])] + decode + [(60, [60, 60])] + decode)
  with pytest.raises(ValueError, match="absolute positions need sink 0"):
    WindowCache.init(n_layers=1, batch=1, kv_heads=1, head_dim=8, window=4, sink=1, absolute=True)


def test_bounded_rope_long_stream():
  """A row 20,000 tokens in attends like a row that just filled its cache (same held tokens), and
  like the float64 oracle: the rotation angles never grow with the stream."""
  sink, window, hd = 4, 16, 64
  rng = np.random.default_rng(3)
  long_len = 20_000
  k = rng.standard_normal((1, 1, 1, long_len, hd)).astype(np.float32)
  v = rng.standard_normal((1, 1, 1, long_len, hd)).astype(np.float32)
  long_cache = slide(empty_cache(1, sink, window, layers=1, kv_heads=1, head_dim=hd),
                     jnp.asarray(k), jnp.asarray(v))
  keep = np.r_[0:sink, long_len - window:long_len]
  short_cache = slide(empty_cache(1, sink, window, layers=1, kv_heads=1, head_dim=hd),
                      jnp.asarray(k[..., keep, :]), jnp.asarray(v[..., keep, :]))
  q = rng.standard_normal((1, 3, 2, hd)).astype(np.float32)
  kn = rng.standard_normal((1, 3, 1, hd)).astype(np.float32)
  vn = rng.standard_normal((1, 3, 1, hd)).astype(np.float32)
  rope = RoPE(hd, 100000.0)
  args = (jnp.asarray(q), jnp.asarray(kn), jnp.asarray(vn), jnp.array([3]))
  out_long, _ = long_cache.attend(0, *args, rope=rope)
  out_short, _ = short_cache.attend(0, *args, rope=rope)
  np.testing.assert_allclose(np.asarray(out_long), np.asarray(out_short), atol=1e-6)
  # And the same holds against float64 math at the original positions for window keys.
  orc = WindowOracle(1, sink, window)
  orc.rows[0] = [(k[:, 0, :, p], v[:, 0, :, p]) for p in range(long_len)]
  global THETA
  saved, THETA = THETA, 100000.0
  try:
    want = oracle_outputs(orc, 0, 0, q[0], kn[0], vn[0], 3)
  finally:
    THETA = saved
  np.testing.assert_allclose(np.asarray(out_long[0]), want, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Model level (tiny)
# ---------------------------------------------------------------------------------------------
def _apply_fn(model):
  net = Llama(model.config, model.dtype)
  return jax.jit(lambda params, tokens, cache, n_valid: net.apply({"params": params}, tokens, cache, n_valid))


def _prefill_then_steps(model, spec, ids, lengths, prefill, *, apply=None, **options):
  """Logits [B, P, V] for each row's tokens: a prefill chunk of `prefill` tokens, then one token
  at a time (rows shorter than the step feed padding with n_valid 0)."""
  apply = apply or _apply_fn(model)
  batch, total = ids.shape
  cache = kvjax.make_cache(spec, model.config, batch, 256, **options)
  logits = []
  lengths = np.asarray(lengths)
  chunks = [(0, prefill)] + [(s, s + 1) for s in range(prefill, total)]
  for lo, hi in chunks:
    nv = np.clip(lengths - lo, 0, hi - lo).astype(np.int32)
    out, cache = apply(model.params, jnp.asarray(ids[:, lo:hi]), cache, jnp.asarray(nv))
    logits.append(np.asarray(out))
  return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("spec,block", [("sink:4+window:16", 256), ("sink:3+window:8", 8),
                                        ("window:12", 256)])
def test_chunked_prefill_equals_token_by_token(tiny, spec, block):
  rng = np.random.default_rng(4)
  ids = rng.integers(0, tiny.config.vocab_size, size=(2, 45)).astype(np.int32)
  lengths = np.array([45, 29])
  apply = _apply_fn(tiny)
  stepped, c1 = _prefill_then_steps(tiny, spec, ids, lengths, 1, apply=apply, block=block)
  chunked, c2 = _prefill_then_steps(tiny, spec, ids, lengths, 40, apply=apply, block=block)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(chunked[b, :n], stepped[b, :n], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(c1.pos), np.asarray(c2.pos))
  np.testing.assert_array_equal(np.asarray(c1.lengths), lengths)
  np.testing.assert_allclose(np.asarray(c1.k), np.asarray(c2.k), atol=1e-5)


def test_window_longer_than_sequence_equals_full(tiny_gqa):
  rng = np.random.default_rng(5)
  ids = rng.integers(0, tiny_gqa.config.vocab_size, size=(2, 40)).astype(np.int32)
  lengths = np.array([40, 23])
  apply = _apply_fn(tiny_gqa)
  full, _ = _prefill_then_steps(tiny_gqa, "full", ids, lengths, 30, apply=apply)
  for spec in ("sink:2+window:40", "window:64"):
    win, _ = _prefill_then_steps(tiny_gqa, spec, ids, lengths, 30, apply=apply)
    for b, n in enumerate(lengths):
      np.testing.assert_allclose(win[b, :n], full[b, :n], atol=1e-4)
  want = oracle.llama_forward(tiny_gqa.config, tiny_gqa.params, ids[0])
  np.testing.assert_allclose(win[0], want, atol=1e-3)


def test_jit_equals_eager_model(tiny):
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 260, size=(1, 20)), jnp.int32)
  net = Llama(tiny.config, tiny.dtype)
  cache = kvjax.make_cache("sink:2+window:6", tiny.config, 1, 16)
  eager, c_eager = net.apply({"params": tiny.params}, ids, cache)
  jitted, c_jit = jax.jit(lambda p, t, c: net.apply({"params": p}, t, c))(tiny.params, ids, cache)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(c_eager.pos), np.asarray(c_jit.pos))
  np.testing.assert_allclose(np.asarray(c_eager.k), np.asarray(c_jit.k), atol=1e-5)


def test_generate_streams_in_constant_memory(tiny):
  prompt = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10]
  spec = "sink:4+window:32"
  initial = kvjax.make_cache(spec, tiny.config, 1, 512)
  before = kvjax.compile_stats()["by_function"]
  res = kvjax.generate(tiny, prompt, cache=spec, max_new_tokens=300, stop_at_eos=False)
  after = kvjax.compile_stats()["by_function"]
  loops = sum(after.get(f, 0) - before.get(f, 0) for f in ("jit(_prefill)", "jit(_decode)"))
  assert loops <= 2  # one prefill, one decode (fewer if already built)
  assert res.tokens.shape == (1, 300) and int(res.n_generated[0]) == 300
  assert res.cache_bytes == initial.nbytes()
  assert int(res.cache.lengths[0]) == len(prompt) + 299
  assert np.asarray(res.cache.pos[0]).tolist() == [0, 1, 2, 3] + sorted(
      range(len(prompt) + 299 - 32, len(prompt) + 299), key=lambda p: (p - 4) % 32)
  # Another length in the same output bucket reuses both executables.
  before = kvjax.compile_stats()["n_compiles"]
  again = kvjax.generate(tiny, prompt, cache=spec, max_new_tokens=280, stop_at_eos=False)
  assert kvjax.compile_stats()["n_compiles"] == before
  np.testing.assert_array_equal(again.tokens[0], res.tokens[0, :280])
  # While everything fits (prompt + 26 tokens < 36 slots) greedy output equals the full cache's.
  full = kvjax.generate(tiny, prompt, cache="full", max_new_tokens=26, stop_at_eos=False)
  np.testing.assert_array_equal(res.tokens[0, :26], full.tokens[0])


def test_generate_ragged_batch_rows_independent(tiny):
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [200, 201, 202]]  # one prompt bucket
  spec = "sink:2+window:8"
  both = kvjax.generate(tiny, prompts, cache=spec, max_new_tokens=30, stop_at_eos=False)
  for b, p in enumerate(prompts):
    alone = kvjax.generate(tiny, p, cache=spec, max_new_tokens=30, stop_at_eos=False)
    np.testing.assert_array_equal(both.tokens[b], alone.tokens[0])
  assert ((both.tokens >= 0) & (both.tokens < tiny.config.vocab_size)).all()


def test_perplexity_tiny(tiny):
  ids = np.random.default_rng(7).integers(0, 260, size=60)
  full = kvjax.perplexity(tiny, ids, cache="full")
  big = kvjax.perplexity(tiny, ids, cache="sink:4+window:56")
  small = kvjax.perplexity(tiny, ids, cache="sink:2+window:8")
  assert abs(full.nll - big.nll) < 1e-4
  assert np.isfinite(small.ppl)
  assert small.cache_bytes == kvjax.make_cache("sink:2+window:8", tiny.config, 1, 64).nbytes()


# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow)
# ---------------------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.slow
def test_smollm2_perplexity_with_sinks(smollm2):
  if not DATA.exists():
    pytest.skip(f"missing {DATA} (clone shared/ beside the repo)")
  ids = np.asarray(smollm2.tokenizer.encode(DATA.read_text()[:1500]))[:300]
  assert ids.size >= 250
  full = kvjax.perplexity(smollm2, ids, cache="full")
  sinks = kvjax.perplexity(smollm2, ids, cache="sink:4+window:64")
  plain = kvjax.perplexity(smollm2, ids, cache="window:64")
  assert np.isfinite(full.ppl) and np.isfinite(sinks.ppl) and np.isfinite(plain.ppl)
  assert sinks.ppl < 2 * full.ppl, (full.ppl, sinks.ppl)


@pytest.mark.slow
def test_smollm2_generate_window_matches_full_while_it_fits(smollm2):
  prompt = "The quick brown fox"
  full = kvjax.generate(smollm2, prompt, cache="full", max_new_tokens=12)
  win = kvjax.generate(smollm2, prompt, cache="sink:4+window:60", max_new_tokens=12, capacity=64)
  assert ((win.tokens >= 0) & (win.tokens < smollm2.config.vocab_size)).all()
  np.testing.assert_array_equal(win.tokens[0, :8], full.tokens[0, :8])
