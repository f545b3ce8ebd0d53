"""Budget planning: the most faithful cache spec whose memory for a context fits a byte budget.

  spec, nbytes = kvjax.plan(config, max_bytes=64 << 20, context=8192, batch=4)

`estimate_bytes(spec, config, context, batch, dtype)` gives the bytes
`make_cache(spec, config, batch, capacity=context, dtype)` allocates (every array the cache holds:
keys, values, scales, positions, lengths; for `offload` device and host together; for `share:G`
the KV storage without the calibration maps), from the closed formula each kind registers with
itself (`kvjax.caches.registry`). `measured_bytes` gets the same number from the cache's abstract
shapes (`jax.eval_shape`, nothing allocated) for any kind, and stands in where a kind has no
formula.

`plan` walks `candidates()` in order of faithfulness and returns the first that fits:

  1. full                         lossless
  2. int8                         every token kept, 8-bit
  3. int4+residual:64, int4       every token kept, 4-bit (the newest 64 at full precision first)
  4. int2+residual:64, int2       every token kept, 2-bit
  5. sink:4+window:N              drops old tokens: the largest N >= min_window that fits
  6. tier:64:fp32,N:int8 / int4 / int2    64 recent tokens exact, the largest N older ones quantized

Kinds whose module is not built are skipped. Nothing fitting raises `PlanError`, naming the
smallest candidate's bytes.

Invariant (tests/test_plan.py): `estimate_bytes == sum(make_cache(...).nbytes().values())` for
every candidate and every built kind, over hypothesis-generated configs, contexts, batches, dtypes;
the returned spec fits and no earlier candidate does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kvjax import layouts
from kvjax import spec as spec_lib
from kvjax.caches import hybrid, registry


class PlanError(ValueError):
  """No candidate cache spec fits the byte budget."""


def estimate_bytes(spec, config, context: int, batch: int = 1, dtype=jnp.float32) -> int:
  """Bytes of `make_cache(spec, config, batch, capacity=context, dtype)`.

  From the kind's own formula (`estimate_bytes` in its registration) where it declares one, else
  measured from the cache's abstract shapes (`measured_bytes`, nothing allocated). A layout
  (`kvjax.layouts`), or any spec on a model with sliding layers, is the sum over its groups.
  """
  spec = layouts.parse_request(spec)
  plan_ = layouts.plan_for(spec, config)
  if plan_ is not None:
    return sum(_estimate_one(s, hybrid.group_config(config, len(ls)), context, batch, dtype)
               for ls, s, _ in hybrid.merge_windows(plan_))
  return _estimate_one(spec, config, context, batch, dtype)


def _estimate_one(spec, config, context: int, batch: int, dtype) -> int:
  if not spec.uses_cache:
    return 0
  info = registry.lookup(spec.kind)
  formula = info.estimate_bytes
  if formula is not None:
    try:
      return int(formula(spec, config, context, batch, jnp.dtype(dtype)))
    except NotImplementedError:  # a wrapper kind whose inner kind has no formula
      pass
  return measured_bytes(spec, config, context, batch, dtype)


def measured_bytes(spec, config, context: int, batch: int = 1, dtype=jnp.float32,
                   **options) -> int:
  """Bytes of the cache's arrays from their abstract shapes (`jax.eval_shape`): nothing allocated."""
  shapes = jax.eval_shape(lambda: spec_lib.make_cache(spec, config, batch, context, dtype, **options))
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes))


def bytes_per_device(spec, config, context: int, batch: int = 1, dtype=jnp.float32, *, mesh,
                     rules=None, **options) -> int:
  """The largest per-device share of `make_cache(spec, ..., mesh=mesh, rules=rules)`: the cache's
  abstract shapes split by the sharding plan (`kvjax.sharding`), nothing allocated."""
  from kvjax import sharding

  shapes = jax.eval_shape(lambda: spec_lib.make_cache(spec, config, batch, context, dtype, **options))
  plan_ = sharding.plan_cache(mesh, config, shapes, rules=rules)
  if plan_.rules.slots and isinstance(shapes, hybrid.HybridCache):  # its unsplit groups keep all slots
    shapes = shapes.with_slot_sharding(sharding.SlotSharding.of(plan_))
  shardings = sharding.cache_shardings(shapes, plan_)
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)))


