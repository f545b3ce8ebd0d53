"""The scored kinds in the spec grammar: their terms, their factory, and how one is added.

A scored kind is a spec word `name:K` (keep the K best-scored older tokens, beside `window:W` and
optional `sink:S`, intN/fp8 storage and residual:R) bound to a `Scorer`. `register_scored(name,
make_scorer, terms=...)` registers it with the kind registry: one generic factory (`from_spec`),
memory formula (`estimate_bytes`) and budget serve every scored kind, and the modifiers declared
here (`pyramid`, `adakv`) combine with each of them. Built in: h2o and snapkv (below); each other
scored kind declares itself in its own module (e.g. knorm.py) and is listed in
`kvjax.caches.registry._BUILTIN_MODULES`.

Invariants: a spec names at most one scored term; the budget of a spec is sink + window + K (K of
the first, largest layer with `pyramid`); `estimate_bytes` equals the built cache's `nbytes`
(tests/caches/test_layered.py, test_adakv.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from kvjax.caches import codec as codec_lib
from kvjax.caches import registry, terms
from kvjax.caches.layered import LayeredCache
from kvjax.caches.registry import PYRAMID_BETA, SpecError, pyramid_budgets
from kvjax.caches.scored import scorers
from kvjax.caches.scored.cache import ScoredCache


@dataclasses.dataclass(frozen=True)
class ScoredKind:
  """name: the kind, its spec word and the spec field holding K; scorer(**options) -> Scorer;
  options: the `make_cache` keyword arguments the scorer reads."""

  name: str
  scorer: Callable[..., scorers.Scorer]
  options: tuple[str, ...] = ()


_SCORED: dict[str, ScoredKind] = {}  # in registration order: h2o, snapkv, then the others


def register_scored(name: str, scorer: Callable[..., scorers.Scorer], *, terms: tuple = (),
                    options: tuple[str, ...] = (), description: str = ""):
  """Registers the built-in scored kind `name` (its term, declared in `terms` or by another
  kind's registration, sets the spec field `name` to K); returns its `registry.KindInfo`."""
  _SCORED[name] = ScoredKind(name, scorer, tuple(options))
  return registry.register_kind(name, from_spec, estimate_bytes=estimate_bytes, terms=terms,
                                budget=_budget, capacity=registry.budget_capacity, builtin=True,
                                options=options,
                                description=description)


def scored_term(spec) -> tuple[str, int | None]:
  """(kind name, K) of the scored term in `spec` (the first registered one present)."""
  for name in _SCORED:
    if getattr(spec, name, None) is not None:
      return name, getattr(spec, name)
  return "h2o", None


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32,
              **options) -> ScoredCache | LayeredCache:
  """`NAME:K+window:W` for a scored kind NAME, `[+sink:S][+intN[+residual:R][+group:G]]`, and
  `pyramid` / `adakv`. `capacity` is not used. Options: those of the kind's scorer (snapkv:
  observe, kernel, pooling)."""
  name, heavy = scored_term(spec)
  kind = _SCORED[name]
  extra = {k: options.pop(k) for k in kind.options if k in options}
  registry.no_options(name, options)
  scorer = kind.scorer(**extra)
  make = lambda n_layers, k: ScoredCache.init(
      n_layers=n_layers, batch=batch, kv_heads=config.n_kv_heads, head_dim=config.head_dim,
      heavy=k, window=spec.window, sink=spec.sink, residual=spec.residual or 0, dtype=dtype,
      scorer=scorer, shared_heads=spec.adakv, codec=codec_lib.for_spec(spec, dtype))
  if spec.pyramid is not None:  # one cache per layer, each with its own budget
    return LayeredCache.of(make(1, k) for k in layer_budgets(spec, config.n_layers))
  return make(config.n_layers, heavy)


