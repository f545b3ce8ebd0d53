"""`compress`: prefill prompt rows, let a press choose the tokens each layer keeps, return the cache.

    cache = kvjax.compress(model, ids, "snapkv", ratio=0.5)          # or budget=512
    out = kvjax.generate(model, [question_ids], cache=cache, max_new_tokens=32)

How it runs (one jitted call per (model, press, shapes)): the prompt rows (ragged, right-padded)
are fed through `model.step` in one chunk with a `_Pressing` cache in the model's cache slot. At
each layer it attends causally over the prompt (so, as in kvpress, every layer's outputs and the
next layer's inputs are those of the uncompressed prompt), hands the layer's queries, keys and
values to the press (`LayerInputs`), and writes the kept tokens into that layer of a
`ScoredCache` (keys rotated at their true positions, stored through the chosen codec). The result
holds, per (row, layer, kv head), exactly the kept prompt tokens plus `room` empty slots: decoding
then appends up to `room` tokens with nothing evicted (kvpress keeps every decoded token too);
past that the cache evicts like any scored cache (the decoded tokens in its window are kept, older
ones compete with the prompt's by score).

Presses that look past one layer (base.py): with `rerotates` the kept keys of each (row, layer,
kv head) are re-rotated to positions 0..n-1 (`rerotation.rerotate`) and the cache's `lengths` say
n, so decoding continues at n; with `extend` the prefill runs over the extended rows and only each
row's first `n_context` tokens are scored, kept and counted (`lengths` = the context's length); a
press with `own_scores` (kvzip on rows over its chunk size) scores by model passes of its own
after a plain prefill, and the compress then only selects and writes, as with given scores.

Sweeps: `prefill(model, ids)` runs the model once and keeps every layer's queries, keys and values
(`Prefilled`); `compress(model, prefilled, press, ...)` then replays only the pressing (score,
select, write) per layer, so N presses x M ratios cost one prefill instead of N x M;
`save_prefilled` / `load_prefilled` keep it across sittings. A press whose scores ignore the
budget (`Press.budget_free`) scores once per sweep: `compress(..., details=True)` (or
`score_prompt`) returns every layer's scores, and `compress(..., ratio=r, scores=those)` only
selects and writes; kvzip's repetition then runs once, and every ratio compresses a plain
`prefill(model, ids)` of the context.

Budgets: `ratio` r keeps n_kept = max(1, floor(n * (1 - r))) tokens of a row of n (kvpress's rule,
per row, so ragged rows each lose the same share); `budget` keeps min(budget, n). A press may give
layers different budgets (PyramidKV, `Press.layer_kept`) or pool a layer's heads (AdaKV); the cache
is then one `ScoredCache` per layer (`LayeredCache`) or a pool shared by the kv heads.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import pickle
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as attn
from kvjax.caches import codec as codec_lib
from kvjax.caches.hybrid import HybridCache
from kvjax.caches.layered import LayeredCache
from kvjax.caches.scored import admission
from kvjax.caches.scored.admission import Layer
from kvjax.caches.scored.cache import ScoredCache
from kvjax.caches.scored.scorers import Scorer
from kvjax.caches.window import WindowCache
from kvjax.caches.terms import SpecError
from kvjax.models.config import layer_windows
from kvjax.models.protocol import check_model, model_dtype, static_step
from kvjax.presses.base import LayerInputs, Press, make_press, protect
from kvjax.presses.rerotation import rerotate

ROOM = 256  # decode tokens a compressed cache holds beside the kept prompt, by default
_BLOCK = 256  # key block of the prefill's attention


@dataclasses.dataclass(frozen=True)
class Pressed(Scorer):
  """The scorer of a compressed cache while decoding: decoded tokens start at score 0 and scores
  do not grow; only matters once more than `room` tokens were decoded (see module docstring)."""

  name: ClassVar[str] = "pressed"


@struct.dataclass
class Compressed:
  """What `compress(..., details=True)` returns beside the cache.

  logits: float32 [B, V] at each row's last prompt token (the uncompressed prefill's; for a press
    that extends the rows, `Press.extend`, at the extension's last token).
  scores: float32 [L, B, K, T] every layer's press scores (T = the longest row's context), or
    None.
  kept: bool [L, B, K, T] the kept positions, or None.
  n_kept: int32 [L, B] each layer's per-head budget per row.
  layers: the model layers the L entries of scores and kept belong to (all of them, or a hybrid
    model's global layers: its sliding layers keep their own window and have no press).
  """

  logits: jax.Array
  scores: jax.Array | None
  kept: jax.Array | None
  n_kept: jax.Array
  layers: tuple = struct.field(pytree_node=False, default=())


@struct.dataclass
class _Pressing:
  """The model's cache during a compressing prefill (see module docstring). target: the cache the
  kept tokens go to (ScoredCache, or LayeredCache of one-layer ones); n_kept int32 [L, B]."""

  target: Any
  n_kept: jax.Array
  wo: tuple | None = None
  scores: tuple = ()
  kept: tuple = ()
  context: jax.Array | None = None  # int32 [B] context lengths when the press extended the rows
  given: tuple | None = None  # per layer float32 [B, K, T] scores to use (None: sliding layers)
  done: jax.Array | None = None  # float32 [] in a replay: depends on all of the last layer's work
  press: Press = struct.field(pytree_node=False, default=None)
  n_layers: int = struct.field(pytree_node=False, default=1)
  record: bool = struct.field(pytree_node=False, default=False)
  protected: tuple = struct.field(pytree_node=False, default=(0, 0))  # (sink, window) always kept
  sliding: tuple | None = struct.field(pytree_node=False, default=None)  # per layer: window

  @property
  def lengths(self):
    return jnp.zeros((self.batch,), jnp.int32) if self.target is None else self.target.lengths

  @property
  def batch(self) -> int:
    return self.n_kept.shape[1]

  def token_positions(self, tokens: int):
    return self.lengths[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None, :]

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """q [B, T, N, H], k/v [B, T, K, H] un-rotated, from an empty cache. Returns (out, cache).
    A hybrid model's sliding layers go to their window cache unpressed."""
    if self.sliding is not None and self.sliding[layer] is not None:
      if self.target is None:  # score_prompt: the layer's outputs only
        return _prompt_attention(q, k, v, n_valid, rope, scale, self.sliding[layer]), self
      if self.context is None:
        out, target = self.target.attend(layer, q, k, v, n_valid, rope=rope, scale=scale)
        return out, self.replace(target=target)
      out = _prompt_attention(q, k, v, n_valid, rope, scale, self.sliding[layer])
      return out, self.fill_window(layer, q, k, v, n_valid, rope, scale)
    b, t, _, _ = q.shape
    n_valid = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid
    x = self.inputs(layer, q, k, v, n_valid, rope, scale)
    out = attn.prompt_attention(x.q, x.k.swapaxes(1, 2), v, n_valid, scale=scale, block_size=_BLOCK)
    return out, self.press_layer(x)

  def fill_window(self, layer: int, q, k, v, n_valid, rope, scale) -> "_Pressing":
    """A sliding layer's window cache written with the prompt's last tokens (its output unused).
    When the press extended the rows (kvzip) only the context goes in: the extension is read by
    the prefill, and decoding continues after the context."""
    ends = n_valid if self.context is None else self.context
    _, target = self.target.attend(layer, q, k, v, ends, rope=rope, scale=scale)
    return self.replace(target=target)

  def inputs(self, layer: int, q, k, v, n_valid, rope, scale) -> LayerInputs:
    """The press's view of one layer: q [B, T, N, H], k/v [B, T, K, H] un-rotated at 0..T-1."""
    b, t, _, h = q.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kr = attn.apply_rope(rope, k, positions)
    return LayerInputs(q=attn.apply_rope(rope, q, positions), q_raw=q, k=kr.swapaxes(1, 2),
                       k_raw=k.swapaxes(1, 2), v=v.swapaxes(1, 2), n_valid=n_valid,
                       n_context=self.context, wo=None if self.wo is None else self.wo[layer],
                       layer=layer, n_layers=self.n_layers,
                       scale=h**-0.5 if scale is None else scale, rope=rope)

  def press_layer(self, x: LayerInputs) -> "_Pressing":
    """Scores layer x.layer, selects, and writes the kept tokens to the target (and the record)."""
    layer = x.layer
    n_kept = self.n_kept[layer]
    if self.given is None:
      scores = self.press.score(x, n_kept).astype(jnp.float32)
    else:  # compress(scores=): over the context; an extended run's tail is not a context position
      given = self.given[layer]
      scores = jnp.pad(given, ((0, 0), (0, 0), (0, x.tokens - given.shape[-1])))
    sink, window = self.protected
    if sink or window:  # compress(sink=, window=): kept whatever the press says
      pos = jnp.arange(x.tokens)[None, :]
      ends = x.n_valid if self.context is None else self.context
      scores = protect(scores, ((pos < sink) | (pos >= ends[:, None] - window))[:, None])
    keep = self.press.select(x, scores, n_kept) & x.context[:, None, :]
    new = self
    if self.target is not None:
      kept_k = self.press.prune_keys(x)  # x.k unless the press thins keys (ThinK)
      kept_v = self.press.merge_values(x, keep)  # x.v unless the press merges (merging)
      new = new.replace(target=_fill(self.target, layer, keep, scores, kept_k, kept_v,
                                     x.rope if self.press.rerotates else None))
    if self.record:
      new = new.replace(scores=self.scores + (scores,), kept=self.kept + (keep,))
    if self.done is not None:  # a replay orders its layers by this (see _replay)
      total = jnp.sum(jnp.where(keep, scores, 0.0))
      if self.target is not None:
        total = total + jnp.sum(kept_v.astype(jnp.float32)) + jnp.sum(kept_k.astype(jnp.float32))
      new = new.replace(done=jnp.float32(0.0) * jnp.nan_to_num(total))
    return new

  def advance(self, n_valid):
    if self.target is None:
      return self
    target = self.target.advance(n_valid if self.context is None else self.context)
    if self.press.rerotates:  # decoding continues right after the last kept token
      target = _contiguous_lengths(target)
    return self.replace(target=target)


@struct.dataclass
class _Capturing:
  """The model's cache during `prefill`: attends causally over the prompt like `_Pressing` (a
  hybrid model's sliding layers over their window) and keeps every layer's un-rotated q [B, T, N,
  H], k and v [B, T, K, H], with each layer's (rope, scale) as static facts."""

  q: tuple = ()
  k: tuple = ()
  v: tuple = ()
  batch: int = struct.field(pytree_node=False, default=1)
  sliding: tuple | None = struct.field(pytree_node=False, default=None)
  meta: tuple = struct.field(pytree_node=False, default=())  # per layer: (rope, scale)

  @property
  def lengths(self):
    return jnp.zeros((self.batch,), jnp.int32)

  def token_positions(self, tokens: int):
    return jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (self.batch, tokens))

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    b, t = q.shape[:2]
    n_valid = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid
    window = None if self.sliding is None else self.sliding[layer]
    out = _prompt_attention(q, k, v, n_valid, rope, scale, window)
    return out, self.replace(q=self.q + (q,), k=self.k + (k,), v=self.v + (v,),
                             meta=self.meta + ((rope, scale),))

  def advance(self, n_valid):
    return self


