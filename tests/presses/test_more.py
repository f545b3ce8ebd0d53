"""kvjax.presses.more (chunk, entropy_gated_chunkkv, non_causal_attn, compactor) against small
NumPy oracles written from kvpress 0.5.5's code, on synthetic `LayerInputs` with ragged rows (the
shorter right-padded with garbage): a batched row must get what it gets alone. The oracles of
chunk, entropy_gated_chunkkv, non_causal_attn, cap and merging were checked once against kvpress
0.5.5's own torch code on random tensors (compactor's leverage sketch is torch.randn there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.presses import LayerInputs, make_press
from kvjax.presses.keys import LeverageScorePress
from kvjax.presses.more import chunk_budgets
from kvjax.testing.presses import check_press
from tests.presses.synthetic import layer_inputs

LENGTHS = (23, 14)
KV_HEADS, GROUPS = 2, 2


@functools.partial(jax.jit, static_argnames="press")
def _run(press, x, n_kept):
  scores = press.score(x, n_kept).astype(jnp.float32)
  return scores, press.select(x, scores, n_kept)


def run(press, x: LayerInputs, n_kept):
  """(scores, kept) as NumPy; nothing kept at padding."""
  scores, kept = _run(make_press(press), x, jnp.asarray(n_kept, jnp.int32))
  scores, kept = np.asarray(scores), np.asarray(kept)
  assert not (kept & ~np.asarray(x.valid)[:, None, :]).any(), "a padding position was kept"
  return scores, kept


def alone(x: LayerInputs, b: int) -> LayerInputs:
  """Row b of x alone, cut to its own length."""
  n = int(x.n_valid[b])
  cut = lambda a, axis: jax.lax.slice_in_dim(a[b:b + 1], 0, n, axis=axis)
  return x.replace(q=cut(x.q, 1), q_raw=cut(x.q_raw, 1), k=cut(x.k, 2), k_raw=cut(x.k_raw, 2),
                   v=cut(x.v, 2), n_valid=x.n_valid[b:b + 1])


def assert_rows_alone(press, x, n_kept, scores, kept, atol=1e-5):
  for b in range(x.batch):
    n = int(x.n_valid[b])
    s1, k1 = run(press, alone(x, b), [n_kept[b]])
    np.testing.assert_allclose(s1[0], scores[b, :, :n], atol=atol, rtol=1e-4)
    assert (k1[0] == kept[b, :, :n]).all()


def np_topk(s, k):
  """bool [len(s)]: the k best of s (ties to the lower position)."""
  keep = np.zeros(len(s), bool)
  keep[np.argsort(-s, kind="stable")[:k]] = True
  return keep


# ---- chunk ---------------------------------------------------------------------------------------
def kvpress_chunk_budgets(n, c, ratio):
  """kvpress's ChunkPress: a chunk of L tokens keeps max(1, int(L (1 - ratio)))."""
  return [max(1, int(min(c, n - i) * (1 - ratio))) for i in range(0, n, c)]


