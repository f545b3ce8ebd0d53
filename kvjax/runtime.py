"""From a cache request to a placed cache: the one resolver every entry point calls.

`generate`, `perplexity`, prefix caching, `beam_search` and `Engine` all turn (model, cache spec
or cache object, the rows' token needs, capacity, mesh) into a cache the same way:

  cache, plan = resolve(model, "paged:16", lengths=[23, 7], extra=11, mesh=mesh)

  1. a given cache object is checked (the protocol, its rows, no row already overflowed) and kept;
  2. otherwise the spec is parsed ('none' is refused: callers with an uncached path branch first),
     the batch is padded up to what the mesh's batch axes divide (`sharding.padded_batch`;
     padding rows hold one token), the capacity defaults to the kind's own choice
     (`KindInfo.default_capacity(spec, needed=, prompt=)`), a paged pool holds the pages the rows
     will fill (each row's length plus `extra`, rounded up to pages; not rows x capacity), and
     `make_cache` builds it;
  3. the fits check: the longest row (`prompt`) must fit, and so must the longest need
     (`needed` = longest length + extra, plus what a given cache already holds) unless the caller
     says it makes room itself (`check`), with an error that names the numbers;
  4. with a mesh the cache is placed by `kvjax.sharding.plan`'s rules.

`make_cache` (what `kvjax.make_cache` runs) is the lower step alone: a model's config and dtype,
the kind's factory through `registry.build`, and placement on a mesh when one is given.

Rows: `lengths` int [B] are the tokens each row is given first (a prompt, a document); `extra`
the tokens every row takes after them. Without `lengths` (the engine) the caller gives the batch
and capacity and the kind's default pool is kept.

`CachePlan` records what was decided; its `params` / `rows` / `replicate` place the caller's
other inputs by the same plan (identity without a mesh), so entry points need no mesh branches.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from kvjax import kernels, layouts, sharding
from kvjax import spec as spec_lib
from kvjax.caches import base, hybrid, paged, registry
from kvjax.caches.base import CapacityError
from kvjax.models.protocol import default_dtype, model_dtype


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """What `resolve` decided.

  spec: the parsed spec, or `kvjax.layouts.Layout` for a layout (None for a given cache).
  capacity: slots per row (the largest group's for a layout).
  batch: the caller's rows; padded_batch: the cache's rows (batch plus mesh padding rows).
  prompt / needed: tokens the longest row is given first / must hold in all (with a given cache,
  what it already holds included).  pages: a paged pool's size, else None.
  sharding: the `ShardingPlan` the cache was placed by (None without a mesh); its notes say
  which fallbacks were taken and which rows are padding.  given: the caller passed the cache.
  """

  spec: spec_lib.CacheSpec | None
  capacity: int
  batch: int
  padded_batch: int
  prompt: int
  needed: int
  pages: int | None
  sharding: sharding.ShardingPlan | None
  given: bool
  growable: bool
  label: str  # str(spec) (a layout's canonical string), or the given cache's type name

  def describe(self) -> str | None:
    """The sharding plan in words, None without a mesh."""
    return None if self.sharding is None else self.sharding.describe()

  def pad_rows(self, x: np.ndarray, value=0) -> np.ndarray:
    """A host array [batch, ...] padded with `value` rows up to [padded_batch, ...]."""
    extra = self.padded_batch - x.shape[0]
    if extra <= 0:
      return x
    return np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=value)

  def rows(self, x, axis: int = 0):
    """A host array whose `axis` is the batch, split over the batch axes (a device array)."""
    if self.sharding is None:
      return jnp.asarray(x)
    return sharding.shard_rows(np.asarray(x), self.sharding, axis=axis)

  def params(self, params):
    """The weights placed by the plan (tensor-parallel where it allows)."""
    return params if self.sharding is None else sharding.shard_params(params, self.sharding)

  def replicate(self, x):
    return x if self.sharding is None else sharding.replicate(np.asarray(x), self.sharding)


def is_cache(cache) -> bool:
  """True for a cache object (not a spec string or `CacheSpec`)."""
  return not isinstance(cache, (str, spec_lib.CacheSpec)) and hasattr(cache, "attend")


def check_capacity(capacity) -> None:
  if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
    raise ValueError(f"capacity must be a positive int, got {capacity!r}")


def resolve(model, cache="full", *, lengths=None, batch: int | None = None, extra: int = 0,
            capacity: int | None = None, dtype=None, mesh=None, rules=None,
            options: dict | None = None, check: str = "all", spare_pages: int = 0,
            what: str = "generate", row: str = "prompt", demand: str | None = None):
  """A placed cache for the rows, and the `CachePlan` saying how (see the module docstring).

  model: a model (its config and dtype are read) or a config (then give `dtype`).
  cache: spec string / `CacheSpec`, or a cache object (used as is, placed on the mesh if one is
    given; its rows must equal the rows of `lengths`).
  lengths: int [B] tokens each row is given first; batch: rows, when there are no lengths.
  extra: tokens every row takes after its first ones.  capacity: slots per row (default: the
    kind's choice).  options: `make_cache` keyword arguments (`pages=` overrides the pool size;
    `kernel=` sets the decode kernel, on a given cache too).
  check: what must fit: "all" (the whole need), "fixed" (the whole need unless the cache is
    growable: the caller grows it when it fills) or "prompt" (the first tokens only: the caller
    makes room or checks later).
  spare_pages: pages beyond the rows' own that copy-on-write may take at once (beam search).
  what / row / demand: words for errors (the entry point, what a row holds, what makes the need).
  """
  check_capacity(capacity)
  if check not in ("all", "fixed", "prompt"):
    raise ValueError(f"resolve: check must be 'all', 'fixed' or 'prompt', got {check!r}")
  if (lengths is None) == (batch is None):
    raise ValueError("resolve: give either the rows' lengths or, without them, the batch")
  lengths = None if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
  n_rows = int(lengths.size if lengths is not None else batch)
  prompt = 0 if lengths is None else int(lengths.max())
  options = dict(options or {})
  kernel = _attention_kernel(options)
  if is_cache(cache):
    kv, spec, padded = _given(cache, n_rows, what, row), None, n_rows
    if kernel != "auto":
      kv = kernels.with_kernel(kv, kernel)
    needed = prompt + extra + int(jnp.max(kv.lengths))
  else:
    spec = layouts.parse_request(cache)
    if not spec.uses_cache:
      raise spec_lib.SpecError(f"{what} needs a cache; 'none' keeps nothing to feed tokens through")
    padded = n_rows if mesh is None else sharding.padded_batch(mesh, n_rows, rules)
    needed = prompt + extra
    kv = _build(model, spec, lengths, padded, extra, capacity, dtype, options, spare_pages)
    kv = kv if kernel == "auto" else kernels.with_kernel(kv, kernel)
    if lengths is not None and not kv.fits(prompt):
      raise CapacityError(f"{what}: a {prompt}-token {row} does not fit a cache of capacity "
                          f"{kv.capacity}")
  growable = kv.caps.growable
  skip = check == "prompt" or (check == "fixed" and growable)
  if lengths is not None and not skip and not kv.fits(needed):
    raise CapacityError(f"{what}: {demand or f'{prompt} + {extra} tokens'} needs {needed} cache "
                        f"slots, but the cache capacity is {kv.capacity}; raise capacity or ask "
                        "for fewer tokens")
  kv, plan_ = _place(kv, model, mesh, rules, n_rows, padded, growable)
  plan = CachePlan(spec=spec, capacity=int(kv.capacity), batch=n_rows, padded_batch=padded,
                   prompt=prompt, needed=needed, pages=kv.n_pages if isinstance(kv, base.PagedStorage) else None,
                   sharding=plan_, given=spec is None, growable=growable,
                   label=type(kv).__name__ if spec is None else str(spec))
  return kv, plan


def default_capacity(spec, *, needed: int, prompt: int) -> int:
  """Slots per row a kind allocates for `needed` tokens (the longest first given: `prompt`)."""
  spec = spec_lib.parse_spec(spec)
  return int(registry.lookup(spec.kind).default_capacity(spec, needed=needed, prompt=prompt))


def _layer_specs(spec, model) -> list:
  """The specs the cache of `spec` is built from: its groups' on a layered model, else itself."""
  plan = layouts.plan_for(spec, getattr(model, "config", model))
  return [spec] if plan is None else [s for _, s, _ in plan]


def _given(cache, n_rows: int, what: str, row: str):
  """A caller's cache, checked: the protocol, one row per row, no row that dropped tokens."""
  base.check_cache(cache, what)
  if cache.batch != n_rows:
    raise ValueError(f"the given cache has {cache.batch} rows but there are {n_rows} {row}s")
  lost = np.flatnonzero(np.asarray(cache.overflowed()))
  if lost.size:
    raise CapacityError(f"rows {lost.tolist()} of the given cache already dropped tokens past its "
                        f"capacity {cache.capacity} (cache.overflowed()); continuing them would "
                        "condition on a truncated context")
  return cache


def _build(model, spec, lengths, padded: int, extra: int, capacity, dtype, options,
           spare_pages: int):
  """An empty cache of `spec` for `padded` rows: the kind's capacity, a pool sized from rows.
  `make_cache` reads a model's config and dtype."""
  options = dict(options or {})
  specs = _layer_specs(spec, model)  # a layout's groups: global ones need prompt + extra
  if capacity is None:
    if lengths is None:
      raise ValueError(f"a capacity is needed to build {str(spec)!r} without row lengths")
    prompt = int(lengths.max())
    sized = [s for s in specs if not s.bounded] or specs  # bounded groups size themselves
    capacity = max(default_capacity(s, needed=prompt + extra, prompt=prompt) for s in sized)
  page_sizes = {s.paged for s in specs} - {None}
  if len(page_sizes) == 1 and lengths is not None and options.get("pages") is None:
    held = np.concatenate([lengths, np.ones(padded - lengths.size, np.int64)]) + extra
    options["pages"] = paged.pages_for(held, page_sizes.pop()) + spare_pages
  return make_cache(spec, model, padded, int(capacity), dtype, **options)


def _attention_kernel(options: dict) -> str:
  """Pops the attention kernel ("auto" | "jnp" | "pallas") from `options`. An int `kernel` is
  not one: it is SnapKV's pooling kernel size (`snapkv`'s own option), left in `options`."""
  kernel = options.get("kernel", "auto")
  if isinstance(kernel, (int, np.integer)) and not isinstance(kernel, bool):
    return "auto"
  options.pop("kernel", None)
  return kernels.check_kernel(kernel)


def make_cache(spec, config, batch: int, capacity: int | None = None, dtype=None, *, mesh=None,
               rules=None, **options):
  """Builds an empty cache of the kind `spec` names, for `batch` rows.

  config: anything with `n_layers`, `n_kv_heads`, `head_dim` (a model config), or a model (then
    its config, and its dtype unless `dtype` is given).
  capacity: the tokens a row must be able to hold. Unbounded kinds (full, dynamic, quantized,
    offload, lowrank) allocate exactly that many slots; `paged:P` rounds it up to whole pages;
    bounded kinds (window, h2o, snapkv, tier) hold their budget whatever the stream, so they size
    themselves from it (also the default when capacity is None, as for a registered kind with a
    `capacity` hook), and a budget larger than `capacity` is an error.
  dtype: storage dtype of full-precision keys/values; default: the config's (or model's) `dtype`
    if it has one, else fp32 on CPU and bf16 on accelerators.
  mesh, rules: place the arrays over a `jax.sharding.Mesh` by logical axis rules (see
    `kvjax.sharding`; the plan's fallbacks are logged to the 'kvjax' logger).
  kernel: "auto" (default) | "jnp" | "pallas": the decode attention kernel of the kinds that have
    a Pallas path (full, paged; `kvjax.kernels`); "pallas" on CPU runs it in interpret mode.
    (An int `kernel` is SnapKV's pooling kernel size, snapkv's own option, as before.)
  options: kind-specific extras (e.g. calibration maps for share:G:cal), each read by the kinds
    that declare it (`registry.register_kind(options=)`); in a layout, only the groups that read
    an option get it, per-layer ones (maps) cut to the group's layers. `slack=n` goes to the kinds
    with a ring (window, share:G+window:N: slots a crop of n tokens falls back on) and is dropped
    for others.

  spec may also be a layout (`kvjax.layouts`: `"int4@global; window:256@sliding"`, or a dict):
  on a model with sliding layers, or with `@` placements, each group of layers gets its own cache
  in a `HybridCache` (bounded groups sized by their budget, the others by `capacity`); a spec
  without `@` on a model without layer types builds the plain cache, exactly as before.
  """
  kernel = _attention_kernel(options)
  spec = layouts.parse_request(spec)
  if hasattr(config, "config") and hasattr(config, "params"):  # a model
    dtype = dtype if dtype is not None else model_dtype(config)
    config = config.config
  if dtype is None:
    dtype = getattr(config, "dtype", None) or default_dtype()
  registry.check_config(config)
  plan = layouts.plan_for(spec, config)
  if plan is None:
    takes = registry.lookup(spec.kind).options_for(spec) if spec.uses_cache else None
    for name in hybrid.SOFT_OPTIONS - (takes or frozenset()):
      options.pop(name, None)  # e.g. slack: only a kind with a ring reads it (`hybrid.route_options`)
    cache = registry.build(spec, config, batch=batch, capacity=capacity, dtype=dtype, **options)
  else:
    cache = hybrid.build(plan, config, batch=batch, capacity=capacity, dtype=dtype,
                         build_one=registry.build, **options)
  if kernel != "auto":
    cache = kernels.with_kernel(cache, kernel)
  if mesh is not None:
    plan_ = sharding.plan_cache(mesh, config, cache, rules=rules)
    for note in plan_.notes:
      logging.getLogger("kvjax").info("make_cache(%s): %s", spec, note)
    cache = sharding.shard_cache(cache, plan_)
  return cache


def _place(kv, model, mesh, rules, n_rows: int, padded: int, growable: bool):
  """(cache placed by the mesh's plan, that plan); (kv, None) without a mesh."""
  if mesh is None:
    return kv, None
  config = getattr(model, "config", model)
  plan_ = sharding.plan_cache(mesh, config, kv, rules=rules)
  if growable and plan_.rules.slots:
    raise ValueError("a dynamic (growable) cache cannot split its slots over devices")
  if padded > n_rows:
    plan_ = sharding.with_note(plan_, f"batch {n_rows} padded to {padded} rows to split it (rows "
                               f"{n_rows}..{padded - 1} of the returned cache are padding)")
  return sharding.shard_cache(kv, plan_), plan_


def bucket(n: int) -> int:
  """Slots (or prompt padding) for n tokens: `registry.bucket`, the one bucketing rule."""
  return registry.bucket(n)


__all__ = ["CachePlan", "bucket", "check_capacity", "default_capacity", "is_cache", "make_cache",
           "resolve"]
