"""Every cache kind lowers for GPU and TPU, checked on this CPU-only machine with `jax.export`.

The prefill and the decode loop that `kvjax.generate` runs (`decode._prefill`, `decode._decode`,
the very jitted functions) are exported for platforms `cuda` and `tpu` in bf16, for every built-in
kind, from abstract arguments only: nothing runs, and a kind that used an op one of those backends
cannot lower (or a CPU-only memory space) fails here. Offloaded buffers keep their memory kind
(`pinned_host`) through a one-device mesh, as they would on the accelerator.
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
from kvjax import decode
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
