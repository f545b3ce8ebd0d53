"""A cache whose layers come in groups of different kinds (Gemma 3's sliding and global layers).

`HybridCache(groups=(c_0, ..., c_{G-1}), where=((g, i) per layer))` holds one cache per group of
layers that share a spec and a window (`kvjax.layouts.layer_plan`); c_g has n_layers = the group's
size, and layer l is layer `where[l][1]` of group `where[l][0]`. `attend` / `write` go to that
group; `advance`, `reset`, `crop`, `reorder` map over every group (all hold the same rows and
lengths). The model needs nothing new: each layer's cache applies its own window. `build` first merges
groups of one full/quantized/paged spec that differ only in their window (`merge_windows`): that
kind masks each layer by its own `sliding` entry, so `paged:16@all` is one PagedCache, not two.
`make_cache` options go to the groups whose kind reads them (`route_options`): `maps=` of a
`share:G:cal` group, fitted over the model's L layers, reaches that group alone, cut to its layers.

Sizes: `capacity` is the largest group's, `lossless_tokens` the smallest's; `view()` lists the
layers in model order, each padded to `capacity` with empty slots (mask False, position -1), so
keys, values [L, B, K, S, H]. Capabilities: `limited` if any group is, `exact` / `chunk_exact` if
all are, `error_bound` the largest; the optional verbs those every group supports (`grow` grows
the growable groups, when every limited group is growable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.caches import base, registry


@struct.dataclass
class HybridCache(base.CacheBase):
  """Caches per group of layers; see the module docstring. groups: tuple of caches;
  where (static): ((group, index in group), ...) per layer."""

  groups: tuple
  where: tuple = struct.field(pytree_node=False)

  @classmethod
  def of(cls, groups, layers) -> "HybridCache":
    """groups[g] holds the layers `layers[g]` (tuples of model layer indices, in order)."""
    groups, layers = tuple(groups), tuple(tuple(ls) for ls in layers)
    n = sum(len(ls) for ls in layers)
    if sorted(l for ls in layers for l in ls) != list(range(n)):
      raise ValueError(f"HybridCache: the groups' layers {layers} must cover 0..{n - 1} once each")
    for c, ls in zip(groups, layers, strict=True):
      if c.n_layers != len(ls) or (c.batch, c.kv_heads, c.head_dim) != (
          groups[0].batch, groups[0].kv_heads, groups[0].head_dim):
        raise ValueError(f"HybridCache: group of layers {ls} has {c.n_layers} layers, batch "
                         f"{c.batch}, kv heads {c.kv_heads}, head dim {c.head_dim}; expected "
                         f"{len(ls)} layers and the first group's batch, heads and head dim")
    where = {l: (g, i) for g, ls in enumerate(layers) for i, l in enumerate(ls)}
    return cls(groups=groups, where=tuple(where[l] for l in range(n)))

  # ---- facts --------------------------------------------------------------------------------
  lengths = property(lambda self: self.groups[0].lengths)
  batch = property(lambda self: self.groups[0].batch)
  kv_heads = property(lambda self: self.groups[0].kv_heads)
  head_dim = property(lambda self: self.groups[0].head_dim)
  n_layers = property(lambda self: len(self.where))
  capacity = property(lambda self: max(c.capacity for c in self.groups))
  lossless_tokens = property(lambda self: min(c.caps.lossless_tokens for c in self.groups))
  limited = property(lambda self: any(c.caps.limited for c in self.groups))
  exact = property(lambda self: all(c.caps.exact for c in self.groups))
  chunk_exact = property(lambda self: all(c.caps.chunk_exact for c in self.groups))

  @property
  def error_bound(self):
    bounds = [c.caps.error_bound for c in self.groups]
    return None if None in bounds else max(bounds)

  @property
  def growable(self) -> bool:
    caps = [c.caps for c in self.groups]
    return any(c.growable for c in caps) and all(c.growable or not c.limited for c in caps)

  def filled(self) -> jax.Array:
    return jnp.max(jnp.stack([c.filled() for c in self.groups]), axis=0)

  def has_room(self, n: int) -> jax.Array:
    return jnp.all(jnp.stack([c.has_room(n) for c in self.groups]))

  def fits(self, n_tokens: int) -> bool:
    return all(c.fits(n_tokens) for c in self.groups)

  def overflowed(self) -> jax.Array:
    return jnp.any(jnp.stack([c.overflowed() for c in self.groups]), axis=0)

  # ---- per layer ----------------------------------------------------------------------------
  def _route(self, layer: int):
    if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
      raise ValueError(f"HybridCache: layer must be an int in [0, {self.n_layers}), got {layer!r}")
    return self.where[layer]

  def _with(self, g: int, cache) -> "HybridCache":
    return self.replace(groups=self.groups[:g] + (cache,) + self.groups[g + 1:])

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, T, N, H], k/v [B, T, K, H] of `layer`, attended by its group's cache."""
    g, i = self._route(layer)
    out, cache = self.groups[g].attend(i, q, k, v, n_valid, rope=rope, scale=scale)
    return out, self._with(g, cache)

  def write(self, layer: int, k, v, n_valid=None) -> "HybridCache":
    g, i = self._route(layer)
    return self._with(g, self.groups[g].write(i, k, v, n_valid))

  def _map(self, fn) -> "HybridCache":
    return self.replace(groups=tuple(fn(c) for c in self.groups))

  def advance(self, n_valid) -> "HybridCache":
    return self._map(lambda c: c.advance(n_valid))

  def reset(self) -> "HybridCache":
    return self._map(lambda c: c.reset())

  def supports(self, verb: str) -> bool:
    if verb == "grow":
      return self.growable
    return all(base.supports(c, verb) for c in self.groups)

  def crop(self, length) -> "HybridCache":
    return self._map(lambda c: c.crop(length))

  def reorder(self, indices) -> "HybridCache":
    return self._map(lambda c: c.reorder(indices))

  def grow(self, capacity: int) -> "HybridCache":
    """Grows the growable groups (outside jit); bounded groups keep their size."""
    if not self.growable:
      return super().grow(capacity)
    return self._map(lambda c: c.grow(capacity) if c.caps.growable else c)

  def _in_layer_order(self, per_group: list) -> jax.Array:
    """Arrays [L_g, ...] per group -> [L, ...] in model layer order."""
    offsets = [0]
    for c in self.groups:
      offsets.append(offsets[-1] + c.n_layers)
    order = jnp.asarray([offsets[g] + i for g, i in self.where])
    return jnp.concatenate(per_group, axis=0)[order]

  @property
  def held(self):
    """held() -> int32 [L, B, K] tokens held per layer (when every group's kind counts them)."""
    if not all(hasattr(c, "held") for c in self.groups):
      raise AttributeError("held")
    return lambda: self._in_layer_order([c.held() for c in self.groups])

  def kv_nbytes(self) -> dict[str, int]:
    """The KV storage of every group by memory kind: a group's own `kv_nbytes` where it keeps
    extras apart (share:G:cal's maps), else all its arrays; `nbytes()` = this plus `maps_nbytes()`."""
    out: dict[str, int] = {}
    for c in self.groups:
      for kind, n in (c.kv_nbytes() if hasattr(c, "kv_nbytes") else c.nbytes()).items():
        out[kind] = out.get(kind, 0) + n
    return out

  def maps_nbytes(self) -> int:
    """Bytes of the groups' calibration maps (each share:G:cal group holds its layers' rows)."""
    return sum(int(c.maps_nbytes()) for c in self.groups if hasattr(c, "maps_nbytes"))

  def view(self) -> base.CacheView:
    """Every layer's view in model order, padded to `capacity` slots: [L, B, K, S, H]."""
    views = [c.view() for c in self.groups]
    s = self.capacity

    def pad(x, value):
      width = [(0, 0)] * x.ndim
      width[3] = (0, s - x.shape[3])
      return jnp.pad(x, width, constant_values=value)

    field = lambda name, value: self._in_layer_order([pad(getattr(v, name), value) for v in views])
    return base.CacheView(keys=field("keys", 0), values=field("values", 0),
                          mask=field("mask", False), positions=field("positions", -1))

  # ---- over a device mesh (kvjax.sharding) ---------------------------------------------------
  # Every group is placed by the same logical-axis rules (`logical_axes` delegates to the groups'
  # own names). Slot sharding (flash-decoding) splits the groups that can split their slots (full
  # caches, sliding ones included); the others (window rings, quantized, paged ...) keep every
  # slot on each device along the slot axes: their leaves drop the `slots` name.
  def logical_axes(self) -> "HybridCache":
    """`LogicallyNamed`: each group's own names (`base.cache_logical_axes`), with `slots` unnamed
    in the groups that keep their slots whole while another group splits its slots."""
    split = any(getattr(c, "slot_sharding", None) is not None for c in self.groups)

    def names(c):
      axes = base.cache_logical_axes(c)
      if not split or getattr(c, "slot_sharding", None) is not None:
        return axes
      return jax.tree_util.tree_map(
          lambda n: base.Names(None if a == "slots" else a for a in n), axes,
          is_leaf=lambda x: isinstance(x, base.Names))

    return self.replace(groups=tuple(names(c) for c in self.groups))

  def slot_groups(self, shards: int | None = None) -> tuple:
    """Indices of the groups that can split their slots (over `shards` devices, when given):
    `SlotShardable`, not growable, capacity divisible by `shards`."""
    return tuple(g for g, c in enumerate(self.groups)
                 if isinstance(c, base.SlotShardable) and not c.caps.growable
                 and (shards is None or c.capacity % shards == 0))

  def can_split_slots(self) -> bool:
    """Whether slot sharding splits anything here (some group can; see `slot_groups`)."""
    return bool(self.slot_groups())

  def with_slot_sharding(self, slot_sharding) -> "HybridCache":
    """`SlotShardable`: the groups of `slot_groups` split their slots; the others keep theirs."""
    split = self.slot_groups(slot_sharding.shards())
    if not split:
      raise ValueError(f"no group of this HybridCache ({self.group_kinds()}) can split its slots "
                       f"over {slot_sharding.shards()} devices (slot sharding is implemented for "
                       "the full cache); drop slots from the rules")
    return self.replace(groups=tuple(c.with_slot_sharding(slot_sharding) if g in split else c
                                     for g, c in enumerate(self.groups)))

  def group_layers(self) -> tuple:
    """The model layers of each group: ((layer, ...), ...)."""
    return tuple(tuple(l for l, (gg, _) in enumerate(self.where) if gg == g)
                 for g in range(len(self.groups)))

  def group_kinds(self) -> str:
    """'layers 0-4: WindowCache, layer 5: FullCache' (for notes and errors)."""
    return ", ".join(f"{self._span(ls)}: {type(c).__name__}"
                     for ls, c in zip(self.group_layers(), self.groups))

  def slot_sharding_note(self, axes: tuple, shards: int) -> str | None:
    """What a plan splitting the slots over `axes` (`shards` devices) does to the groups, when
    some keep their slots whole; None when every group splits."""
    split = self.slot_groups(shards)
    whole = [g for g in range(len(self.groups)) if g not in split]
    if not whole:
      return None
    layers = self.group_layers()
    show = lambda gs: ", ".join(f"{self._span(layers[g])} ({type(self.groups[g]).__name__})" for g in gs)
    return (f"slots split over {'x'.join(axes)} in {show(split)} only; {show(whole)} keep every "
            f"slot on each {'x'.join(axes)} device")

  @staticmethod
  def _span(layers: tuple) -> str:
    """'layer 5', 'layers 0-4' or 'layers 0.2.4'."""
    if len(layers) == 1:
      return f"layer {layers[0]}"
    if layers == tuple(range(layers[0], layers[-1] + 1)):
      return f"layers {layers[0]}-{layers[-1]}"
    return f"layers {'.'.join(map(str, layers))}"
  # ---- end of the mesh section ----------------------------------------------------------------


