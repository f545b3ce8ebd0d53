"""H2O heavy-hitter cache: the eviction policy, attention-score accumulation, quantized storage.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
`h2o:2+window:4`, with a sink, and with int4 storage (held tokens are what was appended, within the
error bound when quantized; positions / mask / lengths / filled, padding ignored, rows independent,
inputs not mutated, jit equals eager, chunk-exact, never overflows, never holds more than its
budget, reset / crop / reorder, nbytes; unquantized: attention over what is held and a Llama
forward vs NumPy while the stream fits).

What is special to H2O, checked here against oracles (NumPy, token by token, from the definition
in kvjax.caches.h2o's docstring): per (layer, row, kv head) a dict position -> [key, value,
score]; a new token is added, the sinks, the W most recent and the K best-scored others are kept,
then (attend) its query attends over what is kept and each held token's score grows by the
probability mass it got, summed over the G query heads. `evict_topk` on its own; the policy under
random scores; real attention whatever the chunking, scores included; jit == no jit past the
budget (the kit's jit stream stays within it); model level (budget above the sequence == full,
constant-memory generate), memory formulas, spec errors.
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
from kvjax.models import llama
from kvjax.testing import oracle
from tests.helpers import DATA, PRE_ROTATED, SETTINGS, model_logits

L, B, K, G, H = 2, 2, 2, 2, 16
GROUP = 8
ROPE = RoPE(H, 10000.0)


@pytest.mark.parametrize("spec", [
    "h2o:2+window:4",
    pytest.param("h2o:2+window:4+sink:1", marks=pytest.mark.slow),
    pytest.param("int4+residual:4+h2o:2+window:4+group:4", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec)


class H2OOracle:
  """Token-by-token heavy-hitter cache of L layers, `batch` rows and K kv heads."""

  def __init__(self, batch, *, heavy, window, sink=0, bits=None, residual=0):
    self.heavy, self.window, self.sink = heavy, window, sink
    self.bits, self.residual = bits, residual
    self.held = {(l, b, h): {} for l in range(L) for b in range(batch) for h in range(K)}
    self.n = [0] * batch

  def _store(self, x):
    if self.bits is None:
      return x.astype(np.float32)
    return oracle.packing_quantize(x, self.bits, GROUP)[0]  # bit-identical to the cache's storage

  def admit(self, b, k, v):
    """Adds token n[b] (k, v [L, K, H], key rotated) to row b, evicting; returns its position."""
    p = self.n[b]
    self.n[b] = n = p + 1
    for l in range(L):
      for h in range(K):
        held = self.held[l, b, h]
        held[p] = [k[l, h].astype(np.float32), v[l, h].astype(np.float32), np.float32(0)]
        # Quantized storage: a token is quantized when it leaves the full-precision ring.
        if self.bits is not None and (p - self.residual) in held:
          entry = held[p - self.residual]
          entry[0], entry[1] = self._store(entry[0]), self._store(entry[1])
        protected = {x for x in held if x < self.sink or x >= n - self.window}
        others = sorted(set(held) - protected, key=lambda x: -held[x][2])
        for x in others[self.heavy:]:
          del held[x]
    return p

  def attend(self, b, q):
    """Query of row b's newest token (q [L, N, H] rotated): output [L, N, H]; adds the mass."""
    out = np.zeros(q.shape)
    for l in range(L):
      for h in range(K):
        held = self.held[l, b, h]
        ps = sorted(held)
        ks = np.stack([held[x][0] for x in ps]).astype(np.float64)
        vs = np.stack([held[x][1] for x in ps]).astype(np.float64)
        mass = np.zeros(len(ps))
        for g in range(G):
          s = ks @ q[l, h * G + g].astype(np.float64) / np.sqrt(H)
          w = np.exp(s - s.max())
          w /= w.sum()
          out[l, h * G + g] = w @ vs
          mass += w
        for x, m in zip(ps, mass):
          held[x][2] = np.float32(held[x][2] + m)
    return out


