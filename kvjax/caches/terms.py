"""The words of the cache-spec grammar, each declared by the module that owns it.

A spec string is terms joined by `+`; a term is `word[:value]`. The grammar itself knows nothing
about any word: every kind or modifier module declares its terms here, in one `Term` each (what
the word sets, its default, its doc line, how its value is read and printed, which kind it selects
and the cross-term rules it needs). `kvjax.spec.parse_spec` then parses and prints any spec
generically, and `kvjax.spec.grammar()` lists the terms for help texts and errors.

Which kind a spec builds: among the terms present that select a kind, the one of highest `rank`
(a wrapper such as `share:G` outranks what it wraps; `h2o:K` outranks the `window:W` it needs).
A spec with none of them builds `full`.

User kinds use the same mechanism: `kvjax.register_kind(name, factory, terms=(...))` declares
the kind's own word (and any extra words it reads); `accepts` names the built-in modifier fields
it composes with (e.g. `{"bits", "group"}` for `ring:64+int8`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class SpecError(ValueError):
  """A cache spec that names an unknown, malformed or contradictory term."""


@dataclasses.dataclass(frozen=True)
class Term:
  """One word of the grammar (see the module docstring).

  name: the word ("window"); `words` lists every spelling that selects the term (default: name).
  usage: how the help shows it ("window:N").
  doc: one line saying what it does.
  fields: (spec attribute, default) pairs the term sets; the term is present in a spec when any
    of them differs from its default.
  parse(word, text) -> {field: value}: reads `word[:text]` (text None when there is no `:`).
  show(spec) -> str: the canonical text of the term in `spec` (called only when present).
  kind, rank: the kind the term selects, and its precedence (see the module docstring).
  check(spec): cross-term rules, raising SpecError; run whenever the term is present.
  order: the term's place in the canonical string.
  owner: the kind that declared it ("" for built-in terms).
  selected(spec) -> bool: whether the term is present, where its fields alone cannot tell (a
    registered kind's own word shares the field `custom` with the others').
  """

  name: str
  usage: str
  doc: str
  fields: tuple[tuple[str, Any], ...]
  parse: Callable[[str, str | None], dict]
  show: Callable[[Any], str]
  words: tuple[str, ...] = ()
  kind: str | None = None
  rank: int = 0
  check: Callable[[Any], None] | None = None
  order: int = 50
  owner: str = ""
  selected: Callable[[Any], bool] | None = None

  @property
  def spellings(self) -> tuple[str, ...]:
    return self.words or (self.name,)

  def present(self, spec) -> bool:
    if self.selected is not None:
      return self.selected(spec)
    return any(getattr(spec, field) != default for field, default in self.fields)


_TERMS: dict[str, Term] = {}   # by name
_WORDS: dict[str, Term] = {}   # by every spelling
_DEFAULTS: dict[str, Any] = {}  # every field a term declares, and its default


def declare(*terms: Term) -> None:
  """Adds terms to the grammar (a module declares its words once, at import)."""
  for term in terms:
    clash = [w for w in term.spellings if w in _WORDS and _WORDS[w].name != term.name]
    taken = {f for t in _TERMS.values() if t.name != term.name for f, _ in t.fields}
    clash += [f for f, _ in term.fields if f in taken and f != "custom"]
    if clash:
      raise ValueError(f"term {term.name!r}: {clash} already belong to another term")
    _TERMS[term.name] = term
    for word in term.spellings:
      _WORDS[word] = term
    _DEFAULTS.update(term.fields)


def forget(owner: str) -> None:
  """Removes the terms a (user) kind declared."""
  for term in [t for t in _TERMS.values() if t.owner == owner]:
    del _TERMS[term.name]
    for word in term.spellings:
      _WORDS.pop(word, None)
  _DEFAULTS.clear()
  for term in _TERMS.values():
    _DEFAULTS.update(term.fields)


def by_word(word: str) -> Term | None:
  return _WORDS.get(word)


def all_terms() -> list[Term]:
  """Every declared term, in canonical order."""
  return sorted(_TERMS.values(), key=lambda t: (t.order, t.name))


def defaults() -> dict[str, Any]:
  """Every spec field and its default (do not mutate)."""
  return _DEFAULTS


# ---- helpers for declaring the common shapes of term ------------------------------------------
def integer(word: str, text: str | None) -> int:
  """The integer value of `word:text`, or a SpecError naming the term."""
  if text is None or text == "":
    raise SpecError(f"term {word!r}: {word} needs a value, e.g. {word}:64")
  try:
    return int(text)
  except ValueError:
    raise SpecError(f"term '{word}:{text}': {text!r} is not an integer") from None


def no_value(word: str, text: str | None) -> None:
  if text is not None:
    raise SpecError(f"term '{word}:{text}': {word} takes no value")


def positive(term: str, value) -> None:
  if value is not None and (not isinstance(value, int) or value <= 0):
    raise SpecError(f"{term}:{value} must be a positive integer")


def int_term(name: str, doc: str, *, usage: str | None = None, kind: str | None = None,
             rank: int = 0, check: Callable | None = None, order: int = 50, default=None,
             owner: str = "") -> Term:
  """`name:N` setting the field `name` to a positive int (default None: absent)."""
  def checked(spec):
    positive(name, getattr(spec, name))
    if check is not None:
      check(spec)

  return Term(name=name, usage=usage or f"{name}:N", doc=doc, fields=((name, default),),
              parse=lambda word, text: {name: integer(word, text)},
              show=lambda spec: f"{name}:{getattr(spec, name)}", kind=kind, rank=rank,
              check=checked, order=order, owner=owner)


def flag_term(name: str, doc: str, *, kind: str | None = None, rank: int = 0,
              check: Callable | None = None, order: int = 50, owner: str = "") -> Term:
  """A bare word setting the field `name` to True."""
  def parse(word, text):
    no_value(word, text)
    return {name: True}

  return Term(name=name, usage=name, doc=doc, fields=((name, False),), parse=parse,
              show=lambda spec: name, kind=kind, rank=rank, check=check, order=order, owner=owner)


def needs(spec, term: str, *fields: str, hint: str) -> None:
  """Raises unless one of `fields` is set in `spec`: `term` needs it (`hint` says what to add)."""
  if all(getattr(spec, f) in (None, False) for f in fields):
    raise SpecError(f"{term} needs {hint}")


def alone(name: str, *allowed: str):
  """The check of a term that is a storage layout of its own (`paged:P`, `lowrank:R`): it takes
  the terms named in `allowed` and no other."""
  def check(spec):
    value = getattr(spec, name)
    positive(name, value)
    if spec.residual is not None and "residual" not in allowed:
      raise SpecError(f"{name}:{value} does not take residual:{spec.residual}")
    others = [t.name for t in spec.terms() if t.name not in (name, "mode", "residual", *allowed)]
    others += [spec.mode] if spec.mode != "full" else []
    if others:
      raise SpecError(f"{name}:{value} is a storage layout of its own; it does not combine with "
                      f"{', '.join(others)} (it takes {' and '.join(_TERMS[a].usage for a in allowed)})")
  return check