def build(plan, config, *, batch: int, capacity: int | None, dtype, build_one, **options):
  """The cache of a `kvjax.layouts.layer_plan`: one group per (layers, spec, window) after
  `merge_windows` (groups of a masking kind that differ only in their window are one cache), built by
  `build_one(spec, group_config, capacity=, **options)` (`registry.build`); a single group is that
  group's plain cache. Bounded groups size themselves from their budget; `sliding=W` goes to the
  kinds that mask a window; each group gets the options its kind reads, per-layer ones sliced to
  its layers (`route_options`)."""
  plan = merge_windows(plan)
  caches = []
  for (layers, spec, window), opts in zip(plan, route_options(plan, config, options)):
    if window is not None and spec.kind != "window":
      opts["sliding"] = window
    if window is not None and spec.kind == "window" and not spec.sink:
      opts["absolute"] = True  # the model's own sliding layers: keys rotated once, at true positions
    caches.append(build_one(spec, group_config(config, len(layers)), batch=batch,
                            capacity=None if spec.bounded else capacity, dtype=dtype, **opts))
  if len(caches) == 1:
    return caches[0]
  return HybridCache.of(caches, [layers for layers, _, _ in plan])


# Options a caller may pass whatever the spec, dropped where no kind reads them: `slack` (ring
# slots a crop falls back on, which speculative decoding asks of any main cache).
SOFT_OPTIONS = frozenset({"slack"})


