"""Tiered cache: which token sits in which tier at what precision, attention over the tiers.

The generic invariants come from `kvjax.testing`: `test_conformance` runs `check_cache_kind` on
`tier:4:fp32,4:int8+group:16` and `tier:4:fp32,4:fp32` (held tokens within the error bound of what
was appended, positions / mask / lengths / filled, padding ignored, rows independent, inputs not
mutated, jit equals eager, chunk-exact, never overflows, never holds more than its budget, reset /
reorder, nbytes; all-fp32: attention over what is held and a Llama forward vs NumPy).

What is special to the tiers, checked here against the definition (module docstring of
kvjax.caches.tiered): with n tokens seen, the token of age a = n - 1 - p sits in tier i iff
start_i <= a < end_i, holding the chain of encodings Q_i(...Q_0(x)); a query attends over every
token of age < sum(budgets) as of its arrival, whatever the chunking. Also: jit == no jit across
three tiers (the kit's jit stream stays in the first ones), model level (all-fp32 == full,
constant-memory generate), memory per tier, spec errors and the unsupported crop.
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
from kvjax.caches import tiered
from kvjax.models import llama
from kvjax.testing import oracle
from tests.helpers import DATA, PRE_ROTATED, SETTINGS, model_logits

L, B, K, G, H = 2, 2, 2, 2, 16
GROUP = 8
ROPE = RoPE(H, 10000.0)


@pytest.mark.parametrize("spec", [
    "tier:4:fp32,4:int8+group:16", pytest.param("tier:4:fp32,4:fp32", marks=pytest.mark.slow)])
def test_conformance(check_kind, spec):
  """Every generic invariant of `kvjax.testing` (see the module docstring)."""
  check_kind(spec)


def chain(x: np.ndarray, fmts, group: int, exact: bool = False):
  """x pushed through tiers fmts[0], fmts[1], ... : (value, accumulated tolerance)."""
  tol = np.zeros(x.shape, np.float32)
  for fmt in fmts:
    x, step = oracle.np_encode(x, fmt, group, exact)
    tol = tol + step
  return x, tol


class TierOracle:
  """Per row: the token list (k [L, K, H], v) in order; tiers by age.

  exact: quantize through kvjax.caches.packing instead of the NumPy reference (see
  packing_quantize).
  """

  def __init__(self, tiers, batch, exact=False):
    self.tiers, self.exact = tiers, exact
    self.rows = [[] for _ in range(batch)]

  def append(self, k, v, n_valid):
    """k, v [L, B, K, T, H]."""
    for b in range(k.shape[1]):
      for j in range(int(n_valid[b])):
        self.rows[b].append((k[:, b, :, j], v[:, b, :, j]))

  def tier_of_age(self, age):
    start = 0
    for i, (budget, _) in enumerate(self.tiers):
      if start <= age < start + budget:
        return i
      start += budget
    return None

  def held(self, b, n=None):
    """{position: (tier, k [L, K, H], v, k_tol, v_tol)} of row b after its first n tokens."""
    toks = self.rows[b] if n is None else self.rows[b][:n]
    n = len(toks)
    out = {}
    for p, (k, v) in enumerate(toks):
      i = self.tier_of_age(n - 1 - p)
      if i is None:
        continue
      fmts = [f for _, f in self.tiers[: i + 1]]
      kq, kt = chain(k, fmts, GROUP, self.exact)
      vq, vt = chain(v, fmts, GROUP, self.exact)
      out[p] = (i, kq, vq, kt, vt)
    return out


def tier_slices(tiers):
  out, start = [], 0
  for budget, _ in tiers:
    out.append((start, start + budget))
    start += budget
  return out


def check_view(cache, orc: TierOracle, tiers):
  """The cache holds exactly the oracle's tokens, in the right tier, at the right precision."""
  view = jax.device_get(cache.view())
  lengths = np.asarray(cache.lengths)
  assert lengths.tolist() == [len(r) for r in orc.rows]
  slices = tier_slices(tiers)
  for b in range(B):
    want = orc.held(b)
    for layer in range(L):
      for h in range(K):
        pos = view.positions[layer, b, h]
        assert (view.mask[layer, b, h] == (pos >= 0)).all()
        live = pos[pos >= 0]
        assert len(set(live.tolist())) == len(live), "positions must be unique"
        assert sorted(live.tolist()) == sorted(want), (b, layer, h, sorted(live.tolist()))
        for s in np.nonzero(pos >= 0)[0]:
          tier, kq, vq, kt, vt = want[int(pos[s])]
          lo, hi = slices[tier]
          assert lo <= s < hi, f"position {pos[s]} should sit in tier {tier}"
          np.testing.assert_array_less(np.abs(view.keys[layer, b, h, s] - kq[layer, h]),
                                       kt[layer, h] + 1e-5)
          np.testing.assert_array_less(np.abs(view.values[layer, b, h, s] - vq[layer, h]),
                                       vt[layer, h] + 1e-5)


# ---------------------------------------------------------------------------------------------
# Jitted entry points (one compile per shape)
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("layer", "rope"))
def _attend(cache, q, k, v, n_valid, *, layer, rope=ROPE):
  return cache.attend(layer, q, k, v, n_valid, rope=rope)


