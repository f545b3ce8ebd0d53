"""The registry of cache kinds: which spec term builds which cache, and what the kind declares.

Every kind, built in or not, is a `KindInfo` registered under the term that selects it:

  kvjax.register_kind("ring", make_ring_cache)            # a factory, see below
  cache = kvjax.make_cache("ring:64", config, batch=2, capacity=256)
  kvjax.generate(model, prompts, cache="ring:64", ...)    # and perplexity, the CLI (--plugin)

A factory is `factory(spec, config, *, batch, capacity, dtype, **options) -> cache`: `spec` is the
parsed `CacheSpec` (`spec.arg` is the text after the kind's term, "64" above, or None), `config`
anything with `n_layers`, `n_kv_heads`, `head_dim`; `capacity` the slots per row the caller asks
for; `options` the keyword arguments given to `make_cache`. The cache must follow
`kvjax.caches.base.KVCache` (inheriting `base.Limited` or `base.Evicting` does most of it).

What else a kind may declare (all optional):

  estimate_bytes(spec, config, context, batch, dtype) -> int   a closed formula for the planner;
      without it the planner measures the cache's abstract shapes (`jax.eval_shape`).
  capacity(spec, needed, prompt) -> int   the slots per row `generate` / `perplexity` allocate when
      the caller gives none (needed: tokens a row must hold; prompt: the longest prompt). Default:
      `needed` rounded up to a bucket, so nearby lengths share one compiled executable.
  accepts   the built-in modifier terms the kind reads from the spec (e.g. {"bits", "group"} for
      `ring:64+int8`); any other built-in term in its spec is an error naming the term.
  parse(value) -> None   validates the term's value at parse time (raise SpecError).
  examples  spec strings of the kind that `kvjax.testing.strategies.specs()` draws from.
  terms     extra spec words the kind reads (`kvjax.caches.terms.Term`, e.g. `int_term("stride",
      ...)`): parsed, printed and validated like the built-in ones; the factory reads them as
      spec fields (`spec.stride`). Built-in kinds declare every word of the grammar this way.
  budget(spec), lossless(spec)   the kind's derived facts behind `CacheSpec.budget` / `.lossless`.
  options   the `make_cache` keyword options the factory reads: names, or `options(spec) -> names`
      when they depend on the spec (`share:G+KIND` reads `maps` and KIND's). Without it, the
      factory's keyword parameters when its signature lists them all (no **kwargs), else unknown.
      A layout (`kvjax.caches.hybrid.build`) gives each group only the options its kind reads.
  layer_options   those of the options that hold one entry per model layer (every leaf's leading
      axis is the model's L, e.g. calibration maps [L, ...]); a layout slices them to each group's
      layers.

Built-in kinds register themselves when their module is first imported (`lookup` imports it);
third-party kinds can also be found through the `kvjax.cache_kinds` entry-point group, whose
entries are imported the first time a spec names a term nobody registered.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np

from kvjax.caches import terms as grammar
from kvjax.caches.terms import SpecError, Term  # noqa: F401  (re-exported)


# Built-in kinds and the module that registers each (and declares its spec terms). Adding a
# built-in kind: its module, one entry here, its tests.
_BUILTIN_MODULES = {
    "full": "kvjax.caches.full",
    "quantized": "kvjax.caches.quantized",
    "window": "kvjax.caches.window",
    "h2o": "kvjax.caches.scored",
    "snapkv": "kvjax.caches.scored",
    "knorm": "kvjax.caches.scored.knorm",
    "tiered": "kvjax.caches.tiered",
    "offload": "kvjax.caches.offload",
    "shared": "kvjax.caches.shared",
    "lowrank": "kvjax.caches.lowrank",
    "paged": "kvjax.caches.paged",
}
_builtins_loaded = False
ENTRY_POINT_GROUP = "kvjax.cache_kinds"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class KindInfo:
  """What the registry knows about one kind (see the module docstring)."""

  name: str
  factory: Callable
  estimate_bytes: Callable | None = None
  capacity: Callable | None = None
  accepts: frozenset = frozenset()
  parse: Callable | None = None
  description: str = ""
  builtin: bool = False
  examples: tuple = ()
  budget: Callable | None = None
  lossless: Callable | None = None
  terms: tuple = ()
  options: Callable | frozenset | None = None
  layer_options: frozenset = frozenset()

  def options_for(self, spec) -> frozenset | None:
    """Names of the `make_cache` options a spec of this kind reads, or None when the kind does
    not say (a factory taking **options without declaring them)."""
    names = self.options(spec) if callable(self.options) else self.options
    return None if names is None else frozenset(names) | self.layer_options

  def budget_of(self, spec) -> int | None:
    """Tokens per row a spec of this kind keeps at most, or None when it keeps every token."""
    return None if self.budget is None else self.budget(spec)

  def lossless_for(self, spec) -> bool:
    """Whether a spec of this kind keeps every token exactly (registered kinds: never)."""
    return bool(self.lossless(spec)) if self.lossless is not None else False

  def default_capacity(self, spec, *, needed: int, prompt: int) -> int:
    """Slots per row to allocate for `needed` tokens when the caller gives no capacity."""
    if self.capacity is not None:
      return int(self.capacity(spec, needed=needed, prompt=prompt))
    return bucket(needed)


_KINDS: dict[str, KindInfo] = {}
_plugins_loaded = False


def register_kind(name: str, factory: Callable, *, estimate_bytes: Callable | None = None,
                  capacity: Callable | None = None, accepts=(), parse: Callable | None = None,
                  description: str = "", examples=(), replace: bool = False,
                  builtin: bool = False, terms: tuple = (), budget: Callable | None = None,
                  lossless: Callable | None = None, options=None, layer_options=()) -> KindInfo:
  """Registers a cache kind under the spec term `name` and returns its `KindInfo`.

  terms: extra `kvjax.caches.terms.Term`s the kind reads (built-in kinds declare all of theirs
    this way; a user kind gets its own word `name[:value]` declared for it, validated by `parse`).
  budget(spec) -> int | None, lossless(spec) -> bool: the kind's derived facts (`CacheSpec.budget`,
    `CacheSpec.lossless`).
  options: names of the `make_cache` options the factory reads, or `options(spec) -> names`;
    default: the factory's keyword parameters if its signature has no **kwargs (else undeclared:
    a layout gives the kind every option no other group reads). layer_options: the options with
    one entry per model layer, sliced to a group's layers in a layout (see the module docstring).

  Raises ValueError for a malformed name, a name the spec grammar reserves, a name already taken
  (unless `replace=True`), or `accepts` naming something that is not a built-in term.
  """
  if not builtin:
    load_builtins()
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(f"register_kind: the kind name must be lowercase letters, digits and _ "
                     f"starting with a letter, got {name!r}")
  if not callable(factory):
    raise TypeError(f"register_kind: factory for {name!r} must be callable, got {type(factory).__name__}")
  if not builtin and (name in _BUILTIN_MODULES or _builtin_word(name)):
    raise ValueError(f"register_kind: {name!r} is a built-in spec term or kind; pick another name")
  if name in _KINDS and not replace:
    raise ValueError(f"register_kind: a kind named {name!r} is already registered "
                     "(pass replace=True to replace it)")
  modifiers = {f for t in grammar.all_terms() if not t.owner for f, _ in t.fields} | {"dynamic"}
  unknown = set(accepts) - (modifiers - {"mode", "custom", "share_calibrated"})
  if unknown and not builtin:  # built-in kinds may register before the words they accept
    raise ValueError(f"register_kind: accepts names unknown modifier terms {sorted(unknown)}; "
                     f"use spec field names: {', '.join(sorted(modifiers - {'mode', 'custom'}))}")
  if options is None:
    options = _signature_options(factory)
  elif not callable(options):
    options = frozenset(options)
  info = KindInfo(name=name, factory=factory, estimate_bytes=estimate_bytes, capacity=capacity,
                  accepts=frozenset(accepts), parse=parse, description=description, builtin=builtin,
                  examples=tuple(examples), budget=budget, lossless=lossless, terms=tuple(terms),
                  options=options, layer_options=frozenset(layer_options))
  if not builtin:
    grammar.forget(name)
    grammar.declare(_own_term(name, parse, description),
                  *(dataclasses.replace(t, owner=name) for t in terms))
  else:
    grammar.declare(*terms)
  _KINDS[name] = info
  return info


# What every factory is called with (see the module docstring); the rest of its keyword
# parameters are the options it reads.
_FACTORY_ARGS = ("spec", "config", "batch", "capacity", "dtype")


def _signature_options(factory) -> frozenset | None:
  """The keyword parameters of `factory` beyond the ones every factory gets, or None when it
  takes **kwargs (or its signature cannot be read): then the kind has not said."""
  try:
    params = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None
  return frozenset(p.name for p in params if p.name not in _FACTORY_ARGS
                   and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def _builtin_word(name: str) -> bool:
  term = grammar.by_word(name)
  return term is not None and not term.owner


def _own_term(name: str, parse: Callable | None, description: str) -> Term:
  """The word `name[:value]` of a registered kind: sets `custom` to ((name, value),)."""
  def read(word, text):
    if parse is not None:
      parse(text)
    return {"custom": ((word, text),)}

  def show(spec):
    (kind, value), = spec.custom
    return kind if value is None else f"{kind}:{value}"

  return Term(name=name, usage=f"{name}[:VALUE]", doc=description or "a registered kind",
              fields=(("custom", ()),), parse=read, show=show, kind=name, rank=70, order=90,
              owner=name, selected=lambda spec: bool(spec.custom) and spec.custom[0][0] == name)


def unregister_kind(name: str) -> None:
  """Removes a kind registered with `register_kind` (built-in kinds cannot be removed)."""
  if name in _BUILTIN_MODULES:
    raise ValueError(f"unregister_kind: {name!r} is built in")
  _KINDS.pop(name, None)
  grammar.forget(name)


def load_builtins() -> None:
  """Imports every built-in kind's module once, so the grammar knows all their terms."""
  global _builtins_loaded
  if not _builtins_loaded:
    _builtins_loaded = True
    for module in dict.fromkeys(_BUILTIN_MODULES.values()):
      importlib.import_module(module)


