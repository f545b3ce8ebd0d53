"""Runs a `Choice`: each platform's route, under `lax.platform_dependent` when there are several
(so `jax.export` for `cuda` or `tpu` lowers that platform's kernel and nothing else).

Every entry point takes kvjax's grouped, scaled queries [B, T, K, G, H] (T = 1 for the decode
ones) and a `fallback()` that computes the jnp path (run for a jnp route and for a platform the
choice names no route for), and returns [B, T, N, H] in the queries' dtype.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from kvjax.kernels import gpu, tpu
from kvjax.kernels.jnp import NAME as JNP
from kvjax.kernels.select import DPA, GPU_DECODE, GPU_PAGED, INTERPRET, TPU_PAGED, XLA, Choice


def _dispatch(choice: Choice, branch: Callable, fallback: Callable) -> jax.Array:
  """branch(route) per platform; one route runs directly, several by platform."""
  calls = {p: (fallback if r == JNP else (lambda r=r: branch(r))) for p, r in choice.routes}
  if len(calls) == 1:
    return next(iter(calls.values()))()
  return lax.platform_dependent(default=fallback, **calls)


def _flat(qg) -> jax.Array:
  """[B, 1, K, G, H] -> [B, N, H] (query head n = k * G + g, as the kernels group them)."""
  b, t, kh, g, h = qg.shape
  return qg.reshape(b, kh * g, h)


def paged_decode(choice: Choice, qg, k_pages, v_pages, table, lengths, fallback: Callable,
                 scales=None):
  """Decode attention over a paged pool. k_pages, v_pages: [K, pages, page_size, H] (one layer);
  table: int32 [B, M] (out-of-range "no page" entries are clamped here); lengths: int32 [B];
  scales: None, or (key, value) scales [K, pages, page_size] of fp8 codes (GPU route only)."""
  table = jnp.minimum(table, k_pages.shape[1] - 1)
  q = _flat(qg)

  def branch(route):
    interpret = route.endswith(INTERPRET)
    if route.removesuffix(INTERPRET) == GPU_PAGED:
      out = gpu.paged_decode(q, k_pages, v_pages, table, lengths, scales, interpret=interpret)
    elif route.removesuffix(INTERPRET) == TPU_PAGED and scales is None:
      out = tpu.paged_decode(q, k_pages, v_pages, table, lengths, interpret=interpret)
    else:
      raise ValueError(f"no paged decode route {route!r}{' with scales' if scales else ''}")
    return out[:, None]

  return _dispatch(choice, branch, fallback)


def contiguous_decode(choice: Choice, qg, k, v, lengths, start, fallback: Callable):
  """Decode attention over a contiguous buffer k, v [B, K, S, H] (one layer): slots
  [start, lengths) per row (start None: 0)."""
  q = _flat(qg)

  def branch(route):
    if route.removesuffix(INTERPRET) != GPU_DECODE:
      raise ValueError(f"no contiguous decode route {route!r}")
    return gpu.contiguous_decode(q, k, v, lengths, start, interpret=route.endswith(INTERPRET))[:, None]

  return _dispatch(choice, branch, fallback)


def contiguous_decode_stats(choice: Choice, qg, k, v, lengths, start, fallback: Callable):
  """As `contiguous_decode`, but the unnormalized statistics (peak, total [B, K, G, 1], acc
  [B, K, G, 1, H], fp32) that `attention.combine_stats` merges (slot sharding); `fallback()`
  returns the jnp path's statistics."""
  q = _flat(qg)

  def branch(route):
    if route.removesuffix(INTERPRET) != GPU_DECODE:
      raise ValueError(f"no contiguous decode route {route!r}")
    return gpu.contiguous_decode_stats(q, k, v, lengths, start, interpret=route.endswith(INTERPRET))

  return _dispatch(choice, branch, fallback)


def contiguous_prefill(choice: Choice, qg, k, v, positions, lengths, window, fallback: Callable):
  """Attention of T queries per row (a prefill chunk) over a full cache's contiguous buffer k, v
  [B, K, S, H] (one layer, the chunk already written): slot s is visible to query (b, t) iff
  s <= positions[b, t] (int32 [B, T]) and s < lengths[b] (int32 [B]), and within the sliding
  `window` (None: no window)."""
  b, t, kh, g, h = qg.shape
  q = qg.reshape(b, t, kh * g, h)  # query head n = k * G + g, as dot_product_attention groups them

  def branch(route):
    if route not in (DPA, DPA + XLA):
      raise ValueError(f"no contiguous prefill route {route!r}")
    return gpu.contiguous_prefill(q, k, v, positions, lengths, window,
                                  implementation="xla" if route.endswith(XLA) else None)

  return _dispatch(choice, branch, fallback)