def check_against_oracle(cache, orc: H2OOracle, *, atol_kv=1e-6, score_rtol=1e-4,
                         exact_scores=False):
  """Held sets, stored keys/values and scores equal the oracle's; invariants hold."""
  view = jax.device_get(cache.view())
  scores = np.asarray(cache.scores)
  assert np.asarray(cache.lengths).tolist() == orc.n
  budget = orc.sink + orc.window + orc.heavy
  assert view.positions.shape[-1] == budget
  for (l, b, h), held in orc.held.items():
    pos = view.positions[l, b, h]
    live = pos[pos >= 0]
    assert (view.mask[l, b, h] == (pos >= 0)).all()
    assert len(set(live.tolist())) == len(live), "positions must be unique"
    assert sorted(live.tolist()) == sorted(held), (l, b, h, sorted(live.tolist()), sorted(held))
    n = orc.n[b]
    must = set(range(min(orc.sink, n))) | set(range(max(0, n - orc.window), n))
    assert must <= set(live.tolist()), "sinks and the recent window are always held"
    assert (live < n).all()
    for s in np.nonzero(pos >= 0)[0]:
      k, v, score = held[int(pos[s])]
      np.testing.assert_allclose(view.keys[l, b, h, s], k, atol=atol_kv)
      np.testing.assert_allclose(view.values[l, b, h, s], v, atol=atol_kv)
      if exact_scores:
        assert scores[l, b, h, s] == score
      else:
        np.testing.assert_allclose(scores[l, b, h, s], score, rtol=score_rtol, atol=1e-5)
    assert (scores[l, b, h][pos < 0] == 0).all()


@jax.jit
def _append(cache, k, v, n_valid):
  return kvjax.append(cache, k, v, n_valid)


@functools.partial(jax.jit, static_argnames=("layer", "rope"))
def _attend(cache, q, k, v, n_valid, *, layer, rope=ROPE):
  return cache.attend(layer, q, k, v, n_valid, rope=rope)


def new_cache(batch=B, **kw):
  return h2o.H2OCache.init(n_layers=L, batch=batch, kv_heads=K, head_dim=H, group=GROUP, **kw)


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_evict_topk_matches_numpy(data):
  """Selection = protected (sinks, recent) first, then the best scores; payload follows."""
  heavy = data.draw(st.integers(1, 3))
  window = data.draw(st.integers(1, 3))
  sink = data.draw(st.integers(0, 2))
  slots = heavy + window + sink
  c = data.draw(st.integers(slots, slots + 4))
  n = data.draw(st.integers(0, 12))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  pos = np.full((2, 3, c), -1, np.int32)
  for i in range(2):
    for j in range(3):
      chosen = rng.permutation(n)[: min(n, c)]  # unique positions below n, at random candidates
      pos[i, j, rng.permutation(c)[: len(chosen)]] = chosen
  scores = rng.random(pos.shape).astype(np.float32) * (pos >= 0)
  payload = {"x": pos.astype(np.float32)[..., None] * 10 + np.arange(4)}
  lengths = np.full((2,), n, np.int32)
  out_pos, out_scores, out_payload = h2o.evict_topk(
      jnp.asarray(pos), jnp.asarray(scores), jax.tree_util.tree_map(jnp.asarray, payload),
      jnp.asarray(lengths), heavy=heavy, window=window, sink=sink)
  out_pos, out_scores = np.asarray(out_pos), np.asarray(out_scores)
  assert out_pos.shape == (2, 3, slots)
  for i in range(2):
    for j in range(3):
      cand = [(int(p), float(s)) for p, s in zip(pos[i, j], scores[i, j]) if p >= 0]
      protected = {p for p, _ in cand if p < sink or p >= n - window}
      rest = sorted((p for p, _ in cand if p not in protected),
                    key=lambda p: -scores[i, j][list(pos[i, j]).index(p)])
      want = protected | set(rest[: slots - len(protected)])
      got = out_pos[i, j][out_pos[i, j] >= 0]
      assert sorted(got.tolist()) == sorted(want)
      for s in range(slots):
        p = out_pos[i, j, s]
        if p >= 0:
          assert out_scores[i, j, s] == scores[i, j][list(pos[i, j]).index(p)]
          np.testing.assert_array_equal(np.asarray(out_payload["x"])[i, j, s],
                                        p * 10 + np.arange(4))
        else:
          assert out_scores[i, j, s] == 0