def load_plugins() -> None:
  """Imports the entry points of the `kvjax.cache_kinds` group (once per process)."""
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  from importlib import metadata

  for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
    entry.load()


def is_custom(name: str) -> bool:
  """True when `name` is the term of a kind registered from outside kvjax."""
  if name in _BUILTIN_MODULES:
    return False
  if name not in _KINDS:
    load_plugins()
  return name in _KINDS


def lookup(name: str) -> KindInfo:
  """The `KindInfo` of kind `name`, importing a built-in kind's module on first use."""
  if name not in _KINDS and name in _BUILTIN_MODULES:
    importlib.import_module(_BUILTIN_MODULES[name])
  if name not in _KINDS:
    load_plugins()
  if name not in _KINDS:
    raise SpecError(f"cache kind {name!r} is not registered (known: {', '.join(registered_kinds())})")
  return _KINDS[name]


def registered_kinds() -> list[str]:
  """Names of every kind: the built-in ones, then those registered by users and plugins."""
  custom = sorted(n for n in _KINDS if n not in _BUILTIN_MODULES)
  return list(_BUILTIN_MODULES) + custom


def custom_kinds() -> list[str]:
  """Names of the kinds registered from outside kvjax."""
  return [n for n in registered_kinds() if n not in _BUILTIN_MODULES]


