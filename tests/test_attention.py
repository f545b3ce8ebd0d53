"""Attention kernels against the float64 NumPy oracle (kvjax/testing/oracle.py).

Invariants checked:
  * `RoPE.apply` equals the oracle's rotate-half rotation, and preserves each head's norm;
  * `dense_attention` and `causal_attention` equal oracle softmax attention for MHA and GQA (G > 1),
    with query head n reading kv head n // G; masked-out padding never changes a real query's output;
  * `blockwise_attention` equals the oracle over random shapes: several blocks, ragged `kv_lengths`
    (an empty row included), T > 1 queries at causal positions, GQA; key s is visible to query
    (b, t) iff s < kv_lengths[b] and s <= q_positions[b, t];
  * it never reads blocks at or past the last block any row has filled (NaN there changes nothing),
    and a custom `load_block` is what it reads;
  * `prompt_attention` (queries a chunk at a time, each reading only the key blocks it can see)
    equals the oracle's causal attention, with and without a sliding window, over ragged rows, for
    chunks that divide the prompt, do not, or hold all of it.

Shapes: B batch, T queries, S slots, K kv heads, G query heads per kv head, N = K * G, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvjax.attention import (RoPE, blockwise_attention, causal_attention, dense_attention,
                             group_queries, prompt_attention)
from kvjax.testing import oracle
from tests.helpers import examples

ATOL = 1e-5


def oracle_batched(q, k, v, mask):
  """q [B, T, N, H], k/v [B, S, K, H], mask bool [B, T, S] -> [B, T, N, H] float64 (per row oracle)."""
  return np.stack([oracle.attention(q[b], k[b], v[b], mask[b]) for b in range(q.shape[0])])


def buffer_mask(q_positions, kv_lengths, slots):
  """bool [B, T, S]: the visibility rule of `blockwise_attention`."""
  s = np.arange(slots)
  return (s[None, None, :] <= q_positions[:, :, None]) & (s[None, None, :] < kv_lengths[:, None, None])


# ---- RoPE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_rope_matches_oracle(theta):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)  # [B, T, heads, H]
  pos = rng.integers(0, 4000, (2, 5))
  got = RoPE(16, theta).apply(jnp.asarray(x), jnp.asarray(pos))
  np.testing.assert_allclose(np.asarray(got), oracle.rope(x.astype(np.float64), pos, theta),
                             atol=2e-4, rtol=1e-4)
  # A rotation: norms per (position, head) are unchanged, position 0 is the identity.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  zero = RoPE(16, theta).apply(jnp.asarray(x), jnp.zeros((2, 5), jnp.int32))
  np.testing.assert_allclose(np.asarray(zero), x, atol=1e-7)


def test_rope_relative():
  """q.k after rotation depends only on the distance between positions."""
  rng = np.random.default_rng(1)
  q = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)
  rope = RoPE(32)
  dots = []
  for shift in (0, 7, 100):
    qr = rope.apply(jnp.asarray(q), jnp.array([[10 + shift]]))
    kr = rope.apply(jnp.asarray(k), jnp.array([[3 + shift]]))
    dots.append(float(jnp.sum(qr * kr)))
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


# ---- dense / causal -----------------------------------------------------------------------------
def test_group_queries_layout():
  """Query head n = k * G + g lands at [k, g] (the HF repeat_kv convention)."""
  q = jnp.arange(2 * 3 * 6 * 4).reshape(2, 3, 6, 4)
  g = group_queries(q, 2)
  assert g.shape == (2, 3, 2, 3, 4)
  np.testing.assert_array_equal(np.asarray(g[:, :, 1, 2]), np.asarray(q[:, :, 5]))


# Shapes are few and fixed (each compiles once); hypothesis varies masks, lengths and values.
_dense = jax.jit(dense_attention)
_causal = jax.jit(causal_attention)
_blockwise = jax.jit(blockwise_attention, static_argnames=("block_size",))


@pytest.mark.parametrize("kv,g,t,s", [(1, 1, 1, 5), (2, 3, 4, 9), (2, 2, 3, 1)])
@given(seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
@examples(8)
def test_dense_attention_matches_oracle(kv, g, t, s, seed, density):
  rng = np.random.default_rng(seed)
  b, h = 2, 8
  q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
  k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  mask = rng.random((b, t, s)) < density  # rows with no visible key included
  qg = group_queries(jnp.asarray(q) * h**-0.5, kv)
  got = _dense(qg, jnp.asarray(k).transpose(0, 2, 1, 3), jnp.asarray(v).transpose(0, 2, 1, 3),
               jnp.asarray(mask)[:, None])
  np.testing.assert_allclose(np.asarray(got), oracle_batched(q, k, v, mask), atol=ATOL)


def test_dense_attention_probs_sum_to_one():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 3, 2, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 2, 5, 8)), jnp.float32)
  mask = jnp.ones((1, 1, 3, 5), bool).at[..., 0, 3:].set(False)
  _, probs = dense_attention(q, k, k, mask, return_probs=True)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-6)
  assert float(jnp.abs(probs[..., 0, 3:]).max()) == 0.0


@pytest.mark.parametrize("kv,g", [(4, 1), (2, 2), (1, 4)])
def test_causal_attention_matches_oracle(kv, g):
  rng = np.random.default_rng(kv)
  b, t, h = 3, 7, 16
  q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
  k = rng.standard_normal((b, t, kv, h)).astype(np.float32)
  v = rng.standard_normal((b, t, kv, h)).astype(np.float32)
  n_valid = np.array([7, 4, 1])
  pos = np.broadcast_to(np.arange(t), (b, t))
  got = np.asarray(_causal(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                           jnp.asarray(n_valid)))
  mask = (pos[:, :, None] >= pos[:, None, :]) & (np.arange(t)[None, None, :] < n_valid[:, None, None])
  want = oracle_batched(q, k, v, mask)
  for row, n in enumerate(n_valid):  # padding queries' outputs are unspecified
    np.testing.assert_allclose(got[row, :n], want[row, :n], atol=ATOL)
  # Padding keys are invisible: a row's real queries equal attention over its real tokens only.
  short = _causal(jnp.asarray(q[1:2, :4]), jnp.asarray(k[1:2, :4]), jnp.asarray(v[1:2, :4]),
                  jnp.asarray(pos[1:2, :4]))
  np.testing.assert_allclose(got[1, :4], np.asarray(short)[0], atol=ATOL)


def test_causal_attention_first_token_is_its_value():
  """Position 0 sees only itself, so its output is v[0] of its kv head."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((1, 4, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float32)
  out = causal_attention(q, k, v, jnp.arange(4)[None])
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(v[0, 0])[[0, 0, 1, 1]], atol=1e-6)