@dataclasses.dataclass(frozen=True, eq=False)
class Prefilled:
  """One prefill of prompt rows, kept so that many presses and ratios compress it without running
  the model again (`prefill`; pass it to `compress` or `score_prompt` in place of the ids).

  rows: the prompt rows (token ids): what a press scores and keeps.
  run: the rows as the model ran them: `rows`, or their extension by a press (`Press.extend`,
    kvzip's repeated context). n_valid: int [B] their lengths.
  logits: float32 [B, V] at each run row's last token.
  q: per layer [B, T, N, H]; k, v: per layer [B, T, K, H] (un-rotated, T = the longest row).
  meta: per layer (rope, scale), as the model handed them to its cache.
  """

  rows: tuple
  run: tuple
  n_valid: np.ndarray
  logits: jax.Array
  q: tuple
  k: tuple
  v: tuple
  meta: tuple

  @property
  def n_layers(self) -> int:
    return len(self.q)

  @property
  def nbytes(self) -> int:
    """Bytes the kept layer inputs take (what holding a Prefilled costs)."""
    return sum(x.size * x.dtype.itemsize for x in self.q + self.k + self.v)


def prefill(model, ids, press=None) -> Prefilled:
  """Runs the model once over the prompt rows `ids` and keeps what every layer saw, so that
  `compress(model, prefilled, press, ratio=...)` for any number of presses and ratios gives the
  same cache as `compress(model, ids, press, ratio=...)` without another prefill (research sweeps,
  experiments/leaderboard.py). Memory: every layer's queries, keys and values of every row
  (`Prefilled.nbytes`; SmolLM2 at 4096 tokens: about 0.5 GB per row in fp32).

  A press that extends the prompt (kvzip: `Press.extend`) scores a longer run than the rows: pass
  it as `press` and the prefill runs over its extension; that Prefilled then serves the presses
  with the same extension (any ratio), and the plain one every other press."""
  check_model(model, "prefill")
  rows = _rows(model, ids)
  if min(len(r) for r in rows) < 1:
    raise ValueError("prefill: every row needs at least one token")
  run = rows if press is None else make_press(press).extend(rows, getattr(model, "tokenizer",
                                                                          None))[0]
  tokens, n_valid = _tokens(run)
  sliding = _sliding(model.config)
  logits, done = _prefill(static_step(model), model.params, jnp.asarray(tokens),
                          jnp.asarray(n_valid, jnp.int32),
                          _Capturing(batch=len(rows), sliding=sliding))
  return Prefilled(rows=tuple(tuple(r) for r in rows), run=tuple(tuple(r) for r in run),
                   n_valid=n_valid, logits=logits,
                   q=done.q, k=done.k, v=done.v, meta=done.meta)