def layer_budgets(spec, n_layers: int) -> list[int]:
  """The scored-token budget of each layer: K everywhere, or PyramidKV's taper."""
  heavy = scored_term(spec)[1]
  if spec.pyramid is None:
    return [heavy] * n_layers
  return pyramid_budgets(heavy, n_layers, spec.pyramid)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Per layer: the pool (at its precision), the residual ring, positions and scores per slot;
  and the lengths (once per layer with pyramid budgets, whose layers are separate caches)."""
  residual = spec.residual or 0
  codec = codec_lib.for_spec(spec, dtype)
  if codec.kind == "int" and config.head_dim % codec.group:
    raise SpecError(f"{str(spec)!r}: group:{codec.group} does not divide head_dim {config.head_dim}")
  total = 0
  for heavy in layer_budgets(spec, config.n_layers):
    pool = spec.sink + spec.window - residual + heavy
    pool_bytes = 2 * pool * codec.token_bytes(config.head_dim)
    ring_bytes = 2 * residual * config.head_dim * jnp.dtype(dtype).itemsize
    per_slot = 12 if spec.adakv else 8  # position and score (and the slot's kv head)
    total += batch * config.n_kv_heads * (pool_bytes + ring_bytes + per_slot * (pool + residual))
  return total + 4 * batch * (config.n_layers if spec.pyramid is not None else 1)


def _budget(spec) -> int:
  heavy = scored_term(spec)[1]
  if spec.pyramid is not None:  # the first layer holds the most
    heavy = max(pyramid_budgets(heavy, 2, spec.pyramid))
  return spec.window + spec.sink + heavy


# ---- the checks every scored term shares --------------------------------------------------------
def check_scored(spec) -> None:
  """The cross-term rules of a scored term `NAME:K`: one scorer, a window, residual <= window."""
  present = [f"{n}:{getattr(spec, n)}" for n in _SCORED if getattr(spec, n, None) is not None]
  if len(present) > 1:
    raise SpecError(f"{' and '.join(present)} are two scorers for one pool; pick one")
  name, heavy = scored_term(spec)
  terms.needs(spec, f"{name}:{heavy}", "window", hint="a window:N term for the recent tokens it "
              "always keeps")
  if spec.residual is not None and spec.residual > spec.window:
    raise SpecError(f"residual:{spec.residual} must not exceed window:{spec.window} with {name} "
                    f"(the full-precision ring holds the newest tokens of the window)")


def _any_scored(spec, what: str) -> None:
  terms.needs(spec, what, *_SCORED, hint=" or ".join(f"{n}:K" for n in _SCORED))


def _check_adakv(spec):
  _any_scored(spec, "adakv shares a scored pool across kv heads; it")
  if spec.residual is not None:
    raise SpecError(f"adakv does not take residual:{spec.residual} yet; drop the residual ring")


def _check_pyramid(spec):
  terms.positive("pyramid", spec.pyramid)
  _any_scored(spec, f"pyramid:{spec.pyramid} shapes the budgets of a scored pool; it")


H2O_TERM = terms.int_term("h2o", "keep the K heaviest-attended tokens (needs window for the "
                          "recent part)", usage="h2o:K", kind="h2o", rank=50, check=check_scored,
                          order=30)
SNAPKV_TERM = terms.int_term("snapkv", "keep the K prompt tokens its last queries attend to most "
                             "(SnapKV; needs window), then decode as h2o does", usage="snapkv:K",
                             kind="snapkv", rank=45, check=check_scored, order=31)
PYRAMID_TERM = terms.Term(
    name="pyramid", usage="pyramid | pyramid:BETA", fields=(("pyramid", None),),
    doc=f"h2o/snapkv budgets shrinking with depth (PyramidKV): from 2K - K/BETA at the first layer "
        f"down to K/BETA (BETA default {PYRAMID_BETA}), L x K in all",
    parse=lambda word, text: {"pyramid": PYRAMID_BETA if text is None else terms.integer(word, text)},
    show=lambda spec: "pyramid" if spec.pyramid == PYRAMID_BETA else f"pyramid:{spec.pyramid}",
    check=_check_pyramid, order=32)
ADAKV_TERM = terms.flag_term("adakv", "one scored budget per layer shared by its kv heads (AdaKV): "
                             "heads compete for kv_heads x K slots", check=_check_adakv, order=33)

register_scored("h2o", lambda: scorers.H2O(), terms=(H2O_TERM, SNAPKV_TERM, PYRAMID_TERM, ADAKV_TERM),
                description="the recent window plus the most-attended older tokens (H2O)")
register_scored("snapkv", scorers.SnapKV, options=("observe", "kernel", "pooling"),
                description="the prompt tokens its last queries attend to most (SnapKV), then h2o "
                            "while decoding")
