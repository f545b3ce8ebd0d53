"""The press protocol: what one layer shows a press, how a press scores it, and how presses are named.

A press (kvpress's word) decides which prompt tokens a compressed cache keeps. In kvjax a press is
a frozen, hashable dataclass (a static argument of the jitted prefill, so one compile per press
and shapes) with two hooks, both pure functions of one layer's `LayerInputs`:

  score(x, n_kept) -> float32 [B, K, T]
      How much each prompt token of each kv head is worth keeping (higher keeps). n_kept int32 [B]
      is the row's budget for this layer; most presses ignore it (StreamingLLM and CriticalKV use
      it) and say so with `budget_free = True`: one scoring then serves every budget
      (`compress(..., scores=)`, a ratio sweep scores once). Positions t >= x.n_valid[b] are
      padding: their scores are ignored.
  select(x, scores, n_kept) -> bool [B, K, T]
      Which tokens are kept. Default (`topk_per_head`): the n_kept[b] best of each (row, kv head),
      kvpress's ScorerPress rule. Wrappers override it (AdaKV pools a layer's heads, ChunkKV keeps
      whole chunks, BlockPress rescores block by block).

and one optional hook for presses that thin the keys instead of (or beside) dropping tokens:

  prune_keys(x) -> k [B, K, T, H]
      The rotated keys as the cache stores them (default: x.k unchanged). ThinK zeroes its pruned
      key channels here. Only the written cache sees it: the prefill's own attention, and so every
      later layer's inputs, use the full keys (as in kvpress, whose presses run after attention).

and one for presses that change the stored values (merging folds dropped values into kept ones):

  merge_values(x, keep) -> v [B, K, T, H]
      The values the cache stores for this layer, given the selection keep bool [B, K, T] (default:
      x.v unchanged). Only the kept positions are written; like prune_keys, only the cache sees it.

and two class-level facts: `name` (the spec word, kvpress's name for the method) and `kvpress`,
the option values kvpress 0.5.5 uses by default where kvjax's own default differs (`compat=
"kvpress"` applies them, `resolve`). Budgets per layer (PyramidKV) come from `layer_kept`.

Presses that need more than one layer's view of the prompt say so with three more facts:
`rerotates` (the kept keys are re-rotated to positions 0..n-1 and decoding continues at n:
key_rerotation, finch), `takes_budget = False` (the press sizes every layer itself, so `compress`
takes no ratio or budget: simlayerkv) and `extend(rows, tokenizer)` (the prefill runs over a longer
prompt than the one compressed, e.g. kvzip's "repeat the context"; the keys scored and kept are
the first `n_context` of each row). A press that scores with model passes of its own (kvzip's
chunked repetition of long rows) returns its scores from `own_scores(model, rows, prefilled)`;
`compress` then only selects and writes, as with given scores.

Everything else — running the prefill, budgets from a ratio or a token count, ragged rows, storage
(intN/fp8), the cache the kept tokens land in — is shared machinery (`kvjax.presses.compress`).

Invariants: scores are finite float32 where valid; `select` keeps at most the budget and never a
padding position; hooks depend only on their arguments and the press's static fields.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.caches.terms import SpecError


@struct.dataclass
class LayerInputs:
  """What one attention layer of the prompt's prefill shows a press (one row per prompt).

  q: [B, T, N, H] queries rotated at their positions (not scaled); q_raw the same before RoPE.
  k: [B, K, T, H] keys rotated at their positions (what the cache stores); k_raw before RoPE.
  v: [B, K, T, H] values.
  n_valid: int32 [B] real tokens per row (the rest is right padding).
  wo: the layer's output projection [N * H, D] when the press asks for it (`needs_wo`), else None.
  n_context: int32 [B] the tokens of each row that may be kept, when the press extended the prompt
    (`Press.extend`: positions >= n_context are the extension, attended but never kept); None: all.
  layer, n_layers: static; scale: the softmax scale; rope: the layer's RoPE (static).
  """

  q: jax.Array
  q_raw: jax.Array
  k: jax.Array
  k_raw: jax.Array
  v: jax.Array
  n_valid: jax.Array
  wo: jax.Array | None = None
  n_context: jax.Array | None = None
  layer: int = struct.field(pytree_node=False, default=0)
  n_layers: int = struct.field(pytree_node=False, default=1)
  scale: float = struct.field(pytree_node=False, default=1.0)
  rope: Any = struct.field(pytree_node=False, default=None)

  # ---- shapes ---------------------------------------------------------------------------------
  @property
  def batch(self) -> int:
    return self.k.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.k.shape[1]

  @property
  def tokens(self) -> int:
    return self.k.shape[2]

  @property
  def heads(self) -> int:
    return self.q.shape[2]

  @property
  def groups(self) -> int:
    return self.heads // self.kv_heads

  @property
  def head_dim(self) -> int:
    return self.k.shape[3]

  @property
  def valid(self) -> jax.Array:
    """bool [B, T]: real (not padding) positions."""
    return jnp.arange(self.tokens)[None, :] < self.n_valid[:, None]

  @property
  def context(self) -> jax.Array:
    """bool [B, T]: the positions a press may keep (`valid` unless the prompt was extended)."""
    n = self.n_valid if self.n_context is None else self.n_context
    return jnp.arange(self.tokens)[None, :] < n[:, None]

  # ---- helpers presses share ------------------------------------------------------------------
  def group_mean(self, x):
    """[B, N, ...] per query head -> [B, K, ...]: the mean over each kv head's G query heads."""
    return x.reshape((x.shape[0], self.kv_heads, self.groups) + x.shape[2:]).mean(axis=2)

  def last_queries(self, w: int, *, raw: bool = False):
    """(q [B, w, N, H], positions int32 [B, w], seen bool [B, w]): the last w real queries of each
    row (rotated unless raw); a row shorter than w repeats its first query where seen is False."""
    at = self.n_valid[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]
    seen = at >= 0
    at = jnp.clip(at, 0, self.tokens - 1)
    q = self.q_raw if raw else self.q
    return jnp.take_along_axis(q, at[:, :, None, None], axis=1), at, seen

  def attention_of(self, q, q_positions, n_keys: int | None = None):
    """Softmax attention (fp32) of rotated queries q [B, W, N, H] at q_positions [B, W] over the
    row's real keys up to their own position: [B, N, W, T] (query head n reads kv head n // G).
    With `n_keys` (static) only the first n_keys keys are read, [B, N, W, n_keys]: the caller
    knows no query reaches past them."""
    k, valid = self.k, self.valid
    if n_keys is not None:
      k, valid = k[:, :, :n_keys], valid[:, :n_keys]
    qg = attn.prepare_queries(q, self.kv_heads, self.scale)  # [B, W, K, G, H]
    mask = (jnp.arange(k.shape[2])[None, None, :] <= q_positions[:, :, None]) \
        & valid[:, None, :]  # [B, W, T]
    probs = attn.masked_softmax(attn.scores_of(qg, k), mask[:, None, None])  # [B,K,G,W,T]
    b, kh, g, w, t = probs.shape
    return probs.reshape(b, kh * g, w, t)

  def window_attention(self, w: int):
    """(probs [B, N, w, T], seen [B, w]): attention of each row's last w real queries."""
    q, at, seen = self.last_queries(w)
    return self.attention_of(q, at), seen

  def attention_column_sums(self, block: int = 256, parts: int = 4):
    """float32 [B, N, T]: the attention each key gets summed over every real query of the row
    (causal), computed `block` queries at a time so [T, T] is never held at once.

    The query blocks are cut into `parts` runs; a run reads only the keys its last query can see,
    so the masked upper triangle is mostly skipped: (parts + 1) / (2 parts) of the full [T, T]
    work (5/8 for 4), at the price of one compiled loop per run."""
    t = self.tokens
    n_blocks = -(-t // block)
    pad = n_blocks * block - t
    q = jnp.pad(self.q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pos = jnp.arange(n_blocks * block, dtype=jnp.int32)
    edges = sorted({round(n_blocks * i / parts) for i in range(parts + 1)})
    sums = jnp.zeros((self.batch, self.q.shape[2], t), jnp.float32)
    for first, end in zip(edges[:-1], edges[1:]):
      n_keys = min(end * block, t)

      def one(i, n_keys=n_keys):
        qb = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        pb = jax.lax.dynamic_slice_in_dim(pos, i * block, block)
        probs = self.attention_of(qb, jnp.broadcast_to(pb, (self.batch, block)), n_keys)
        real = pb[None, :] < self.n_valid[:, None]  # [B, block]
        return jnp.einsum("bnwt,bw->bnt", probs, real.astype(probs.dtype))

      run = jnp.sum(jax.lax.map(one, jnp.arange(first, end)), axis=0)  # [B, N, n_keys]
      sums = sums.at[:, :, :n_keys].add(run)
    return sums


# ---- the protocol ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Press:
  """The press protocol (module docstring). Subclasses set `name`, override `score` (and maybe
  `select`, `layer_kept`), and list in `kvpress` the options whose kvpress default differs."""

  name: ClassVar[str] = ""
  kvpress: ClassVar[dict] = {}  # option -> kvpress 0.5.5's default, where kvjax's differs
  needs_wo: ClassVar[bool] = False
  doc: ClassVar[str] = ""  # one line: what it keeps, and the paper
  example: ClassVar[str | None] = ""  # a spec that builds it ("" = its name; None = none generic)
  keeps_every_token: ClassVar[bool] = False  # prunes something else (think: key channels)
  changes_keys: ClassVar[bool] = False  # stored keys differ from the prefill's (think, rerotation)
  rerotates: ClassVar[bool] = False  # kept keys move to positions 0..n-1 (module docstring)
  takes_budget: ClassVar[bool] = True  # False: no ratio/budget, the press sizes each layer
  budget_free: ClassVar[bool] = False  # True: score() never reads n_kept (the kit checks it)

  def score(self, x: LayerInputs, n_kept) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} has no score()")

  def select(self, x: LayerInputs, scores, n_kept) -> jax.Array:
    return topk_per_head(scores, n_kept, x.context)

  def extend(self, rows: list[list[int]], tokenizer) -> tuple[list[list[int]], list[int]]:
    """(the rows the prefill runs over, each row's context length): a press that needs the model
    to read more than the prompt (kvzip) appends it here; only the first `context length` tokens
    of each row are scored, kept and counted in the budget. Host-side, once per call; `tokenizer`
    is the model's (or None). Default: the rows unchanged."""
    return rows, [len(r) for r in rows]

  def own_scores(self, model, rows: list[list[int]], prefilled: Callable[[], Any]):
    """float32 [pressed layers, B, K, T] from model passes of the press's own, or None (default):
    the press scores inside the prefill (`score`). `prefilled()` returns the rows' plain
    `prefill` (every layer's q, k, v; run at the first call, then kept): kvzip repeats long
    contexts chunk by chunk after it. Only for `budget_free` presses (no budget is given)."""
    return None

  def prune_keys(self, x: LayerInputs) -> jax.Array:
    """The keys [B, K, T, H] (rotated) the cache stores for this layer; default x.k as is."""
    return x.k

  def merge_values(self, x: LayerInputs, keep) -> jax.Array:
    """The values [B, K, T, H] the cache stores for this layer given the selection keep bool
    [B, K, T]; default x.v as is."""
    return x.v

  def layer_kept(self, n_kept: int, tokens: int, layer: int, n_layers: int,
                 ratio: float | None = None) -> int:
    """The budget of `layer` for a row of `tokens` tokens whose per-layer budget is n_kept
    (host ints; `ratio` when the budget came from one; PyramidKV tapers it with depth).
    Default: n_kept everywhere."""
    return n_kept

  def resolve(self, compat: str | None) -> "Press":
    """This press with kvpress 0.5.5's defaults where compat == 'kvpress' (options the user set
    explicitly are kept), applied to wrapped presses too."""
    if compat not in (None, "kvpress"):
      raise SpecError(f"compat must be None or 'kvpress', got {compat!r}")
    changes = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Press):
        changes[f.name] = value.resolve(compat)
      elif compat == "kvpress" and f.name in self.kvpress and value is None:
        changes[f.name] = self.kvpress[f.name]
    return dataclasses.replace(self, **changes) if changes else self

  def option(self, name: str, default):
    """The option `name`, or kvjax's default when it was left None."""
    value = getattr(self, name)
    return default if value is None else value

  def __str__(self) -> str:
    args = []
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Press):
        args.append(str(value))
      elif value != f.default:
        args.append(f"{f.name}={value!r}")
    return f"{self.name}({', '.join(args)})" if args else self.name


