"""Cache specs: the typed description of a cache, and its string form.

A spec string is terms joined by `+`:

  full | dynamic | none        how the token axis is allocated (default full: static, preallocated)
  window:N                     keep the N most recent tokens (ring buffer)
  sink:S                       also keep the first S tokens forever (StreamingLLM; needs window)
  int8 | int4 | int2 | int3    quantized storage, bit-packed, with per-group scales
  residual:R                   the R most recent tokens stay full precision (needs intN)
  group:G                      quantization group size (default 32)
  h2o:K                        keep the K heaviest-attended tokens (needs window for the recent part)
  snapkv:K                     keep the K prompt tokens its last queries attend to most (SnapKV;
                               needs window), then decode as h2o does
  adakv                        one scored budget per layer shared by its kv heads (AdaKV): heads
                               compete for kv_heads x K slots, each keeps its sinks and window
  pyramid | pyramid:BETA       h2o/snapkv budgets shrinking with depth (PyramidKV): layer l keeps
                               K_l tokens, from 2K - K/BETA at the first layer down to K/BETA
                               (BETA default 20), L x K in all
  offload                      older blocks live in host memory
  tier:64:fp32,512:int8,4096:int2   budgets per precision tier, newest first
  share:G  |  share:G:cal      layers in groups of G share one cache (cal: calibrated linear maps)
  lowrank:R                    store R-dimensional latents of each layer's keys and values, from
                               projections fitted on calibration text (MLA-style; with intN the
                               latents are quantized)
  paged:P                      keys/values live in a pool of P-token pages shared by all rows, with a
                               block table per row (vLLM-style); with intN the pages are quantized
  NAME[:VALUE]                 a kind registered with `kvjax.register_kind` (see caches/registry.py)

`parse_spec` turns a string into a `CacheSpec` (frozen, hashable: a static jit argument) and
rejects unknown, malformed and contradictory terms with a `SpecError` naming the term; `str(spec)`
gives the canonical string back. `make_cache` builds the cache pytree of the kind the spec names,
through the kind registry: every kind, built in or registered by a user, is built the same way.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from kvjax.caches import registry
from kvjax.caches.registry import PYRAMID_BETA, SpecError, pyramid_budgets
from kvjax.models.protocol import default_dtype, model_dtype


SUPPORTED_BITS = (8, 4, 3, 2)
TIER_DTYPES = ("fp32", "bf16", "fp16", "int8", "int4", "int3", "int2")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Typed cache configuration; see the module docstring for the meaning of each term."""

  mode: str = "full"
  window: int | None = None
  sink: int = 0
  bits: int | None = None
  residual: int | None = None
  group: int = 32
  h2o: int | None = None
  snapkv: int | None = None
  pyramid: int | None = None
  adakv: bool = False
  offload: bool = False
  tiers: tuple[tuple[int, str], ...] | None = None
  share: int = 1
  share_calibrated: bool = False
  lowrank: int | None = None
  paged: int | None = None
  custom: tuple[tuple[str, str | None], ...] = ()

  def __post_init__(self):
    def positive(term, value):
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise SpecError(f"{term}:{value} must be a positive integer")

    if self.mode not in ("full", "dynamic", "none"):
      raise SpecError(f"unknown cache mode {self.mode!r}; expected full, dynamic or none")
    positive("window", self.window)
    positive("residual", self.residual)
    positive("group", self.group)
    positive("h2o", self.h2o)
    positive("snapkv", self.snapkv)
    positive("pyramid", self.pyramid)
    positive("share", self.share)
    positive("lowrank", self.lowrank)
    positive("paged", self.paged)
    if not isinstance(self.sink, int) or self.sink < 0:
      raise SpecError(f"sink:{self.sink} must be a non-negative integer")
    if self.bits is not None and self.bits not in SUPPORTED_BITS:
      raise SpecError(f"int{self.bits}: unsupported bit width; supported: "
                      + ", ".join(f"int{b}" for b in SUPPORTED_BITS))
    if self.sink and self.window is None:
      raise SpecError(f"sink:{self.sink} needs a window:N term (sinks are kept beside a recent window)")
    if self.residual is not None and self.bits is None:
      raise SpecError(f"residual:{self.residual} needs a quantized storage term (int8, int4, int2)")
    if self.residual is not None and self.residual % self.group:
      raise SpecError(f"residual:{self.residual} must be a multiple of group:{self.group}")
    if self.h2o is not None and self.snapkv is not None:
      raise SpecError(f"h2o:{self.h2o} and snapkv:{self.snapkv} are two scorers for one pool; pick one")
    scored = self.h2o if self.h2o is not None else self.snapkv
    if self.adakv and scored is None:
      raise SpecError("adakv shares a scored pool across kv heads; it needs h2o:K or snapkv:K")
    if self.adakv and self.residual is not None:
      raise SpecError(f"adakv does not take residual:{self.residual} yet; drop the residual ring")
    if self.pyramid is not None and scored is None:
      raise SpecError(f"pyramid:{self.pyramid} shapes the budgets of a scored pool; it needs h2o:K "
                      "or snapkv:K")
    name = "h2o" if self.h2o is not None else "snapkv"
    if scored is not None and self.window is None:
      raise SpecError(f"{name}:{scored} needs a window:N term for the recent tokens it always keeps")
    if scored is not None and self.residual is not None and self.residual > self.window:
      raise SpecError(f"residual:{self.residual} must not exceed window:{self.window} with {name} "
                      f"(the full-precision ring holds the newest tokens of the window)")
    bounded = self.window is not None or self.tiers is not None
    if self.mode == "none" and (bounded or self.bits or self.h2o or self.snapkv or self.offload or self.share > 1):
      raise SpecError("'none' (no cache) cannot be combined with other cache terms")
    if self.mode == "dynamic" and bounded:
      raise SpecError("'dynamic' grows an unbounded cache; it contradicts window/tier budgets")
    if self.tiers is not None:
      if (self.window is not None or self.bits is not None or self.h2o is not None
          or self.snapkv is not None):
        raise SpecError("tier:... sets its own budgets and precisions; drop window/intN/h2o/snapkv terms")
      for budget, dtype in self.tiers:
        if dtype not in TIER_DTYPES:
          raise SpecError(f"tier dtype {dtype!r} is unknown; expected one of {', '.join(TIER_DTYPES)}")
        positive("tier budget", budget)
    if self.share_calibrated and self.share == 1:
      raise SpecError("share:1:cal shares nothing; use share:G with G >= 2")
    if self.offload and (self.window is not None or self.tiers is not None):
      raise SpecError("offload moves old blocks of an unbounded cache to host memory; "
                      "a window/tier cache is already bounded")
    for term, value in (("lowrank", self.lowrank), ("paged", self.paged)):
      if value is None:
        continue
      others = [t for t, on in (("window", self.window is not None), ("tier", self.tiers is not None),
                                ("offload", self.offload), ("share", self.share > 1),
                                ("dynamic", self.mode == "dynamic"), ("none", self.mode == "none"),
                                ("lowrank", term != "lowrank" and self.lowrank is not None))
                if on]
      if others:
        raise SpecError(f"{term}:{value} is a storage layout of its own; it does not combine with "
                        f"{', '.join(others)} (it takes intN and group:G)")
      if self.residual is not None:
        raise SpecError(f"{term}:{value} does not take residual:{self.residual}")
    if len(self.custom) > 1:
      raise SpecError(f"a spec selects one registered kind; got {[n for n, _ in self.custom]}")
    if self.custom and self.mode == "none":
      raise SpecError("'none' (no cache) cannot be combined with other cache terms")

  # ---- derived facts --------------------------------------------------------------------------
  @property
  def uses_cache(self) -> bool:
    return self.mode != "none"

  @property
  def bounded(self) -> bool:
    """True when memory stays fixed however long the sequence (window, sinks, h2o, tiers)."""
    return self.window is not None or self.tiers is not None

  @property
  def budget(self) -> int | None:
    """Tokens a bounded cache holds at most (per row, layer and kv head)."""
    if self.tiers is not None:
      return sum(b for b, _ in self.tiers)
    if self.window is not None:
      heavy = (self.h2o or 0) + (self.snapkv or 0)
      if self.pyramid is not None:  # the first layer holds the most
        heavy = max(pyramid_budgets(heavy, 2, self.pyramid))
      return self.window + self.sink + heavy
    return None

  @property
  def lossless(self) -> bool:
    """True when the cache keeps every token at full precision (same logits as no cache). False
    for low-rank and shared kinds, and for registered kinds, which kvjax cannot vouch for."""
    return (self.uses_cache and self.bits is None and not self.bounded
            and not (self.share > 1) and self.lowrank is None and not self.custom)

  @property
  def kind(self) -> str:
    """Name of the registered kind that builds this spec (see `kvjax.caches.registry`)."""
    if self.share > 1:
      return "shared"
    if self.paged is not None:
      return "paged"
    if self.lowrank is not None:
      return "lowrank"
    if self.custom:
      return self.custom[0][0]
    if self.tiers is not None:
      return "tiered"
    if self.h2o is not None:
      return "h2o"
    if self.snapkv is not None:
      return "snapkv"
    if self.window is not None:
      return "window"
    if self.bits is not None:
      return "quantized"
    if self.offload:
      return "offload"
    return "full"

  @property
  def arg(self) -> str | None:
    """The value of a registered kind's term (`"64"` in `ring:64`), or None."""
    return self.custom[0][1] if self.custom else None

  def modifier_terms(self) -> set[str]:
    """Built-in terms set in this spec besides the kind a registered term selects (field names:
    dynamic, window, sink, bits, residual, group, h2o, offload, tiers, share)."""
    terms = {name for name, default in _DEFAULTS.items() if getattr(self, name) != default}
    if self.mode == "dynamic":
      terms.add("dynamic")
    return terms

  def replace(self, **changes) -> "CacheSpec":
    return dataclasses.replace(self, **changes)

  def __str__(self) -> str:
    terms = []
    if self.mode != "full" or not any((self.window, self.bits, self.h2o, self.offload, self.tiers,
                                       self.share > 1, self.custom, self.lowrank, self.paged)):
      terms.append(self.mode)
    if self.tiers is not None:
      terms.append("tier:" + ",".join(f"{b}:{d}" for b, d in self.tiers))
    if self.bits is not None:
      terms.append(f"int{self.bits}")
    if self.residual is not None:
      terms.append(f"residual:{self.residual}")
    if self.group != 32:
      terms.append(f"group:{self.group}")
    if self.h2o is not None:
      terms.append(f"h2o:{self.h2o}")
    if self.snapkv is not None:
      terms.append(f"snapkv:{self.snapkv}")
    if self.pyramid is not None:
      terms.append("pyramid" if self.pyramid == PYRAMID_BETA else f"pyramid:{self.pyramid}")
    if self.adakv:
      terms.append("adakv")
    if self.sink:
      terms.append(f"sink:{self.sink}")
    if self.window is not None:
      terms.append(f"window:{self.window}")
    if self.offload:
      terms.append("offload")
    if self.share > 1:
      terms.append(f"share:{self.share}" + (":cal" if self.share_calibrated else ""))
    if self.lowrank is not None:
      terms.append(f"lowrank:{self.lowrank}")
    if self.paged is not None:
      terms.append(f"paged:{self.paged}")
    terms += [name if value is None else f"{name}:{value}" for name, value in self.custom]
    return "+".join(terms)


