"""`kvjax.kernels.gpu`: JAX's Pallas GPU decode kernels, run in Pallas interpret mode on the CPU,
equal kvjax's jnp attention.

Tolerances: float32 inputs (and fp8 pages against the jnp path over their decoded values), 2e-5 absolute (the kernels' online softmax sums in another order;
measured differences are below 1e-6); bfloat16 inputs, 2e-2 (one bf16 rounding of the output and
of the probabilities fed to the value product). Fast lane: one small GQA case per kernel; the MQA,
bf16 and multi-split variants are slow.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as attn
from kvjax.kernels import gpu
from tests.kernels import helpers

F32_TOL = 2e-5
BF16_TOL = 2e-2


def test_block_choices_follow_triton_rules():
  assert gpu.paged_blocks(4, 4, 64) == (1, 4)  # 16 tokens a block, one split
  assert gpu.paged_blocks(64, 16, 64) == (8, 8)  # 128-token blocks, 8 splits
  assert gpu.paged_blocks(2, 4, 64) is None  # 8 tokens: below Triton's smallest block
  assert gpu.paged_blocks(4, 3, 64) is None  # no power-of-two block
  assert gpu.paged_blocks(4, 16, 48) is None  # head dim not a power of two
  assert gpu.decode_blocks(64, 64) == (4, 16)
  assert gpu.decode_blocks(4096, 64) == (16, 128)
  assert gpu.decode_blocks(8, 64) is None  # fewer than 16 slots
  assert gpu.decode_blocks(48, 64) == (3, 16)


def _paged_case(kv_heads, group, head_dim, page_size, per_row, lengths, dtype, seed=0):
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  pages = batch * per_row + 1
  q, qg = helpers.queries(rng, batch, kv_heads, group, head_dim, dtype)
  k_pages, v_pages = helpers.pool(rng, kv_heads, pages, page_size, head_dim, dtype)
  table = helpers.table_of(rng, batch, per_row, pages)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = gpu.paged_decode(q, k_pages, v_pages, table, lengths, interpret=True)
  want = helpers.reference(qg, helpers.dense_of_pages(k_pages, table),
                           helpers.dense_of_pages(v_pages, table), lengths)
  return np.asarray(out, np.float32), np.asarray(want, np.float32)


def test_paged_gqa_ragged_rows_equal_jnp():
  # GQA 4 query heads over 2 kv heads, rows of 5 and 13 tokens and an empty one, 4-token pages
  out, want = _paged_case(2, 2, 16, 4, 4, [5, 13, 0], jnp.float32)
  np.testing.assert_allclose(out, want, atol=F32_TOL)
  assert not out[2].any()  # a row of length 0 sees nothing: zeros, as on the jnp path


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,group", [(2, 2), (1, 2), (2, 8)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_paged_variants_equal_jnp(kv_heads, group, dtype, tol):
  # MQA (1 kv head), GQA 8, 16-token pages, 8 pages a row (two compute blocks, several splits)
  out, want = _paged_case(kv_heads, group, 64, 16, 8, [1, 37, 128], dtype, seed=1)
  np.testing.assert_allclose(out, want, atol=tol)


def _contiguous_case(kv_heads, group, head_dim, slots, lengths, start, dtype, seed=0):
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  q, qg = helpers.queries(rng, batch, kv_heads, group, head_dim, dtype)
  shape = (batch, kv_heads, slots, head_dim)
  k = jnp.asarray(rng.standard_normal(shape), dtype)
  v = jnp.asarray(rng.standard_normal(shape), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  start = None if start is None else jnp.asarray(start, jnp.int32)
  out = gpu.contiguous_decode(q, k, v, lengths, start, interpret=True)
  return np.asarray(out, np.float32), np.asarray(helpers.reference(qg, k, v, lengths, start),
                                                 np.float32)


def test_contiguous_gqa_window_equals_jnp():
  # slots [start, length): a sliding window of 6 over rows of 9 and 30 tokens, and an empty row
  out, want = _contiguous_case(2, 2, 16, 32, [9, 30, 0], [3, 24, 0], jnp.float32)
  np.testing.assert_allclose(out, want, atol=F32_TOL)
  assert not out[2].any()


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,group", [(2, 2), (1, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_contiguous_variants_equal_jnp(kv_heads, group, dtype, tol):
  out, want = _contiguous_case(kv_heads, group, 64, 128, [1, 77, 128], None, dtype, seed=2)
  np.testing.assert_allclose(out, want, atol=tol)


@pytest.mark.slow
def test_contiguous_stats_combine_like_kvjax_statistics():
  # the kernel's residuals over two halves of the slots, merged by `combine_stats`, equal the
  # whole: the form slot sharding combines across devices
  rng = np.random.default_rng(3)
  q, qg = helpers.queries(rng, 2, 2, 2, 16)
  k = jnp.asarray(rng.standard_normal((2, 2, 64, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 2, 64, 16)), jnp.float32)
  lengths = jnp.asarray([20, 50], jnp.int32)
  low = gpu.contiguous_decode_stats(q, k[:, :, :32], v[:, :, :32], jnp.minimum(lengths, 32),
                                    interpret=True)
  high = gpu.contiguous_decode_stats(q, k[:, :, 32:], v[:, :, 32:], jnp.maximum(lengths - 32, 0),
                                     interpret=True)
  out = attn.finish_stats(attn.combine_stats(low, high), jnp.float32)[:, 0]
  np.testing.assert_allclose(out, helpers.reference(qg, k, v, lengths), atol=F32_TOL)


def test_paged_fp8_pages_with_token_scales_equal_jnp_over_decoded_pages():
  # kvjax's fp8 codec: a code per channel, one scale per token; the kernel takes the scales
  from kvjax.caches import codec as codec_lib

  rng = np.random.default_rng(4)
  codec = codec_lib.Codec(format="fp8_e4m3")
  q, qg = helpers.queries(rng, 2, 2, 2, 16)
  k_pages, v_pages = helpers.pool(rng, 2, 9, 4, 16)
  ks, vs = codec.encode(k_pages), codec.encode(v_pages)
  table = helpers.table_of(rng, 2, 4, 9)
  lengths = jnp.asarray([6, 16], jnp.int32)
  out = gpu.paged_decode(q, ks.data, vs.data, table, lengths, (ks.scale[..., 0], vs.scale[..., 0]),
                         interpret=True)
  k, v = codec.decode(ks), codec.decode(vs)
  want = helpers.reference(qg, helpers.dense_of_pages(k, table), helpers.dense_of_pages(v, table),
                           lengths)
  np.testing.assert_allclose(out, want, atol=F32_TOL)