POLICIES = [dict(heavy=2, window=2), dict(heavy=3, window=1, sink=1),
            dict(heavy=1, window=3, sink=2)]


def _ids(params):
  return "-".join(f"{k}{v}" for k, v in params.items())


@pytest.mark.parametrize("policy", POLICIES, ids=_ids)
@SETTINGS
@given(plan=st.lists(st.lists(st.integers(0, 1), min_size=B, max_size=B), min_size=1, max_size=14),
       seed=st.integers(0, 2**31 - 1))
def test_policy_with_random_scores(policy, plan, seed):
  """Random per-step attention masses: the kept set is always the W most recent (and sinks) plus
  the top-K by accumulated score; budgets, uniqueness, nothing mutated."""
  rng = np.random.default_rng(seed)
  cache = new_cache(**policy)
  orc = H2OOracle(B, **policy)
  for nv in plan:
    nv = np.asarray(nv, np.int32)
    k = rng.normal(size=(L, B, K, 1, H)).astype(np.float32)
    v = rng.normal(size=(L, B, K, 1, H)).astype(np.float32)
    old, before = cache, jax.tree_util.tree_map(np.array, cache)
    cache = _append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(nv))
    jax.tree_util.tree_map(lambda a, b_: np.testing.assert_array_equal(np.asarray(a), b_),
                           old, before)
    for b in range(B):
      if nv[b]:
        orc.admit(b, k[:, b, :, 0], v[:, b, :, 0])
    check_against_oracle(cache, orc, exact_scores=True)
    # This step's attention: random mass on every held slot.
    mass = rng.random(cache.scores.shape).astype(np.float32)
    pos = np.asarray(cache.positions)
    mass = np.where(pos >= 0, mass, 0).astype(np.float32)
    cache = cache.replace(scores=cache.scores + jnp.asarray(mass))
    for (l, b, h), held in orc.held.items():
      for s, p in enumerate(pos[l, b, h]):
        if p >= 0:
          held[int(p)][2] = np.float32(held[int(p)][2] + mass[l, b, h, s])


ATTEND_CONFIGS = [
    dict(heavy=2, window=2),
    dict(heavy=2, window=3, sink=1),
    dict(heavy=2, window=4, bits=4, residual=2),
    dict(heavy=3, window=2, bits=8),
]
chunk_plan = st.lists(
    st.tuples(st.sampled_from((1, 3, 4)), st.lists(st.integers(0, 4), min_size=B, max_size=B)),
    min_size=1, max_size=5)


