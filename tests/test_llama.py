"""The Flax Llama decoder on the `tiny` model: cached decoding against full recomputation.

Invariants checked:
  * cached decoding (prefill, then token by token through a FullCache via `Llama(config).apply`)
    gives the logits of the uncached `llama.forward` over the whole sequence at every step
    (atol 1e-4, fp32), and the same greedy tokens; for batch 1 and a ragged right-padded batch;
  * `llama.forward` equals the float64 NumPy oracle (`kvjax.testing.oracle.llama_forward`), MHA and GQA;
  * prefilling in chunks equals prefilling at once;
  * GQA equals MHA with explicitly repeated kv heads (wk/wv rows repeated per query head), cached
    and uncached;
  * right padding (n_valid) never changes a real token's logits.

`lively` is `tiny` with its matrices scaled by 5: the random 0.02-std weights make greedy decoding
repeat one token, which would hide cache bugs; scaled weights give varied sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.caches.full import FullCache
from kvjax.loading import Model
from kvjax.models import llama
from kvjax.testing import oracle

ATOL = 1e-4


@pytest.fixture(scope="module")
def lively(tiny):
  params = jax.tree_util.tree_map(lambda p: p * 5.0 if p.ndim > 1 else p, tiny.params)
  return Model("tiny-lively", tiny.config, params, tiny.tokenizer)


# Every call is padded to one shape per config (rows to BATCH, prefill to PREFILL tokens, forward
# to WIDTH tokens) so each config compiles a handful of executables, not one per test.
BATCH, PREFILL, WIDTH = 3, 16, 32


@functools.lru_cache(maxsize=None)
def _step_fn(config):
  """jitted (params, tokens [B, T], cache, n_valid [B]) -> (logits [B, T, V], cache)."""
  model = llama.Llama(config, jnp.float32)
  return jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, c, n))


def new_cache(config, batch=BATCH, capacity=32, block_size=8):
  return FullCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                        head_dim=config.head_dim, capacity=capacity, block_size=block_size)


def padded(seqs, width):
  """Right-padded int32 [BATCH, width] tokens and int32 [BATCH] lengths (spare rows: one token)."""
  tokens = np.zeros((BATCH, width), np.int32)
  lengths = np.ones((BATCH,), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
    lengths[b] = len(s)
  return jnp.asarray(tokens), jnp.asarray(lengths)


def forward(model, seqs):
  """Uncached logits [len(seqs), WIDTH, V] of right-padded rows."""
  tokens, lengths = padded(seqs, WIDTH)
  return np.asarray(llama.forward(model.config, model.params, tokens, lengths))[:len(seqs)]


def cached_greedy(model, prompts, steps, chunked_prefill=True):
  """Prefill of ragged `prompts`, then `steps` greedy tokens one at a time.

  The prefill is one right-padded chunk (n_valid = prompt lengths), or, with chunked_prefill=False,
  one token per call with n_valid 0 for rows whose prompt is already in (one compile fewer).
  Returns (sequences: per-row token lists, prompt + generated; logits: per row [n, V], one for every
  token fed, in order, n = len(sequence)).
  """
  step = _step_fn(model.config)
  batch = len(prompts)
  cache = new_cache(model.config)
  per_row = [[] for _ in prompts]
  if chunked_prefill:
    tokens, lengths = padded(prompts, PREFILL)
    logits, cache = step(model.params, tokens, cache, lengths)
    logits = np.asarray(logits)
    per_row = [[logits[b, i] for i in range(len(p))] for b, p in enumerate(prompts)]
  else:
    for t in range(max(len(p) for p in prompts)):
      tok, n_valid = np.zeros((BATCH, 1), np.int32), np.zeros((BATCH,), np.int32)
      for b, p in enumerate(prompts):
        if t < len(p):
          tok[b, 0], n_valid[b] = p[t], 1
      logits, cache = step(model.params, jnp.asarray(tok), cache, jnp.asarray(n_valid))
      for b, p in enumerate(prompts):
        if t < len(p):
          per_row[b].append(np.asarray(logits[b, 0]))
  lengths = np.array([len(p) for p in prompts])
  np.testing.assert_array_equal(np.asarray(cache.lengths)[:batch], lengths)
  seqs = [list(p) for p in prompts]
  for _ in range(steps):
    nxt = np.zeros((BATCH, 1), np.int32)
    for b in range(batch):
      nxt[b, 0] = int(np.argmax(per_row[b][-1]))
      seqs[b].append(int(nxt[b, 0]))
    logits, cache = step(model.params, jnp.asarray(nxt), cache, jnp.ones((BATCH,), jnp.int32))
    for b in range(batch):
      per_row[b].append(np.asarray(logits[b, 0]))
  np.testing.assert_array_equal(np.asarray(cache.lengths)[:batch], lengths + steps)
  return seqs, [np.stack(r) for r in per_row]


PROMPTS = [[72, 105, 32, 116, 104, 101, 114, 101], [7, 200, 13], [99, 1, 2, 3, 4, 250]]


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["batch1", "ragged"])
def test_cached_decoding_equals_full_recompute(lively, rows):
  prompts = [PROMPTS[r] for r in rows]
  steps = 12
  seqs, logits = cached_greedy(lively, prompts, steps)
  full = forward(lively, seqs)
  for b, (prompt, seq) in enumerate(zip(prompts, seqs)):
    n = len(seq)
    assert logits[b].shape[0] == n  # the last sampled token is fed too
    np.testing.assert_allclose(logits[b], full[b, :n], atol=ATOL)
    # Greedy tokens identical: token i+1 is the argmax of the recomputed logits at i.
    np.testing.assert_array_equal(np.argmax(full[b, len(prompt) - 1:n - 1], -1), seq[len(prompt):])
  assert len(set(seqs[0][len(prompts[0]):])) > 3, "lively model should not repeat one token"


def test_cached_decoding_tiny_batch1_and_ragged(tiny):
  """The unscaled tiny model too (its logits vary by position even when argmax repeats)."""
  seqs, logits = cached_greedy(tiny, [PROMPTS[0], PROMPTS[1]], 6)
  seqs2, logits2 = cached_greedy(tiny, [PROMPTS[0], PROMPTS[1]], 6, chunked_prefill=False)
  assert seqs2 == seqs
  for a, b in zip(logits, logits2):
    np.testing.assert_allclose(a, b, atol=ATOL)
  full = forward(tiny, seqs)
  for b, seq in enumerate(seqs):
    np.testing.assert_allclose(logits[b], full[b, :len(seq)], atol=ATOL)


@pytest.mark.parametrize("which", ["tiny", "tiny_gqa", "lively"])
def test_forward_matches_numpy_oracle(which, request):
  model = request.getfixturevalue(which)
  seq = PROMPTS[0] + PROMPTS[2]
  got = forward(model, [seq])[0, :len(seq)]
  want = oracle.llama_forward(model.config, model.params, np.array(seq))
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_cached_decoding_matches_oracle(lively):
  seqs, logits = cached_greedy(lively, [PROMPTS[1]], 8)
  want = oracle.llama_forward(lively.config, lively.params, np.array(seqs[0]))
  np.testing.assert_allclose(logits[0], want, atol=ATOL)


def test_right_padding_is_invisible(tiny):
  """A padded row's real logits equal the unpadded row's (padding value is irrelevant)."""
  seq = jnp.asarray([PROMPTS[2]], jnp.int32)
  alone = np.asarray(llama.forward(tiny.config, tiny.params, seq))[0]
  np.testing.assert_allclose(forward(tiny, [PROMPTS[2]])[0, :6], alone, atol=1e-5)
  tokens = np.asarray(padded([PROMPTS[2]], WIDTH)[0]).copy()
  tokens[:, 6:] = 255  # different padding ids
  junk = np.asarray(llama.forward(tiny.config, tiny.params, jnp.asarray(tokens), jnp.array([6, 1, 1])))
  np.testing.assert_allclose(junk[0, :6], alone, atol=1e-5)


def test_chunked_prefill(lively):
  cfg = lively.config
  step = _step_fn(cfg)
  seq = PROMPTS[0] + PROMPTS[2]  # 14 tokens
  whole, c1 = step(lively.params, *padded([seq], PREFILL)[:1], new_cache(cfg), jnp.array([14, 1, 1]))
  first, rest = padded([seq[:5]], PREFILL)[0], padded([seq[5:]], PREFILL)[0]
  a, c2 = step(lively.params, first, new_cache(cfg), jnp.array([5, 1, 1]))
  b, c2 = step(lively.params, rest, c2, jnp.array([9, 1, 1]))
  np.testing.assert_allclose(np.asarray(a[0, :5]), np.asarray(whole[0, :5]), atol=ATOL)
  np.testing.assert_allclose(np.asarray(b[0, :9]), np.asarray(whole[0, 5:14]), atol=ATOL)
  np.testing.assert_array_equal(np.asarray(c2.lengths[0]), np.asarray(c1.lengths[0]))
  np.testing.assert_allclose(np.asarray(c2.k[:, 0, :, :14]), np.asarray(c1.k[:, 0, :, :14]), atol=1e-5)


# ---- GQA == MHA with repeated heads -----------------------------------------------------------------
def mha_from_gqa(model):
  """An MHA model computing the same function: each kv head's wk/wv columns repeated G times."""
  cfg = model.config
  g, h = cfg.group_size, cfg.head_dim
  params = dict(model.params)
  for i in range(cfg.n_layers):
    attn = dict(params[f"layers_{i}"]["attn"])
    for name in ("wk", "wv"):
      w = np.asarray(attn[name]).reshape(cfg.dim, cfg.n_kv_heads, h)  # [D, K*H] -> [D, K, H]
      attn[name] = jnp.asarray(np.repeat(w, g, axis=1).reshape(cfg.dim, cfg.n_heads * h))
    params[f"layers_{i}"] = dict(params[f"layers_{i}"], attn=attn)
  mha_cfg = cfg.replace(n_kv_heads=cfg.n_heads, name="tiny-gqa-as-mha")
  return Model(mha_cfg.name, mha_cfg, params, model.tokenizer)


