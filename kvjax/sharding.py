"""Caches and weights over a device mesh: named logical axes, rules that map them to mesh axes,
and what happens when a head count does not divide the devices.

kvjax uses JAX's own machinery: a `jax.sharding.Mesh` (axes of type Auto, so XLA's partitioner
propagates shardings through the model), `NamedSharding` for every array, `jax.shard_map` where a
cache's slots are split over devices, and `jax.distributed` for several processes.

Logical axes. Every cache array is laid out over the axes

  layers  batch  kv_heads  slots  head_dim          (caches: [L, B, K, S, H] and prefixes of it)

and `AxisRules` says which mesh axes each is split over. Weights follow the same rules: with
`tensor_parallel` the attention projections are split by heads and the MLP by its hidden units
over the kv_heads axes (as MaxText's logical axis rules do), else replicated.

Defaults, for a mesh whose axes are named `data` and `model`: batch over `data`, kv heads (and
the weights' heads and MLP) over `model`, slots not split. A 1-D mesh named `data` splits the
batch only. Rules name mesh axes the mesh lacks are ignored.

When a size does not divide its mesh axes (SmolLM2 has 3 kv heads; meshes have 2, 4, 8 devices),
`plan` falls back, cheapest first, and says which it chose (`ShardingPlan.notes`):

  | what does not divide          | fallback                                                     |
  |-------------------------------|--------------------------------------------------------------|
  | kv heads over `model`         | 1. the batch over `data` x `model`, if the batch divides      |
  |                               | 2. the slots over `model` (flash-decoding), if the kind       |
  |                               |    supports it and the capacity divides                        |
  |                               | 3. replicated over `model` (every device holds all heads)     |
  | batch over `data`             | `generate` / `perplexity` pad the batch up to a multiple     |
  |                               | (`padded_batch`); given a batch that does not divide:         |
  |                               | replicated over `data`                                       |
  | slots (asked for) over an axis| replicated                                                   |

Weights are tensor-parallel only while kv heads are split over the same axes (query heads are
grouped by kv head, so the projections split along the same boundaries); otherwise replicated.

Slot sharding (flash-decoding across chips): each device holds `capacity / n` consecutive slots of
every row; a step writes the new tokens on the device that owns their slots, every device attends
over its own filled blocks, and the partial softmax statistics (running max, sum, weighted values)
are combined across the slot axes (`lax.pmax` / `lax.psum` of [B, K, G, T(, H)]), so one
sequence's cache can be larger than one device's memory and no device ever sees another's keys.
It is implemented for the full cache (`FullCache`, sliding-window layers included); other kinds
raise a clear error. A `HybridCache` (Gemma 3's sliding and global groups) splits the slots of the
groups that can and keeps the others' slots whole on every device (`plan_cache` notes which); with
one kv head (Gemma 3 270M) nothing divides `model`, so the batch or the slots carry that axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvjax.caches import base
from kvjax.caches.base import LOGICAL_AXES, Names, cache_logical_axes  # noqa: F401  (re-exported)


def _axes(value) -> tuple:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical axis -> mesh axes it is split over (a name, a tuple of names, or () / None)."""

  batch: tuple = ("data",)
  kv_heads: tuple = ("model",)
  slots: tuple = ()
  layers: tuple = ()
  head_dim: tuple = ()
  tensor_parallel: bool = True

  def __post_init__(self):
    for name in LOGICAL_AXES:
      object.__setattr__(self, name, _axes(getattr(self, name)))
    used = [a for name in LOGICAL_AXES for a in getattr(self, name)]
    if len(used) != len(set(used)):
      raise ValueError(f"AxisRules: a mesh axis splits two logical axes: {self}")

  def replace(self, **changes) -> "AxisRules":
    return dataclasses.replace(self, **changes)

  @classmethod
  def parse(cls, text: str) -> "AxisRules":
    """'batch=data,kv_heads=model,slots=' (mesh axes joined by '*'; empty = not split)."""
    changes: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      name, eq, value = part.partition("=")
      if not eq or name not in LOGICAL_AXES + ("tensor_parallel",):
        raise ValueError(f"mesh rules: {part!r} is not LOGICAL_AXIS=MESH_AXES (logical axes: "
                         f"{', '.join(LOGICAL_AXES)}, tensor_parallel=true|false)")
      if name == "tensor_parallel":
        changes[name] = value.lower() in ("1", "true", "yes")
      else:
        changes[name] = tuple(filter(None, value.split("*")))
    return cls().replace(**changes)


