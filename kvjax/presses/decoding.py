"""Compression while decoding (kvpress's DecodingPress / PrefillDecodingPress), as a host loop.

    cache = kvjax.compress(model, context, "snapkv", ratio=0.5, room=64)   # prefill press (or none)
    tokens, cache = kvjax.presses.decode(model, [question], "decoding(knorm, target_size=256,
                                         compression_interval=64)", cache=cache, max_new_tokens=512)

`decode` alternates two jitted programs of fixed shapes: `kvjax.generate` runs
`compression_interval` tokens on a `ScoredCache` that has room for them beside `target_size`
tokens (nothing is evicted meanwhile), then `recompress` rescores everything each (row, layer, kv
head) holds with the inner press and keeps its `target_size` best, at their true positions (no
re-rotation, as in kvpress). Every chunk after the first reuses the same shapes, so the loop
compiles twice at most. Without a `cache`, the prompt is prefilled whole (kvpress's DecodingPress
alone does not compress the prefill); with one from `kvjax.compress`, the pair is kvpress's
PrefillDecodingPress.

What the inner press sees: the held tokens of one layer, sorted by position and packed to the left
(`LayerInputs.k` / `v` [B, K, S, H], `n_valid` the held count; `k_raw` un-rotated), so positional
presses (streaming_llm) read slot order as token order. kvpress hands its press buffered hidden
states of recent decoding steps for queries; kvjax has no queries at that point, so only presses
that score keys and values are accepted (knorm, streaming_llm, ...; a press that reads
`LayerInputs.q` is refused when the loop starts).

Differences from kvpress 0.5.5: compression happens after every `compression_interval` generated
tokens, between chunks (kvpress counts decoding forward passes per layer, the question's included,
and compresses inside the step that reaches the count); EOS does not stop the loop (exactly
max_new_tokens per row); kvpress's `hidden_states_buffer_size` has no counterpart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.caches.scored import admission
from kvjax.caches.scored.admission import Layer
from kvjax.caches.scored.cache import ScoredCache
from kvjax.caches.terms import SpecError
from kvjax.presses.compress import Pressed, _first_slots, _gather, _rows
from kvjax.presses.base import LayerInputs, Press, make_press, register_press, topk_per_head
from kvjax.presses.rerotation import rerotate
from kvjax.presses.wrappers import Wrapper
from kvjax.sampling import GREEDY


@register_press
@dataclasses.dataclass(frozen=True)
class DecodingPress(Wrapper):
  """Compress while decoding (kvpress's DecodingPress): every `compression_interval` generated
  tokens each (layer, kv head) keeps the `target_size` tokens its inner press scores best. Run it
  with `kvjax.presses.decode`; `compress` with it keeps the whole prompt (kvpress does not
  compress the prefill either)."""

  name: ClassVar[str] = "decoding"
  example: ClassVar[str | None] = "decoding(knorm)"
  doc: ClassVar[str] = "the inner press every compression_interval decoded tokens (kvpress)"
  takes_budget: ClassVar[bool] = False
  budget_free: ClassVar[bool] = False
  compression_interval: int = 512
  target_size: int = 2048

  def __post_init__(self):
    super().__post_init__()
    for name in ("compression_interval", "target_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise SpecError(f"decoding: {name} must be an int >= 1, got {value!r}")
    if getattr(self.press, "shared_heads", False) or type(self.press).select is not Press.select:
      raise SpecError(f"decoding: {self.press.name} selects its own way (pooled or in chunks); "
                      "wrap a per-head scorer such as knorm")

  def select(self, x: LayerInputs, scores, n_kept):  # everything: no prefill compression
    return jnp.broadcast_to(x.context[:, None, :], scores.shape)


def decode(model, prompts, press, *, max_new_tokens: int, cache=None, sampler=GREEDY, seed=0):
  """Generates `max_new_tokens` per row, compressing the cache while decoding (module docstring).

  Args:
    model: a kvjax model. prompts: the rows to feed first (token ids, ragged; at least one each),
      e.g. the question after a compressed context.
    press: a "decoding(...)" spec or `DecodingPress` (its inner press must score keys and values).
    cache: a `ScoredCache` from `kvjax.compress` holding the context (its `room` must fit the first
      prompt plus compression_interval tokens), or None to prefill `prompts` whole.
    sampler, seed: as `kvjax.generate` (chunk i samples with the seed's key folded with i).

  Returns:
    (tokens int32 [B, max_new_tokens], the final cache).
  """
  press = make_press(press)
  if not isinstance(press, DecodingPress):
    raise SpecError(f"decode: press must be a decoding(...) press, got {press}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"decode: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  import kvjax  # the decode loop (kvjax.generate), imported late: kvjax imports this package

  interval = press.compression_interval
  shape = _attention_shape(model)
  _check_scores_keys(press.press, shape)
  rows = _rows(model, prompts)
  if cache is None:  # prefill the prompt but its last token, which starts the generation
    cache = kvjax.compress(model, rows, press, room=interval)
    cache = cache.crop(cache.lengths - 1)
    rows = [[r[-1]] for r in rows]
  _check_cache(cache, max(len(r) for r in rows) + interval - 1)
  key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
  out, done = [], 0
  while done < max_new_tokens:
    n = min(interval, max_new_tokens - done)
    result = kvjax.generate(model, rows, cache=cache, max_new_tokens=n, sampler=sampler,
                            seed=jax.random.fold_in(key, len(out)), stop_at_eos=False)
    out.append(np.asarray(result.tokens)[:, :n])
    done += n
    cache = recompress(result.cache, press.press, press.target_size, interval, shape)
    rows = [[int(t)] for t in out[-1][:, -1]]
  return np.concatenate(out, axis=1), cache


@struct.dataclass
class AttentionShape:
  """What a press needs of the model's attention beside the cache (static): the layers' `rope`
  and softmax `scale` (None: 1/sqrt(H)), the number of query heads and the head dim."""

  rope: object = struct.field(pytree_node=False)
  scale: float | None = struct.field(pytree_node=False)
  heads: int = struct.field(pytree_node=False)
  head_dim: int = struct.field(pytree_node=False)


def _attention_shape(model) -> AttentionShape:
  """Read off one traced (never run) decoding step: what the model hands its cache's `attend`."""
  seen = []

  @struct.dataclass
  class Probe:
    lengths: jax.Array

    def attend(self, layer, q, k, v, n_valid=None, *, rope=None, scale=None):
      seen.append(AttentionShape(rope=rope, scale=scale, heads=q.shape[2], head_dim=q.shape[3]))
      return jnp.zeros_like(q), self

    def advance(self, n_valid):
      return self

  jax.eval_shape(lambda p: model.step(p, jnp.zeros((1, 1), jnp.int32),
                                      Probe(jnp.zeros((1,), jnp.int32)),
                                      jnp.ones((1,), jnp.int32)), model.params)
  if len({(a.rope, a.scale) for a in seen}) != 1:
    raise SpecError("decode: the model's layers use different RoPE or scales; not supported")
  return seen[0]


def _check_cache(cache, need: int) -> None:
  """SpecErrors for a cache `recompress` cannot take, or without room for the first chunk."""
  for c in getattr(cache, "layers", (cache,)):
    if not isinstance(c, ScoredCache) or c.shared_heads:
      raise SpecError(f"decode: the cache must be a ScoredCache of kvjax.compress with one pool "
                      f"per kv head, got {type(c).__name__}"
                      + (" with a pool shared by its heads" if isinstance(c, ScoredCache) else ""))
    if c.window < need:
      raise SpecError(f"decode: the cache has room for {c.window} new tokens beside the prompt, "
                      f"the first chunk feeds {need}; compress with room >= {need}")


def _inputs(press_shape: AttentionShape, k, v, n_valid, positions, layer=0, n_layers=1):
  """LayerInputs of held tokens k, v [B, K, S, H] rotated at positions [B, K, S] (packed to the
  left); the queries are zeros (a decoding step has none)."""
  b, kh, s, h = k.shape
  q = jnp.zeros((b, s, press_shape.heads, h), k.dtype)
  k_raw = rerotate(press_shape.rope, k, positions, jnp.zeros_like(positions))
  scale = h**-0.5 if press_shape.scale is None else press_shape.scale
  return LayerInputs(q=q, q_raw=q, k=k, k_raw=k_raw, v=v, n_valid=n_valid, layer=layer,
                     n_layers=n_layers, scale=scale, rope=press_shape.rope)


def _check_scores_keys(press: Press, shape: AttentionShape) -> None:
  """SpecError unless `press.score` never reads the queries (traced once on a small input)."""
  k = jnp.zeros((1, 1, 8, shape.head_dim), jnp.float32)
  x = _inputs(shape, k, k, jnp.full((1,), 8, jnp.int32), jnp.zeros((1, 1, 8), jnp.int32))
  closed = jax.make_jaxpr(lambda q, q_raw: press.score(x.replace(q=q, q_raw=q_raw),
                                                       jnp.full((1,), 4, jnp.int32)))(x.q, x.q_raw)
  queries = closed.jaxpr.invars
  if any(a is v for eqn in closed.jaxpr.eqns for a in eqn.invars for v in queries) \
      or any(a is v for a in closed.jaxpr.outvars for v in queries):
    raise SpecError(f"decoding: {press.name} reads the queries, which kvjax does not keep while "
                    "decoding (kvpress feeds it buffered hidden states); use a press that scores "
                    "keys and values, such as knorm or streaming_llm")


@functools.partial(jax.jit, static_argnames=("press", "target", "room", "shape"))
def recompress(cache, press: Press, target: int, room: int, shape: AttentionShape):
  """A `ScoredCache` (or `LayeredCache` of them) with `target` + `room` slots per (row, layer, kv
  head) holding the `target` tokens of each that `press` scores best among those `cache` holds
  (all of them when fewer), at their true positions; `lengths` unchanged."""
  if not isinstance(cache, ScoredCache):
    return cache.replace(layers=tuple(recompress(c, press, target, room, shape)
                                      for c in cache.layers))
  new = ScoredCache.init(n_layers=cache.n_layers, batch=cache.batch, kv_heads=cache.kv_heads,
                         head_dim=cache.head_dim, heavy=target, window=room,
                         dtype=cache.ring_k.dtype, scorer=Pressed(),
                         codec=cache.k.codec).replace(lengths=cache.lengths)
  view = cache.view()
  for layer in range(cache.n_layers):
    pos = view.positions[layer]  # [B, K, S]
    live = pos >= 0
    order = jnp.argsort(jnp.where(live, pos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
    pos = jnp.take_along_axis(pos, order, axis=-1)  # held tokens first, by position
    k = jnp.take_along_axis(view.keys[layer], order[..., None], axis=2)
    v = jnp.take_along_axis(view.values[layer], order[..., None], axis=2)
    n_valid = jnp.sum(live[:, 0], axis=-1).astype(jnp.int32)  # every head holds as many
    x = _inputs(shape, k, v, n_valid, jnp.maximum(pos, 0), layer, cache.n_layers)
    n_kept = jnp.minimum(n_valid, target)
    scores = press.score(x, n_kept).astype(jnp.float32)
    keep = topk_per_head(scores, n_kept, x.valid)
    new = admission.put_layer(new, layer, _kept(new, layer, keep, scores, k, v, pos))
  return new


def _kept(cache, layer: int, keep, scores, k, v, positions) -> Layer:
  """Layer `layer` of `cache` (empty) holding the kept candidates: keep bool [B, K, S], scores,
  positions [B, K, S], k, v [B, K, S, H], in position order in the first slots."""
  st = admission.take_layer(cache, layer)
  slot = jnp.broadcast_to(jnp.arange(keep.shape[-1], dtype=jnp.int32), keep.shape)
  index, live = _first_slots(keep, slot, cache.pool)  # [B, K, P]
  take = lambda a: _gather(a[..., None], index)[..., 0]
  kept_k = jnp.where(live[..., None], _gather(k, index), 0)
  kept_v = jnp.where(live[..., None], _gather(v, index), 0)
  return Layer(cache.k.codec.encode(kept_k), cache.v.codec.encode(kept_v), st.ring_k, st.ring_v,
               jnp.where(live, take(positions), -1), jnp.where(live, take(scores), 0.0), None)