def route_options(plan, config, options: dict) -> list[dict]:
  """The `make_cache` options of each group of `plan` ((layers, spec, window), ...): those its
  kind reads (`KindInfo.options_for`), the kind's per-layer ones (`layer_options`, leaves
  [L, ...] over the model's L layers) sliced to the group's layers ([len(layers), ...]). A kind
  that does not declare its options gets every option that no declaring group reads (but the
  `SOFT_OPTIONS`). Raises TypeError naming an option that no group reads (soft ones are dropped)."""
  takes = [registry.lookup(spec.kind).options_for(spec) for _, spec, _ in plan]
  declared = frozenset().union(*(t for t in takes if t is not None))
  open_ = any(t is None for t in takes)
  unread = [k for k in options if k not in declared and k not in SOFT_OPTIONS and not open_]
  if unread:
    groups = "; ".join(f"{HybridCache._span(layers)}: {spec} reads "
                       f"{', '.join(sorted(t)) or 'none'}"
                       for (layers, spec, _), t in zip(plan, takes))
    raise TypeError(f"make_cache: no group of this layout reads the option"
                    f"{'s' if len(unread) > 1 else ''} {', '.join(map(repr, unread))} ({groups})")
  routed = []
  for (layers, spec, _), names in zip(plan, takes):
    if names is None:
      opts = {k: v for k, v in options.items() if k not in declared and k not in SOFT_OPTIONS}
    else:
      opts = {k: v for k, v in options.items() if k in names}
    for name in registry.lookup(spec.kind).layer_options & opts.keys():
      opts[name] = layer_slice(opts[name], layers, config.n_layers, f"option {name!r} ({spec})")
    routed.append(opts)
  return routed