def save_prefilled(prefilled: Prefilled, path) -> None:
  """Writes `prefilled` to the folder `path` (created; a file per layer input, `.npy`, and the
  rows and per-layer meta pickled), so a sweep spread over several sittings runs the model once:
  `load_prefilled(path)` gives it back, bit for bit. A saved prefill belongs to the model, weights
  and kvjax that made it (nothing checks that on loading); load only folders you wrote (pickle)."""
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  for name in ("q", "k", "v"):
    for layer, a in enumerate(getattr(prefilled, name)):
      np.save(folder / f"{name}{layer}.npy", np.asarray(a))
  np.save(folder / "logits.npy", np.asarray(prefilled.logits))
  rest = dict(rows=prefilled.rows, run=prefilled.run, n_valid=np.asarray(prefilled.n_valid),
              meta=prefilled.meta)
  (folder / "prefilled.pkl").write_bytes(pickle.dumps(rest))


def load_prefilled(path) -> Prefilled:
  """The Prefilled `save_prefilled` wrote to the folder `path` (each array read memory-mapped and
  copied to the device once)."""
  folder = pathlib.Path(path)
  index = folder / "prefilled.pkl"
  if not index.is_file():
    raise FileNotFoundError(f"load_prefilled: {folder} holds no saved prefill (no {index.name})")
  rest = pickle.loads(index.read_bytes())
  read = lambda name: jnp.asarray(np.load(folder / f"{name}.npy", mmap_mode="r"))
  layers = lambda name: tuple(read(f"{name}{layer}") for layer in range(len(rest["meta"])))
  return Prefilled(rows=rest["rows"], run=rest["run"], n_valid=rest["n_valid"],
                   logits=read("logits"), q=layers("q"), k=layers("k"), v=layers("v"),
                   meta=rest["meta"])