_DEFAULTS = {"window": None, "sink": 0, "bits": None, "residual": None, "group": 32, "h2o": None, "snapkv": None, "pyramid": None, "adakv": False,
             "offload": False, "tiers": None, "share": 1, "lowrank": None, "paged": None}


_INT_TERMS = {"window": "window", "sink": "sink", "residual": "residual", "group": "group", "h2o": "h2o",
              "snapkv": "snapkv", "lowrank": "lowrank", "paged": "paged"}


def _int_value(term: str, raw: str) -> int:
  try:
    value = int(raw)
  except ValueError:
    raise SpecError(f"term {term!r}: {raw!r} is not an integer") from None
  return value


def parse_spec(spec) -> CacheSpec:
  """Accepts a `CacheSpec` (returned as is) or a spec string."""
  if isinstance(spec, CacheSpec):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"cache spec must be a string or CacheSpec, got {type(spec).__name__}")
  if not spec.strip():
    raise SpecError("empty cache spec")
  fields: dict = {}
  seen: set[str] = set()
  for term in (t.strip() for t in spec.strip().lower().split("+")):
    if not term:
      raise SpecError(f"empty term in cache spec {spec!r}")
    name, _, rest = term.partition(":")
    key = "mode" if name in ("full", "dynamic", "none") else ("bits" if name.startswith("int") else name)
    if key in seen:
      raise SpecError(f"cache spec {spec!r}: term {term!r} repeats or contradicts an earlier term")
    seen.add(key)
    if name == "pyramid":
      fields["pyramid"] = _int_value(term, rest) if rest else PYRAMID_BETA
    elif name == "adakv":
      if rest:
        raise SpecError(f"term {term!r}: adakv takes no value")
      fields["adakv"] = True
    elif name in ("full", "dynamic", "none", "offload"):
      if rest:
        raise SpecError(f"term {term!r}: {name} takes no value")
      if name == "offload":
        fields["offload"] = True
      else:
        fields["mode"] = name
    elif name.startswith("int"):
      if rest or not name[3:].isdigit():
        raise SpecError(f"term {term!r}: expected int8, int4, int3 or int2")
      fields["bits"] = int(name[3:])
    elif name in _INT_TERMS:
      if not rest:
        raise SpecError(f"term {term!r}: {name} needs a value, e.g. {name}:64")
      fields[_INT_TERMS[name]] = _int_value(term, rest)
    elif name == "tier":
      tiers = []
      for part in rest.split(","):
        budget, _, dtype = part.partition(":")
        if not dtype:
          raise SpecError(f"term {term!r}: each tier is BUDGET:DTYPE, e.g. tier:64:fp32,512:int8")
        tiers.append((_int_value(term, budget), dtype))
      fields["tiers"] = tuple(tiers)
    elif name == "share":
      value, _, flag = rest.partition(":")
      if flag not in ("", "cal"):
        raise SpecError(f"term {term!r}: expected share:G or share:G:cal")
      fields["share"] = _int_value(term, value)
      fields["share_calibrated"] = flag == "cal"
    elif registry.is_custom(name):
      info = registry.lookup(name)
      value = rest or None
      if info.parse is not None:
        info.parse(value)
      fields.setdefault("custom", ())
      fields["custom"] += ((name, value),)
    else:
      custom = registry.custom_kinds()
      raise SpecError(f"cache spec {spec!r}: unknown term {term!r} (known: full, dynamic, none, "
                      "window:N, sink:S, int8|int4|int3|int2, residual:R, group:G, h2o:K, snapkv:K, pyramid, adakv, offload, "
                      "tier:..., share:G, lowrank:R, paged:P" + (", registered: " + ", ".join(custom) if custom else "")
                      + ")")
  return CacheSpec(**fields)