def topk_per_head(scores, n_kept, valid):
  """bool [B, K, T]: per (row, kv head) the n_kept[b] highest scores among the valid positions
  (ties to the lower position). scores [B, K, T]; n_kept int32 [B]; valid bool [B, T]."""
  t = scores.shape[-1]
  ranked = jnp.where(valid[:, None, :], scores.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-ranked, axis=-1, stable=True)  # best first
  rank = jnp.argsort(order, axis=-1)  # rank of each position
  keep = rank < jnp.minimum(n_kept, t)[:, None, None]
  return keep & valid[:, None, :]


def row_zscore(s, valid):
  """s [B, K, T] z-scored over each row's valid (K, T) entries (unbiased std, at least 1e-6);
  0 where not valid. valid: bool [B, K, T]."""
  count = jnp.sum(valid, axis=(1, 2), keepdims=True) * 1.0
  mean = jnp.sum(jnp.where(valid, s, 0.0), axis=(1, 2), keepdims=True) / jnp.maximum(count, 1)
  var = jnp.sum(jnp.where(valid, jnp.square(s - mean), 0.0), axis=(1, 2), keepdims=True) \
      / jnp.maximum(count - 1, 1)
  return jnp.where(valid, (s - mean) / jnp.maximum(jnp.sqrt(var), 1e-6), 0.0)


