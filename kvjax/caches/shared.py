"""Cross-layer KV sharing (CLA): layers in groups of G consecutive layers share one cache.

Spec terms `share:G` and `share:G:cal`. Model layer l belongs to group l // G; the group's first
layer (l % G == 0, the leader) stores its keys and values, and every other layer of the group (a
follower) attends over the leader's cache instead of its own K/V (its own k/v projections are
ignored, so XLA drops them). The cache therefore holds ceil(L / G) layers instead of L.

L and l count the layers this cache serves. In a layout (`kvjax.caches.hybrid`) that is its
group's layers, in order: `share:2` on Gemma 3 270M's global layers 5, 11, 17 makes 11 read 5's
cache and 17 lead alone (ceil(3 / 2) = 2 cache layers); the layout hands it the rows of `maps=`
(fitted over every model layer) for those layers, and messages below count in those layers.

`SharedCache` wraps an inner cache of ceil(L / G) layers built from the same spec without the
share term (`full` by default, any kind works: `share:2+int8`, `share:2+window:256`, ...):

  * inner is a `FullCache` (always for `:cal`): keys are stored in the inner buffer and attention
    is done here, block by block; a follower reads the leader's blocks without writing anything.
  * any other kind: the leader calls `inner.attend` and the wrapper keeps, until `advance`, the
    inner cache as it was before that write plus the leader's new k/v; each follower repeats the
    leader's `attend` on that saved state with its own queries and drops the resulting cache. So a
    follower sees exactly what the leader saw, whatever the kind does on a write (eviction,
    quantization), at the cost of keeping the pre-write state alive during the forward.

Calibrated variant (`share:G:cal`): per follower layer l, linear maps fitted on calibration text
(`kvjax.calibrate.fit_share_maps`) predict the follower's un-rotated K and V from its leader's:

  k_l[b, t] ~= k_leader[b, t] @ k_w[l] + k_b[l]     over the flattened [K * H] features; V alike.

The maps act before RoPE, so in this variant the inner cache stores the leader's UN-rotated keys and
every read rotates them by their slot position (after mapping, for followers). Maps are cache
leaves (`ShareMaps`, copied into each cache so that donating a cache never deletes the caller's
maps), passed as `make_cache(spec, ..., maps=...)`; `nbytes()` counts every array (the maps
included), `kv_nbytes()` the KV storage alone and `maps_nbytes()` the maps (a fixed cost per
cache, whatever its length).

Invariants (tests/caches/test_shared.py): logits equal a NumPy Llama forward in which each follower
uses its leader's (mapped) K/V; chunked prefill equals token-by-token decoding; with identity maps
`share:G:cal` equals `share:G`; `view()` gives L layers, a follower's being what it attends over;
`kvjax.append` writes leader layers only; `advance` advances the inner cache once; G = 1 is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.attention import RoPE
from kvjax.caches import base, registry, terms
from kvjax.caches.terms import SpecError
from kvjax.caches.full import FullCache


@struct.dataclass
class ShareMaps:
  """Per-layer linear maps from a group leader's un-rotated K/V to a follower's ([K*H] features).

  k_w, v_w: [L, K*H, K*H]; k_b, v_b: [L, K*H] (float32). Rows of leader layers are unused
  (identity / zero).
  """

  k_w: jax.Array
  k_b: jax.Array
  v_w: jax.Array
  v_b: jax.Array

  @classmethod
  def identity(cls, n_layers: int, features: int) -> "ShareMaps":
    def eye():  # separate buffers: a donated cache must not hold one buffer twice
      return jnp.tile(jnp.eye(features, dtype=jnp.float32), (n_layers, 1, 1))

    def zero():
      return jnp.zeros((n_layers, features), jnp.float32)

    return cls(k_w=eye(), k_b=zero(), v_w=eye(), v_b=zero())

  def apply(self, layer: int, k, v):
    """k, v [..., K, H] (un-rotated leader) -> the follower `layer`'s predicted k, v."""

    def one(x, w, bias):
      flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
      return (flat @ w[layer] + bias[layer]).reshape(x.shape).astype(x.dtype)

    return one(k, self.k_w, self.k_b), one(v, self.v_w, self.v_b)


