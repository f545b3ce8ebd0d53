"""`kvjax.kernels.select`: the resolver's table, the `kernel=` setting and its errors, and that
"auto" on CPU builds exactly the jnp program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import kernels
from kvjax.caches.full import FullCache
from kvjax.caches.paged import PagedCache
from kvjax.kernels.select import GPU_DECODE, GPU_PAGED, JNP, TPU_PAGED

PAGED = dict(head_dim=128, pages_per_row=4, page_size=16)


def routes(choice):
  return dict(choice.routes)


def test_auto_on_cpu_is_jnp_and_pallas_routes_every_platform():
  assert kernels.choose("auto", "paged", queries=1, on="cpu", **PAGED).is_jnp
  pallas = kernels.choose("pallas", "paged", queries=1, on="cpu", **PAGED)
  assert routes(pallas) == {"cpu": GPU_PAGED + "+interpret", "cuda": GPU_PAGED, "tpu": TPU_PAGED}
  assert pallas.name == GPU_PAGED + "+interpret"
  assert kernels.choose("auto", "paged", queries=1, on="tpu", **PAGED).name == TPU_PAGED
  assert kernels.choose("auto", "paged", queries=1, on="cuda", **PAGED).name == GPU_PAGED
  full = kernels.choose("auto", "full", queries=1, head_dim=64, slots=256, on="cuda")
  assert full.name == GPU_DECODE
  assert kernels.choose("auto", "full", queries=1, head_dim=64, slots=256, on="tpu").is_jnp


@pytest.mark.parametrize("kind,facts,why", [
    ("paged", dict(queries=4), "queries per row"),
    ("paged", dict(queries=1, storage="int"), "codes"),
    ("paged", dict(queries=1, window=8), "sliding window"),
    ("window", dict(queries=1), "window kind"),
])
def test_what_stays_on_jnp_says_why(kind, facts, why):
  choice = kernels.choose("pallas", kind, head_dim=128, slots=256, pages_per_row=4, page_size=16,
                          on="cuda", **facts)
  assert choice.is_jnp and why in choice.reason


def test_platform_limits_are_per_route():
  # head dim 64: Triton takes it, Mosaic wants 128 lanes; 8-token blocks are too small for Triton
  choice = kernels.choose("pallas", "paged", queries=1, head_dim=64, pages_per_row=4, page_size=16)
  assert routes(choice)["cuda"] == GPU_PAGED and routes(choice)["tpu"] == JNP
  assert "128" in choice.reason
  small = kernels.choose("pallas", "paged", queries=1, head_dim=64, pages_per_row=2, page_size=4)
  assert small.is_jnp
  # a window is the contiguous kernel's start index
  assert routes(kernels.choose("pallas", "full", queries=1, head_dim=64, slots=64,
                               window=8))["cuda"] == GPU_DECODE


def test_fp8_pages_go_to_the_gpu_kernel_only():
  choice = kernels.choose("pallas", "paged", queries=1, storage="fp8", **PAGED)
  assert routes(choice) == {"cpu": GPU_PAGED + "+interpret", "cuda": GPU_PAGED, "tpu": JNP}
  assert "int8" in choice.reason


@pytest.mark.parametrize("bad", ["triton", None])
def test_bad_kernel_values_name_the_allowed_ones(bad):
  with pytest.raises(ValueError, match="'auto', 'jnp', 'pallas'"):
    kernels.check_kernel(bad)
  config = kvjax.load("tiny").config
  with pytest.raises(ValueError, match="kernel must be one of"):
    kvjax.make_cache("paged:4", config, 1, 16, kernel=bad)


def test_bad_kernel_value_on_the_entry_points():
  model = kvjax.load("tiny")
  with pytest.raises(ValueError, match="kernel must be one of"):
    kvjax.generate(model, [[1, 2, 3]], max_new_tokens=2, kernel="cuda")
  with pytest.raises(ValueError, match="kernel must be one of"):
    kvjax.perplexity(model, [1, 2, 3], kernel="fast")
  with pytest.raises(ValueError, match="kernel must be one of"):
    kvjax.Engine(model, rows=1, capacity=16, cache="paged:4", kernel="gpu")


def test_make_cache_sets_the_field_and_describe_names_the_kernel():
  config = kvjax.load("tiny").config
  assert kvjax.make_cache("full", config, 1, 64).kernel == "auto"
  cache = kvjax.make_cache("paged:16", config, 1, 64, kernel="pallas")
  assert cache.kernel == "pallas"
  assert kernels.describe(cache, on="cpu") == {
      "kernel": "pallas", "decode": GPU_PAGED + "+interpret", "prefill": JNP}
  assert kernels.describe(kvjax.make_cache("full", config, 1, 64))["decode"] == JNP
  assert kernels.describe(kvjax.make_cache("int8", config, 1, 64))["kernel"] == "jnp"


def _lowered(cache, kernel, queries=1):
  cache = kernels.with_kernel(cache, kernel)
  q = jnp.zeros((cache.batch, queries, 2 * cache.kv_heads, cache.head_dim), jnp.float32)
  k = jnp.zeros((cache.batch, queries, cache.kv_heads, cache.head_dim), jnp.float32)
  return jax.jit(lambda c, q, k: c.attend(0, q, k, k)).lower(cache, q, k).as_text()


@pytest.mark.parametrize("make", [
    lambda: FullCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=32),
    lambda: PagedCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=32, page_size=8),
])
def test_auto_on_cpu_is_exactly_the_jnp_program(make):
  cache = make()
  auto = _lowered(cache, "auto")
  assert auto == _lowered(cache, "jnp")
  assert auto != _lowered(cache, "pallas")
  np.testing.assert_equal(kernels.describe(cache)["decode"], JNP)


def test_auto_on_cpu_is_exactly_the_jnp_program_for_a_full_cache_prefill():
  # a chunk of 4 queries per row: "pallas" takes dot_product_attention(implementation="xla") on
  # CPU, "auto" stays the jnp program
  cache = FullCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=32)
  auto = _lowered(cache, "auto", 4)
  assert auto == _lowered(cache, "jnp", 4)
  assert auto != _lowered(cache, "pallas", 4)
  assert kernels.describe(cache)["prefill"] == JNP


def test_a_given_cache_takes_the_setting_through_resolve():
  from kvjax import runtime

  model = kvjax.load("tiny")
  cache = kvjax.make_cache("full", model, 1, 64)
  kv, _ = runtime.resolve(model, cache, lengths=[3], options={"kernel": "pallas"})
  assert kv.kernel == "pallas" and cache.kernel == "auto"