def check_config(config, what: str = "make_cache") -> None:
  """A cache config needs positive int n_layers, n_kv_heads, head_dim (any object will do)."""
  for field in ("n_layers", "n_kv_heads", "head_dim"):
    value = getattr(config, field, None)
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise TypeError(f"{what}: config must have a positive int {field}, got {value!r} "
                      f"(from {type(config).__name__})")


def make_cache(spec, config, batch: int, capacity: int | None = None, dtype=None, *, mesh=None,
               rules=None, **options):
  """Builds an empty cache of the kind `spec` names, for `batch` rows.

  config: anything with `n_layers`, `n_kv_heads`, `head_dim` (a model config), or a model (then
    its config, and its dtype unless `dtype` is given).
  capacity: slots per row for unbounded kinds (full, dynamic, quantized, offload); bounded kinds
    size themselves from their budget (the default when capacity is None; so does a registered
    kind that declares a `capacity` hook), and a budget larger than `capacity` is an error.
  dtype: storage dtype of full-precision keys/values; default: the config's (or model's) `dtype`
    if it has one, else fp32 on CPU and bf16 on accelerators.
  mesh, rules: place the arrays over a `jax.sharding.Mesh` by logical axis rules (see
    `kvjax.sharding`; the plan's fallbacks are logged to the 'kvjax' logger).
  options: kind-specific extras (e.g. calibration maps for share:G:cal).
  """
  spec = parse_spec(spec)
  if hasattr(config, "config") and hasattr(config, "params"):  # a model
    dtype = dtype if dtype is not None else model_dtype(config)
    config = config.config
  check_config(config)
  if not spec.uses_cache:
    raise SpecError("cache spec 'none' has no cache object: it recomputes the prefix every step")
  if not isinstance(batch, (int, np.integer)) or batch <= 0:
    raise ValueError(f"make_cache: batch must be a positive int, got {batch!r}")
  info = registry.lookup(spec.kind)
  if capacity is None:
    if spec.budget is not None:
      capacity = spec.budget
    elif not info.builtin and info.capacity is not None:  # a registered kind that sizes itself
      capacity = info.default_capacity(spec, needed=0, prompt=0)
    else:
      raise ValueError(f"make_cache: cache spec {str(spec)!r} needs a capacity (slots per row)")
  if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
    raise ValueError(f"make_cache: capacity must be a positive int, got {capacity!r}")
  if spec.budget is not None and spec.budget > capacity:
    raise SpecError(f"cache spec {str(spec)!r} keeps {spec.budget} tokens, more than the capacity "
                    f"{capacity}; lower the budget or raise the capacity")
  if dtype is None:
    dtype = getattr(config, "dtype", None) or default_dtype()
  if not info.builtin:
    extra = spec.modifier_terms() - info.accepts - {"share"}
    if extra:
      raise SpecError(f"cache spec {str(spec)!r}: kind {info.name!r} does not take "
                      f"{', '.join(sorted(extra))} (it accepts: "
                      f"{', '.join(sorted(info.accepts)) or 'no other terms'})")
  cache = info.factory(spec, config, batch=int(batch), capacity=int(capacity),
                       dtype=jnp.dtype(dtype), **options)
  if mesh is not None:
    from kvjax import sharding

    plan = sharding.plan(mesh, config, batch=int(batch), capacity=cache.capacity, rules=rules,
                         slot_sharding_ok=sharding.supports_slot_sharding(cache))
    for note in plan.notes:
      logging.getLogger("kvjax").info("make_cache(%s): %s", spec, note)
    cache = sharding.shard_cache(cache, plan)
  return cache