@functools.partial(jax.jit, static_argnames=("meta",))
def _replay(pressing, q, k, v, n_valid, meta):
  """What the compressing prefill does at each layer, from a Prefilled's layer inputs.

  Every layer's inputs are there from the start, so nothing but memory would order the layers:
  XLA:CPU computed them side by side and held every layer's temporaries at once (7 SmolLM2 rows
  of 1024 tokens: 3.2 GiB for merging, 4.3 GiB for compactor; 4096 tokens ran out of memory).
  Each layer's inputs therefore take `pressing.done`, zero times a sum over the last pressed
  layer's scores and written keys and values: the layers run one after the other, as in the
  prefill. (An optimization barrier did not do it: XLA:CPU's buffer assignment ignored it.)"""
  pressing = pressing.replace(done=jnp.zeros((), jnp.float32))
  for layer, (rope, scale) in enumerate(meta):
    after = lambda a: a + pressing.done.astype(a.dtype)  # exactly a: done is 0, never NaN
    q_l, k_l, v_l = after(q[layer]), after(k[layer]), after(v[layer])
    if pressing.sliding is not None and pressing.sliding[layer] is not None:
      if pressing.target is not None:
        pressing = pressing.fill_window(layer, q_l, k_l, v_l, n_valid, rope, scale)
      continue
    x = pressing.inputs(layer, q_l, k_l, v_l, n_valid, rope, scale)
    pressing = pressing.press_layer(x)
  return pressing.replace(done=None).advance(n_valid)


def _pressed_layers(config) -> tuple:
  """The layers a press compresses: all of them, or a hybrid model's global (unwindowed) ones."""
  return tuple(i for i, w in enumerate(layer_windows(config)) if w is None)


def _sliding(config) -> tuple | None:
  """Each layer's sliding window (None: global), or None when the model has no sliding layer."""
  windows = layer_windows(config)
  return windows if any(w is not None for w in windows) else None


def _prompt_attention(q, k, v, n_valid, rope, scale, window):
  """One layer's causal attention over a prompt from an empty cache, q [B, T, N, H] and k, v
  [B, T, K, H] un-rotated at positions 0..T-1: within `window` tokens when it is not None."""
  b, t = q.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  qr, kr = attn.apply_rope(rope, q, positions), attn.apply_rope(rope, k, positions)
  return attn.prompt_attention(qr, kr, v, n_valid, scale=scale, window=window, block_size=_BLOCK)


# ---- writing the kept tokens -------------------------------------------------------------------
def _fill(target, layer: int, keep, scores, k, v, rope=None):
  """target with `layer` holding exactly the kept tokens: keep bool [B, K, T], scores [B, K, T],
  k (rotated), v [B, K, T, H]; kept tokens fill the first slots in position order. With `rope`
  the i-th kept key of each (row, kv head) is re-rotated to position i. target: a ScoredCache, a
  LayeredCache of them, or a HybridCache whose group holds them."""
  if isinstance(target, HybridCache):
    g, i = target.where[layer]
    return target.replace(groups=target.groups[:g] + (
        _fill(target.groups[g], i, keep, scores, k, v, rope),) + target.groups[g + 1:])
  if isinstance(target, LayeredCache):
    one = _fill(target.layers[layer], 0, keep, scores, k, v, rope)
    return target.replace(layers=target.layers[:layer] + (one,) + target.layers[layer + 1:])
  st = admission.take_layer(target, layer)
  if target.shared_heads:
    st = _fill_shared(target, st, keep, scores, k, v)
  else:
    st = _fill_heads(target, st, keep, scores, k, v, rope)
  return admission.put_layer(target, layer, st)