def test_gqa_equals_mha_with_repeated_heads(tiny_gqa):
  assert tiny_gqa.config.group_size == 2
  mha = mha_from_gqa(tiny_gqa)
  assert mha.params["layers_0"]["attn"]["wk"].shape == (256, 4 * 64)
  assert tiny_gqa.params["layers_0"]["attn"]["wk"].shape == (256, 2 * 64)
  gqa_full = forward(tiny_gqa, [PROMPTS[0], PROMPTS[1]])
  mha_full = forward(mha, [PROMPTS[0], PROMPTS[1]])
  for b, p in enumerate([PROMPTS[0], PROMPTS[1]]):
    np.testing.assert_allclose(gqa_full[b, :len(p)], mha_full[b, :len(p)], atol=1e-5)
  gqa_seqs, gqa_logits = cached_greedy(tiny_gqa, [PROMPTS[0], PROMPTS[1]], 5, chunked_prefill=False)
  mha_seqs, mha_logits = cached_greedy(mha, [PROMPTS[0], PROMPTS[1]], 5, chunked_prefill=False)
  assert gqa_seqs == mha_seqs
  for a, b in zip(gqa_logits, mha_logits):
    np.testing.assert_allclose(a, b, atol=ATOL)
  # GQA's cache really holds K = 2 heads (never repeated in memory).
  assert new_cache(tiny_gqa.config).k.shape[2] == 2


def test_gqa_cached_equals_uncached(tiny_gqa):
  seqs, logits = cached_greedy(tiny_gqa, [PROMPTS[2], PROMPTS[1]], 6, chunked_prefill=False)
  full = forward(tiny_gqa, seqs)
  for b, seq in enumerate(seqs):
    np.testing.assert_allclose(logits[b], full[b, :len(seq)], atol=ATOL)