_prompt = jax.jit(prompt_attention, static_argnames=("window", "block_size", "chunk"))


@pytest.mark.parametrize("kv,g,t,window,chunk,block", [
    (1, 2, 37, None, 16, 8), (2, 2, 37, 5, 16, 8), (3, 3, 40, None, 8, 8), (1, 4, 40, 12, 64, 16),
    (2, 1, 33, 9, 8, 32)])
@given(seed=st.integers(0, 2**16))
@examples(4)
def test_prompt_attention_matches_oracle(kv, g, t, window, chunk, block, seed):
  rng = np.random.default_rng(seed)
  b, h = 3, 8
  q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
  k = rng.standard_normal((b, t, kv, h)).astype(np.float32)
  v = rng.standard_normal((b, t, kv, h)).astype(np.float32)
  n_valid = np.array([t, rng.integers(1, t + 1), 1])
  got = np.asarray(_prompt(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                           jnp.asarray(n_valid, jnp.int32), window=window, chunk=chunk,
                           block_size=block))
  i = np.arange(t)
  mask = (i[None, :, None] >= i[None, None, :]) & (i[None, None, :] < n_valid[:, None, None])
  if window is not None:
    mask &= i[None, None, :] > i[None, :, None] - window
  want = oracle_batched(q, k, v, mask)
  for row, n in enumerate(n_valid):  # padding queries' outputs are unspecified
    np.testing.assert_allclose(got[row, :n], want[row, :n], atol=ATOL)


