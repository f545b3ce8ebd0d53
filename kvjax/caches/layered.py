"""A cache made of one single-layer cache per layer, so layers may differ in size.

`LayeredCache(layers=(c_0, ..., c_{L-1}))` holds L caches of the same kind, each with
n_layers = 1; layer l's `attend` / `write` go to `c_l`. It is how a budget that changes with depth
is laid out without padding every layer to the largest (PyramidKV: `snapkv:K+window:W+pyramid`,
`h2o:K+window:W+pyramid`, see kvjax.caches.scored), and each layer's arrays are its own buffers, so a
decode step never slices a stacked [L, ...] array.

Sizes: `capacity` is the largest layer's (what one (layer, row, kv head) may hold), and
`lossless_tokens` the smallest's (how long a stream every layer holds whole). `view()` pads every
layer to `capacity` with empty slots (mask False, position -1). Capabilities (`limited`, `exact`,
`chunk_exact`, `error_bound`) and the optional verbs are those of the layers' kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.caches import base


@struct.dataclass
class LayeredCache(base.CacheBase):
  """One cache per layer; see the module docstring. layers: tuple of caches with n_layers == 1."""

  layers: tuple

  @classmethod
  def of(cls, layers) -> "LayeredCache":
    layers = tuple(layers)
    if not layers:
      raise ValueError("LayeredCache needs at least one layer")
    kinds = {type(c) for c in layers}
    if len(kinds) > 1 or any(c.n_layers != 1 for c in layers):
      raise ValueError("LayeredCache: every layer must be a one-layer cache of the same kind, got "
                       f"{[(type(c).__name__, c.n_layers) for c in layers]}")
    return cls(layers=layers)

  # ---- facts --------------------------------------------------------------------------------
  @property
  def _first(self):
    return self.layers[0]

  @property
  def lengths(self) -> jax.Array:
    return self._first.lengths

  @property
  def limited(self) -> bool:
    return self._first.limited

  @property
  def exact(self) -> bool:
    return self._first.exact

  @property
  def chunk_exact(self) -> bool:
    return self._first.chunk_exact

  @property
  def error_bound(self):
    return self._first.error_bound

  @property
  def n_layers(self) -> int:
    return len(self.layers)

  @property
  def batch(self) -> int:
    return self._first.batch

  @property
  def kv_heads(self) -> int:
    return self._first.kv_heads

  @property
  def head_dim(self) -> int:
    return self._first.head_dim

  @property
  def capacity(self) -> int:
    return max(c.capacity for c in self.layers)

  @property
  def lossless_tokens(self) -> int:
    """The longest stream every layer holds in full (the smallest layer's capacity)."""
    return min(c.capacity for c in self.layers)

  @property
  def layer_capacities(self) -> tuple[int, ...]:
    return tuple(c.capacity for c in self.layers)

  def filled(self) -> jax.Array:
    return jnp.max(jnp.stack([c.filled() for c in self.layers]), axis=0)

  def has_room(self, n: int) -> jax.Array:
    return jnp.all(jnp.stack([c.has_room(n) for c in self.layers]))

  def fits(self, n_tokens: int) -> bool:
    return all(c.fits(n_tokens) for c in self.layers)

  def overflowed(self) -> jax.Array:
    return jnp.any(jnp.stack([c.overflowed() for c in self.layers]), axis=0)

  # ---- per layer ----------------------------------------------------------------------------
  def _with(self, layer: int, cache) -> "LayeredCache":
    return self.replace(layers=self.layers[:layer] + (cache,) + self.layers[layer + 1:])

  def _check_layer(self, layer: int):
    if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
      raise ValueError(f"LayeredCache: layer must be an int in [0, {self.n_layers}), got {layer!r}")

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    self._check_layer(layer)
    out, cache = self.layers[layer].attend(0, q, k, v, n_valid, rope=rope, scale=scale)
    return out, self._with(layer, cache)

  def write(self, layer: int, k, v, n_valid=None) -> "LayeredCache":
    self._check_layer(layer)
    return self._with(layer, self.layers[layer].write(0, k, v, n_valid))

  def _map(self, fn) -> "LayeredCache":
    return self.replace(layers=tuple(fn(c) for c in self.layers))

  def advance(self, n_valid) -> "LayeredCache":
    return self._map(lambda c: c.advance(n_valid))

  def reset(self) -> "LayeredCache":
    return self._map(lambda c: c.reset())

  def supports(self, verb: str) -> bool:
    return verb != "grow" and all(base.supports(c, verb) for c in self.layers)

  def crop(self, length) -> "LayeredCache":
    return self._map(lambda c: c.crop(length))

  def reorder(self, indices) -> "LayeredCache":
    return self._map(lambda c: c.reorder(indices))

  def held(self) -> jax.Array:
    """int32 [L, B, K] tokens held per layer, row and kv head (kinds that count them)."""
    return jnp.concatenate([c.held() for c in self.layers], axis=0)

  def view(self) -> base.CacheView:
    """Every layer's view, padded to `capacity` slots: [L, B, K, S, H]."""
    views = [c.view() for c in self.layers]
    s = self.capacity

    def pad(x, value):
      width = [(0, 0)] * x.ndim
      width[3] = (0, s - x.shape[3])
      return jnp.pad(x, width, constant_values=value)

    cat = lambda xs: jnp.concatenate(xs, axis=0)
    return base.CacheView(keys=cat([pad(v.keys, 0) for v in views]),
                          values=cat([pad(v.values, 0) for v in views]),
                          mask=cat([pad(v.mask, False) for v in views]),
                          positions=cat([pad(v.positions, -1) for v in views]))