@jax.jit
def _append(cache, k, v, n_valid):
  return kvjax.append(cache, k, v, n_valid)


TIER_SETS = [
    ((2, "fp32"), (3, "int8"), (4, "int2")),
    ((3, "bf16"), (2, "int4"), (3, "int3")),
    ((1, "int8"), (2, "fp16")),
]
CHUNKS = (1, 3, 4)


def new_cache(tiers, batch=B):
  return tiered.TieredCache.init(n_layers=L, batch=batch, kv_heads=K, head_dim=H, tiers=tiers,
                                 group=GROUP)


chunk_plan = st.lists(
    st.tuples(st.sampled_from(CHUNKS), st.lists(st.integers(0, 4), min_size=B, max_size=B)),
    min_size=1, max_size=6)


# ---------------------------------------------------------------------------------------------
# Oracle tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiers", TIER_SETS, ids=lambda t: ",".join(f"{b}:{f}" for b, f in t))
@SETTINGS
@given(plan=chunk_plan, seed=st.integers(0, 2**31 - 1))
def test_append_matches_tier_oracle(tiers, plan, seed):
  """kvjax.append (raw writes): every token sits in the tier its age says, at that precision."""
  rng = np.random.default_rng(seed)
  cache = new_cache(tiers)
  orc = TierOracle(tiers, B)
  for t, nv in plan:
    nv = np.minimum(np.asarray(nv, np.int32), t)
    k = rng.normal(size=(L, B, K, t, H)).astype(np.float32)
    v = rng.normal(size=(L, B, K, t, H)).astype(np.float32)
    k_in, v_in = jnp.asarray(k), jnp.asarray(v)
    old, before = cache, jax.tree_util.tree_map(np.array, cache)
    cache = _append(cache, k_in, v_in, jnp.asarray(nv))
    np.testing.assert_array_equal(np.asarray(k_in), k)  # nothing mutated
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           old, before)
    orc.append(k, v, nv)
    check_view(cache, orc, tiers)


def _attention_oracle(orc: TierOracle, q_all):
  """Expected outputs for the queries: q_all[b] = list of (position, q [L, N, H] rotated)."""
  out = {}
  for b, queries in enumerate(q_all):
    for p, q in queries:
      held = orc.held(b, n=p + 1)
      ps = sorted(held)
      for layer in range(L):
        ks = np.stack([held[x][1][layer] for x in ps])  # [S, K, H]
        vs = np.stack([held[x][2][layer] for x in ps])
        mask = np.ones((1, len(ps)), bool)
        out[(b, p, layer)] = oracle.attention(q[layer][None], ks, vs, mask)[0]
  return out


@pytest.mark.parametrize("tiers", TIER_SETS[:2], ids=lambda t: ",".join(f"{b}:{f}" for b, f in t))
@SETTINGS
@given(plan=chunk_plan, seed=st.integers(0, 2**31 - 1))
def test_attend_matches_oracle(tiers, plan, seed):
  """Each query sees exactly the tokens held at its arrival, each at its tier's precision, and
  chunks leave the same contents as token-by-token decoding. Inputs come pre-rotated (see
  PreRotated); rotation at original positions is checked by the fp32-tier model test."""
  rng = np.random.default_rng(seed)
  cache = new_cache(tiers)
  orc = TierOracle(tiers, B, exact=True)
  got, queries = {}, [[] for _ in range(B)]
  for t, nv in plan:
    nv = np.minimum(np.asarray(nv, np.int32), t)
    q = rng.normal(size=(L, B, t, K * G, H)).astype(np.float32)
    k = rng.normal(size=(L, B, t, K, H)).astype(np.float32)
    v = rng.normal(size=(L, B, t, K, H)).astype(np.float32)
    lengths = np.asarray(cache.lengths)
    pos = lengths[:, None] + np.arange(t)[None]
    q_rot = oracle.rope(q, pos, ROPE.theta).astype(np.float32)  # [L, B, T, N, H]
    k_rot = oracle.rope(k, pos, ROPE.theta).astype(np.float32)
    for layer in range(L):
      out, cache = _attend(cache, jnp.asarray(q_rot[layer]), jnp.asarray(k_rot[layer]),
                           jnp.asarray(v[layer]), jnp.asarray(nv), layer=layer, rope=PRE_ROTATED)
      out = np.asarray(out)
      for b in range(B):
        for j in range(nv[b]):
          got[(b, int(pos[b, j]), layer)] = out[b, j]
    cache = cache.advance(jnp.asarray(nv))
    orc.append(k_rot.transpose(0, 1, 3, 2, 4), v.transpose(0, 1, 3, 2, 4), nv)
    for b in range(B):
      for j in range(nv[b]):
        queries[b].append((int(pos[b, j]), q_rot[:, b, j]))
  want = _attention_oracle(orc, queries)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=str(key))
  check_view(cache, orc, tiers)


