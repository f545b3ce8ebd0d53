"""The engine's page pools on a model with sliding-window layers (Gemma 3): one pool per window.

A plain model gets one `PagedCache` (`paged:P`), every layer in one pool, as ever. A model whose
layer types mix global layers with sliding ones gets a `HybridCache` of paged caches:

  global layers       one PagedCache that keeps every token (what admission counts: see
                      `kvjax.engine.admission`); its page index entries are the prefix cache;
  sliding layers      one PagedCache per window W with `window_only`: a row gives back its pages
                      behind W as it advances, so it holds at most `window_pages(W, P, chunk)`
                      pages however long it runs.

A window pool is sized so that it can never run short: `rows` times what one row may hold, plus
a budget of prefix-cache pins (`WindowPages`, default a window's worth per row): pages the rows
have moved past that a later prompt with the same prefix needs. Nothing waits on a window pool,
so admission looks at the global pool alone. A model whose layers all slide keeps the one-pool
design (every layer pages every token, masked to its window).
"""

from __future__ import annotations

from kvjax import layouts
from kvjax.caches import paged
from kvjax.caches.hybrid import HybridCache, group_config
from kvjax.models import config as config_lib


def split(config) -> dict | None:
  """{window or None: model layers with it} for a model with global and sliding layers, None for a
  model with no sliding layer or no global one (one pool serves those)."""
  parts: dict = {}
  for layer, window in enumerate(config_lib.layer_windows(config)):
    parts.setdefault(window, []).append(layer)
  if None not in parts or len(parts) == 1:
    return None
  return {w: tuple(ls) for w, ls in parts.items()}


def prefill_chunks(parts: dict | None, chunks: tuple) -> tuple:
  """The prefill chunk sizes for a model's `split` (`parts`): those of `chunks` no larger than
  its smallest window (at least the smallest chunk), since a window pool row holds its window plus
  a chunk; `chunks` itself for one pool (parts None)."""
  if parts is None:
    return chunks
  smallest = min(w for w in parts if w is not None)
  return tuple(c for c in chunks if c <= smallest) or chunks[:1]


def window_budget(window: int, page_size: int, rows: int) -> int:
  """The default prefix-cache pins of a window pool: a window's worth of pages per row."""
  return rows * -(-window // page_size)


def build(parts: dict, spec, model_config, *, rows: int, capacity: int, dtype, pages: int | None,
          window_pins: int | None, chunk: int) -> tuple[HybridCache, dict]:
  """(the HybridCache of the pools, {group: (window, pin budget)} of its window pools).

  parts: the model's `split`. spec: the engine's parsed `paged:P[+intN]` spec, on every pool.
  pages: the global pool's pages (default: every row full). window_pins: pages of each window
  pool kept for prefix-cache pins beyond the rows' share (default `window_budget`). chunk: the
  most tokens a row writes at once (the engine's largest prefill chunk)."""
  p = spec.paged
  caches, layers, windows = [], [], {}
  for window, group in sorted(parts.items(), key=lambda item: item[1][0]):
    config = group_config(model_config, len(group))
    if window is None:
      cache = paged.from_spec(spec, config, batch=rows, capacity=capacity, dtype=dtype, pages=pages)
    else:
      pins = window_budget(window, p, rows) if window_pins is None else int(window_pins)
      if pins < 0:
        raise ValueError(f"Engine: window_pins must be >= 0, got {window_pins!r}")
      held = rows * min(paged.window_pages(window, p, chunk), -(-capacity // p))
      cache = paged.from_spec(spec, config, batch=rows, capacity=capacity, dtype=dtype,
                              pages=held + pins, sliding=window, window_only=True)
      windows[len(caches)] = (window, pins)
    caches.append(cache)
    layers.append(group)
  return HybridCache.of(caches, layers), windows


def one_pool_layout(spec, model_config):
  """The spec to build one paged cache over every layer from: `spec` itself for a plain model, on
  every layer (`paged:P@all`, per-layer windows masked) for a model whose layers all slide."""
  if layouts.plan_for(spec, model_config) is None:
    return spec
  return layouts.Layout(placements=((layouts.ALL, spec),))