def layer_slice(value, layers: tuple, n_layers: int, what: str = "option"):
  """`value` (a pytree whose leaves are [n_layers, ...]) at model layers `layers`: leaves
  [len(layers), ...]; `value` itself when `layers` is every layer in order, or it is None."""
  if value is None or tuple(layers) == tuple(range(n_layers)):
    return value
  leaves = jax.tree_util.tree_leaves(value)
  bad = [tuple(x.shape) for x in leaves if not x.shape or x.shape[0] != n_layers]
  if bad:
    raise ValueError(f"make_cache: {what} holds one entry per model layer: every array needs "
                     f"{n_layers} rows (the model's layers) to pick "
                     f"{HybridCache._span(tuple(layers))} from; got shapes {bad}")
  index = jnp.asarray(layers, jnp.int32)
  return jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), value)


def group_config(config, n_layers: int):
  """`config` seen through a group of `n_layers` of its layers (a plain config: no layer types),
  what a group's kind is built from."""
  return _Layers(config, n_layers)


class _Layers:
  """`config` with `n_layers` set to a group's size and no layer types."""

  layer_types = ()

  def __init__(self, config, n_layers: int):
    self._config, self.n_layers = config, n_layers

  def __getattr__(self, name):
    return getattr(self._config, name)


# Kinds whose `sliding=` may be a tuple per layer (see `FullCache.sliding`).
PER_LAYER_SLIDING = ("full", "quantized", "paged")


def merge_windows(plan) -> tuple:
  """`plan` with the groups of one spec that differ only in their sliding window merged into one
  group whose window is a tuple per layer (None for a global layer), when the kind masks each
  layer on its own (`PER_LAYER_SLIDING`): `paged:16@all` on Gemma 3 is one `PagedCache` over every
  layer (one page table, what the engine pages), not a paged cache per layer type."""
  parts: dict = {}
  for layers, spec, window in plan:
    key = spec if spec.kind in PER_LAYER_SLIDING else (spec, window)
    parts.setdefault(key, []).append((layers, spec, window))
  merged = []
  for same in parts.values():
    if len(same) == 1:
      merged.append(same[0])
      continue
    per_layer = {layer: w for layers, _, w in same for layer in layers}
    layers = tuple(sorted(per_layer))
    merged.append((layers, same[0][1], tuple(per_layer[layer] for layer in layers)))
  return tuple(sorted(merged, key=lambda group: group[0][0]))