def _first_slots(keep, order_key, slots: int):
  """Indices [..., slots] of the kept entries (by order_key), padded past the end if fewer."""
  n = keep.shape[-1]
  if n < slots:  # fewer candidates than slots: pad with never-kept ones
    widths = [(0, 0)] * (keep.ndim - 1) + [(0, slots - n)]
    keep = jnp.pad(keep, widths)
    order_key = jnp.pad(order_key, widths, constant_values=0)
  key = jnp.where(keep, order_key, order_key + keep.shape[-1])
  index = jnp.argsort(key, axis=-1, stable=True)[..., :slots]
  return index, jnp.take_along_axis(keep, index, axis=-1)


def _gather(x, index):
  """x [B, K, T, H] at index [B, K, S] (indices past T read zeros)."""
  t = x.shape[2]
  x = jnp.pad(x, ((0, 0), (0, 0), (0, max(0, index.shape[-1] - t) + 1), (0, 0)))
  return jnp.take_along_axis(x, jnp.minimum(index, x.shape[2] - 1)[..., None], axis=2)


def _fill_heads(cache, st: Layer, keep, scores, k, v, rope=None) -> Layer:
  t = keep.shape[-1]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), keep.shape)
  index, live = _first_slots(keep, pos, cache.pool)  # [B, K, P]
  kept_k = jnp.where(live[..., None], _gather(k, index), 0)
  kept_v = jnp.where(live[..., None], _gather(v, index), 0)
  if rope is not None:  # slot i holds the i-th kept token: it moves to position i
    slot = jnp.broadcast_to(jnp.arange(index.shape[-1], dtype=jnp.int32), index.shape)
    kept_k = jnp.where(live[..., None], rerotate(rope, kept_k, index, slot), 0)
    index = slot
  positions = jnp.where(live, index, -1)
  s = jnp.where(live, jnp.take_along_axis(jnp.pad(scores, ((0, 0), (0, 0), (0, cache.pool))),
                                          index, axis=-1), 0.0)
  ring = jnp.full(st.positions.shape[:-1] + (cache.residual,), -1, jnp.int32)
  return Layer(cache.k.codec.encode(kept_k), cache.v.codec.encode(kept_v), st.ring_k, st.ring_v,
               jnp.concatenate([positions, ring], axis=-1),
               jnp.concatenate([s, jnp.zeros(ring.shape, jnp.float32)], axis=-1), None)


