"""Attention presses (tova, observed_attention, expected_attention) and wrappers (criticalkv,
criticaladakv, chunkkv, block, per_layer, composed) against small NumPy oracles, on synthetic
`LayerInputs`: two ragged rows (the shorter right-padded with garbage), 2 kv heads of 2 query
heads, head dim 8. Every batched result must equal that of each row alone. The SmolLM2 comparison
with kvpress itself is tests/presses/test_kvpress_oracle.py (slow lane).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import RoPE
from kvjax.caches.terms import SpecError
from kvjax.presses import LayerInputs, Press, make_press, topk_per_head
from kvjax.presses import attention as attention_presses
from kvjax.presses import wrappers
from kvjax.presses.compress import layer_budgets, row_budgets

LENGTHS = (12, 9)
KV_HEADS, GROUPS, HEAD_DIM, MODEL_DIM = 2, 2, 8, 6
THETA = 100.0
FMAX = float(np.finfo(np.float32).max)


# ---- synthetic layers ---------------------------------------------------------------------------
def make_inputs(lengths=LENGTHS, seed=0, rope=True) -> LayerInputs:
  """Two rows of random pre-RoPE queries/keys/values, rotated at positions 0.. (padding random)."""
  rng = np.random.default_rng(seed)
  b, t, n = len(lengths), max(lengths), KV_HEADS * GROUPS
  q_raw = rng.normal(size=(b, t, n, HEAD_DIM)).astype(np.float32)
  k_raw = rng.normal(size=(b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)
  v = rng.normal(size=(b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)
  wo = rng.normal(size=(n * HEAD_DIM, MODEL_DIM)).astype(np.float32)
  r = RoPE(head_dim=HEAD_DIM, theta=THETA) if rope else None
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  q = r.apply(jnp.asarray(q_raw), pos) if rope else jnp.asarray(q_raw)
  k = r.apply(jnp.asarray(k_raw), pos) if rope else jnp.asarray(k_raw)
  return LayerInputs(q=q, q_raw=jnp.asarray(q_raw), k=k.swapaxes(1, 2),
                     k_raw=jnp.asarray(k_raw).swapaxes(1, 2), v=jnp.asarray(v).swapaxes(1, 2),
                     n_valid=jnp.asarray(lengths, jnp.int32), wo=jnp.asarray(wo),
                     scale=HEAD_DIM**-0.5, rope=r)


def rows(x: LayerInputs):
  """(b, n, q [n, N, H], k [K, n, H], v [K, n, H]) of each row, real tokens only, as NumPy."""
  for b, n in enumerate(np.asarray(x.n_valid)):
    yield (b, n, np.asarray(x.q[b, :n], np.float64), np.asarray(x.k[b, :, :n], np.float64),
           np.asarray(x.v[b, :, :n], np.float64))


@functools.partial(jax.jit, static_argnames="press")
def _run(press, x, n_kept):
  scores = press.score(x, n_kept).astype(jnp.float32)
  return scores, press.select(x, scores, n_kept) & x.valid[:, None, :]


def run(press, x, n_kept):
  """(scores, kept) of `press` on x with per-row budgets n_kept, as NumPy (one compile per press
  and shape is cheaper than running op by op)."""
  scores, kept = _run(press, x, jnp.asarray(n_kept, jnp.int32))
  assert not np.asarray(kept & ~x.valid[:, None, :]).any(), "a padding position was kept"
  return np.asarray(scores), np.asarray(kept)


def beside_another_row(x: LayerInputs, seed=99) -> LayerInputs:
  """x's second (padded) row first, with other padding, beside an unrelated full row: the same
  shapes as x (so the same compiled press), and what a row gets must not change."""
  other = make_inputs(seed=seed)
  n = int(x.n_valid[1])

  def swap(mine, theirs, axis):  # [B, ...] with tokens on `axis`
    row = np.moveaxis(np.array(mine[1]), axis - 1, 0)
    row[n:] = np.moveaxis(np.asarray(theirs[1]), axis - 1, 0)[n:]
    return jnp.asarray(np.stack([np.moveaxis(row, 0, axis - 1), np.asarray(theirs[0])]))

  return x.replace(q=swap(x.q, other.q, 1), q_raw=swap(x.q_raw, other.q_raw, 1),
                   k=swap(x.k, other.k, 2), k_raw=swap(x.k_raw, other.k_raw, 2),
                   v=swap(x.v, other.v, 2), n_valid=jnp.asarray([n, other.n_valid[0]], jnp.int32))


# ---- NumPy oracles ------------------------------------------------------------------------------
def np_attention(q, k):
  """Causal softmax attention [N, n, n] of q [n, N, H] over k [K, n, H] (head n reads n // G)."""
  kg = np.repeat(k, GROUPS, axis=0)  # [N, n, H]
  logits = np.einsum("tnh,nsh->nts", q, kg) * HEAD_DIM**-0.5
  n = q.shape[0]
  logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def group_mean(a):
  return a.reshape((KV_HEADS, GROUPS) + a.shape[1:]).mean(axis=1)


def np_topk(scores, n):
  """bool [K, T]: per head the n best (ties to the lower position)."""
  keep = np.zeros(scores.shape, bool)
  for h in range(scores.shape[0]):
    keep[h, np.argsort(-scores[h], kind="stable")[:n]] = True
  return keep


def np_rope_matrix(p):
  """The [H, H] RoPE rotation of position p, built from cos/sin tables and rotate_half's matrix."""
  half = HEAD_DIM // 2
  angles = p / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
  cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
  rotate_half = np.zeros((HEAD_DIM, HEAD_DIM))
  rotate_half[half:, :half], rotate_half[:half, half:] = np.eye(half), -np.eye(half)
  return np.diag(cos) + np.diag(sin) @ rotate_half


def np_value_norms(v, wo):
  """[K, n]: ||v W_o^n||_1 averaged over the kv head's query heads."""
  wo = np.asarray(wo, np.float64).reshape(KV_HEADS * GROUPS, HEAD_DIM, -1)
  moved = np.einsum("nth,nhd->ntd", np.repeat(v, GROUPS, axis=0), wo)
  return group_mean(np.abs(moved).sum(-1))


def knorm(k):
  return -np.linalg.norm(k, axis=-1)


@dataclasses.dataclass(frozen=True)
class MeanAway(Press):
  """Test press whose scores depend on which tokens it is shown: keys far from their mean."""

  name: ClassVar[str] = "mean_away"

  def score(self, x, n_kept):
    k = x.k.astype(jnp.float32)
    w = x.valid[:, None, :, None]
    mean = jnp.sum(jnp.where(w, k, 0.0), axis=2, keepdims=True) / x.n_valid[:, None, None, None]
    return -jnp.sum(k * mean, axis=-1)


def np_mean_away(k):
  return -(k @ k.mean(axis=0))  # k [S, H] of one head


# ---- attention presses --------------------------------------------------------------------------
def test_tova_is_the_last_querys_attention_over_all_heads():
  x = make_inputs()
  scores, _ = run(attention_presses.TOVAPress(), x, [5, 4])
  for b, n, q, k, _ in rows(x):
    want = np_attention(q, k)[:, -1].mean(axis=0)  # [n]
    want[-1] = want[:-1].max() + 1
    for h in range(KV_HEADS):
      np.testing.assert_allclose(scores[b, h, :n], want, rtol=1e-5)


def test_observed_attention_is_the_mean_attention_a_key_receives():
  x = make_inputs()
  scores, _ = run(attention_presses.ObservedAttentionPress(), x, [5, 4])
  for b, n, q, k, _ in rows(x):
    want = group_mean(np_attention(q, k).sum(axis=1) / np.arange(n, 0, -1))
    np.testing.assert_allclose(scores[b, :, :n], want, rtol=1e-5)


@pytest.mark.parametrize("block, parts", [(2, 4), (3, 2), (4, 3), (16, 4)])
def test_attention_column_sums_skip_only_the_masked_triangle(block, parts):
  """Runs of query blocks read only the keys they can see; the sums equal every real query's
  causal attention summed, whatever the cut (blocks that overrun the row, runs of one block)."""
  x = make_inputs()
  got = np.asarray(jax.jit(lambda x: x.attention_column_sums(block, parts))(x))
  for b, n, q, k, _ in rows(x):
    np.testing.assert_allclose(got[b, :, :n], np_attention(q, k).sum(axis=1), rtol=1e-5,
                               atol=1e-6)
    assert not got[b, :, n:].any(), "padding keys got attention"


@pytest.mark.parametrize("options", [
    dict(n_future_positions=5, n_sink=2),
    dict(n_future_positions=3, n_sink=0, use_covariance=False, use_vnorm=False),
    dict(n_future_positions=7, n_sink=3, epsilon=0.05),
    dict(n_future_positions=2, n_sink=1, rope=False),
])
def test_expected_attention_matches_its_gaussian_model(options):
  options = dict(options)
  x = make_inputs(rope=options.pop("rope", True))
  press = attention_presses.ExpectedAttentionPress(**options)
  scores, _ = run(press, x, [6, 5])
  sink = press.n_sink
  for b, n, _, k, v in rows(x):
    q_raw = np.asarray(x.q_raw[b, sink:n], np.float64)  # [m, N, H]
    mean = q_raw.mean(axis=0)  # [N, H]
    centred = q_raw - mean
    cov = np.einsum("mni,mnj->nij", centred, centred) / len(q_raw)
    if x.rope is not None:
      rot = np.mean([np_rope_matrix(p) for p in range(n, n + press.n_future_positions)], axis=0)
      mean, cov = mean @ rot.T, rot @ cov @ rot.T
    kg = np.repeat(k[:, sink:], GROUPS, axis=0)  # [N, n - sink, H]
    logits = np.einsum("nh,nth->nt", mean, kg) / np.sqrt(HEAD_DIM)
    if press.use_covariance:
      logits += np.einsum("nti,nij,ntj->nt", kg, cov, kg) / HEAD_DIM / 2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = group_mean(p / p.sum(-1, keepdims=True))
    if press.use_vnorm:
      want = (want + press.epsilon) * np.linalg.norm(v[:, sink:], axis=-1)
    want = np.concatenate([np.full((KV_HEADS, sink), want.max() + 1), want], axis=1)
    np.testing.assert_allclose(scores[b, :, :n], want, rtol=2e-5, atol=1e-7)


# ---- criticalkv, criticaladakv ----------------------------------------------------------------
def test_criticalkv_keeps_a_first_stage_then_rescales_by_the_output_projection():
  x = make_inputs()
  press = wrappers.CriticalKVPress(make_press("knorm"), epsilon=0.01, first_stage_ratio=0.5)
  assert press.needs_wo and not make_press("knorm").needs_wo
  n_kept = [7, 3]
  scores, kept = run(press, x, n_kept)
  for b, n, _, k, v in rows(x):
    s = knorm(k)
    first = np_topk(s, max(1, n_kept[b] // 2))
    want = np.where(first, FMAX, (s + 0.01) * np_value_norms(v, x.wo))
    np.testing.assert_allclose(scores[b, :, :n], want, rtol=1e-5)
    np.testing.assert_array_equal(kept[b, :, :n], np_topk(want, n_kept[b]))


def np_criticaladakv(s, norms, n_kept, alpha, eps, first_stage_ratio):
  """kvpress 0.5.5's CriticalAdaKVPress.compress for one row: kept bool [K, T]."""
  kh, t = s.shape
  n_safe = max(1, int(n_kept * alpha))
  safe = np_topk(s, n_safe)
  boosted = np.where(safe, FMAX, s)
  pooled = np.zeros(kh * t, bool)
  pooled[np.argsort(-boosted.reshape(-1), kind="stable")[:n_kept * kh]] = True
  budgets = pooled.reshape(kh, t).sum(-1)
  scores = boosted.copy()
  for h in range(kh):
    first = np.argsort(-boosted[h], kind="stable")[:int(budgets[h] * first_stage_ratio)]
    scores[h, first] = FMAX
  with np.errstate(over="ignore"):
    scores = (scores + eps) * norms
  return np.stack([np_topk(scores[h:h + 1], budgets[h])[0] for h in range(kh)])


def test_criticaladakv_matches_kvpress_algorithm():
  x = make_inputs(seed=3)
  press = wrappers.CriticalAdaKVPress(make_press("knorm"), alpha_safeguard=0.3)
  n_kept = [6, 4]
  _, kept = run(press, x, n_kept)
  for b, n, _, k, v in rows(x):
    want = np_criticaladakv(knorm(k), np_value_norms(v, x.wo), n_kept[b], 0.3, 1e-4, 0.5)
    np.testing.assert_array_equal(kept[b, :, :n], want)
    assert kept[b].sum() == KV_HEADS * n_kept[b]


# ---- chunkkv ------------------------------------------------------------------------------------
def test_chunkkv_keeps_the_best_whole_chunks_in_every_head():
  x = make_inputs(lengths=(12, 9, 3))
  press = wrappers.ChunkKVPress(make_press("knorm"), chunk_length=4)
  # 3 and 3 chunks of 4 (the second row's last is 1 token); the third row is shorter than a chunk
  kept_chunks = {0: 2, 1: 1}
  n_kept = [press.layer_kept(0, 12, 0, 1, ratio=0.3), press.layer_kept(0, 9, 0, 1, ratio=0.5),
            press.layer_kept(2, 3, 0, 1, ratio=0.4)]
  assert n_kept == [8, 4, 2]
  _, kept = run(press, x, n_kept)
  for b, n, _, k, _ in rows(x):
    s = knorm(k)
    if b == 2:  # no whole chunk: knorm's own top-k
      np.testing.assert_array_equal(kept[b, :, :n], np_topk(s, 2))
      continue
    summed = s.sum(axis=0)
    chunk_scores = np.array([summed[i:i + 4].mean() for i in range(0, n, 4)])
    best = np.argsort(-chunk_scores, kind="stable")[:kept_chunks[b]]
    want = np.isin(np.arange(n) // 4, best)
    np.testing.assert_array_equal(kept[b, :, :n], np.broadcast_to(want, (KV_HEADS, n)))


def test_chunkkv_budgets():
  press = make_press("chunkkv(knorm, chunk_length=20)")
  assert press.layer_kept(131, 263, 0, 30, ratio=0.5) == 140  # int(14 * 0.5) = 7 chunks
  assert press.layer_kept(108, 217, 0, 30, ratio=0.5) == 100  # int(11 * 0.5) = 5 chunks
  assert press.layer_kept(50, 217, 0, 30) == 40  # budget=50: 2 whole chunks
  assert press.layer_kept(5, 217, 0, 30) == 20  # at least one chunk
  assert press.layer_kept(217, 217, 0, 30) == 217  # every chunk, clipped to the prompt
  assert press.layer_kept(9, 19, 0, 30, ratio=0.5) == 9  # shorter than a chunk: the press's own


# ---- block --------------------------------------------------------------------------------------
def np_block(k, n_kept, block_size):
  """kvpress's BlockPress for one row with MeanAway as the press: kept bool [K, T]."""
  kh, t, _ = k.shape
  keep = np.zeros((kh, t), bool)
  for h in range(kh):
    kept = np.arange(min(n_kept, t))
    for start in range(n_kept, t, block_size):
      cand = np.concatenate([kept, np.arange(start, min(start + block_size, t))])
      s = np_mean_away(k[h, cand])
      kept = cand[np.argsort(-s, kind="stable")[:n_kept]]
    keep[h, kept] = True
  return keep


@pytest.mark.parametrize("block_size", [2, 5])
def test_block_rescores_survivors_with_each_new_block(block_size):
  x = make_inputs(seed=1)
  press = wrappers.BlockPress(MeanAway(), block_size=block_size)
  n_kept = [5, 4]
  _, kept = run(press, x, n_kept)
  for b, n, _, k, _ in rows(x):
    np.testing.assert_array_equal(kept[b, :, :n], np_block(k, n_kept[b], block_size))
  # a press whose scores do not depend on the subset: block keeps its plain top-k
  _, plain = run(make_press("knorm"), x, n_kept)
  np.testing.assert_array_equal(run(wrappers.BlockPress(make_press("knorm"), 3), x, n_kept)[1],
                                plain)


def test_restrict_shows_each_head_its_own_tokens():
  x = make_inputs()
  rng = np.random.default_rng(5)
  mask = np.zeros((2, KV_HEADS, 12), bool)
  for b, n in enumerate(LENGTHS):
    for h in range(KV_HEADS):
      mask[b, h, np.sort(rng.choice(n, 6, replace=False))] = True
  sub, order = wrappers.restrict(x, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(sub.n_valid), [6, 6])
  for b in range(2):
    for h in range(KV_HEADS):
      at = np.flatnonzero(mask[b, h])
      np.testing.assert_array_equal(np.asarray(order[b, h, :6]), at)
      np.testing.assert_array_equal(np.asarray(sub.k[b, h, :6]), np.asarray(x.k[b, h, at]))
      np.testing.assert_array_equal(np.asarray(sub.v[b, h, :6]), np.asarray(x.v[b, h, at]))
      for g in range(GROUPS):
        n = h * GROUPS + g
        np.testing.assert_array_equal(np.asarray(sub.q[b, :6, n]), np.asarray(x.q[b, at, n]))
  values = jnp.asarray(rng.normal(size=mask.shape), jnp.float32)
  back = wrappers.unrestrict(jnp.take_along_axis(values, order, axis=-1), order)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(values))


def test_restrict_to_a_prefix_is_the_shorter_prompt():
  x = make_inputs()
  prefix = jnp.broadcast_to(jnp.arange(12) < jnp.asarray([7, 5])[:, None, None], (2, KV_HEADS, 12))
  sub, _ = wrappers.restrict(x, prefix)
  short = x.replace(n_valid=jnp.asarray([7, 5], jnp.int32))
  for spec in ["tova", "expected_attention(n_future_positions=3)"]:
    got, want = run(make_press(spec), sub, [3, 3])[0], run(make_press(spec), short, [3, 3])[0]
    for b, n in enumerate([7, 5]):
      np.testing.assert_allclose(got[b, :, :n], want[b, :, :n], rtol=1e-6)


# ---- per_layer ----------------------------------------------------------------------------------
def test_per_layer_gives_each_layer_its_ratio():
  press = make_press("per_layer(knorm, compression_ratios=(0.25, 0.5, 0.75, 0.5))")
  assert press.compression_ratios == (0.25, 0.5, 0.75, 0.5) and press.mean_ratio == 0.5
  lengths = np.array([100, 37])
  rows_kept = row_budgets(lengths, ratio=0.5)
  got = layer_budgets(press, lengths, rows_kept, 4, ratio=0.5)
  np.testing.assert_array_equal(got, [[75, 27], [50, 18], [25, 9], [50, 18]])
  # through the press's own per-layer budgets too
  pyramid = make_press("per_layer(pyramidkv(window_size=4), compression_ratios=(0.5, 0.5))")
  want = [make_press("pyramidkv(window_size=4)").layer_kept(50, 100, layer, 2, 0.5)
          for layer in range(2)]
  assert [pyramid.layer_kept(50, 100, layer, 2, 0.5) for layer in range(2)] == want
  with pytest.raises(SpecError, match="average 0.5; call with ratio=0.5"):
    press.layer_kept(50, 100, 0, 4, ratio=0.3)
  with pytest.raises(SpecError, match="average"):
    press.layer_kept(50, 100, 0, 4)  # budget=
  with pytest.raises(SpecError, match="4 compression_ratios for a model of 30 layers"):
    press.layer_kept(50, 100, 0, 30, ratio=0.5)
  with pytest.raises(ValueError, match="one ratio in"):
    make_press("per_layer(knorm, compression_ratios=(0.5, 1.0))")


# ---- composed -----------------------------------------------------------------------------------
def test_composed_chooses_among_the_survivors_of_the_press_before():
  x = make_inputs(seed=2)
  press = wrappers.ComposedPress(make_press("knorm"), MeanAway())
  n_kept = [3, 4]
  scores, kept = run(press, x, n_kept)
  for b, n, _, k, _ in rows(x):
    first = max(n_kept[b], round(n * (n_kept[b] / n) ** 0.5))  # 6 of 12, 6 of 9
    assert first == 6
    survivors = np_topk(knorm(k), first)
    for h in range(KV_HEADS):
      at = np.flatnonzero(survivors[h])
      s = np_mean_away(k[h, at])
      want = np.zeros(n, bool)
      want[at[np.argsort(-s, kind="stable")[:n_kept[b]]]] = True
      np.testing.assert_array_equal(kept[b, h, :n], want)
      np.testing.assert_allclose(scores[b, h, at], s, rtol=1e-5)
      dropped = ~survivors[h]
      assert scores[b, h, :n][dropped].max() < s.min()
  # the scores rank the kept first, so the default top-k of them is the chain's selection
  np.testing.assert_array_equal(
      np.asarray(topk_per_head(jnp.asarray(scores), jnp.asarray(n_kept), x.valid)), kept)


def test_composed_budgets_share_the_drop_equally():
  budgets = wrappers.stage_budgets(jnp.asarray([100, 9]), jnp.asarray([10, 9]), 3)
  np.testing.assert_array_equal(np.stack([np.asarray(b) for b in budgets]),
                                [[46, 9], [22, 9], [10, 9]])


def test_composed_spec_resolve_and_refusals():
  press = make_press("composed(knorm, snapkv(window_size=4), tova)")
  assert str(press) == "composed(knorm, snapkv(window_size=4), tova)"
  assert make_press(str(press)) == press and hash(press) == hash(make_press(str(press)))
  resolved = make_press("composed(knorm, snapkv)").resolve("kvpress")
  assert resolved.presses[1].window == 64
  assert make_press("composed(knorm, criticalkv(knorm))").needs_wo
  with pytest.raises(ValueError, match="pools a layer's heads"):
    make_press("composed(knorm, adakv(snapkv))")
  with pytest.raises(ValueError, match="two presses or more"):
    make_press("composed(knorm)")


# ---- wrappers around presses of every kind -----------------------------------------------------
WRAPPED = [
    "criticalkv(expected_attention(n_future_positions=4, n_sink=2, use_vnorm=False))",
    "criticaladakv(snapkv(window_size=3, kernel_size=3))",
    "chunkkv(snapkv(window_size=3, kernel_size=3), chunk_length=3)",
    "block(streaming_llm(n_sink=2), block_size=4)",
    "composed(knorm, snapkv(window_size=3, kernel_size=3))",
    "composed(observed_attention, criticalkv(tova))",
]


@pytest.mark.parametrize("spec", WRAPPED)
def test_wrappers_take_any_press_and_rows_stay_apart(spec):
  press = make_press(spec)
  x = make_inputs(seed=4)
  n_kept = [5, 4]
  scores, kept = run(press, x, n_kept)
  counts = kept.sum(-1)  # [B, K]
  if isinstance(press, wrappers.CriticalAdaKVPress):  # the layer's heads share the budget
    np.testing.assert_array_equal(counts.sum(-1), [KV_HEADS * 5, KV_HEADS * 4])
  elif isinstance(press, wrappers.ChunkKVPress):  # two whole chunks of 3, one selection
    np.testing.assert_array_equal(counts, [[6, 6], [6, 6]])
  else:
    np.testing.assert_array_equal(counts, [[5, 5], [4, 4]])
  # the padded row beside another row and other padding: its scores and selection are the same
  moved_scores, moved_kept = run(press, beside_another_row(x), [4, 5])
  n = LENGTHS[1]
  np.testing.assert_allclose(moved_scores[0, :, :n], scores[1, :, :n], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(moved_kept[0], kept[1])


def test_pyramid_wraps_any_press_with_pyramidkvs_budgets():
  from kvjax.presses.attention import pyramid_budget

  plain = make_press("pyramidkv")
  wrapped = make_press(f"pyramid(snapkv, window_size={plain.window})")
  for tokens, ratio in ((217, 0.5), (300, 0.25), (1000, 0.75)):
    got = [wrapped.layer_kept(0, tokens, l, 30, ratio) for l in range(30)]
    assert got == [plain.layer_kept(0, tokens, l, 30, ratio) for l in range(30)]
  knorm = [make_press("pyramid(knorm)").layer_kept(100, 400, l, 8) for l in range(8)]
  assert knorm[0] > knorm[-1] and abs(sum(knorm) / 8 - 100) <= 1
  assert knorm == [pyramid_budget(100, 400, l, 8, None, window=0, beta=20) for l in range(8)]