def make_mesh(spec: str | dict, devices=None) -> Mesh:
  """A mesh from 'data=2,model=4' (or {'data': 2, 'model': 4}); -1 takes the remaining devices.

  The axes are of type Auto: XLA propagates shardings through everything kvjax does not place.
  """
  if isinstance(spec, str):
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, eq, value = part.partition("=")
      if not eq or not name:
        raise ValueError(f"mesh {spec!r}: expected NAME=SIZE terms, e.g. data=2,model=4")
      try:
        sizes[name] = int(value)
      except ValueError:
        raise ValueError(f"mesh {spec!r}: size of {name!r} must be an int, got {value!r}") from None
  else:
    sizes = dict(spec)
  devices = list(jax.devices() if devices is None else devices)
  known = math.prod(s for s in sizes.values() if s != -1)
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh {spec!r}: at most one axis may be -1")
  sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {spec!r} needs {math.prod(sizes.values())} devices; "
                     f"{len(devices)} are available")
  return Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """Resolved rules for one mesh, config and batch; `notes` say which fallbacks were taken."""

  mesh: Mesh
  rules: AxisRules
  notes: tuple = ()

  def size(self, axes: tuple) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def spec(self, logical: tuple) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names (None: unnamed)."""
    parts = []
    for name in logical:
      axes = getattr(self.rules, name) if name in LOGICAL_AXES else ()
      parts.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*parts)

  def sharding(self, logical: tuple, memory_kind: str | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical), memory_kind=memory_kind)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def describe(self) -> str:
    split = {n: getattr(self.rules, n) for n in LOGICAL_AXES if getattr(self.rules, n)}
    text = (f"mesh {dict(self.mesh.shape)}: "
            + (", ".join(f"{k} over {'x'.join(v)}" for k, v in split.items()) or "nothing split")
            + f"; weights {'tensor-parallel' if self.rules.tensor_parallel else 'replicated'}")
    return text + "".join(f"; {n}" for n in self.notes)


def plan(mesh: Mesh, config, *, batch: int, capacity: int | None = None, rules: AxisRules | None = None,
         slot_sharding_ok: bool = True) -> ShardingPlan:
  """Resolves `rules` (default `AxisRules()`) for `mesh`, taking the fallbacks of the module
  docstring where a size does not divide; see `ShardingPlan.notes` for what was chosen."""
  if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  rules = rules or AxisRules()
  names = set(mesh.axis_names)
  kept = {n: tuple(a for a in getattr(rules, n) if a in names) for n in LOGICAL_AXES}
  notes = []
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)

  if batch % size(kept["batch"]):
    notes.append(f"batch {batch} does not divide {'x'.join(kept['batch'])}="
                 f"{size(kept['batch'])}: the batch is replicated")
    kept["batch"] = ()
  heads = config.n_kv_heads
  if kept["kv_heads"] and heads % size(kept["kv_heads"]):
    axes = kept["kv_heads"]
    kept["kv_heads"] = ()
    what = f"{heads} kv heads do not divide {'x'.join(axes)}={size(axes)}"
    if batch % size(kept["batch"] + axes) == 0:
      kept["batch"] = kept["batch"] + axes
      notes.append(f"{what}: the batch is split over {'x'.join(kept['batch'])} instead")
    elif slot_sharding_ok and capacity is not None and not kept["slots"] and capacity % size(axes) == 0:
      kept["slots"] = axes
      notes.append(f"{what}: the slots are split over {'x'.join(axes)} instead (flash-decoding)")
    else:
      notes.append(f"{what}: every {'x'.join(axes)} device holds all heads (duplicated)")
  if kept["slots"]:
    if not slot_sharding_ok:
      raise ValueError("this cache kind cannot split its slots over devices (slot sharding is "
                       "implemented for the full cache); drop slots from the rules")
    if capacity is not None and capacity % size(kept["slots"]):
      notes.append(f"capacity {capacity} does not divide {'x'.join(kept['slots'])}: the slots "
                   "are not split")
      kept["slots"] = ()
  tp = rules.tensor_parallel and bool(kept["kv_heads"])
  if rules.tensor_parallel and not kept["kv_heads"] and any(a in names for a in rules.kv_heads):
    notes.append("weights replicated (they are tensor-parallel only while kv heads are split)")
  resolved = AxisRules(**kept, tensor_parallel=tp)
  return ShardingPlan(mesh, resolved, tuple(notes))


def padded_batch(mesh: Mesh, batch: int, rules: AxisRules | None = None) -> int:
  """The smallest batch >= `batch` that the rules' batch axes present in `mesh` divide.

  `generate` and `perplexity` pad their rows up to it (padding rows are independent and finish at
  once), so the batch is split over `data` instead of being replicated: each device then holds
  and computes ceil(batch / n) rows rather than all of them."""
  names = set(mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in (rules or AxisRules()).batch if a in names)
  return -(-batch // n) * n


def with_note(plan_: ShardingPlan, note: str) -> ShardingPlan:
  return dataclasses.replace(plan_, notes=plan_.notes + (note,))


# ---------------------------------------------------------------------------------------------
# Placing caches and weights
# ---------------------------------------------------------------------------------------------
def _fits(x, logical, plan_: ShardingPlan) -> tuple:
  """Drops the split of a dimension whose size the mesh axes do not divide (e.g. a quantized
  cache's group scales along the slots)."""
  out = []
  for dim, name in zip(x.shape, logical):
    axes = getattr(plan_.rules, name) if name in LOGICAL_AXES else ()
    out.append(name if axes and dim % plan_.size(axes) == 0 else None)
  return tuple(out)


def cache_shardings(cache, plan_: ShardingPlan):
  """NamedSharding for every array of `cache` (memory kinds, e.g. pinned_host, kept)."""
  axes = cache_logical_axes(cache)

  def one(x, logical):
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return plan_.sharding(_fits(x, logical, plan_), memory_kind=kind)

  return jax.tree_util.tree_map(one, cache, axes)


def place(tree, shardings):
  """`tree`'s arrays as global arrays with `shardings`. In one process this is `device_put`; with
  several (`jax.distributed`), each process holds the whole value on the host and contributes
  the shards its devices own (`jax.make_array_from_callback`), so a global mesh works alike."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(one, tree, shardings)


def fetch(x) -> np.ndarray:
  """A global array's whole value on this host (gathered from the other processes if needed)."""
  if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def supports_slot_sharding(cache) -> bool:
  """`SlotShardable`, and for a cache made of parts (`HybridCache`) some part can split its
  slots (its `can_split_slots()`)."""
  if not isinstance(cache, base.SlotShardable):
    return False
  can = getattr(cache, "can_split_slots", None)
  return True if can is None else bool(can())


def plan_cache(mesh: Mesh, config, cache, *, rules: AxisRules | None = None) -> ShardingPlan:
  """`plan` for this cache (its batch, capacity and whether it can split its slots), plus a note
  when the slots are split but some parts of the cache keep theirs whole (a `HybridCache`'s
  window groups beside a full global group)."""
  plan_ = plan(mesh, config, batch=int(cache.batch), capacity=int(cache.capacity), rules=rules,
               slot_sharding_ok=supports_slot_sharding(cache))
  note = getattr(cache, "slot_sharding_note", None)
  if plan_.rules.slots and note is not None:
    text = note(plan_.rules.slots, plan_.size(plan_.rules.slots))
    if text:
      plan_ = with_note(plan_, text)
  return plan_


def shard_cache(cache, plan_: ShardingPlan):
  """The cache with every array placed by the plan (and, for slot sharding, told so)."""
  if plan_.rules.slots:
    if not supports_slot_sharding(cache):
      raise ValueError(f"{type(cache).__name__} cannot split its slots over devices (slot "
                       "sharding is implemented for the full cache)")
    cache = cache.with_slot_sharding(SlotSharding.of(plan_))
  return place(cache, cache_shardings(cache, plan_))


# Weights: which logical role each parameter's dimensions have, by name, for tensor parallelism.
# Projections are [in, out]: heads (q, k, v) and MLP units (gate, up) are the output columns;
# wo and w_down take them as input rows.
_WEIGHT_SPLITS = {"wq": (None, "heads"), "wk": (None, "heads"), "wv": (None, "heads"),
                  "wo": ("heads", None), "w_gate": (None, "units"), "w_up": (None, "units"),
                  "w_down": ("units", None)}


def param_shardings(params, plan_: ShardingPlan):
  """NamedSharding per weight: tensor-parallel over the kv-head axes where the plan allows it
  (heads of the attention projections, units of the MLP), replicated otherwise."""
  axes = plan_.rules.kv_heads if plan_.rules.tensor_parallel else ()
  n = plan_.size(axes) if axes else 1

  def one(path, x):
    name = getattr(path[-1], "key", None)
    roles = _WEIGHT_SPLITS.get(name)
    if not axes or roles is None or x.ndim != 2:
      return plan_.replicated
    parts = [None if role is None or x.shape[i] % n else (axes[0] if len(axes) == 1 else axes)
             for i, role in enumerate(roles)]
    return NamedSharding(plan_.mesh, PartitionSpec(*parts))

  return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, plan_: ShardingPlan):
  """The weights placed by the plan (already placed ones are not copied)."""
  return place(params, param_shardings(params, plan_))