def protect(scores, where):
  """scores [B, ...] with `where` (broadcastable bool) raised above every other score of the
  row's layer: kvpress's `max + 1` for windows and sinks (its max is over one row's layer)."""
  top = jnp.max(scores, axis=tuple(range(1, scores.ndim)), keepdims=True) + 1.0
  return jnp.where(where, top, scores)


# ---- registry and spec strings ------------------------------------------------------------------
_PRESSES: dict[str, Callable[..., Press]] = {}


def register_press(cls=None, *, name: str | None = None):
  """Registers a Press subclass under its `name` (or `name=`), usable by spec string; returns the
  class, so it works as a decorator. Re-registering a name replaces it."""
  def add(c):
    key = name or c.name
    if not key or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
      raise SpecError(f"register_press: a press needs a lower-case name, got {key!r}")
    _PRESSES[key] = c
    return c
  return add(cls) if cls is not None else add


def unregister_press(name: str) -> None:
  _PRESSES.pop(name, None)


def press_names() -> list[str]:
  """Every registered press, in registration order."""
  return list(_PRESSES)


def example_spec(name: str) -> str | None:
  """A spec string that builds the registered press `name` with sensible arguments (a wrapper
  around snapkv or knorm, finch with a window), or None when it has no generic example (per_layer
  needs one ratio per layer of a model)."""
  example = press_class(name).example
  return name if example == "" else example