@pytest.mark.parametrize("config", ATTEND_CONFIGS, ids=_ids)
@SETTINGS
@given(plan=chunk_plan, seed=st.integers(0, 2**31 - 1))
def test_attend_matches_oracle(config, plan, seed):
  """Real attention: outputs, kept sets and scores equal the token-by-token oracle, whatever the
  chunking (ragged n_valid included). Unquantized configs go through kvjax's RoPE (checking that
  keys sit at their original positions); quantized ones get pre-rotated inputs (PreRotated)."""
  rng = np.random.default_rng(seed)
  cache = new_cache(**config)
  orc = H2OOracle(B, **config)
  rope = ROPE if config.get("bits") is None else PRE_ROTATED
  for t, nv in plan:
    nv = np.minimum(np.asarray(nv, np.int32), t)
    q = rng.normal(size=(L, B, t, K * G, H)).astype(np.float32)
    k = rng.normal(size=(L, B, t, K, H)).astype(np.float32)
    v = rng.normal(size=(L, B, t, K, H)).astype(np.float32)
    pos = np.asarray(cache.lengths)[:, None] + np.arange(t)[None]
    q_rot = oracle.rope(q, pos, ROPE.theta).astype(np.float32)  # [L, B, T, N, H]
    k_rot = oracle.rope(k, pos, ROPE.theta).astype(np.float32)
    if rope is PRE_ROTATED:
      q, k = q_rot, k_rot
    outs = []
    for layer in range(L):
      out, cache = _attend(cache, jnp.asarray(q[layer]), jnp.asarray(k[layer]),
                           jnp.asarray(v[layer]), jnp.asarray(nv), layer=layer, rope=rope)
      outs.append(np.asarray(out))
    cache = cache.advance(jnp.asarray(nv))
    for b in range(B):
      for j in range(nv[b]):
        orc.admit(b, k_rot[:, b, j], v[:, b, j])
        want = orc.attend(b, q_rot[:, b, j])
        for layer in range(L):
          np.testing.assert_allclose(outs[layer][b, j], want[layer], atol=1e-4)
  check_against_oracle(cache, orc, atol_kv=1e-5)


# ---------------------------------------------------------------------------------------------
# Model-level tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["h2o:8+window:16+sink:2", "snapkv:8+window:16+sink:2"])
@pytest.mark.parametrize("fixture", ["tiny", "tiny_gqa"])
def test_budget_above_sequence_equals_full(fixture, spec, request):
  model = request.getfixturevalue(fixture)
  ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 24).astype(np.int32)
  full = np.asarray(llama.forward(model.config, model.params, jnp.asarray(ids[None])))[0]
  got, cache = model_logits(model, spec, ids, [9, 1, 1, 13])
  np.testing.assert_allclose(got, full, atol=1e-4)
  assert int(cache.filled().min()) == 24


def test_jit_equals_no_jit(tiny):
  """Past the budget, with RoPE: evictions happen (the kit's jit stream stays within the budget)."""
  c = tiny.config
  cache = kvjax.make_cache("h2o:3+window:4+sink:1", c, 2, 64)
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(2, 5, c.n_heads, c.head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, c.n_kv_heads, c.head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 5, c.n_kv_heads, c.head_dim)), jnp.float32)
  rope = RoPE(c.head_dim, c.rope_theta)
  jitted_attend = jax.jit(lambda c_, q_, k_, v_, n_: c_.attend(2, q_, k_, v_, n_, rope=rope))
  for _ in range(3):  # past the budget: evictions happen
    nv = jnp.asarray([5, 3])
    eager_out, eager = cache.attend(2, q, k, v, nv, rope=rope)
    jit_out, jitted = jitted_attend(cache, q, k, v, nv)
    np.testing.assert_allclose(eager_out, jit_out, atol=1e-5)
    np.testing.assert_array_equal(eager.positions, jitted.positions)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eager, jitted)
    cache = jitted.advance(nv)


def test_generate_tiny_constant_memory(tiny):
  spec = "h2o:16+window:16"
  prompt = [list(range(3, 9))]
  empty = kvjax.make_cache(spec, tiny.config, 1, 256)
  res = kvjax.generate(tiny, prompt, max_new_tokens=100, cache=spec, stop_at_eos=False)
  assert res.tokens.shape == (1, 100)
  assert ((res.tokens >= 0) & (res.tokens < tiny.config.vocab_size)).all()
  assert res.cache.nbytes() == empty.nbytes()
  assert int(res.cache.lengths[0]) == 6 + 99
  assert int(res.cache.filled().max()) == 32
  short = kvjax.generate(tiny, prompt, max_new_tokens=20, cache=spec, stop_at_eos=False)
  assert short.cache.nbytes() == res.cache.nbytes()
  # Until the budget is full nothing is evicted: same tokens as the full cache.
  full = kvjax.generate(tiny, prompt, max_new_tokens=100, cache="full", stop_at_eos=False)
  np.testing.assert_array_equal(res.tokens[:, :32 - 6 + 1], full.tokens[:, :32 - 6 + 1])


