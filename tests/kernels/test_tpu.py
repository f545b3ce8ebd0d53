"""`kvjax.kernels.tpu`: JAX's Pallas TPU paged decode kernel, run in TPU interpret mode
(`pltpu.force_tpu_interpret_mode`) on the CPU, equals kvjax's jnp attention.

The kernel loads pages as bfloat16 whatever their dtype. Tolerances: against the jnp path over the
same pages rounded to bf16, 2e-5 absolute (the kernel's order of summation); against the jnp path
over the float32 pages themselves, 5e-2 (bf16 rounding of keys and values; measured up to 0.02 on
unit-normal data). Mosaic needs a head dim that is a multiple of 128, so these run at 128. Fast
lane: one small GQA case; the MQA and bf16 variants are slow.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.kernels import tpu
from tests.kernels import helpers

BF16_PAGES_TOL = 2e-5
F32_PAGES_TOL = 5e-2


def test_block_choice_needs_lane_wide_heads():
  assert tpu.paged_blocks(4, 4, 128) == 4
  assert tpu.paged_blocks(64, 16, 128) == 32  # 512 tokens a block at most
  assert tpu.paged_blocks(4, 4, 64) is None


def _case(kv_heads, group, page_size, per_row, lengths, dtype, seed=0):
  rng = np.random.default_rng(seed)
  batch, head_dim = len(lengths), 128
  pages = batch * per_row + 1
  q, qg = helpers.queries(rng, batch, kv_heads, group, head_dim, dtype)
  k_pages, v_pages = helpers.pool(rng, kv_heads, pages, page_size, head_dim, dtype)
  table = helpers.table_of(rng, batch, per_row, pages)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = np.asarray(tpu.paged_decode(q, k_pages, v_pages, table, lengths, interpret=True), np.float32)

  def want(cast):
    k = helpers.dense_of_pages(k_pages.astype(cast).astype(dtype), table)
    v = helpers.dense_of_pages(v_pages.astype(cast).astype(dtype), table)
    return np.asarray(helpers.reference(qg, k, v, lengths), np.float32)

  return out, want(jnp.bfloat16), want(dtype)


def test_paged_gqa_ragged_rows_equal_jnp():
  out, want_bf16, want = _case(2, 2, 4, 4, [5, 13, 0], jnp.float32)
  np.testing.assert_allclose(out, want_bf16, atol=BF16_PAGES_TOL)
  np.testing.assert_allclose(out, want, atol=F32_PAGES_TOL)
  assert not out[2].any()  # the kernel skips a row of length 0; the wrapper gives zeros


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,group", [(1, 2), (2, 8)])
def test_paged_variants_equal_jnp(kv_heads, group):
  out, want_bf16, _ = _case(kv_heads, group, 16, 4, [1, 37, 64], jnp.bfloat16, seed=1)
  np.testing.assert_allclose(out, want_bf16, atol=2e-2)  # bf16 queries and output too