def available(spec) -> bool:
  """True when the spec's kind is registered (built in, or by a user or plugin)."""
  try:
    registry.lookup(spec_lib.parse_spec(spec).kind)
  except spec_lib.SpecError:
    return False
  return True


def candidates() -> list:
  """Spec families in order of faithfulness: fixed spec strings, then (name, n -> spec, slots the
  spec holds besides the n sized ones) for the families sized to the budget."""
  fixed = ["full", "int8", "int4+residual:64", "int4", "int2+residual:64", "int2"]
  sized = [("sink:4+window:N", lambda n: f"sink:4+window:{n}", 4)]
  sized += [(f"tier:64:fp32,N:{q}", lambda n, q=q: f"tier:64:fp32,{n}:{q}", 64) for q in ("int8", "int4", "int2")]
  return fixed + sized


def rank(spec) -> int | None:
  """Index in `candidates()` of the family `spec` belongs to (lower = more faithful), else None."""
  spec = spec_lib.parse_spec(spec)
  sizes = {spec.window, spec.tiers[-1][0] if spec.tiers else None} - {None}
  for i, entry in enumerate(candidates()):
    if isinstance(entry, str):
      if spec_lib.parse_spec(entry) == spec:
        return i
    elif any(spec_lib.parse_spec(entry[1](n)) == spec for n in sizes):
      return i
  return None


def _largest_fitting(make, need, max_bytes, low: int, high: int) -> int:
  """Largest n in [low, high] with need(make(n)) <= max_bytes, given that make(low) fits
  (bytes grow with n)."""
  while low < high:
    mid = (low + high + 1) // 2
    if need(make(mid)) <= max_bytes:
      low = mid
    else:
      high = mid - 1
  return low


def plan(config, max_bytes: int, context: int, batch: int = 1, dtype=jnp.float32, *,
         min_window: int = 64, mesh=None, rules=None):
  """(spec, estimated bytes) of the most faithful candidate that fits `max_bytes` for `context`
  tokens per row. Windows smaller than `min_window` tokens are not offered.

  With a `mesh` (and sharding `rules`), `max_bytes` is a per-device budget and the bytes returned
  are the largest per-device share (`bytes_per_device`): splitting the batch, heads or slots over
  devices lets a more faithful spec fit."""
  if not isinstance(context, int) or context <= 0:
    raise ValueError(f"plan: context must be a positive int, got {context!r}")
  if not isinstance(max_bytes, int) or max_bytes <= 0:
    raise ValueError(f"plan: max_bytes must be a positive int, got {max_bytes!r}")
  smallest = None

  def need(spec):
    if mesh is None:
      return estimate_bytes(spec, config, context, batch, dtype)
    return bytes_per_device(spec, config, context, batch, dtype, mesh=mesh, rules=rules)

  def consider(spec):
    nonlocal smallest
    try:
      need_bytes = need(spec)
    except spec_lib.SpecError:  # e.g. a quantization group that does not divide the head dim
      return False
    smallest = need_bytes if smallest is None else min(smallest, need_bytes)
    return need_bytes <= max_bytes

  for entry in candidates():
    if isinstance(entry, str):
      spec = spec_lib.parse_spec(entry)
      if available(spec) and consider(spec):
        return spec, need(spec)
      continue
    _, make, extra = entry
    most = context - extra  # a bigger n holds nothing more: the whole context already fits
    if most < min_window or not available(make(min_window)) or not consider(make(min_window)):
      continue
    n = _largest_fitting(make, need, max_bytes, min_window, most)
    spec = spec_lib.parse_spec(make(n))
    return spec, need(spec)
  if smallest is None:
    raise PlanError(f"no candidate cache kind is available for {getattr(config, 'name', type(config).__name__)} (see plan.candidates)")
  raise PlanError(f"no cache spec fits {max_bytes} bytes for {context} tokens x {batch} rows of "
                  f"{getattr(config, 'name', type(config).__name__)}; the smallest candidate needs {smallest} bytes "
                  f"(raise max_bytes, or lower min_window={min_window} / batch)")