def test_quantized_memory_and_spec():
  c = kvjax.SMOLLM2_135M
  plain = kvjax.make_cache("h2o:256+window:512", c, 1, 8192)
  quant = kvjax.make_cache("int4+residual:64+h2o:256+window:512", c, 1, 8192)
  assert plain.capacity == quant.capacity == 768
  assert quant.pool == 704 and quant.residual == 64 and quant.bits == 4
  per = c.n_layers * c.n_kv_heads * 2  # layers x kv heads x (k, v)
  groups = c.head_dim // 32
  book = c.n_layers * c.n_kv_heads * 768 * (4 + 4)  # positions + scores
  assert sum(plain.nbytes().values()) == 768 * per * c.head_dim * 4 + book + 4
  assert sum(quant.nbytes().values()) == (704 * per * (c.head_dim // 2 + 4 * groups)
                                          + 64 * per * c.head_dim * 4 + book + 4)


def test_spec_errors_and_ops(tiny):
  with pytest.raises(kvjax.SpecError, match="residual"):
    kvjax.make_cache("int4+residual:64+h2o:8+window:32", tiny.config, 1, 256)
  with pytest.raises(kvjax.SpecError, match="group"):
    kvjax.make_cache("int4+group:48+h2o:8+window:32", tiny.config, 1, 256)
  with pytest.raises(kvjax.SpecError, match="window"):
    kvjax.parse_spec("h2o:8")
  cache = new_cache(heavy=2, window=2, sink=1)
  assert bool(cache.has_room(10**6)) and cache.fits(10**6) and cache.limited is False
  rng = np.random.default_rng(4)
  k = jnp.asarray(rng.normal(size=(L, B, K, 6, H)), jnp.float32)
  cache = _append(cache, k, k, jnp.asarray([6, 4]))
  swapped = cache.reorder(jnp.asarray([1, 0]))
  np.testing.assert_array_equal(cache.view().keys[:, 0], swapped.view().keys[:, 1])
  np.testing.assert_array_equal(cache.positions[:, 1], swapped.positions[:, 0])
  assert swapped.lengths.tolist() == [4, 6]
  cropped = cache.crop(4)
  assert cropped.lengths.tolist() == [4, 4]
  assert int(cropped.positions.max()) <= 3
  assert (np.asarray(cropped.view().mask) == (np.asarray(cropped.positions) >= 0)).all()
  empty = cache.reset()
  assert not bool(empty.view().mask.any()) and empty.lengths.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_h2o(smollm2):
  model = smollm2
  spec = "h2o:64+window:64"
  res = kvjax.generate(model, "The quick brown fox", max_new_tokens=12, cache=spec)
  full = kvjax.generate(model, "The quick brown fox", max_new_tokens=12, cache="full")
  assert ((res.tokens >= 0) & (res.tokens < model.config.vocab_size)).all()
  np.testing.assert_array_equal(res.tokens, full.tokens)  # the budget exceeds the sequence
  if not DATA.exists():
    pytest.skip(f"{DATA} not found")
  ids = model.tokenizer.encode(DATA.read_text()[:4000])[:256]
  ppl_full = kvjax.perplexity(model, ids, cache="full").ppl
  for s in (spec, "int4+residual:32+h2o:64+window:64"):
    ppl = kvjax.perplexity(model, ids, cache=s).ppl
    assert np.isfinite(ppl) and ppl < 2 * ppl_full, (s, ppl, ppl_full)