def press_class(name: str):
  try:
    return _PRESSES[name]
  except KeyError:
    raise SpecError(f"unknown press {name!r}; known: {', '.join(_PRESSES)}") from None


def make_press(spec, **options) -> Press:
  """A press from a spec string or a Press (returned as is, or with `options` replaced).

  Grammar: `name` | `name(arg, ...)` where each arg is `option=value` (a Python literal) or, first,
  a nested press spec for wrappers: "snapkv", "snapkv(window_size=32)", "adakv(snapkv)",
  "criticalkv(expected_attention(use_vnorm=False), first_stage_ratio=0.5)".
  """
  if isinstance(spec, Press):
    return dataclasses.replace(spec, **options) if options else spec
  if not isinstance(spec, str):
    raise SpecError(f"a press is a spec string or a kvjax.presses.Press, got {type(spec).__name__}")
  press, rest = _parse(spec.strip(), spec)
  if rest.strip():
    raise SpecError(f"press spec {spec!r}: unexpected {rest.strip()!r}")
  return dataclasses.replace(press, **options) if options else press


def _parse(text: str, whole: str):
  m = re.match(r"\s*([a-z][a-z0-9_]*)\s*", text)
  if not m:
    raise SpecError(f"press spec {whole!r}: expected a press name at {text!r}")
  cls = press_class(m.group(1))
  text = text[m.end():]
  positional, kwargs = [], {}
  if text.startswith("("):
    text = text[1:]
    while True:
      text = text.lstrip()
      if text.startswith(")"):
        text = text[1:]
        break
      km = re.match(r"([a-z_][a-z0-9_]*)\s*=\s*", text)
      if km:
        value, text = _literal(text[km.end():], whole)
        kwargs[km.group(1)] = value
      else:
        inner, text = _parse(text, whole)
        positional.append(inner)
      text = text.lstrip()
      if text.startswith(","):
        text = text[1:]
      elif not text.startswith(")"):
        raise SpecError(f"press spec {whole!r}: expected ',' or ')' at {text!r}")
  if positional and not _wraps(cls):
    raise SpecError(f"press spec {whole!r}: {m.group(1)} does not wrap a press; its options go "
                    f"by name, e.g. {m.group(1)}(option=value)")
  try:
    return cls(*positional, **kwargs), text
  except TypeError as e:
    raise SpecError(f"press spec {whole!r}: {e}") from None


def wraps_presses(name: str) -> bool:
  """True when the registered press `name` is built around other presses (its first option is
  a press or a list of them: adakv, criticalkv, composed, ...), as in "adakv(snapkv)"."""
  return _wraps(press_class(name))


def _wraps(cls) -> bool:
  """True when the press class's first field holds presses (a wrapper: adakv, composed, ...)."""
  fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
  return bool(fields) and fields[0].name in ("press", "presses")


def _literal(text: str, whole: str):
  """One Python literal at the start of text (up to the next top-level ',' or ')')."""
  depth = 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      if depth == 0:
        break
      depth -= 1
    elif ch == "," and depth == 0:
      break
  else:
    i = len(text)
  raw = text[:i].strip()
  try:
    return ast.literal_eval(raw), text[i:]
  except (ValueError, SyntaxError):
    raise SpecError(f"press spec {whole!r}: {raw!r} is not a literal value") from None
