"""Turning (model or config, spec, batch, mesh) into a placed cache."""

from __future__ import annotations

import logging

from kvjax.caches import registry
from kvjax.models.protocol import default_dtype, model_dtype


def make_cache(spec, config, batch: int, capacity: int | None = None, dtype=None, *, mesh=None,
               rules=None, **options):
  """`kvjax.make_cache` for a parsed spec (see its docstring)."""
  if hasattr(config, "config") and hasattr(config, "params"):  # a model
    dtype = dtype if dtype is not None else model_dtype(config)
    config = config.config
  registry.check_config(config)
  if dtype is None:
    dtype = getattr(config, "dtype", None) or default_dtype()
  cache = registry.build(spec, config, batch=batch, capacity=capacity, dtype=dtype, **options)
  if mesh is not None:
    from kvjax import sharding

    plan = sharding.plan(mesh, config, batch=int(batch), capacity=cache.capacity, rules=rules,
                         slot_sharding_ok=sharding.supports_slot_sharding(cache))
    for note in plan.notes:
      logging.getLogger("kvjax").info("make_cache(%s): %s", spec, note)
    cache = sharding.shard_cache(cache, plan)
  return cache