def _fill_shared(cache, st: Layer, keep, scores, k, v) -> Layer:
  """A pool shared by the kv heads: the kept (head, position) pairs, by head then position."""
  b, kh, t = keep.shape
  flat = lambda x: x.reshape((b, 1, kh * t) + x.shape[3:])
  head = jnp.broadcast_to(jnp.arange(kh, dtype=jnp.int32)[:, None], (kh, t))
  order = flat(jnp.broadcast_to(head * t + jnp.arange(t, dtype=jnp.int32), (b, kh, t)))
  index, live = _first_slots(flat(keep), order, cache.pool)  # [B, 1, P]
  kept_k = jnp.where(live[..., None], _gather(flat(k), index), 0)
  kept_v = jnp.where(live[..., None], _gather(flat(v), index), 0)
  positions = jnp.where(live, index % t, -1)
  heads = jnp.where(live, index // t, 0)
  s = jnp.where(live, jnp.take_along_axis(jnp.pad(flat(scores), ((0, 0), (0, 0), (0, cache.pool))),
                                          index, axis=-1), 0.0)
  return Layer(cache.k.codec.encode(kept_k), cache.v.codec.encode(kept_v), st.ring_k, st.ring_v,
               positions, s, heads.astype(jnp.int32))


def _contiguous_lengths(target):
  """target with each row's `lengths` = its last kept position + 1 (per layer cache)."""
  if isinstance(target, LayeredCache):
    return target.replace(layers=tuple(_contiguous_lengths(c) for c in target.layers))
  return target.replace(lengths=jnp.max(target.positions, axis=(0, 2, 3)) + 1)


# ---- budgets ------------------------------------------------------------------------------------
def row_budgets(lengths, *, ratio=None, budget=None) -> np.ndarray:
  """int [B]: tokens each row keeps per (layer, kv head): max(1, floor(n (1 - ratio))) of a row of
  n tokens, or min(budget, n). Exactly one of ratio, budget."""
  lengths = np.asarray(lengths, np.int64)
  if (ratio is None) == (budget is None):
    raise SpecError("compress: give exactly one of ratio= (share of the prompt to drop, as kvpress"
                    " does) or budget= (tokens to keep per layer and kv head)")
  if ratio is not None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
      raise SpecError(f"compress: ratio must be in [0, 1), got {ratio!r}")
    return np.maximum(1, np.floor(lengths * (1.0 - ratio) + 1e-9).astype(np.int64))
  if not isinstance(budget, (int, np.integer)) or budget < 1:
    raise SpecError(f"compress: budget must be an int >= 1, got {budget!r}")
  return np.minimum(lengths, budget)


def layer_budgets(press: Press, lengths, rows, n_layers: int, ratio=None) -> np.ndarray:
  """int [L, B]: each layer's budget per row (`Press.layer_kept`)."""
  return np.array([[press.layer_kept(int(n), int(t), layer, n_layers, ratio)
                    for n, t in zip(rows, lengths)] for layer in range(n_layers)], np.int64)


# ---- the entry point ----------------------------------------------------------------------------
def compress(model, ids, press, *, ratio: float | None = None, budget: int | None = None,
             compat: str | None = None, room: int = ROOM, storage: str | None = None,
             sink: int = 0, window: int = 0, group: int = 32, details: bool = False,
             scores=None, **options):
  """Prefills the prompt rows `ids` and keeps what `press` chooses; returns the cache.

  Args:
    model: a kvjax model (`kvjax.load(...)`, or your own: params, config, step).
    ids: token ids, one row ([n]) or several (list of lists, ragged; or [B, T] with every row
      full). Text is tokenized with the model's tokenizer. Or a `Prefilled` (`prefill(model,
      ids)`): the same cache without running the model again.
    press: a press spec string ("snapkv", "adakv(snapkv)", ...) or a `kvjax.presses.Press`.
    ratio: the share of each row's tokens to drop; budget: tokens to keep (one of the two; neither
      for a press that sizes its layers itself, `Press.takes_budget` False: simlayerkv, decoding).
    compat: "kvpress" takes kvpress 0.5.5's default hyper-parameters for the press.
    room: decode tokens the cache keeps beside the compressed prompt before it evicts again.
    storage: "int8", "int4", "fp8", ... to store the kept tokens quantized (group: int group size).
    sink, window: the first `sink` and last `window` prompt tokens of each row outrank every
      other score, whatever the press (they count in the budget).
    details: also return a `Compressed` (first-token logits, every layer's scores and kept mask).
    scores: float32 [L, B, K, T], the `Compressed.scores` of an earlier `compress(details=True)`
      or `score_prompt` of the same rows and press at any budget: used instead of scoring again,
      so a ratio sweep scores once. Only for presses whose scores ignore the budget
      (`Press.budget_free`). A press that extends the rows (kvzip) then runs over the rows alone
      (ids, or a plain `prefill(model, ids)`): the scores already saw the extension, and the
      logits of details=True are the prompt's own.
    options: the press's own options (e.g. window_size=32 for snapkv).

  Returns:
    the cache (a `ScoredCache`, or `LayeredCache` of them when layers' budgets differ), with
    `lengths` = each row's prompt length; `cache.view()` shows the kept positions per (layer, row,
    kv head). With details=True: (cache, Compressed).
  """
  press, rows, lengths, kept = _prepare(model, ids, press, ratio, budget, compat, options,
                                        "compress", given=scores is not None)
  if scores is None:
    scores, ids = _own_scores(model, ids, press, rows, lengths)
  given = None if scores is None else _given_scores(model, press, scores, lengths)
  if not isinstance(room, (int, np.integer)) or room < 1:
    raise SpecError(f"compress: room must be an int >= 1, got {room!r}")
  dtype = model_dtype(model)
  target = _target(press, model.config, kept, room, codec_lib.parse(storage, dtype, group), dtype)
  done, info = _run(model, rows, lengths, press, kept, target, details, _protected(sink, window),
                    _prefilled(ids), given)
  return (done.target, info) if details else done.target


def score_prompt(model, ids, press, *, ratio: float | None = None, budget: int | None = None,
                 compat: str | None = None, sink: int = 0, window: int = 0,
                 **options) -> Compressed:
  """What `press` would keep of the prompt rows, without building a cache: a `Compressed` with
  every layer's scores [L, B, K, T] and kept mask, the budgets and the first-token logits.
  The budget is an input of the compiled program, so ratios do not recompile (research sweeps,
  tests/presses/test_kvpress_oracle.py)."""
  press, rows, lengths, kept = _prepare(model, ids, press, ratio, budget, compat, options,
                                        "score_prompt")
  scores, ids = _own_scores(model, ids, press, rows, lengths)
  given = None if scores is None else _given_scores(model, press, scores, lengths)
  return _run(model, rows, lengths, press, kept, None, True, _protected(sink, window),
              _prefilled(ids), given)[1]


def _prefilled(ids) -> Prefilled | None:
  return ids if isinstance(ids, Prefilled) else None


def _own_scores(model, ids, press, rows, lengths) -> tuple:
  """(scores or None, ids): a press that scores by model passes of its own (`Press.own_scores`,
  kvzip's chunked repetition) gets the rows' plain prefill, which the compress then replays
  (a Prefilled passed in serves as it is; from ids it is run once here)."""
  held, rows = [], [list(r[:n]) for r, n in zip(rows, lengths)]  # the context of each row

  def plain():
    if not held:
      held.append(ids if isinstance(ids, Prefilled) else prefill(model, rows))
    return held[0]

  scores = press.own_scores(model, rows, plain)
  return scores, (held[0] if held else ids)


def _protected(sink, window) -> tuple[int, int]:
  for name, value in (("sink", sink), ("window", window)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise SpecError(f"compress: {name} must be an int >= 0, got {value!r}")
  return int(sink), int(window)


def _prepare(model, ids, press, ratio, budget, compat, options, what, given=False):
  """(press resolved, rows, lengths [B], budgets int [L, B]) after checking the arguments.
  given: scores were passed in, so an extending press need not run its extension."""
  check_model(model, what)
  press = make_press(press, **options).resolve(compat)
  if given and not press.budget_free:
    raise SpecError(f"{what}: {press}'s scores depend on the budget (Press.budget_free is False), "
                    "so scores made at another budget are not its scores here; compress without "
                    "scores=")
  if isinstance(ids, Prefilled):
    _check_prefilled(model, ids, what)
    rows = [list(r) for r in ids.rows]
  else:
    rows = _rows(model, ids)
  if min(len(r) for r in rows) < 1:
    raise ValueError(f"{what}: every row needs at least one token")
  extended, context = press.extend(rows, getattr(model, "tokenizer", None))
  if given and not (isinstance(ids, Prefilled) and [tuple(r) for r in extended] == list(ids.run)):
    extended, context = rows, [len(r) for r in rows]  # the given scores saw the extension
  if isinstance(ids, Prefilled) and [tuple(r) for r in extended] != list(ids.run):
    raise SpecError(f"{what}: {press} scores " + (
        f"an extended prompt ({press.name} adds to each row): make its Prefilled with "
        f"prefill(model, ids, press={press.name!r}), or pass the ids"
        if [list(r) for r in extended] != rows else
        "the rows as given, but this Prefilled ran an extension of them (another press's "
        "prefill); use a plain prefill(model, ids)"))
  rows = extended
  lengths = np.array(context, np.int64)  # what is scored, kept and budgeted
  if not press.takes_budget:
    if ratio is not None or budget is not None:
      raise SpecError(f"{what}: {press.name} chooses each layer's budget itself; drop ratio= and "
                      "budget=")
    budget = int(lengths.max())
  if press.rerotates and any(w is not None for w in layer_windows(model.config)):
    raise SpecError(f"{what}: {press} re-rotates the kept keys to positions 0..n-1, but this "
                    "model's sliding layers keep their window at the true positions; use a "
                    "press without re-rotation on hybrid models")
  if press.rerotates and getattr(press, "shared_heads", False):
    raise SpecError(f"{what}: {press} re-rotates the kept keys to positions 0..n-1, which needs "
                    "the same number of kept tokens in every kv head; a pooled selection "
                    "(adakv) gives heads different counts")
  n_layers = model.config.n_layers
  kept = layer_budgets(press, lengths, row_budgets(lengths, ratio=ratio, budget=budget), n_layers,
                       ratio)
  return press, rows, lengths, kept


def _given_scores(model, press, scores, lengths) -> tuple:
  """compress(scores=) as one float32 [B, K, T] per layer (None for a sliding layer), checked
  against what this call's press scores: [pressed layers, rows, kv heads, longest row]."""
  pressed = _pressed_layers(model.config)
  want = (len(pressed), len(lengths), model.config.n_kv_heads, int(lengths.max()))
  shape = tuple(getattr(scores, "shape", ()))
  if shape != want:
    raise SpecError(f"compress: scores has shape {shape}; {press} scores these rows as {want} "
                    "([pressed layers, rows, kv heads, longest row]: the Compressed.scores of a "
                    "compress(details=True) or score_prompt of the same rows)")
  scores = jnp.asarray(scores, jnp.float32)
  per_layer = [None] * model.config.n_layers
  for i, layer in enumerate(pressed):
    per_layer[layer] = scores[i]
  return tuple(per_layer)


def _check_prefilled(model, prefilled: Prefilled, what: str) -> None:
  config = model.config
  k = prefilled.k[0] if prefilled.k else None
  if (prefilled.n_layers != config.n_layers or k is None or k.shape[2] != config.n_kv_heads
      or k.shape[3] != config.head_dim):
    raise SpecError(f"{what}: this Prefilled was made by another model ({prefilled.n_layers} "
                    f"layers, keys {None if k is None else k.shape}); this one has "
                    f"{config.n_layers} layers of {config.n_kv_heads} kv heads x {config.head_dim}")


def _tokens(rows) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, T] right-padded, n_valid int [B]) of ragged rows."""
  n_valid = np.array([len(r) for r in rows], np.int64)
  tokens = np.zeros((len(rows), int(n_valid.max())), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
  return tokens, n_valid


def _run(model, rows, lengths, press, kept, target, record, protected=(0, 0), prefilled=None,
         given=None):
  """The compressing prefill, or its replay from `prefilled`: (the final _Pressing, Compressed or
  None). lengths: each row's context (rows may be longer when the press extended them); given:
  per-layer scores to use instead of the press's (`_given_scores`)."""
  tokens, n_valid = _tokens(rows)
  wo = _output_projections(model) if press.needs_wo else None
  sliding = _sliding(model.config)
  context = None if np.array_equal(n_valid, lengths) else jnp.asarray(lengths, jnp.int32)
  pressing = _Pressing(target=target, n_kept=jnp.asarray(kept, jnp.int32), wo=wo, press=press,
                       n_layers=model.config.n_layers, record=record, sliding=sliding,
                       protected=protected, context=context, given=given)
  if prefilled is None:
    logits, done = _prefill(static_step(model), model.params, jnp.asarray(tokens),
                            jnp.asarray(n_valid, jnp.int32), pressing)
  else:
    logits = prefilled.logits
    done = _replay(pressing, prefilled.q, prefilled.k, prefilled.v,
                   jnp.asarray(n_valid, jnp.int32), prefilled.meta)
  if not record:
    return done, None
  pressed = _pressed_layers(model.config)
  t = int(lengths.max())
  return done, Compressed(logits=logits, scores=jnp.stack(done.scores)[..., :t],
                          kept=jnp.stack(done.kept)[..., :t],
                          n_kept=pressing.n_kept[np.asarray(pressed)], layers=pressed)