def shard_rows(x, plan_: ShardingPlan, axis: int = 0):
  """A host array split over the batch axes along `axis`, its batch dimension ([B, ...] token
  ids and lengths; [C, B, T] chunks with axis=1)."""
  parts = [None] * np.ndim(x)
  parts[axis] = SlotSharding._part(plan_.rules.batch)
  spec = PartitionSpec(*parts)
  return place(x, NamedSharding(plan_.mesh, spec))


def replicate(x, plan_: ShardingPlan):
  return place(x, plan_.replicated)


def bytes_per_device(tree) -> dict:
  """{device: bytes} the arrays of `tree` hold on each device (shards counted where they live)."""
  out: dict = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in getattr(x, "addressable_shards", ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
  return out


def max_bytes_per_device(tree) -> int:
  """The largest per-device share of `tree`'s bytes (what must fit one device's memory)."""
  per = bytes_per_device(tree)
  return max(per.values()) if per else 0


# ---------------------------------------------------------------------------------------------
# Slot sharding (flash-decoding across devices), used by the full cache
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SlotSharding:
  """Static description of a cache whose slots are split over mesh axes (hashable)."""

  mesh: Mesh
  batch: tuple
  kv_heads: tuple
  slots: tuple

  @classmethod
  def of(cls, plan_: ShardingPlan) -> "SlotSharding":
    return cls(plan_.mesh, plan_.rules.batch, plan_.rules.kv_heads, plan_.rules.slots)

  @staticmethod
  def _part(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)

  def buffer_spec(self) -> PartitionSpec:  # [L, B, K, S, H]
    return PartitionSpec(None, self._part(self.batch), self._part(self.kv_heads),
                         self._part(self.slots), None)

  def tokens_spec(self) -> PartitionSpec:  # [B, T, heads, H]
    return PartitionSpec(self._part(self.batch), None, self._part(self.kv_heads), None)

  def rows_spec(self) -> PartitionSpec:  # [B] or [B, T]
    return PartitionSpec(self._part(self.batch))

  def shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.slots)

  def offset(self, local_slots: int):
    """First global slot of this device's part (inside shard_map)."""
    index = 0
    for axis in self.slots:
      index = index * self.mesh.shape[axis] + jax.lax.axis_index(axis)
    return index * local_slots