# ---------------------------------------------------------------------------------------------
# Helpers for factories
# ---------------------------------------------------------------------------------------------
def no_options(kind: str, options: dict) -> None:
  """Factories of kinds without options call this so a misspelt option is an error, not ignored."""
  if options:
    raise TypeError(f"{kind} cache: unknown options {sorted(options)}")


def streams(config, batch: int) -> int:
  """(layer, row, kv head) triples of a cache for `config`: what per-token bytes multiply."""
  return config.n_layers * batch * config.n_kv_heads


def bucket(n: int) -> int:
  """Slots for n tokens: a power of two from 16 up to 256, then a multiple of 256. Nearby
  lengths share a bucket, hence one compiled executable."""
  if n <= 256:
    return max(16, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // 256) * 256


def unbounded_capacity(spec, *, needed: int, prompt: int) -> int:
  """Default capacity of kinds that keep every token: the bucket of `needed`; with the `dynamic`
  policy, room for the prompt only (at least 64 slots), doubled while decoding."""
  if spec.mode == "dynamic":
    return max(64, 1 << max(prompt, 1).bit_length())
  return bucket(needed)


PYRAMID_BETA = 20  # PyramidKV's default: the last layer keeps about K / 20 scored tokens


def pyramid_budgets(heavy: int, n_layers: int, beta: int = PYRAMID_BETA) -> list[int]:
  """Scored-token budgets per layer, shrinking linearly with depth (PyramidKV): from
  2K - K/beta at layer 0 to K/beta (at least 1) at the last, about L x K in all."""
  low = max(1, round(heavy / beta))
  high = max(low, 2 * heavy - low)
  if n_layers == 1:
    return [heavy]
  return [max(1, round(high - (high - low) * layer / (n_layers - 1))) for layer in range(n_layers)]


def budget_capacity(spec, *, needed: int, prompt: int) -> int:
  """Default capacity of bounded kinds: their budget, whatever the length."""
  return int(spec.budget)


def check_config(config, what: str = "make_cache") -> None:
  """A cache config needs positive int n_layers, n_kv_heads, head_dim (any object will do)."""
  for field in ("n_layers", "n_kv_heads", "head_dim"):
    value = getattr(config, field, None)
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise TypeError(f"{what}: config must have a positive int {field}, got {value!r} "
                      f"(from {type(config).__name__})")


def build(spec, config, *, batch: int, capacity: int | None, dtype, **options):
  """The cache a parsed spec names, unplaced: the kind's factory after the checks every kind
  shares (a positive batch, a capacity or the kind's own, the budget fits, accepted modifiers).
  `kvjax.make_cache` parses, reads a model's config and dtype, and places on a mesh around it;
  wrappers (`share:G`) build their inner kind with it."""
  check_config(config)
  if not spec.uses_cache:
    raise SpecError("cache spec 'none' has no cache object: it recomputes the prefix every step")
  if not isinstance(batch, (int, np.integer)) or batch <= 0:
    raise ValueError(f"make_cache: batch must be a positive int, got {batch!r}")
  info = lookup(spec.kind)
  budget = info.budget_of(spec)
  if capacity is None:
    if budget is not None:
      capacity = budget
    elif not info.builtin and info.capacity is not None:  # a registered kind that sizes itself
      capacity = info.default_capacity(spec, needed=0, prompt=0)
    else:
      raise ValueError(f"make_cache: cache spec {str(spec)!r} needs a capacity (slots per row)")
  if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
    raise ValueError(f"make_cache: capacity must be a positive int, got {capacity!r}")
  if budget is not None and budget > capacity:
    raise SpecError(f"cache spec {str(spec)!r} keeps {budget} tokens, more than the capacity "
                    f"{capacity}; lower the budget or raise the capacity")
  if not info.builtin:
    own = {f for t in info.terms for f, _ in t.fields}
    extra = spec.modifier_terms() - info.accepts - own - {"share"}
    if extra:
      raise SpecError(f"cache spec {str(spec)!r}: kind {info.name!r} does not take "
                      f"{', '.join(sorted(extra))} (it accepts: "
                      f"{', '.join(sorted(info.accepts)) or 'no other terms'})")
  return info.factory(spec, config, batch=int(batch), capacity=int(capacity),
                      dtype=jnp.dtype(dtype), **options)