@functools.partial(jax.jit, static_argnames=("step",))
def _prefill(step, params, tokens, n_valid, pressing):
  return step.step_last(params, tokens, pressing, n_valid)


def _target(press, config, kept, room, codec, dtype):
  """The empty cache the kept tokens are written to (see module docstring): one ScoredCache over
  the pressed layers (a LayeredCache when their budgets differ), and on a hybrid model (Gemma 3)
  a window cache per sliding window beside it, in a HybridCache."""
  windows = layer_windows(config)
  pressed = list(_pressed_layers(config))
  if not pressed:
    raise SpecError("compress: every layer of this model slides over a window, so there is no "
                    "global layer to press")
  heavy = [max(1, int(kept[i].max())) for i in pressed]
  shared = getattr(press, "shared_heads", False)
  make = lambda n_layers, h: ScoredCache.init(
      n_layers=n_layers, batch=kept.shape[1], kv_heads=config.n_kv_heads,
      head_dim=config.head_dim, heavy=h, window=room, dtype=dtype, scorer=Pressed(),
      shared_heads=shared, codec=codec)
  uniform = len(set(heavy)) == 1 and not (press.rerotates and (kept[pressed] != kept[pressed[0]]).any())
  # (re-rotated layers keep their own lengths, so differing budgets split layers)
  scored = make(len(pressed), heavy[0]) if uniform else LayeredCache.of(make(1, h) for h in heavy)
  if len(pressed) == len(windows):
    return scored
  groups, layers = [scored], [tuple(pressed)]
  for w in sorted({w for w in windows if w is not None}):
    mine = tuple(i for i, x in enumerate(windows) if x == w)
    groups.append(WindowCache.init(n_layers=len(mine), batch=kept.shape[1],
                                   kv_heads=config.n_kv_heads, head_dim=config.head_dim, window=w,
                                   dtype=dtype, absolute=True))
    layers.append(mine)
  return HybridCache.of(groups, layers)


