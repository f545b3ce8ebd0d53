"""Hybrid layer layouts: which cache spec each layer of a model gets.

A layout string is placements joined by `;` (spaces around allowed), each `SPEC@LAYERS`, plus at
most one part without `@` (the plain part, default `full`) for every layer not placed otherwise:

  full                                   Gemma 3: full on global layers, window:512 on sliding ones
  int4+residual:64                       int4 on global layers, window:512 on sliding ones
  snapkv:256+window:64@global; window:256@sliding
  full@all                               every layer full (sliding layers masked to their window)
  int8@0-8; full                         layers 0..8 int8, the rest by the model's defaults

LAYERS is a layer type the model declares (`global`, `sliding`, ...), an index `5`, a range `0-4`,
a `.`-separated list of those (`5.11.17`), or `all`. Model defaults: a layer whose type has a
window (`kvjax.models.config.layer_window`) gets `window:W` unless a placement names it; every
other layer gets the plain part. A sliding layer placed explicitly takes `full`/`dynamic`, `intN`
/ `fp8`, `paged:P` (built with `sliding=W`: attention hides keys older than the window) or
`window:N` with N <= W.

A dict is accepted wherever a layout string is: `{"global": "int4", "sliding": "window:256"}`
(keys as LAYERS; `"*"` or None for the plain part). `parse_layout` returns a frozen `Layout`;
`str(layout)` is its canonical string and `parse_layout(str(x)) == x`. `layer_plan(layout,
config)` resolves it against a model config into groups of layers that share (spec, window).
"""

from __future__ import annotations

import dataclasses

from kvjax import spec as spec_lib
from kvjax.caches.terms import SpecError
from kvjax.models import config as config_lib

ALL = "all"
# Kinds that hold every token and hide the keys outside a sliding window when built with sliding=W.
MASKED_KINDS = ("full", "quantized", "paged")


@dataclasses.dataclass(frozen=True)
class Layout:
  """placements: ((selector, CacheSpec), ...) in the order given; a selector is a layer type name,
  `"all"`, or a sorted tuple of layer indices. plain: the spec of the part without `@`."""

  placements: tuple = ()
  plain: spec_lib.CacheSpec = dataclasses.field(default_factory=spec_lib.CacheSpec)

  @property
  def uses_cache(self) -> bool:
    return self.plain.uses_cache and all(s.uses_cache for _, s in self.placements)

  def __str__(self) -> str:
    parts = [f"{spec}@{_show_selector(sel)}" for sel, spec in self.placements]
    if not parts or self.plain != spec_lib.CacheSpec():
      parts.append(str(self.plain))
    return "; ".join(parts)


def is_layout_text(spec) -> bool:
  """True for what only `parse_layout` reads: a dict, a `Layout`, or a string with `@` or `;`."""
  return isinstance(spec, (dict, Layout)) or (isinstance(spec, str) and ("@" in spec or ";" in spec))


def parse_layout(spec) -> Layout:
  """A `Layout` from a layout string, a dict (see the module docstring), a spec or a `Layout`."""
  if isinstance(spec, Layout):
    return spec
  if isinstance(spec, spec_lib.CacheSpec):
    return Layout(plain=spec)
  if isinstance(spec, dict):
    spec = "; ".join(str(v) if k in ("*", None) else f"{v}@{k}" for k, v in spec.items())
  if not isinstance(spec, str):
    raise TypeError(f"cache layout must be a string, dict or CacheSpec, got {type(spec).__name__}")
  placements, plain = [], None
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      raise SpecError(f"cache layout {spec!r}: empty part between ';'")
    text, at, layers = (s.strip() for s in part.partition("@"))
    if at and not text:
      raise SpecError(f"cache layout {spec!r}: '@{layers}' places an empty spec")
    if not at:
      if plain is not None:
        raise SpecError(f"cache layout {spec!r}: two parts without '@' ({plain} and {text})")
      plain = spec_lib.parse_spec(text)
      continue
    placements.append((_read_selector(layers, spec), spec_lib.parse_spec(text)))
  return Layout(placements=tuple(placements), plain=plain or spec_lib.CacheSpec())