# ---------------------------------------------------------------------------------------------
# Model-level tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny", "tiny_gqa"])
def test_all_fp32_budget_above_sequence_equals_full(fixture, request):
  model = request.getfixturevalue(fixture)
  ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 24).astype(np.int32)
  full = np.asarray(llama.forward(model.config, model.params, jnp.asarray(ids[None])))[0]
  got, _ = model_logits(model, "tier:8:fp32,20:fp32", ids, [9, 1, 1, 13])
  np.testing.assert_allclose(got, full, atol=1e-4)


def test_jit_equals_no_jit(tiny):
  """Across three tiers, with RoPE (the kit's jit stream stays in the first tiers)."""
  cache = kvjax.make_cache("tier:4:fp32,4:int8,8:int2", tiny.config, 2, 64)
  rng = np.random.default_rng(2)
  c = tiny.config
  q = jnp.asarray(rng.normal(size=(2, 5, c.n_heads, c.head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, c.n_kv_heads, c.head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 5, c.n_kv_heads, c.head_dim)), jnp.float32)
  rope = RoPE(c.head_dim, c.rope_theta)
  for _ in range(3):  # walk past the tier boundaries
    nv = jnp.asarray([5, 3])
    eager_out, eager = cache.attend(2, q, k, v, nv, rope=rope)
    jit_out, jitted = jax.jit(lambda c_, q_, k_, v_, n_: c_.attend(2, q_, k_, v_, n_, rope=rope))(
        cache, q, k, v, nv)
    np.testing.assert_allclose(eager_out, jit_out, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eager, jitted)
    cache = jitted.advance(nv)


def test_generate_tiny_constant_memory(tiny):
  spec = "tier:16:fp32,16:int8,32:int2"
  prompt = [list(range(3, 9))]
  empty = kvjax.make_cache(spec, tiny.config, 1, 256)
  res = kvjax.generate(tiny, prompt, max_new_tokens=100, cache=spec, stop_at_eos=False)
  assert res.tokens.shape == (1, 100)
  assert ((res.tokens >= 0) & (res.tokens < tiny.config.vocab_size)).all()
  assert res.cache.nbytes() == empty.nbytes()
  assert int(res.cache.lengths[0]) == 6 + 99
  short = kvjax.generate(tiny, prompt, max_new_tokens=20, cache=spec, stop_at_eos=False)
  assert short.cache.nbytes() == res.cache.nbytes()
  # While everything held is still in the fp32 tier, decoding equals the full cache's.
  full = kvjax.generate(tiny, prompt, max_new_tokens=100, cache="full", stop_at_eos=False)
  np.testing.assert_array_equal(res.tokens[:, :16 - 6 + 1], full.tokens[:, :16 - 6 + 1])


def test_memory_per_tier():
  cache = kvjax.make_cache("tier:64:fp32,512:int8,4096:int2", kvjax.SMOLLM2_135M, 1, 8192)
  c = kvjax.SMOLLM2_135M
  per_slot = c.n_layers * c.n_kv_heads * 2  # layers x kv heads x (k and v)
  groups = c.head_dim // 32
  fp32, int8, int2 = cache.tier_nbytes()
  assert fp32 == 64 * per_slot * c.head_dim * 4
  assert int8 == 512 * per_slot * (c.head_dim + 2 * groups)  # codes + float16 scale (symmetric)
  assert int2 == 4096 * per_slot * (c.head_dim // 4 + 2 * 2 * groups)  # codes + scale + zero
  assert sum(cache.nbytes().values()) == fp32 + int8 + int2 + 4  # + lengths
  assert cache.capacity == 64 + 512 + 4096


def test_spec_errors_and_unsupported_ops(tiny):
  with pytest.raises(kvjax.SpecError, match="group"):
    kvjax.make_cache("tier:4:fp32,8:int4+group:48", tiny.config, 1, 64)
  with pytest.raises(kvjax.SpecError):
    kvjax.parse_spec("tier:4:fp64")
  cache = kvjax.make_cache("tier:4:fp32,8:int4", tiny.config, 2, 64)
  with pytest.raises(NotImplementedError, match="crop"):
    cache.crop(3)
  assert bool(cache.has_room(10**6)) and cache.fits(10**6) and cache.limited is False


# ---------------------------------------------------------------------------------------------
# Real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tiered(smollm2):
  model = smollm2
  spec = "tier:32:fp32,64:int8,128:int2"
  res = kvjax.generate(model, "The quick brown fox", max_new_tokens=12, cache=spec)
  full = kvjax.generate(model, "The quick brown fox", max_new_tokens=12, cache="full")
  assert ((res.tokens >= 0) & (res.tokens < model.config.vocab_size)).all()
  np.testing.assert_array_equal(res.tokens, full.tokens)  # everything fits the fp32 tier
  if not DATA.exists():
    pytest.skip(f"{DATA} not found")
  ids = model.tokenizer.encode(DATA.read_text()[:4000])[:256]
  ppl_full = kvjax.perplexity(model, ids, cache="full").ppl
  ppl = kvjax.perplexity(model, ids, cache=spec).ppl
  assert np.isfinite(ppl) and ppl < 2 * ppl_full, (ppl, ppl_full)