def _output_projections(model):
  """Each layer's attention output projection wo [N * H, D] (for presses with needs_wo)."""
  params = model.params
  try:
    return tuple(params[f"layers_{i}"]["attn"]["wo"] for i in range(model.config.n_layers))
  except (KeyError, TypeError):
    raise SpecError("compress: this press needs the attention output projections, found at "
                    "params['layers_<i>']['attn']['wo'] in kvjax's models; this model keeps them "
                    "elsewhere") from None


def _rows(model, ids) -> list[list[int]]:
  """The prompt rows as lists of ints (text through the model's tokenizer)."""
  if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
      raise ValueError("compress: text prompts need a model with a tokenizer; pass token ids")
    texts = [ids] if isinstance(ids, str) else list(ids)
    return [list(tok.encode(s)) for s in texts]
  arr = ids
  if isinstance(arr, (np.ndarray, jax.Array)):
    arr = np.asarray(arr)
    if arr.ndim == 1:
      return [arr.astype(np.int64).tolist()]
    if arr.ndim == 2:
      return [row.astype(np.int64).tolist() for row in arr]
    raise ValueError(f"compress: ids must be [n] or [rows, n], got shape {arr.shape}")
  arr = list(arr)
  if not arr:
    raise ValueError("compress: no prompt rows")
  if all(isinstance(x, (int, np.integer)) for x in arr):
    return [[int(x) for x in arr]]
  rows = [[int(x) for x in np.asarray(r).reshape(-1)] for r in arr]
  vocab = model.config.vocab_size
  for r in rows:
    if any(x < 0 or x >= vocab for x in r):
      raise ValueError(f"compress: token ids must be in [0, {vocab})")
  return rows