@struct.dataclass
class SharedCache(base.CacheBase):
  """ceil(L / G) cache layers serving L model layers.

  inner: the cache of the leaders (layer l // G of inner serves model layer l).
  maps: `ShareMaps` for `share:G:cal`, else None.
  pending: None between forward calls; inside one (non-full inner only) the inner cache before the
    current leader's write and the leader's new k, v [B, T, K, H], for its followers.
  """

  inner: Any
  maps: ShareMaps | None = None
  pending: Any = None
  group: int = struct.field(pytree_node=False, default=2)
  model_layers: int = struct.field(pytree_node=False, default=2)
  rope: RoPE | None = struct.field(pytree_node=False, default=None)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def wrap(cls, inner, *, group: int, model_layers: int, maps: ShareMaps | None = None,
           rope: RoPE | None = None) -> "SharedCache":
    if not isinstance(group, int) or group < 2:
      raise ValueError(f"SharedCache: group must be an int >= 2 (share:1 shares nothing), got {group!r}")
    if inner.n_layers != math.ceil(model_layers / group):
      raise ValueError(f"SharedCache: {model_layers} layers in groups of {group} need "
                       f"{math.ceil(model_layers / group)} inner layers, got {inner.n_layers}")
    if maps is not None:
      if not isinstance(inner, FullCache):
        raise ValueError(f"share:G:cal needs a full inner cache (it stores un-rotated keys), got "
                         f"{type(inner).__name__}")
      if rope is None:
        raise ValueError("share:G:cal needs the model's RoPE to rotate keys on read")
      features = inner.kv_heads * inner.head_dim
      want = (model_layers, features, features)
      if tuple(maps.k_w.shape) != want or tuple(maps.v_w.shape) != want:
        raise ValueError(f"share maps must have k_w/v_w of shape {want} (the {model_layers} "
                         f"layers this cache serves, kv heads x head dim = {features}), got "
                         f"{tuple(maps.k_w.shape)} / {tuple(maps.v_w.shape)}")
    if maps is not None:  # own copies: generate donates the cache, the caller keeps its maps
      maps = jax.tree_util.tree_map(jnp.array, maps)
    return cls(inner=inner, maps=maps, group=group, model_layers=model_layers, rope=rope)

  # ---- static facts (delegated) ---------------------------------------------------------------
  @property
  def lengths(self) -> jax.Array:
    return self.inner.lengths

  @property
  def capacity(self) -> int:
    return self.inner.capacity

  @property
  def n_layers(self) -> int:
    """Model layers served (what `kvjax.append` and `view()` count); the inner cache has fewer."""
    return self.model_layers

  @property
  def batch(self) -> int:
    return self.inner.batch

  @property
  def kv_heads(self) -> int:
    return self.inner.kv_heads

  @property
  def head_dim(self) -> int:
    return self.inner.head_dim

  @property
  def limited(self) -> bool:
    """Whether the inner cache has a hard capacity (see `base.Limited`)."""
    return self.inner.limited

  # Followers attend over their leader's keys and values, not their own: `view()` shows what each
  # layer attends over, which for a follower is not what was given to it.
  exact = False
  error_bound = None

  @property
  def chunk_exact(self) -> bool:
    """As the inner kind: followers see what their leader saw, chunked or not."""
    return self.inner.chunk_exact

  @property
  def growable(self) -> bool:
    return self.inner.caps.growable

  @property
  def lossless_tokens(self) -> int:
    return self.inner.caps.lossless_tokens

  def filled(self) -> jax.Array:
    return self.inner.filled()

  def logical_axes(self):
    """For `kvjax.sharding`: the inner cache's axes; the calibration maps are replicated."""
    unnamed = lambda x: base.Names((None,) * x.ndim)
    return self.replace(inner=base.cache_logical_axes(self.inner),
                        maps=jax.tree_util.tree_map(unnamed, self.maps),
                        pending=jax.tree_util.tree_map(unnamed, self.pending))

  def token_positions(self, tokens: int) -> jax.Array:
    return base.row_slots(self.lengths, tokens)

  @property
  def calibrated(self) -> bool:
    return self.maps is not None

  def has_room(self, n: int) -> jax.Array:
    return self.inner.has_room(n)

  def fits(self, n_tokens: int) -> bool:
    return self.inner.fits(n_tokens)

  def overflowed(self) -> jax.Array:
    return self.inner.overflowed()

  def is_leader(self, layer: int) -> bool:
    return layer % self.group == 0

  # ---- protocol -------------------------------------------------------------------------------
  def write(self, layer: int, k, v, n_valid=None) -> "SharedCache":
    """Leader layers store k, v [B, T, K, H] (as given) in inner layer layer // G; followers: no-op."""
    if not self.is_leader(layer):
      return self
    return self.replace(inner=self.inner.write(layer // self.group, k, v, n_valid))

  def advance(self, n_valid) -> "SharedCache":
    return self.replace(inner=self.inner.advance(n_valid), pending=None)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Model layer `layer`: leaders store and attend; followers attend over their leader's cache."""
    slot = layer // self.group
    if isinstance(self.inner, FullCache):
      n_valid, positions = base.attend_inputs(self.inner, q, k, v, n_valid)
      cache = self
      if self.is_leader(layer):
        k_stored = k if self.calibrated else attn.apply_rope(rope, k, positions)
        cache = self.replace(inner=self.inner.write(slot, k_stored, v))
      out = cache._read(layer, attn.apply_rope(rope, q, positions), positions, n_valid, rope, scale)
      return out, cache
    if self.is_leader(layer):
      out, inner = self.inner.attend(slot, q, k, v, n_valid, rope=rope, scale=scale)
      return out, self.replace(inner=inner, pending=(self.inner, k, v))
    if self.pending is None:
      raise ValueError(f"SharedCache: follower layer {layer} attended before its leader "
                       f"{slot * self.group} (layers of this cache, in a layout its group's)")
    before, k_lead, v_lead = self.pending
    out, _ = before.attend(slot, q, k_lead, v_lead, n_valid, rope=rope, scale=scale)
    return out, self

  def _read(self, layer: int, q, positions, n_valid, rope, scale):
    """Attention of rotated queries q [B, T, N, H] over the full inner cache of `layer`'s leader."""
    inner = self.inner
    slot = layer // self.group
    kv_len = jnp.minimum(inner.lengths + n_valid, inner.capacity)
    bs = inner.block_size
    shape = (1, inner.batch, inner.kv_heads, bs, inner.head_dim)

    def load_block(start):
      idx = (slot, 0, 0, start, 0)
      kb = jax.lax.dynamic_slice(inner.k, idx, shape)[0]  # [B, K, bs, H]
      vb = jax.lax.dynamic_slice(inner.v, idx, shape)[0]
      if self.calibrated:
        kb, vb = self._calibrated_block(layer, kb, vb, start + jnp.arange(bs, dtype=jnp.int32), rope)
      return kb, vb

    qg = attn.prepare_queries(q, inner.kv_heads, scale)
    return attn.attend_prefix_blocks(qg, load_block, positions, kv_len, bs)

  def _calibrated_block(self, layer: int, kb, vb, slots, rope):
    """Un-rotated leader block [B, K, S', H] -> what `layer` attends over: mapped (followers), rotated."""
    kb, vb = kb.swapaxes(1, 2), vb.swapaxes(1, 2)  # [B, S', K, H]
    if not self.is_leader(layer):
      kb, vb = self.maps.apply(layer, kb, vb)
    kb = attn.apply_rope(rope, kb, jnp.broadcast_to(jnp.maximum(slots, 0), kb.shape[:2]))
    return kb.swapaxes(1, 2), vb.swapaxes(1, 2)

  def view(self) -> base.CacheView:
    """L layers: a follower's keys/values are what it attends over (its leader's, mapped if :cal)."""
    inner = self.inner.view()
    index = jnp.arange(self.model_layers) // self.group
    keys, values, mask, positions = (jnp.take(x, index, axis=0) for x in
                                     (inner.keys, inner.values, inner.mask, inner.positions))
    if self.calibrated:
      slots = jnp.arange(keys.shape[3], dtype=jnp.int32)  # a full inner cache: slot = position
      per_layer = [self._calibrated_block(l, keys[l], values[l], slots, self.rope)
                   for l in range(self.model_layers)]
      keys = jnp.stack([kv[0] for kv in per_layer])
      values = jnp.stack([kv[1] for kv in per_layer])
    return base.CacheView(keys=keys, values=values, mask=mask, positions=positions)

  def nbytes(self) -> dict[str, int]:
    """Every array the cache holds: the inner cache and, for `:cal`, its own copy of the maps
    (see `kv_nbytes` and `maps_nbytes` for the two parts)."""
    return base.tree_nbytes(self)

  def kv_nbytes(self) -> dict[str, int]:
    """The KV storage alone (the inner cache)."""
    return self.inner.nbytes()

  def maps_nbytes(self) -> int:
    return 0 if self.maps is None else sum(base.tree_nbytes(self.maps).values())

  def reset(self) -> "SharedCache":
    return self.replace(inner=self.inner.reset(), pending=None)

  def supports(self, verb: str) -> bool:
    return base.supports(self.inner, verb)

  def crop(self, length) -> "SharedCache":
    return self.replace(inner=self.inner.crop(length))

  def reorder(self, indices) -> "SharedCache":
    return self.replace(inner=self.inner.reorder(indices))

  def grow(self, capacity: int) -> "SharedCache":
    return self.replace(inner=self.inner.grow(capacity))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32,
              maps: ShareMaps | None = None, **options) -> SharedCache:
  """`share:G[:cal]` on top of any other terms; options other than `maps` go to the inner kind."""
  if spec.share < 2:
    raise SpecError(f"share:{spec.share} shares nothing; use share:G with G >= 2")
  if spec.share_calibrated and maps is None:
    raise SpecError(
        f"{str(spec)!r} needs calibration maps: make_cache(spec, config, ..., "
        f"maps=kvjax.calibrate.fit_share_maps(model, ids, {spec.share}))")
  if not spec.share_calibrated and maps is not None:
    raise SpecError(f"{str(spec)!r} takes no maps; use share:{spec.share}:cal")
  inner_spec = _inner_spec(spec)
  if spec.share_calibrated and inner_spec.kind != "full":
    raise SpecError(f"{str(spec)!r}: calibrated sharing needs a full inner cache, "
                             f"not {inner_spec.kind!r} (maps act on un-rotated full-precision keys)")
  inner_config = _InnerConfig(math.ceil(config.n_layers / spec.share), config.n_kv_heads,
                              config.head_dim, getattr(config, "vocab_size", 0))
  inner = registry.build(inner_spec, inner_config, batch=batch, capacity=capacity, dtype=dtype,
                         **options)
  theta = getattr(config, "rope_theta", None)
  rope = RoPE(config.head_dim, theta) if theta is not None else None
  if spec.share_calibrated and rope is None:
    raise SpecError(f"{str(spec)!r}: calibrated sharing rotates keys on read and needs a "
                             "config with rope_theta")
  return SharedCache.wrap(inner, group=spec.share, model_layers=config.n_layers, maps=maps, rope=rope)


@dataclasses.dataclass(frozen=True)
class _InnerConfig:
  """The inner cache's config: ceil(L / G) layers of the model's shape."""

  n_layers: int
  n_kv_heads: int
  head_dim: int
  vocab_size: int


def _inner_spec(spec):
  return spec.replace(share=1, share_calibrated=False)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """ceil(L / G) layers of the inner kind, plus the float32 calibration maps of `:cal`
  (k_w, v_w [L, F, F] and k_b, v_b [L, F], F = K * H)."""
  inner_spec = _inner_spec(spec)
  inner_config = _InnerConfig(math.ceil(config.n_layers / spec.share), config.n_kv_heads,
                              config.head_dim, getattr(config, "vocab_size", 0))
  info = registry.lookup(inner_spec.kind)
  if info.estimate_bytes is None:
    raise NotImplementedError(f"no byte formula for the inner kind {inner_spec.kind!r}")
  features = config.n_kv_heads * config.head_dim
  maps = 2 * config.n_layers * (features * features + features) * 4 if spec.share_calibrated else 0
  return info.estimate_bytes(inner_spec, inner_config, context, batch, dtype) + maps


def default_capacity(spec, *, needed: int, prompt: int) -> int:
  """The inner kind's choice."""
  inner_spec = _inner_spec(spec)
  return registry.lookup(inner_spec.kind).default_capacity(inner_spec, needed=needed, prompt=prompt)


def _read_share(word, text):
  value, _, flag = (text or "").partition(":")
  if flag not in ("", "cal"):
    raise SpecError(f"term '{word}:{text}': expected share:G or share:G:cal")
  return {"share": terms.integer(word, value), "share_calibrated": flag == "cal"}


def _check_share(spec):
  terms.positive("share", spec.share)
  if spec.share_calibrated and spec.share == 1:
    raise SpecError("share:1:cal shares nothing; use share:G with G >= 2")


def _options(spec):
  """The options `from_spec` reads: `maps` (declared per layer) and the inner kind's."""
  inner = _inner_spec(spec)
  return registry.lookup(inner.kind).options_for(inner)


def _inner_budget(spec):
  inner = _inner_spec(spec)
  return registry.lookup(inner.kind).budget_of(inner)


SHARE = terms.Term(
    name="share", usage="share:G | share:G:cal", fields=(("share", 1), ("share_calibrated", False)),
    doc="layers in groups of G share one cache of the other terms' kind (cal: calibrated linear "
        "maps)", parse=_read_share, kind="shared", rank=100, check=_check_share, order=60,
    show=lambda spec: f"share:{spec.share}" + (":cal" if spec.share_calibrated else ""))

registry.register_kind("shared", from_spec, estimate_bytes=estimate_bytes, capacity=default_capacity,
                       options=_options, layer_options=("maps",),
                       terms=(SHARE,), budget=_inner_budget, builtin=True, description="layers in groups of G share one cache")