@pytest.mark.parametrize("c", [1, 4, 5, 16])
def test_chunk_budgets_are_kvpress_from_the_total_alone(c):
  press = make_press(f"chunk(knorm, chunk_length={c})")
  lengths, totals, wants = [], [], []
  for n in (1, 3, 9, 14, 23, 40):
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.7, 0.9):
      want = kvpress_chunk_budgets(n, c, ratio)
      total = press.layer_kept(max(1, int(n * (1 - ratio))), n, 0, 2, ratio)
      assert total == sum(want)
      lengths, totals, wants = lengths + [n], totals + [total], wants + [want]
    for budget in range(1, n + 1):  # budget=n: the largest kvpress-like split that fits
      total = press.layer_kept(budget, n, 0, 2, None)
      assert (total <= budget or total == -(-n // c)) and 1 <= total <= n
      lengths, totals, wants = lengths + [n], totals + [total], wants + [None]
  m = -(-max(lengths) // c)
  got = np.asarray(jax.jit(chunk_budgets, static_argnums=(2, 3))(
      jnp.asarray(lengths), jnp.asarray(totals), c, m))
  for n, total, want, row in zip(lengths, totals, wants, got):
    assert row.sum() == total and not row[-(-n // c):].any()
    if want is not None:
      assert row[:len(want)].tolist() == want, (n, total)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_chunk_knorm_is_topk_within_each_chunk(ratio):
  c = 5
  press = f"chunk(knorm, chunk_length={c})"
  x = layer_inputs(LENGTHS, seed=1)
  n_kept = [make_press(press).layer_kept(0, n, 0, 1, ratio) for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  for b, n in enumerate(LENGTHS):
    budgets = kvpress_chunk_budgets(n, c, ratio)
    for h in range(KV_HEADS):
      norms = np.linalg.norm(np.asarray(x.k[b, h, :n], np.float64), axis=-1)
      want = np.concatenate([np_topk(-norms[i:i + c], budgets[i // c]) for i in range(0, n, c)])
      assert (kept[b, h, :n] == want).all()
  assert_rows_alone(press, x, n_kept, scores, kept)


def test_chunk_shows_the_press_each_chunk_as_a_whole_prompt():
  # streaming_llm reads n_valid and its budget: in each chunk, its first token and its last k - 1
  c = 4
  press = f"chunk(streaming_llm(n_sink=1), chunk_length={c})"
  x = layer_inputs(LENGTHS, seed=2)
  n_kept = [make_press(press).layer_kept(0, n, 0, 1, 0.5) for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  for b, n in enumerate(LENGTHS):
    want = np.zeros(n, bool)
    for i, k in zip(range(0, n, c), kvpress_chunk_budgets(n, c, 0.5)):
      length = min(c, n - i)
      want[i] = True
      want[i + length - (k - 1):i + length] = True
    assert (kept[b, :, :n] == want).all()
  assert_rows_alone(press, x, n_kept, scores, kept)


def test_chunk_refuses_presses_that_are_not_scorers():
  for spec in ("chunk(adakv(knorm))", "chunk(think)", "chunk(knorm, chunk_length=0)"):
    with pytest.raises(Exception, match="chunk"):
      make_press(spec)


# ---- entropy_gated_chunkkv -----------------------------------------------------------------------
def np_entropy_gated(s, budget, c, low_len):
  """bool [n]: kvpress's EntropyGatedChunkKVPress on head-summed scores s [n] of one row."""
  n = len(s)
  bounds = [(i, min(i + c, n)) for i in range(0, n, c)]
  means, entropies = [], []
  for start, end in bounds:
    part = s[start:end]
    means.append(part.mean())
    if end - start == 1:
      entropies.append(0.0)
      continue
    part = part - min(part.min(), 0.0)
    p = part / (part.sum() + 1e-8)
    h = -(p * np.log(p + 1e-8)).sum()
    entropies.append(min(max(h / math.log(end - start), 0.0), 1.0))
  means, entropies = np.array(means), np.array(entropies)
  lower_median = lambda v: np.sort(v)[(len(v) - 1) // 2]  # torch.median
  spiky = (means >= lower_median(means)) & (entropies < lower_median(entropies))
  keep = np.zeros(n, bool)
  for i in np.argsort(-means, kind="stable"):
    if budget <= 0:
      break
    start, end = bounds[i]
    take = min(end - start, budget)
    if spiky[i]:
      take = min(take, low_len)
    keep[start + np.flatnonzero(np_topk(s[start:end], take))] = True
    budget -= take
  if budget > 0:
    left = np.flatnonzero(~keep)
    keep[left[np_topk(s[left], budget)]] = True
  return keep


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_entropy_gated_chunkkv_is_kvpress_greedy_pass(signed, share):
  press = make_press("entropy_gated_chunkkv(knorm, chunk_length=4, low_entropy_chunk_length=2)")
  x = layer_inputs(LENGTHS, seed=3)
  rng = np.random.default_rng(4)
  scores = rng.exponential(size=(2, KV_HEADS, max(LENGTHS))) ** 3  # some chunks spiky
  scores = scores - 1.0 if signed else scores
  n_kept = [max(1, int(n * share)) for n in LENGTHS]
  kept = np.asarray(jax.jit(press.select)(x, jnp.asarray(scores, jnp.float32),
                                          jnp.asarray(n_kept, jnp.int32)))
  for b, n in enumerate(LENGTHS):
    summed = scores[b, :, :n].astype(np.float32).sum(0).astype(np.float64)
    want = np_entropy_gated(summed, n_kept[b], 4, 2)
    assert (kept[b, :, :n] == want).all() and kept[b].sum(-1).tolist() == [n_kept[b]] * KV_HEADS
    assert not kept[b, :, n:].any()


def test_entropy_gated_chunkkv_checks_its_lengths():
  with pytest.raises(ValueError, match="low_entropy_chunk_length"):
    make_press("entropy_gated_chunkkv(knorm, chunk_length=4, low_entropy_chunk_length=4)")


# ---- non_causal_attn -----------------------------------------------------------------------------
def np_non_causal(q, k, v, c):
  """float64 [K, n]: kvpress's NonCausalAttnPress of one row (q [n, N, H], k/v [K, n, H])."""
  n, heads, h = q.shape
  padded = -(-n // c) * c
  qp = np.zeros((padded, heads, h))
  qp[:n] = q
  kp = np.zeros((KV_HEADS, padded, h))
  kp[:, :n] = k
  kg = np.repeat(kp, GROUPS, axis=0)  # [N, padded, H]
  sums = np.zeros((heads, padded))
  for i in range(0, padded, c):
    logits = np.einsum("qnh,nkh->nqk", qp[i:i + c], kg[:, i:i + c])  # no scale
    logits[:, :, np.arange(i, i + c) >= n] = -1e-9  # kvpress's padding "mask"
    e = np.exp(logits - logits.max(-1, keepdims=True))
    sums[:, i:i + c] = (e / e.sum(-1, keepdims=True)).sum(1)
  a = sums[:, :n].reshape(KV_HEADS, GROUPS, n).mean(1) * np.linalg.norm(v, axis=-1)
  a = np.pad(a, ((0, 0), (1, 1)))
  a = (a[:, :-2] + a[:, 1:-1] + a[:, 2:]) / 3  # avg_pool1d(3, padding=1)
  return (a - a.mean()) / max(a.std(ddof=1), 1e-6)


def row_arrays(x: LayerInputs, b: int, start=0, end=None):
  n = int(x.n_valid[b]) if end is None else end
  return (np.asarray(x.q[b, start:n], np.float64), np.asarray(x.k[b, :, start:n], np.float64),
          np.asarray(x.v[b, :, start:n], np.float64))


@pytest.mark.parametrize("c", [4, 7, 32])
def test_non_causal_attn_is_kvpress_chunked_attention(c):
  press = f"non_causal_attn(chunk_size={c})"
  x = layer_inputs(LENGTHS, seed=5)
  n_kept = [n // 2 for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  for b, n in enumerate(LENGTHS):
    want = np_non_causal(*row_arrays(x, b), c)
    np.testing.assert_allclose(scores[b, :, :n], want, atol=2e-4, rtol=1e-4)
    for h in range(KV_HEADS):
      assert (kept[b, h, :n] == np_topk(scores[b, h, :n], n_kept[b])).all()
  assert_rows_alone(press, x, n_kept, scores, kept)


# ---- compactor -----------------------------------------------------------------------------------
@pytest.mark.parametrize("blending", [None, 0.5])
def test_compactor_blends_leverage_and_non_causal_attention_between_sinks(blending):
  press = make_press("compactor", chunk_size=4, sketch_dimension=6, blending=blending,
                     sink_size_start=3, sink_size_end=2)
  x = layer_inputs(LENGTHS, seed=6)
  n_kept = [n // 2 for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  for b, n in enumerate(LENGTHS):
    middle = alone(x, b)
    cut = lambda a, axis: jax.lax.slice_in_dim(a, 3, n - 2, axis=axis)
    middle = middle.replace(q=cut(middle.q, 1), q_raw=cut(middle.q_raw, 1), k=cut(middle.k, 2),
                            k_raw=cut(middle.k_raw, 2), v=cut(middle.v, 2),
                            n_valid=jnp.asarray([n - 5], jnp.int32))
    lev = np.asarray(LeverageScorePress(6).score(middle, None))[0]
    att = np_non_causal(*row_arrays(x, b, 3, n - 2), 4)
    blend = 1 - n_kept[b] / n if blending is None else blending
    want = blend * lev + att
    np.testing.assert_allclose(scores[b, :, 3:n - 2], want, atol=2e-4, rtol=1e-4)
    sinks = np.r_[0:3, n - 2:n]
    assert np.allclose(scores[b][:, sinks], want.max() + 1, atol=2e-4)
    assert kept[b][:, sinks].all()
  assert_rows_alone(press, x, n_kept, scores, kept, atol=2e-4)


def test_compactor_row_with_nothing_between_its_sinks_keeps_its_first_tokens():
  x = layer_inputs((10, 5), seed=7)
  scores, kept = run("compactor(chunk_size=4, sketch_dimension=4)", x, [3, 2])
  assert np.isfinite(scores[np.broadcast_to(np.asarray(x.valid)[:, None], scores.shape)]).all()
  assert kept[0, :, :3].all() and kept[0].sum(-1).tolist() == [3, 3]
  assert kept[1, :, :2].all() and kept[1].sum(-1).tolist() == [2, 2]


# ---- cap -----------------------------------------------------------------------------------------
def np_mean_rope(n, p, h, theta):
  """float64 [H, H]: kvpress's CapPress average RoPE matrix over positions n .. n + p - 1."""
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  half = np.zeros((h, h))
  half[h // 2:, :h // 2] = np.eye(h // 2)
  half[:h // 2, h // 2:] = -np.eye(h // 2)
  mats = []
  for pos in range(n, n + p):
    angles = np.concatenate([pos * inv, pos * inv])
    mats.append(np.cos(angles)[None, :] * np.eye(h) + np.sin(angles)[None, :] * half)
  return np.mean(mats, axis=0)


def np_cap(q_raw, k, v, n_sink, tau, p, eps, theta):
  """float64 [K, n]: kvpress's CapPress of one row (q_raw [n, N, H], k/v [K, n, H])."""
  n, _, h = q_raw.shape
  anchor = q_raw[n_sink:] @ np_mean_rope(n, p, h, theta).T  # [m, N, H]
  anchor = anchor.mean(0)
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  kg, vg = np.repeat(k[:, n_sink:], GROUPS, 0), np.repeat(v[:, n_sink:], GROUPS, 0)
  stat = np.clip(np.einsum("nh,nth->nt", unit(anchor), unit(kg)), -1, 1)
  w = np.exp(tau * stat - (tau * stat).max(-1, keepdims=True))
  scores = []
  for head in range(len(w)):
    scaled = vg[head] * np.sqrt(w[head] + eps)[:, None]
    a = np.eye(h) + scaled.T @ scaled
    lev = np.einsum("th,th->t", vg[head], np.linalg.solve(a, vg[head].T).T)
    scores.append(w[head] * lev)
  s = np.array(scores).reshape(KV_HEADS, GROUPS, -1).mean(1)
  return np.concatenate([np.full((KV_HEADS, n_sink), s.max() + 1), s], axis=1)


@pytest.mark.parametrize("options", [{}, dict(tau=1.0, n_future_positions=3, n_sink=2)])
def test_cap_is_kvpress_capacity_leverage(options):
  press = make_press("cap", **options)
  x = layer_inputs(LENGTHS, seed=8)
  n_kept = [n // 2 for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  for b, n in enumerate(LENGTHS):
    want = np_cap(np.asarray(x.q_raw[b, :n], np.float64), *row_arrays(x, b)[1:], press.n_sink,
                  press.tau, press.n_future_positions, press.epsilon, 10000.0)
    np.testing.assert_allclose(scores[b, :, :n], want, atol=1e-5, rtol=1e-4)
  assert_rows_alone(press, x, n_kept, scores, kept)
  short = layer_inputs((3, 2), seed=9)  # no token after the sinks: the first ones are kept
  _, kept = run("cap", short, [2, 1])
  assert kept[0, :, :2].all() and kept[1, :, 0].all() and kept.sum() == 6


# ---- merging -------------------------------------------------------------------------------------
def np_torch_quantile(v, q):
  """torch.quantile(v, q) of a 1-D array (linear, torch's lerp: -inf neighbours give NaN/-inf)."""
  s = np.sort(v)
  at = q * (len(s) - 1)
  lo, hi = int(np.floor(at)), min(int(np.floor(at)) + 1, len(s) - 1)
  w = at - lo
  with np.errstate(invalid="ignore"):
    return s[lo] + w * (s[hi] - s[lo]) if w < 0.5 else s[hi] - (s[hi] - s[lo]) * (1 - w)


def np_merge(k, v, keep, threshold, fraction):
  """float64 [n, H]: kvpress's MergingPress.merge of one (row, kv head): k/v [n, H], keep [n]."""
  kept, dropped = np.flatnonzero(keep), np.flatnonzero(~keep)
  v = v.copy()
  if len(dropped) == 0:
    return v
  unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
  sim = unit[dropped] @ unit[kept].T
  best, target = sim.max(-1), kept[sim.argmax(-1)]
  ok = best >= threshold
  if fraction < 1 and ok.any():
    with np.errstate(invalid="ignore"):
      ok = ok & (best >= np_torch_quantile(np.where(ok, best, -np.inf), 1 - fraction))
  norm = np.linalg.norm(v, axis=-1)
  w = np.maximum(best, 0) * ok * norm[dropped] / (norm[dropped] + norm[target] + 1e-6)
  added, weight = np.zeros_like(v), np.zeros(len(v))
  for d, t, wi in zip(dropped, target, w):
    added[t] += wi * v[d]
    weight[t] += wi
  merged = (v + added) / (1 + weight)[:, None]
  return np.where((weight > 0)[:, None], merged, v)


@functools.partial(jax.jit, static_argnames="press")
def _merged(press, x, keep):
  return press.merge_values(x, keep)


@pytest.mark.parametrize("threshold, fraction", [(0.0, 1.0), (0.2, 1.0), (0.0, 0.75), (0.0, 0.3)])
def test_merging_folds_dropped_values_as_kvpress(threshold, fraction):
  press = make_press("merging(knorm)", similarity_threshold=threshold, merge_fraction=fraction)
  x = layer_inputs(LENGTHS, seed=10)
  n_kept = [n // 3 for n in LENGTHS]
  scores, kept = run(press, x, n_kept)
  merged = np.asarray(_merged(press, x, jnp.asarray(kept)))
  for b, n in enumerate(LENGTHS):
    for h in range(KV_HEADS):
      norms = np.linalg.norm(np.asarray(x.k[b, h, :n], np.float64), axis=-1)
      assert (kept[b, h, :n] == np_topk(-norms, n_kept[b])).all()
      want = np_merge(np.asarray(x.k[b, h, :n], np.float64), np.asarray(x.v[b, h, :n], np.float64),
                      kept[b, h, :n], threshold, fraction)
      np.testing.assert_allclose(merged[b, h, :n][kept[b, h, :n]], want[kept[b, h, :n]],
                                 atol=1e-5, rtol=1e-5)
  for b, n in enumerate(LENGTHS):  # a row alone merges the same
    one = np.asarray(_merged(press, alone(x, b), jnp.asarray(kept[b:b + 1, :, :n])))[0]
    np.testing.assert_allclose(one[kept[b, :, :n]], merged[b, :, :n][kept[b, :, :n]], atol=1e-6)
  assert not np.allclose(merged[kept], np.asarray(x.v)[kept])  # something was merged


def test_merging_changes_only_the_stored_values():
  import kvjax
  from kvjax.presses import compress
  model = kvjax.load("tiny")
  rows = [[5, 9, 13, 7, 21, 8, 30, 11, 4, 6], [3, 12, 17, 5, 9, 14]]
  plain = compress(model, rows, "knorm", ratio=0.5, room=2).view()
  merged = compress(model, rows, "merging(knorm)", ratio=0.5, room=2).view()
  assert (np.asarray(plain.positions) == np.asarray(merged.positions)).all()
  assert (np.asarray(plain.mask) == np.asarray(merged.mask)).all()
  live = np.asarray(plain.mask)
  np.testing.assert_array_equal(np.asarray(plain.keys)[live], np.asarray(merged.keys)[live])
  assert not np.allclose(np.asarray(plain.values)[live], np.asarray(merged.values)[live])


# ---- the conformance kit -------------------------------------------------------------------------
# The oracles above already check ragged rows, padding and jit; the kit (eager, slower) runs on
# chunk here and on every press in the full lane (tests/presses/test_compress.py, on tiny).
@pytest.mark.parametrize("spec", [
    "chunk(knorm, chunk_length=5)",
    pytest.param("entropy_gated_chunkkv(knorm)", marks=pytest.mark.slow),
    pytest.param("non_causal_attn(chunk_size=8)", marks=pytest.mark.slow),
    pytest.param("compactor(chunk_size=4, sketch_dimension=4)", marks=pytest.mark.slow),
    pytest.param("cap", marks=pytest.mark.slow),
    pytest.param("merging(knorm)", marks=pytest.mark.slow)])
def test_kit(spec):
  check_press(spec, atol=1e-4)