# ---- blockwise ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv,g,bs,n_blocks,t", [(1, 1, 4, 4, 1), (2, 2, 4, 3, 3), (1, 4, 8, 2, 2),
                                                (2, 1, 8, 1, 4)])
@given(data=st.data())
@examples(10)
def test_blockwise_matches_oracle(kv, g, bs, n_blocks, t, data):
  b, h, s = 3, 8, bs * n_blocks
  # Ragged rows (empty ones included): row b holds kv_len tokens and its T queries are its newest.
  kv_lengths = np.array(data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b), "kv_lengths"))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
  q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
  k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  q_pos = kv_lengths[:, None] - t + np.arange(t)[None, :]
  qg = group_queries(jnp.asarray(q) * h**-0.5, kv)
  kb, vb = jnp.asarray(k).transpose(0, 2, 1, 3), jnp.asarray(v).transpose(0, 2, 1, 3)
  got = _blockwise(qg, kb, vb, jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_lengths, jnp.int32),
                   block_size=bs)
  mask = buffer_mask(q_pos, kv_lengths, s)
  np.testing.assert_allclose(np.asarray(got), oracle_batched(q, k, v, mask), atol=ATOL)
  # Dense attention with the same mask is the same function.
  dense = _dense(qg, kb, vb, jnp.asarray(mask)[:, None])
  np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=ATOL)


def test_blockwise_arbitrary_positions():
  """Queries at positions before the end of the row (speculative verify) see only s <= position."""
  rng = np.random.default_rng(4)
  b, t, kv, g, h, bs, s = 2, 3, 2, 2, 8, 4, 16
  q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
  k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
  q_pos = np.array([[2, 9, 5], [0, 0, 13]])
  kv_len = np.array([11, 14])
  qg = group_queries(jnp.asarray(q) * h**-0.5, kv)
  got = blockwise_attention(qg, jnp.asarray(k).transpose(0, 2, 1, 3), jnp.asarray(v).transpose(0, 2, 1, 3),
                            jnp.asarray(q_pos), jnp.asarray(kv_len), block_size=bs)
  np.testing.assert_allclose(np.asarray(got), oracle_batched(q, k, v, buffer_mask(q_pos, kv_len, s)),
                             atol=ATOL)


def test_blockwise_reads_only_filled_blocks():
  """NaN in every block past the longest row's last block never reaches the output."""
  rng = np.random.default_rng(5)
  b, t, kv, g, h, bs, s = 2, 1, 1, 2, 8, 4, 32
  q = jnp.asarray(rng.standard_normal((b, t, kv, g, h)), jnp.float32)
  k = rng.standard_normal((b, kv, s, h)).astype(np.float32)
  v = rng.standard_normal((b, kv, s, h)).astype(np.float32)
  kv_len = np.array([6, 3])  # blocks 0 and 1 are read; 2.. are not
  k[:, :, 8:] = np.nan
  v[:, :, 8:] = np.nan
  out = blockwise_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_len - 1)[:, None],
                            jnp.asarray(kv_len), block_size=bs)
  assert np.isfinite(np.asarray(out)).all()

  seen = []

  def load_block(kb, vb, start):  # a storage that keeps blocks elsewhere: here, negated keys
    seen.append(start)
    from jax import lax
    return (-lax.dynamic_slice_in_dim(kb, start, bs, axis=2),
            lax.dynamic_slice_in_dim(vb, start, bs, axis=2))

  custom = blockwise_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_len - 1)[:, None],
                               jnp.asarray(kv_len), block_size=bs, load_block=load_block)
  plain = blockwise_attention(-q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_len - 1)[:, None],
                              jnp.asarray(kv_len), block_size=bs)
  assert seen, "load_block was never called"
  np.testing.assert_allclose(np.asarray(custom), np.asarray(plain), atol=1e-6)
