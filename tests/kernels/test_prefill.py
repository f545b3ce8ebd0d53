"""A full cache's prefill chunks through `jax.nn.dot_product_attention` (implementation="xla",
the CPU check route of kernel="pallas") against the jnp path: ragged rows, a cached prefix, a
window, GQA and MQA; and `generate` on tiny with the route."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import kernels
from kvjax.caches.full import FullCache
from kvjax.kernels.select import DPA, JNP, XLA

TOL = 1e-5  # float32, absolute: the same math in a different order


def _chunks(cache, kernel, rng, window=None):
  """Attends two chunks with `kernel` (layer 0): the first fills rows unevenly, the second attends
  over that prefix with its own ragged n_valid (row 1: no new token, row 2: empty before and
  after). Returns the two outputs [B, T, N, H] with padding query rows zeroed."""
  cache = kernels.with_kernel(cache, kernel).replace(sliding=window)
  b, kh, h, n = cache.batch, cache.kv_heads, cache.head_dim, 2 * cache.kv_heads
  outs = []
  for n_valid in ([5, 3, 0], [4, 0, 0]):
    t = 6
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32)
    nv = jnp.asarray(n_valid, jnp.int32)
    out, cache = jax.jit(lambda c, q, k, v, nv: c.attend(0, q, k, v, nv))(cache, q, k, v, nv)
    assert not np.isnan(np.asarray(out)).any()  # padding rows are finite, as on jnp
    valid = np.arange(t)[None, :] < np.asarray(nv)[:, None]
    outs.append(np.where(valid[:, :, None, None], np.asarray(out), 0.0))
    cache = cache.advance(nv)
  return outs


@pytest.mark.parametrize("kv_heads,window", [(2, None), (1, 4)])  # GQA 4/2; MQA 2/1 with a window
def test_prefill_route_equals_jnp(kv_heads, window):
  make = lambda: FullCache.init(n_layers=1, batch=3, kv_heads=kv_heads, head_dim=16, capacity=32)
  cache = make()
  assert cache.replace(kernel="pallas").choice(6, on="cpu").name == DPA + XLA
  got = _chunks(make(), "pallas", np.random.default_rng(0), window)
  want = _chunks(make(), "jnp", np.random.default_rng(0), window)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def test_prefill_route_names():
  full = dict(queries=16, head_dim=64, slots=64)
  choice = kernels.choose("pallas", "full", on="cpu", **full)
  assert dict(choice.routes) == {"cpu": DPA + XLA, "cuda": DPA, "tpu": JNP}
  assert "splash" in choice.reason
  assert kernels.choose("auto", "full", on="cuda", **full).name == DPA
  assert kernels.choose("auto", "full", on="cpu", **full).is_jnp
  assert kernels.choose("auto", "full", window=8, on="cuda", **full).name == DPA
  big = kernels.choose("auto", "full", queries=8192, head_dim=64, slots=8192, on="cuda")
  assert big.is_jnp and "logits" in big.reason  # a long prompt keeps the blockwise jnp path
  sharded = kernels.choose("pallas", "full", sharded=True, on="cuda", **full)
  assert sharded.is_jnp and "statistics" in sharded.reason
  paged = kernels.choose("pallas", "paged", queries=16, head_dim=64, pages_per_row=4,
                         page_size=16, on="cuda")
  assert paged.is_jnp and "contiguous" in paged.reason
  cache = FullCache.init(n_layers=1, batch=1, kv_heads=2, head_dim=16, capacity=32)
  assert kernels.describe(cache.replace(kernel="pallas"), on="cuda") == {
      "kernel": "pallas", "decode": "pallas.gpu.decode_attention", "prefill": DPA}


@pytest.mark.slow
def test_generate_on_tiny_full_pallas_prefill_equals_jnp():
  model = kvjax.load("tiny")
  prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
  runs = {k: kvjax.generate(model, prompts, max_new_tokens=6, cache="full", kernel=k)
          for k in ("jnp", "pallas")}
  np.testing.assert_array_equal(runs["pallas"].tokens, runs["jnp"].tokens)
  assert kernels.describe(runs["pallas"].cache, on="cpu")["prefill"] == DPA + XLA
