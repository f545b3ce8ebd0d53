"""Every cache kind lowers for GPU and TPU, checked on this CPU-only machine with `jax.export`.

The prefill and the decode loop that `kvjax.generate` runs (`decode._prefill`, `decode._decode`,
the very jitted functions) are exported for platforms `cuda` and `tpu` in bf16, for every built-in
kind, from abstract arguments only: nothing runs, and a kind that used an op one of those backends
cannot lower (or a CPU-only memory space) fails here. Offloaded buffers keep their memory kind
(`pinned_host`) through a one-device mesh, as they would on the accelerator.

With kernel="pallas" (`kvjax.kernels`) the decode steps of the full and paged kinds lower through
JAX's Pallas kernels instead: Triton for cuda (a custom call `jax.export` serializes only with its
check disabled), Mosaic for tpu (where the head dim is a multiple of 128); one platform per export.
The full kind's prefill lowers for cuda through `jax.nn.dot_product_attention` (XLA's fusion in this
JAX, no custom call). Compiling them needs the real GPU / TPU; lowering is what is checked here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kvjax
from kvjax import decode, kernels
from kvjax.caches.paged import PagedCache
from kvjax.sampling import GREEDY

SPECS = ["full", "dynamic", "window:32", "sink:4+window:28", "int8", "int4+residual:32", "int2",
         "h2o:8+window:8", "int4+residual:32+h2o:8+window:32", "snapkv:8+window:8",
         "tier:8:bf16,16:int8,16:int2",
         "offload", "share:2", "share:2+int8", "share:2+window:32",
         "paged:16", "paged:16+int4"]
PLATFORMS = ["cuda", "tpu"]


@pytest.fixture(scope="module")
def bf16_model():
  return kvjax.load("tiny", dtype=jnp.bfloat16)


def abstract(tree):
  """ShapeDtypeStructs of a pytree's arrays, memory kinds kept (on a one-device mesh)."""
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))

  def one(x):
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, PartitionSpec(), memory_kind=kind))

  return jax.tree_util.tree_map(one, tree)


@pytest.mark.parametrize("spec", SPECS)
def test_prefill_and_decode_export_for_gpu_and_tpu(bf16_model, spec):
  model, batch = bf16_model, 2
  step = kvjax.static_step(model)
  cache = kvjax.make_cache(spec, model, batch, 64)
  leaves = [x for x in jax.tree_util.tree_leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating)
            and x.ndim == 5]
  if not (spec.startswith("paged") and "int" in spec):  # quantized pages hold no float keys
    assert any(x.dtype == jnp.bfloat16 for x in leaves), "the cache should hold bf16 keys/values"
  params, cache_abs = abstract(model.params), abstract(cache)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

  prefill = functools.partial(decode._prefill, model=step, sampler=GREEDY, out_size=16)
  exported = export.export(jax.jit(prefill), platforms=PLATFORMS)(
      params, i32(batch, 16), i32(batch), cache_abs, jax.ShapeDtypeStruct((2,), jnp.uint32), i32())
  assert exported.platforms == tuple(PLATFORMS)

  state = jax.eval_shape(prefill, params, i32(batch, 16), i32(batch), cache_abs,
                         jax.ShapeDtypeStruct((2,), jnp.uint32), i32())
  state = state.replace(cache=cache_abs)
  step_fn = functools.partial(decode._decode, model=step, sampler=GREEDY)
  exported = export.export(jax.jit(step_fn), platforms=PLATFORMS)(params, state, i32(), i32(), i32())
  assert exported.platforms == tuple(PLATFORMS)
  assert "bf16" in exported.mlir_module()


# ---- kernel="pallas": the decode step lowers through JAX's Pallas kernels -------------------------
# Triton kernels lower to a `__gpu$xla.gpu.triton` custom call, which `jax.export` refuses to
# serialize unless told (it has no compatibility guarantee); Mosaic kernels lower to
# `tpu_custom_call`, which it accepts. Both lower here; compiling them needs the real GPU / TPU.
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
ALLOW_TRITON = [export.DisabledSafetyCheck.custom_call(TRITON)]


