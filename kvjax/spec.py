"""Cache specs: the typed description of a cache, and its string form.

A spec string is terms joined by `+`, each `word[:value]`: `int4+residual:64+window:512`,
`paged:16+int8`, `share:2:cal`, or a registered kind's own word. The grammar is generic: each kind
or modifier module declares its words (`kvjax.caches.terms.Term`); `grammar()` lists them all,
with a line of help each.

`parse_spec` turns a string into a `CacheSpec` (frozen, hashable: a static jit argument) and
rejects unknown, malformed, repeated and contradictory terms with a `SpecError` naming the term;
`str(spec)` gives the canonical string back (`parse_spec(str(s)) == s`). A spec's attributes are
the fields its terms declare (`spec.window`, `spec.bits`, ...; the default where a term is absent).
`make_cache` (`kvjax.runtime.make_cache`) builds the cache pytree of the kind the spec names.
"""

from __future__ import annotations

from typing import Any

from kvjax.caches import registry, terms
from kvjax.caches.terms import SpecError  # noqa: F401  (re-exported)


class CacheSpec:
  """A parsed, validated spec: an immutable set of (field, value) pairs with derived facts.

  `CacheSpec(window=64, sink=4)` builds one from fields (every field a term declares); unset
  fields read as their defaults. Equal specs hash equal; `replace(**changes)` gives a new one.
  """

  __slots__ = ("_values", "_items")

  def __init__(self, **fields):
    registry.load_builtins()
    table = terms.defaults()
    unknown = sorted(set(fields) - set(table))
    if unknown:
      raise TypeError(f"CacheSpec: unknown fields {unknown} (known: {', '.join(sorted(table))})")
    values = {f: v for f, v in fields.items() if v != table[f]}
    object.__setattr__(self, "_values", values)
    object.__setattr__(self, "_items", tuple(sorted(values.items())))
    present = self.terms()
    for term in present:
      if term.check is not None:
        term.check(self)

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_"):
      raise AttributeError(name)
    table = terms.defaults()
    if name not in table:
      raise AttributeError(f"CacheSpec has no field {name!r}")
    return self._values.get(name, table[name])

  def __setattr__(self, name, value):
    raise AttributeError("CacheSpec is immutable; use spec.replace(...)")

  def __eq__(self, other) -> bool:
    return isinstance(other, CacheSpec) and self._items == other._items

  def __hash__(self) -> int:
    return hash(self._items)

  def __repr__(self) -> str:
    return f"CacheSpec({str(self)!r})"

  def replace(self, **changes) -> "CacheSpec":
    return CacheSpec(**{**self._values, **changes})

  def terms(self) -> list[terms.Term]:
    """The terms present in this spec, in canonical order."""
    return [t for t in terms.all_terms() if t.present(self)]

  def __str__(self) -> str:
    return "+".join(t.show(self) for t in self.terms()) or "full"

  # ---- derived facts --------------------------------------------------------------------------
  @property
  def uses_cache(self) -> bool:
    return self.mode != "none"

  @property
  def kind(self) -> str:
    """The kind that builds this spec: the highest-ranked kind term present (else full)."""
    selecting = [t for t in self.terms() if t.kind is not None]
    return max(selecting, key=lambda t: t.rank).kind if selecting else "full"

  @property
  def budget(self) -> int | None:
    """Tokens a bounded cache holds at most (per row, layer and kv head); None if unbounded."""
    return registry.lookup(self.kind).budget_of(self)

  @property
  def bounded(self) -> bool:
    """True when memory stays fixed however long the sequence (window, sinks, h2o, tiers)."""
    return self.budget is not None

  @property
  def lossless(self) -> bool:
    """True when the cache keeps every token exactly (same logits as no cache). The kind says:
    a registered kind never claims it."""
    return self.uses_cache and registry.lookup(self.kind).lossless_for(self)

  @property
  def arg(self) -> str | None:
    """The value of a registered kind's term (`"64"` in `ring:64`), or None."""
    return self.custom[0][1] if self.custom else None

  def modifier_terms(self) -> set[str]:
    """Fields set besides the registered kind's own term (and `dynamic` for that mode)."""
    out = {f for f in self._values if f not in ("mode", "custom", "share_calibrated")}
    return out | ({"dynamic"} if self.mode == "dynamic" else set())


def parse_spec(spec) -> CacheSpec:
  """Accepts a `CacheSpec` (returned as is) or a spec string."""
  if isinstance(spec, CacheSpec):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"cache spec must be a string or CacheSpec, got {type(spec).__name__}")
  if not spec.strip():
    raise SpecError("empty cache spec")
  registry.load_builtins()
  fields: dict = {}
  seen: set[str] = set()
  for text in (t.strip() for t in spec.strip().lower().split("+")):
    if not text:
      raise SpecError(f"empty term in cache spec {spec!r}")
    word, colon, rest = text.partition(":")
    term = terms.by_word(word) or (registry.is_custom(word) and terms.by_word(word))
    if not term:
      raise SpecError(f"cache spec {spec!r}: unknown term {text!r} (known: {known_words()})")
    if term.name in seen or (term.fields[0][0] == "custom" and "custom" in fields):
      raise SpecError(f"cache spec {spec!r}: term {text!r} repeats or contradicts an earlier term")
    seen.add(term.name)
    fields.update(term.parse(word, rest if colon else None))
  return CacheSpec(**fields)


def known_words() -> str:
  """The usage of every term, for error messages."""
  return ", ".join(t.usage for t in terms.all_terms())


def grammar() -> str:
  """One line per term: its usage and what it does (the CLI's `--cache` help prints this)."""
  registry.load_builtins()
  return "\n".join(f"  {t.usage:<28} {t.doc}" for t in terms.all_terms())


def __getattr__(name: str):
  """`kvjax.spec.make_cache` is `kvjax.runtime.make_cache` (it builds and places; this module
  only parses), imported on first use."""
  if name == "make_cache":
    from kvjax import runtime

    return runtime.make_cache
  raise AttributeError(f"module 'kvjax.spec' has no attribute {name!r}")
