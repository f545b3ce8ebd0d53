"""Cache specs: the typed description of a cache, and its string form.

A spec string is terms joined by `+`, e.g. `full`, `none`, `dynamic`. `parse_spec` turns it into a
`CacheSpec` (frozen, hashable: a static jit argument); `str(spec)` gives the canonical string back.
`make_cache(spec, config, batch, capacity)` builds the cache pytree of the kind the spec names.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.models.config import LlamaConfig


class SpecError(ValueError):
  """A cache spec that names an unknown, malformed or contradictory term."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Typed cache configuration.

  mode: "full" (static preallocated), "dynamic" (full, grown by doubling between jitted segments)
    or "none" (no cache: every step recomputes the whole prefix).
  """

  mode: str = "full"

  def __post_init__(self):
    if self.mode not in ("full", "dynamic", "none"):
      raise SpecError(f"unknown cache mode {self.mode!r}; expected full, dynamic or none")

  def __str__(self) -> str:
    return self.mode

  @property
  def uses_cache(self) -> bool:
    return self.mode != "none"


_MODES = ("full", "dynamic", "none")


def parse_spec(spec) -> CacheSpec:
  """Accepts a `CacheSpec` (returned as is) or a spec string."""
  if isinstance(spec, CacheSpec):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"cache spec must be a string or CacheSpec, got {type(spec).__name__}")
  terms = [t.strip() for t in spec.strip().lower().split("+")]
  if not spec.strip() or any(not t for t in terms):
    raise SpecError(f"empty term in cache spec {spec!r}")
  mode = None
  for term in terms:
    if term in _MODES:
      if mode is not None:
        raise SpecError(f"cache spec {spec!r}: term {term!r} contradicts {mode!r}")
      mode = term
    else:
      raise SpecError(f"cache spec {spec!r}: unknown term {term!r} (known: {', '.join(_MODES)})")
  return CacheSpec(mode=mode or "full")


def make_cache(spec, config: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32):
  """Builds an empty cache of the kind `spec` names, for `batch` rows and `capacity` slots."""
  from kvjax.caches.full import FullCache

  spec = parse_spec(spec)
  if not spec.uses_cache:
    raise SpecError("cache spec 'none' has no cache object: it recomputes the prefix every step")
  return FullCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                        head_dim=config.head_dim, capacity=capacity, dtype=dtype)
