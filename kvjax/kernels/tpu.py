"""TPU decode attention through JAX's Pallas (Mosaic) kernel `pallas.ops.tpu.paged_attention`.

kvjax's paged pool is the kernel's layout ([K, pages, page_size, H] per layer and stream). The
kernel loads pages as bfloat16 whatever their dtype, so against the jnp path over float32 pages it
agrees to bf16 rounding of the keys and values (exactly where the pages are bf16, the accelerator
default). Mosaic wants the head dim a multiple of 128 (the lane width): `paged_blocks` returns
None otherwise and the resolver keeps the jnp path. The wrapped op has no `interpret` flag; with
`interpret=True` the call runs under `pltpu.force_tpu_interpret_mode()`, which interprets every
TPU `pallas_call` traced inside it (on CPU too).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as _paged

LANES = 128


def paged_blocks(pages_per_row, page_size, head_dim: int) -> int | None:
  """pages_per_compute_block: the most pages dividing M = `pages_per_row` whose block holds at
  most 512 tokens (one page when a page alone is larger); None when the head dim is not a
  multiple of 128."""
  if not pages_per_row or not page_size or head_dim % LANES:
    return None
  fits = [d for d in range(1, pages_per_row + 1) if pages_per_row % d == 0 and d * page_size <= 512]
  return max(fits) if fits else 1


def paged_decode(q, k_pages, v_pages, table, lengths, *, interpret: bool = False) -> jax.Array:
  """Attention of one query per row over its pages; arguments and result as
  `kvjax.kernels.gpu.paged_decode` (q [B, N, H] scaled, pages [K, pages, page_size, H], table
  int32 [B, M] in range, lengths int32 [B]) -> [B, N, H] in q's dtype. The kernel never writes a
  row of length 0; it is zeroed here, as the jnp path gives."""
  per_block = paged_blocks(table.shape[1], k_pages.shape[2], q.shape[-1])
  mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
  with mode:
    out = _paged(q, k_pages, v_pages, lengths, table, pages_per_compute_block=per_block)
  return jnp.where(lengths[:, None, None] > 0, out, 0).astype(q.dtype)