def _export_steps(model, spec, platforms, disabled=()):
  """(prefill, decode) StableHLO of `generate`'s steps over `spec` with kernel="pallas"."""
  batch, step = 2, kvjax.static_step(model)
  cache = kvjax.make_cache(spec, model, batch, 64, kernel="pallas")
  params, cache_abs = abstract(model.params), abstract(cache)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  prefill = functools.partial(decode._prefill, model=step, sampler=GREEDY, out_size=16)
  pre = export.export(jax.jit(prefill), platforms=platforms, disabled_checks=disabled)(
      params, i32(batch, 16), i32(batch), cache_abs, key, i32())
  state = jax.eval_shape(prefill, params, i32(batch, 16), i32(batch), cache_abs, key, i32())
  step_fn = functools.partial(decode._decode, model=step, sampler=GREEDY)
  dec = export.export(jax.jit(step_fn), platforms=platforms, disabled_checks=disabled)(
      params, state.replace(cache=cache_abs), i32(), i32(), i32())
  return pre.mlir_module(), dec.mlir_module()


@pytest.mark.parametrize("spec", ["full", "paged:16"])
def test_pallas_decode_lowers_through_triton_for_cuda(bf16_model, spec):
  prefill, step = _export_steps(bf16_model, spec, ["cuda"], ALLOW_TRITON)
  assert TRITON in step  # the decode step runs the kernel
  assert TRITON not in prefill  # prefill (16 queries per row) takes no Pallas kernel
  if spec == "full":
    # The full cache's prefill goes through jax.nn.dot_product_attention over the whole layer
    # buffer: the jnp path's blockwise loop (a `stablehlo.while` per layer) is gone. It lowers to
    # XLA's einsum-softmax, not cuDNN: in jax 0.10.2 implementation=None always takes "xla"
    # (cuDNN only when asked by name, and asking fails here: no GPU, "cuDNN is not detected").
    assert "stablehlo.while" not in prefill
    assert "cudnn" not in prefill.lower()


def test_triton_custom_calls_need_the_export_check_disabled(bf16_model):
  with pytest.raises(ValueError, match="custom calls"):
    _export_steps(bf16_model, "paged:16", ["cuda"])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["full", "paged:16"])
def test_pallas_steps_lower_for_one_platform_at_a_time(bf16_model, spec):
  # A known limit: `lax.platform_dependent` picks the branch per platform, but in a multi-platform
  # export JAX still lowers the cuda branch's Triton `pallas_call` for tpu as well, and Pallas
  # refuses GPU compiler params there. kernel="pallas" steps export for one platform at a time
  # (kernel="auto" and "jnp" export for both at once, as above).
  with pytest.raises(ValueError, match="cannot be used for tpu lowering"):
    _export_steps(bf16_model, spec, PLATFORMS, ALLOW_TRITON)
  _, step = _export_steps(bf16_model, spec, ["tpu"])
  assert MOSAIC not in step  # the tiny model's head dim (64) is below Mosaic's 128 lanes: jnp


def test_pallas_paged_decode_lowers_through_mosaic_for_tpu():
  # a cache with 128-wide heads (Mosaic's lane width), one decode token per row, lowered for tpu
  cache = kernels.with_kernel(
      PagedCache.init(n_layers=1, batch=2, kv_heads=2, head_dim=128, capacity=64, page_size=16,
                      dtype=jnp.bfloat16), "pallas")
  q = jax.ShapeDtypeStruct((2, 1, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1, 2, 128), jnp.bfloat16)
  attend = jax.jit(lambda c, q, k: c.attend(0, q, k, k)[0])
  text = export.export(attend, platforms=["tpu"])(abstract(cache), q, k).mlir_module()
  assert MOSAIC in text