def _read_selector(text: str, whole: str):
  text = text.lower()
  if not text:
    raise SpecError(f"cache layout {whole!r}: '@' names no layers")
  if not text[0].isdigit():
    if not text.replace("_", "").isalnum():
      raise SpecError(f"cache layout {whole!r}: {text!r} is not a layer type, index, range or list")
    return text
  indices = set()
  for item in text.split("."):
    low, dash, high = item.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
      raise SpecError(f"cache layout {whole!r}: {item!r} is not a layer index or range a-b")
    low, high = int(low), int(high) if dash else int(low)
    if high < low:
      raise SpecError(f"cache layout {whole!r}: range {item!r} runs backwards")
    indices.update(range(low, high + 1))
  return tuple(sorted(indices))


def _show_selector(selector) -> str:
  if isinstance(selector, str):
    return selector
  runs: list[list[int]] = []
  for i in selector:
    if runs and i == runs[-1][1] + 1:
      runs[-1][1] = i
    else:
      runs.append([i, i])
  return ".".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _layers_of(selector, types: tuple, layout: Layout) -> tuple:
  if selector == ALL:
    return tuple(range(len(types)))
  if isinstance(selector, str):
    if selector not in types:
      raise SpecError(f"cache layout {str(layout)!r}: unknown layer type {selector!r} (the model's "
                      f"layers are {', '.join(sorted(set(types)))}; or use indices or 'all')")
    return tuple(i for i, t in enumerate(types) if t == selector)
  bad = [i for i in selector if i >= len(types)]
  if bad:
    raise SpecError(f"cache layout {str(layout)!r}: layer index {bad[0]} out of range (the model "
                    f"has {len(types)} layers, 0-{len(types) - 1})")
  return selector


def check_on_window(spec, window: int, layer: int) -> None:
  """Raises SpecError unless `spec` can serve a sliding layer of `window` tokens."""
  if spec.kind == "window":
    if spec.sink:
      raise SpecError(f"layer {layer} slides over {window} tokens; sink:{spec.sink} would keep "
                      "older ones (drop the sink)")
    if spec.window > window:
      raise SpecError(f"layer {layer} slides over {window} tokens; window:{spec.window} is larger "
                      f"(use window:N with N <= {window})")
    return
  if spec.kind not in MASKED_KINDS or not spec.uses_cache:
    raise SpecError(f"layer {layer} slides over {window} tokens; {str(spec)!r} cannot serve it: a "
                    f"sliding layer takes full, dynamic, intN, fp8, paged:P (masked to the window) "
                    f"or window:N with N <= {window}")


def parse_request(spec):
  """A `Layout` for a layout string or dict, else a `CacheSpec` (`parse_spec`)."""
  return parse_layout(spec) if is_layout_text(spec) else spec_lib.parse_spec(spec)


def plan_for(spec, config) -> tuple | None:
  """`layer_plan(spec, config)` when layers may differ (a `Layout`, or a config with a windowed
  layer type), None when `spec` is one plain spec for every layer (the plain cache, as ever)."""
  if not isinstance(spec, Layout) and all(w is None for w in config_lib.layer_windows(config)):
    return None
  return layer_plan(spec, config)


def layer_plan(spec, config) -> tuple:
  """Groups of layers of `config` that share a spec and a window: a tuple of
  (layer indices, CacheSpec, sliding window W or None), in order of each group's first layer."""
  layout = parse_layout(spec)
  types = config_lib.layer_types(config)
  placed: dict[int, spec_lib.CacheSpec] = {}
  for selector, s in layout.placements:
    for layer in _layers_of(selector, types, layout):
      if layer in placed:
        raise SpecError(f"cache layout {str(layout)!r}: layer {layer} is placed twice")
      placed[layer] = s
  groups: dict[tuple, list] = {}
  for layer, kind in enumerate(types):
    window = config_lib.layer_window(config, kind)
    s = placed.get(layer)
    if s is None:
      s = layout.plain if window is None else spec_lib.parse_spec(f"window:{window}")
    if window is not None:
      check_on_window(s, window, layer)
    groups.setdefault((s, window), []).append(layer)
  if len(groups) > 1 and any(not s.uses_cache for s, _ in groups):
    raise SpecError(f"cache layout {str(layout)!r}: 'none' (no cache) cannot be mixed with caches")
  return tuple((tuple(layers), s, w) for (s, w), layers in groups.items())


def grammar_line() -> str:
  """The help text of layouts (`kvjax specs` prints it after the terms)."""
  return ("Layouts place specs on groups of layers: SPEC@LAYERS joined by ';', LAYERS a layer type "
          "(global, sliding), 5, 0-4, 5.11.17 or all; a part without @ covers the rest, and "
          "sliding layers default to window:W. E.g. 'int4@global; window:256@sliding', 'full@all'.")
